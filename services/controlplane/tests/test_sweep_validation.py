"""Ranges, endpoints and enums that cannot work are refused; what can be
written canonically is (issue 15, item 6).

Each was accepted and stored as sent: overlay ranges in loopback, multicast,
reserved, link-local or IPv4-mapped space, with a scope id or a zero-padded
prefix length; egress ranges in loopback or multicast space, or IPv6 in an
IPv4-only network; endpoints on the unspecified or loopback address, or with
a trailing newline; `default_policy = 99`. Through raw gRPC: INVALID_ARGUMENT
with a field violation naming the field and the reason, etcd unchanged; the
normalised forms are what Create returns and Get reads back.
"""

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cptest import details, key, make_gateway, make_network, make_node, state_dump
from meshgate.api.v1 import agent_pb2, egress_pb2, enrollment_pb2, network_pb2, node_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT
N, NO, E = network_pb2, node_pb2, egress_pb2


def net(nid="n2", **kw):
    kw.setdefault("ipv4_cidr", "100.64.50.0/24")
    return "networks", "CreateNetwork", N.CreateNetworkRequest(network_id=nid, network=N.Network(**kw))


def node(endpoint, nid="x"):
    return "nodes", "CreateNode", NO.CreateNodeRequest(parent="networks/prod", node_id=nid,
                                                       node=NO.Node(endpoint=endpoint))


def gw(*ranges):
    return "egress", "CreateEgressGateway", E.CreateEgressGatewayRequest(
        parent="networks/prod", egress_gateway_id="g2",
        egress_gateway=E.EgressGateway(node="networks/prod/nodes/a", ranges=list(ranges)))


CASES = {
    # overlay ranges: (request, field, a word the reason must hold)
    "overlay loopback": (net(ipv4_cidr="127.0.0.0/24"), "network.ipv4_cidr", "loopback"),
    "overlay multicast": (net(ipv4_cidr="224.0.0.0/24"), "network.ipv4_cidr", "multicast"),
    "overlay reserved/broadcast": (net(ipv4_cidr="255.255.255.0/24"), "network.ipv4_cidr", "reserved"),
    "overlay this-network": (net(ipv4_cidr="0.0.0.0/24"), "network.ipv4_cidr", "this network"),
    "overlay v4 link-local": (net(ipv4_cidr="169.254.0.0/24"), "network.ipv4_cidr", "link-local"),
    "overlay v6 link-local": (net(ipv6_cidr="fe80::/64"), "network.ipv6_cidr", "link-local"),
    "overlay v6 multicast": (net(ipv6_cidr="ff00::/64"), "network.ipv6_cidr", "multicast"),
    "overlay v4-mapped": (net(ipv6_cidr="::ffff:0:0/96"), "network.ipv6_cidr", "IPv4-mapped"),
    "overlay v6 loopback": (net(ipv6_cidr="::/120"), "network.ipv6_cidr", "loopback"),
    "overlay scope id": (net(ipv6_cidr="fd00::%eth0/64"), "network.ipv6_cidr", "scope"),
    "overlay octal-looking octet": (net(ipv4_cidr="100.070.0.0/24"), "network.ipv4_cidr", "leading zero"),
    "overlay with spaces": (net(ipv4_cidr=" 100.64.50.0/24"), "network.ipv4_cidr", "CIDR"),
    # egress ranges
    "egress loopback": (gw("127.0.0.0/8"), "egress_gateway.ranges[0]", "loopback"),
    "egress multicast": (gw("224.0.0.0/4"), "egress_gateway.ranges[0]", "multicast"),
    "egress inside multicast": (gw("198.51.100.0/24", "239.1.0.0/16"), "egress_gateway.ranges[1]", "multicast"),
    "egress v4 link-local": (gw("169.254.0.0/16"), "egress_gateway.ranges[0]", "link-local"),
    "egress v6 link-local": (gw("fe80::/10"), "egress_gateway.ranges[0]", "link-local"),
    "egress v6 in a v4-only network": (gw("2001:db8::/64"), "egress_gateway.ranges[0]", "IPv6"),
    "egress scope id": (gw("fd00::%eth0/64"), "egress_gateway.ranges[0]", "scope"),
    # endpoints
    "endpoint unspecified": (node("0.0.0.0:51820"), "node.endpoint", "unspecified"),
    "endpoint v6 unspecified": (node("[::]:51820"), "node.endpoint", "unspecified"),
    "endpoint loopback": (node("[::1]:51820"), "node.endpoint", "loopback"),
    "endpoint v4 loopback": (node("127.0.0.1:51820"), "node.endpoint", "loopback"),
    "endpoint multicast": (node("224.0.0.1:51820"), "node.endpoint", "multicast"),
    "endpoint trailing newline": (node("192.0.2.1:51820\n"), "node.endpoint", "host:port"),
    "endpoint host trailing newline": (node("gw.example.com:51820\n"), "node.endpoint", "host:port"),
    # enums
    "default_policy 99": (net(default_policy=99), "network.default_policy", "DefaultPolicy"),
    "default_policy 99 on update": (
        ("networks", "UpdateNetwork", N.UpdateNetworkRequest(
            network=N.Network(name="networks/prod", default_policy=99),
            update_mask=field_mask_pb2.FieldMask(paths=["default_policy"]))),
        "network.default_policy", "DefaultPolicy"),
}


