"""Every class of bad input gets its precise status and field violations, and
etcd holds exactly what it held before (snapshot of the test's keyspace)."""

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cptest import audit_records, details, key, make_gateway, make_network, make_node, state_dump
from meshgate.api.v1 import egress_pb2, network_pb2, node_pb2

N = network_pb2
NO = node_pb2
E = egress_pb2
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def net_req(nid="n2", **kw):
    kw.setdefault("ipv4_cidr", "100.64.50.0/24")
    return ("networks", "CreateNetwork", N.CreateNetworkRequest(network_id=nid, network=N.Network(**kw)))


def node_req(nid="x", parent="networks/prod", **kw):
    return ("nodes", "CreateNode", NO.CreateNodeRequest(parent=parent, node_id=nid, node=NO.Node(**kw)))


def gw_req(gid="g2", node="networks/prod/nodes/a", ranges=("203.0.113.0/24",), parent="networks/prod", **kw):
    return (
        "egress",
        "CreateEgressGateway",
        E.CreateEgressGatewayRequest(
            parent=parent, egress_gateway_id=gid, egress_gateway=E.EgressGateway(node=node, ranges=list(ranges), **kw)
        ),
    )


CASES = {
    # names and ids
    "network id with uppercase": (net_req("Prod"), INVALID, "network_id"),
    "network id missing": (net_req(""), INVALID, "network_id"),
    "network id too long": (net_req("a" * 64), INVALID, "network_id"),
    "node id with slash": (node_req("a/b"), INVALID, "node_id"),
    "malformed parent": (node_req(parent="prod"), INVALID, "parent"),
    "malformed get name": (("nodes", "GetNode", NO.GetNodeRequest(name="networks/prod/node/a")), INVALID, "name"),
    # CIDRs
    "cidr not a cidr": (net_req(ipv4_cidr="banana"), INVALID, "network.ipv4_cidr"),
    "cidr host bits": (net_req(ipv4_cidr="100.64.50.1/24"), INVALID, "network.ipv4_cidr"),
    "cidr missing": (net_req(ipv4_cidr=""), INVALID, "network.ipv4_cidr"),
    "cidr wrong family": (net_req(ipv4_cidr="fd00::/64"), INVALID, "network.ipv4_cidr"),
    "cidr too small": (net_req(ipv4_cidr="100.64.50.0/31"), INVALID, "network.ipv4_cidr"),
    "v6 cidr wrong family": (net_req(ipv6_cidr="100.64.0.0/24"), INVALID, "network.ipv6_cidr"),
    "network overlaps another": (net_req(ipv4_cidr="100.64.0.128/25"), INVALID, "network.ipv4_cidr"),
    "network v6 overlaps another": (net_req(ipv6_cidr="fd00:64::/80"), INVALID, "network.ipv6_cidr"),
    # other network fields
    "mtu too small": (net_req(mtu=500), INVALID, "network.mtu"),
    "listen port too big": (net_req(listen_port=70000), INVALID, "network.listen_port"),
    "display name too long": (net_req(display_name="x" * 129), INVALID, "network.display_name"),
    "description too long": (net_req(description="x" * 1025), INVALID, "network.description"),
    "bad label key": (net_req(labels={"Bad Key": "v"}), INVALID, "network.labels['Bad Key']"),
    # node fields
    "bad endpoint": (node_req(endpoint="192.0.2.1"), INVALID, "node.endpoint"),
    "endpoint port zero": (node_req(endpoint="192.0.2.1:0"), INVALID, "node.endpoint"),
    "bad public key": (node_req(public_key="not-base64!"), INVALID, "node.public_key"),
    "short public key": (node_req(public_key="AAAA"), INVALID, "node.public_key"),
    "bad tag": (node_req(tags=["Web Servers"]), INVALID, "node.tags[0]"),
    "too many tags": (node_req(tags=[f"t{i}" for i in range(33)]), INVALID, "node.tags"),
    "address outside range": (node_req(ipv4_address="100.65.0.1"), INVALID, "node.ipv4_address"),
    "network address requested": (node_req(ipv4_address="100.64.0.0"), INVALID, "node.ipv4_address"),
    "broadcast address requested": (node_req(ipv4_address="100.64.0.255"), INVALID, "node.ipv4_address"),
    "address in use": (node_req(ipv4_address="100.64.0.1"), grpc.StatusCode.ALREADY_EXISTS, "node.ipv4_address"),
    "node exists": (node_req("a"), grpc.StatusCode.ALREADY_EXISTS, None),
    "network missing for node": (node_req(parent="networks/nope"), grpc.StatusCode.NOT_FOUND, "parent"),
    # egress
    "egress overlaps network": (gw_req(ranges=["100.64.0.0/25"]), INVALID, "egress_gateway.ranges[0]"),
    "egress overlaps own v6 range": (gw_req(ranges=["fd00:64::/96"]), INVALID, "egress_gateway.ranges[0]"),
    "egress overlaps other gateway": (gw_req(ranges=["198.51.100.0/25"]), INVALID, "egress_gateway.ranges[0]"),
    "egress ranges overlap each other": (gw_req(ranges=["203.0.113.0/24", "203.0.113.64/26"]), INVALID, "egress_gateway.ranges[1]"),
    "egress range is default route": (gw_req(ranges=["0.0.0.0/0"]), INVALID, "egress_gateway.ranges[0]"),
    "egress no ranges": (gw_req(ranges=[]), INVALID, "egress_gateway.ranges"),
    "egress too many ranges": (gw_req(ranges=[f"10.{i // 256}.{i % 256}.0/24" for i in range(257)]), INVALID, "egress_gateway.ranges"),
    "egress bad interface": (gw_req(egress_interface="eth0/1"), INVALID, "egress_gateway.egress_interface"),
    "egress priority too high": (gw_req(priority=5000), INVALID, "egress_gateway.priority"),
    "egress missing node": (gw_req(node="networks/prod/nodes/ghost"), grpc.StatusCode.NOT_FOUND, "egress_gateway.node"),
    "egress node in other network": (gw_req(node="networks/other/nodes/a"), INVALID, "egress_gateway.node"),
    "egress node not a name": (gw_req(node="a"), INVALID, "egress_gateway.node"),
    "egress exists": (gw_req(gid="gw", ranges=["198.51.100.0/24"]), grpc.StatusCode.ALREADY_EXISTS, None),
    # updates and deletes
    "update unknown mask path": (
        ("networks", "UpdateNetwork", N.UpdateNetworkRequest(network=N.Network(name="networks/prod"), update_mask=field_mask_pb2.FieldMask(paths=["bogus"]))),
        INVALID, "update_mask.paths[0]",
    ),
    "update makes mtu invalid": (
        ("networks", "UpdateNetwork", N.UpdateNetworkRequest(network=N.Network(name="networks/prod", mtu=100), update_mask=field_mask_pb2.FieldMask(paths=["mtu"]))),
        INVALID, "network.mtu",
    ),
    "update missing network": (
        ("networks", "UpdateNetwork", N.UpdateNetworkRequest(network=N.Network(name="networks/ghost"), update_mask=field_mask_pb2.FieldMask(paths=["mtu"]))),
        grpc.StatusCode.NOT_FOUND, None,
    ),
    "update gateway into overlap": (
        ("egress", "UpdateEgressGateway", E.UpdateEgressGatewayRequest(
            egress_gateway=E.EgressGateway(name="networks/prod/egressGateways/gw", ranges=["100.64.0.0/24"]),
            update_mask=field_mask_pb2.FieldMask(paths=["ranges"]))),
        INVALID, "egress_gateway.ranges[0]",
    ),
    "delete network with nodes": (("networks", "DeleteNetwork", N.DeleteNetworkRequest(name="networks/prod")), grpc.StatusCode.FAILED_PRECONDITION, None),
    "delete missing node": (("nodes", "DeleteNode", NO.DeleteNodeRequest(name="networks/prod/nodes/ghost")), grpc.StatusCode.NOT_FOUND, None),
    "negative page size": (("nodes", "ListNodes", NO.ListNodesRequest(parent="networks/prod", page_size=-1)), INVALID, "page_size"),
}


