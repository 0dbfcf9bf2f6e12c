"""Errors never echo unbounded input (issue 15, item 4).

A megabyte id, parent, name, label key or interface name used to be copied
into the status message and the BadRequest detail, whose trailer then exceeded
the client's metadata limit: the caller saw RESOURCE_EXHAUSTED ("Stream
removed") instead of INVALID_ARGUMENT. Through raw gRPC, with the default
client limits: the precise status, the violation naming the field, a bounded
trailer, and nothing stored.
"""

import grpc
import pytest
from grpc_status import rpc_status

from cptest import details, make_gateway, make_network, make_node, state_dump
from meshgate.api.v1 import egress_pb2, events_pb2, events_pb2_grpc, network_pb2, node_pb2

MB = 1 << 20
BIG = "a" * MB
# Short enough for the generic size limit, too long to echo whole.
MID = "b" * 6000

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def cases(big: str):
    gw = egress_pb2.EgressGateway(node="networks/prod/nodes/a", ranges=["198.51.100.0/24"])
    return {
        "network_id": (
            "networks", "CreateNetwork",
            network_pb2.CreateNetworkRequest(network_id=big, network=network_pb2.Network(ipv4_cidr="100.64.9.0/24")),
            "network_id"),
        "parent": ("nodes", "ListNodes", node_pb2.ListNodesRequest(parent=big), "parent"),
        "parent of create": ("nodes", "CreateNode", node_pb2.CreateNodeRequest(parent="networks/" + big, node_id="x"),
                             "parent"),
        "name": ("nodes", "GetNode", node_pb2.GetNodeRequest(name="networks/prod/nodes/" + big), "name"),
        "label key": (
            "networks", "CreateNetwork",
            network_pb2.CreateNetworkRequest(network_id="n2", network=network_pb2.Network(
                ipv4_cidr="100.64.9.0/24", labels={big: "v"})),
            "network.labels"),
        "egress_interface": (
            "egress", "CreateEgressGateway",
            egress_pb2.CreateEgressGatewayRequest(parent="networks/prod", egress_gateway_id="g2",
                                                  egress_gateway=_with(gw, egress_interface=big)),
            "egress_gateway.egress_interface"),
        "egress range": (
            "egress", "CreateEgressGateway",
            egress_pb2.CreateEgressGatewayRequest(parent="networks/prod", egress_gateway_id="g2",
                                                  egress_gateway=_with(gw, ranges=[big])),
            "egress_gateway.ranges[0]"),
        "egress node": (
            "egress", "CreateEgressGateway",
            egress_pb2.CreateEgressGatewayRequest(parent="networks/prod", egress_gateway_id="g2",
                                                  egress_gateway=_with(gw, node=big)),
            "egress_gateway.node"),
        "endpoint": ("nodes", "CreateNode", node_pb2.CreateNodeRequest(
            parent="networks/prod", node_id="x", node=node_pb2.Node(endpoint=big)), "node.endpoint"),
        "many bad tags": ("nodes", "CreateNode", node_pb2.CreateNodeRequest(
            parent="networks/prod", node_id="x", node=node_pb2.Node(tags=[big[: len(big) // 64]] * 30)), None),
    }


def _with(gw, **kw):
    out = egress_pb2.EgressGateway()
    out.CopyFrom(gw)
    for k, v in kw.items():
        if isinstance(v, list):
            del getattr(out, k)[:]
            getattr(out, k).extend(v)
        else:
            setattr(out, k, v)
    return out


@pytest.fixture
async def world(cp):
    await make_network(cp, "prod", "100.64.0.0/24")
    await make_node(cp, "prod", "a")
    await make_gateway(cp, "prod", "gw", "a", ["198.51.100.0/24"])
    return cp


@pytest.mark.parametrize("size", ["1MB", "6000"])
@pytest.mark.parametrize("case", sorted(cases("x")))
async def test_unbounded_input_is_invalid_argument_with_a_bounded_status(world, case, size):
    stub, method, request, field = cases(BIG if size == "1MB" else MID)[case]
    before = await state_dump(world.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await getattr(getattr(world, stub), method)(request)
    assert e.value.code() == INVALID, (e.value.code(), (e.value.details() or "")[:200])
    violations, reason = details(e.value)
    assert violations and reason in ("INVALID_FIELD", "CIDR_OVERLAP")
    if field is not None:
        assert any(f.startswith(field) for f in violations), violations
    status = rpc_status.from_call(e.value)
    assert status is not None
    # What reaches the caller is bounded, whatever the input's size.
    assert len(status.SerializeToString()) < 4096
    assert len(e.value.details()) <= 1024
    assert all(len(f) <= 256 and len(d) <= 512 for f, d in violations.items())
    assert await state_dump(world.etcd) == before


async def test_watch_with_a_huge_parent_is_invalid_argument(world):
    call = events_pb2_grpc.EventServiceStub(world.channel).Watch(events_pb2.WatchRequest(parent="networks/" + MID))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in call:
            break
    assert e.value.code() == INVALID
    violations, _ = details(e.value)
    assert "parent" in violations and len(violations["parent"]) <= 512


def test_errors_clip_what_they_carry():
    """The backstop in the error model itself: whatever a handler puts in an
    ApiError, its status stays small enough for any client's trailer limit."""
    from meshgate.common.errors import ApiError, FieldViolation, invalid_argument, not_found, shown

    assert shown("abc") == "'abc'"
    clipped = shown("x" * MB)
    assert len(clipped) < 120 and "1048576 characters" in clipped
    f, d = "f" * MB, "d" * MB
    err = invalid_argument([FieldViolation(f, d) for _ in range(1000)])
    st = err.to_status()
    assert len(st.SerializeToString()) < 4096 and len(st.message) <= 1024
    assert "more" in st.message  # says that violations were left out
    st = not_found("meshgate.io/Node", "n" * MB).to_status()
    assert len(st.SerializeToString()) < 4096
    st = ApiError(grpc.StatusCode.FAILED_PRECONDITION, "m" * MB, "R", metadata={"k": "v" * MB}).to_status()
    assert len(st.SerializeToString()) < 4096