@pytest.fixture
async def world(cp):
    await make_network(cp, "prod", "100.64.0.0/24")
    await make_node(cp, "prod", "a", public_key=key())
    await make_gateway(cp, "prod", "gw", "a", ["198.51.100.0/24"])
    return cp


@pytest.mark.parametrize("case", sorted(CASES))
async def test_what_cannot_work_is_refused_naming_the_field_and_why(world, case):
    (stub, method, request), field, why = CASES[case]
    before = await state_dump(world.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await getattr(getattr(world, stub), method)(request)
    assert e.value.code() == INVALID, (e.value.code(), e.value.details())
    violations, _ = details(e.value)
    assert field in violations, violations
    assert why.lower() in violations[field].lower(), violations[field]
    assert await state_dump(world.etcd) == before


async def test_an_enrolling_agent_with_a_loopback_endpoint_is_refused(world):
    k = await world.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
        parent="networks/prod", enrollment_key_id="k", enrollment_key=enrollment_pb2.EnrollmentKey()))
    before = await state_dump(world.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await world.agents.Enroll(agent_pb2.EnrollRequest(enrollment_secret=k.secret, node_id="z",
                                                          public_key=key(), endpoint="127.0.0.1:51820"))
    assert e.value.code() == INVALID
    assert "loopback" in details(e.value)[0]["endpoint"]
    assert await state_dump(world.etcd) == before


@pytest.mark.parametrize("given,stored", [
    ("100.70.0.0/024", "100.70.0.0/24"),
    ("100.70.0.0/0024", "100.70.0.0/24"),
])
async def test_a_zero_padded_prefix_length_is_normalised(world, given, stored):
    made = await make_network(world, "n3", given)
    assert made.ipv4_cidr == stored
    assert (await world.networks.GetNetwork(N.GetNetworkRequest(name="networks/n3"))).ipv4_cidr == stored


async def test_ipv6_ranges_are_stored_in_canonical_form(world):
    made = await make_network(world, "n4", "100.64.60.0/24", ipv6_cidr="FD00:0064:0:0::/64")
    assert made.ipv6_cidr == "fd00:64::/64"
    g = await world.egress.CreateEgressGateway(E.CreateEgressGatewayRequest(
        parent="networks/prod", egress_gateway_id="g3",
        egress_gateway=E.EgressGateway(node="networks/prod/nodes/a", ranges=["203.0.113.0/024"])))
    assert list(g.ranges) == ["203.0.113.0/24"]
    got = await world.egress.GetEgressGateway(E.GetEgressGatewayRequest(name=g.name))
    assert list(got.ranges) == ["203.0.113.0/24"]


async def test_what_can_work_is_still_accepted(world):
    """The refusals are exact: ordinary ranges and endpoints go through."""
    await make_network(world, "ok", "10.20.0.0/16", ipv6_cidr="fd00:20::/64")
    await make_node(world, "prod", "b", endpoint="192.0.2.7:51820")
    await make_node(world, "prod", "c", endpoint="[2001:db8::7]:51820")
    await make_node(world, "prod", "d", endpoint="gw.example.com:51820")
    await make_gateway(world, "prod", "lan", "a", ["192.168.0.0/16", "10.0.0.0/8"])
    await make_node(world, "ok", "e")
    await make_gateway(world, "ok", "v6", "e", ["2001:db8:1::/48", "203.0.113.0/24"])