@pytest.fixture
async def world(cp):
    await make_network(cp, "prod", "100.64.0.0/24", ipv6_cidr="fd00:64::/64")
    await make_network(cp, "other", "100.64.1.0/24")
    await make_node(cp, "prod", "a", public_key=key())
    await make_node(cp, "other", "a")
    await make_gateway(cp, "prod", "gw", "a", ["198.51.100.0/24"])
    return cp


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_input_is_refused_precisely_and_changes_nothing(world, case):
    (stub_name, method, request), code, field = CASES[case]
    before = await state_dump(world.etcd)
    audited = len(await audit_records(world.etcd))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await getattr(getattr(world, stub_name), method)(request)
    assert e.value.code() == code, e.value.details()
    assert "Traceback" not in (e.value.details() or "")
    violations, reason = details(e.value)
    if field is not None:
        assert field in violations, f"{field} not in {violations}"
    if code == INVALID:
        assert violations and reason in ("INVALID_FIELD", "CIDR_OVERLAP")
    assert await state_dump(world.etcd) == before
    # The refusal changed nothing but the audit log: a refused mutation leaves
    # one record with its status; a refused read leaves none.
    new = (await audit_records(world.etcd))[audited:]
    if method.startswith(("List", "Get")):
        assert new == []
    else:
        assert [(r.method.rsplit("/", 1)[1], r.status_code, r.principal) for r in new] == [
            (method, code.name, "tokens/test-admin")]
