"""Egress gateway CRUD, HA ranges, overlap rules, references."""

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cptest import details, make_gateway, make_network, make_node, state_dump
from meshgate.api.v1 import egress_pb2, node_pb2


@pytest.fixture
async def net(cp):
    await make_network(cp, ipv6_cidr="fd00:64::/64")
    await make_node(cp, node_id="a")
    await make_node(cp, node_id="b")


async def test_create_defaults_nat_on_and_get(cp, net):
    gw = await make_gateway(cp, ranges=["198.51.100.0/24", "203.0.113.0/25"], priority=10)
    assert gw.name == "networks/prod/egressGateways/gw"
    assert gw.nat is True and gw.HasField("nat")
    got = await cp.egress.GetEgressGateway(egress_pb2.GetEgressGatewayRequest(name=gw.name))
    assert got == gw
    off = await make_gateway(cp, gw_id="nonat", node="b", ranges=["192.0.2.0/26"], nat=False)
    assert off.nat is False


async def test_identical_ranges_on_two_gateways_is_ha(cp, net):
    await make_gateway(cp, gw_id="primary", node="a", ranges=["198.51.100.0/24"], priority=100)
    second = await make_gateway(cp, gw_id="standby", node="b", ranges=["198.51.100.0/24"], priority=50)
    assert list(second.ranges) == ["198.51.100.0/24"]


async def test_partial_overlap_with_another_gateway_refused(cp, net):
    await make_gateway(cp, gw_id="one", ranges=["198.51.100.0/24"])
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await make_gateway(cp, gw_id="two", node="b", ranges=["198.51.100.128/25"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations, reason = details(e.value)
    assert reason == "CIDR_OVERLAP" and "egress_gateway.ranges[0]" in violations
    assert await state_dump(cp.etcd) == before


async def test_internet_gateway_without_ranges(cp, net):
    gw = await make_gateway(cp, gw_id="inet", ranges=[], internet_gateway=True)
    assert gw.internet_gateway and not gw.ranges


async def test_update_ranges_with_mask_and_stale_etag(cp, net):
    gw = await make_gateway(cp)
    out = await cp.egress.UpdateEgressGateway(
        egress_pb2.UpdateEgressGatewayRequest(
            egress_gateway=egress_pb2.EgressGateway(name=gw.name, ranges=["203.0.113.0/24"], nat=False, etag=gw.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["ranges", "nat"]),
        )
    )
    assert list(out.ranges) == ["203.0.113.0/24"] and out.nat is False
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.egress.UpdateEgressGateway(
            egress_pb2.UpdateEgressGatewayRequest(
                egress_gateway=egress_pb2.EgressGateway(name=gw.name, priority=5, etag=gw.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["priority"]),
            )
        )
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert await state_dump(cp.etcd) == before


async def test_move_gateway_to_other_node(cp, net):
    gw = await make_gateway(cp)
    out = await cp.egress.UpdateEgressGateway(
        egress_pb2.UpdateEgressGatewayRequest(
            egress_gateway=egress_pb2.EgressGateway(name=gw.name, node="networks/prod/nodes/b"),
            update_mask=field_mask_pb2.FieldMask(paths=["node"]),
        )
    )
    assert out.node == "networks/prod/nodes/b"


async def test_list_and_delete(cp, net):
    for i in range(3):
        await make_gateway(cp, gw_id=f"g{i}", ranges=[f"198.51.100.{i * 64}/26"])
    r = await cp.egress.ListEgressGateways(egress_pb2.ListEgressGatewaysRequest(parent="networks/prod", page_size=2))
    assert [g.name.rsplit("/", 1)[1] for g in r.egress_gateways] == ["g0", "g1"] and r.next_page_token
    r2 = await cp.egress.ListEgressGateways(
        egress_pb2.ListEgressGatewaysRequest(parent="networks/prod", page_size=2, page_token=r.next_page_token)
    )
    assert [g.name.rsplit("/", 1)[1] for g in r2.egress_gateways] == ["g2"] and not r2.next_page_token
    await cp.egress.DeleteEgressGateway(egress_pb2.DeleteEgressGatewayRequest(name="networks/prod/egressGateways/g1"))
    r3 = await cp.egress.ListEgressGateways(egress_pb2.ListEgressGatewaysRequest(parent="networks/prod"))
    assert len(r3.egress_gateways) == 2


async def test_node_in_use_by_gateway_needs_force(cp, net):
    await make_gateway(cp, node="a")
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name="networks/prod/nodes/a"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await state_dump(cp.etcd) == before
    await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name="networks/prod/nodes/a", force=True))
    r = await cp.egress.ListEgressGateways(egress_pb2.ListEgressGatewaysRequest(parent="networks/prod"))
    assert not r.egress_gateways
