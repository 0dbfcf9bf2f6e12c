"""Node CRUD, address allocation and release, pagination, masks and etags."""

import ipaddress

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cptest import details, key, make_network, make_node, state_dump
from meshgate.api.v1 import node_pb2


async def test_create_allocates_lowest_free_addresses_in_both_families(cp):
    await make_network(cp, ipv6_cidr="fd00:64::/120")
    a = await make_node(cp, node_id="a", tags=["web"], endpoint="192.0.2.10:51820", public_key=key())
    b = await make_node(cp, node_id="b")
    assert (a.ipv4_address, a.ipv6_address) == ("100.64.0.1", "fd00:64::1")
    assert (b.ipv4_address, b.ipv6_address) == ("100.64.0.2", "fd00:64::2")
    assert a.state == node_pb2.Node.PENDING
    assert a.public_key_create_time.seconds > 0
    got = await cp.nodes.GetNode(node_pb2.GetNodeRequest(name=a.name))
    assert got == a


async def test_requested_address_is_honoured_once(cp):
    await make_network(cp)
    n = await make_node(cp, node_id="a", ipv4_address="100.64.0.77")
    assert n.ipv4_address == "100.64.0.77"
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await make_node(cp, node_id="b", ipv4_address="100.64.0.77")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert details(e.value) == ({"node.ipv4_address": "100.64.0.77 is already used by networks/prod/nodes/a"}, "ADDRESS_IN_USE")
    assert await state_dump(cp.etcd) == before


async def test_delete_releases_addresses_and_key(cp):
    await make_network(cp)
    k = key()
    a = await make_node(cp, node_id="a", public_key=k)
    await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name=a.name))
    again = await make_node(cp, node_id="a2", public_key=k)
    assert again.ipv4_address == a.ipv4_address


async def test_small_range_is_exhausted_without_reserved_addresses(cp):
    await make_network(cp, cidr="100.64.0.0/29")  # 8 addresses, 6 usable
    got = [(await make_node(cp, node_id=f"n{i}")).ipv4_address for i in range(6)]
    assert got == [f"100.64.0.{i}" for i in range(1, 7)]
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await make_node(cp, node_id="n6")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(e.value)[1] == "ADDRESS_POOL_EXHAUSTED"
    assert await state_dump(cp.etcd) == before


async def test_public_key_unique_within_network(cp):
    await make_network(cp)
    k = key()
    await make_node(cp, node_id="a", public_key=k)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await make_node(cp, node_id="b", public_key=k)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "node.public_key" in details(e.value)[0]


async def test_list_pages(cp):
    await make_network(cp)
    for i in range(7):
        await make_node(cp, node_id=f"n{i}")
    names, token = [], ""
    while True:
        r = await cp.nodes.ListNodes(node_pb2.ListNodesRequest(parent="networks/prod", page_size=3, page_token=token))
        names += [n.name for n in r.nodes]
        token = r.next_page_token
        if not token:
            break
    assert names == [f"networks/prod/nodes/n{i}" for i in range(7)]
    # A token from one network's listing is refused for another's.
    await make_network(cp, "dev", "100.64.1.0/24")
    r = await cp.nodes.ListNodes(node_pb2.ListNodesRequest(parent="networks/prod", page_size=3))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.nodes.ListNodes(node_pb2.ListNodesRequest(parent="networks/dev", page_token=r.next_page_token))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_update_mask_and_key_rotation_moves_the_key_claim(cp):
    await make_network(cp)
    k1, k2 = key(), key()
    a = await make_node(cp, node_id="a", public_key=k1, tags=["x"])
    out = await cp.nodes.UpdateNode(
        node_pb2.UpdateNodeRequest(
            node=node_pb2.Node(name=a.name, public_key=k2, tags=["y", "z"], display_name="ignored", etag=a.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["public_key", "tags"]),
        )
    )
    assert (out.public_key, list(out.tags), out.display_name) == (k2, ["y", "z"], "")
    # The old key is free again, the new one is taken.
    await make_node(cp, node_id="b", public_key=k1)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await make_node(cp, node_id="c", public_key=k2)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_update_refuses_address_change_and_stale_etag(cp):
    await make_network(cp)
    a = await make_node(cp, node_id="a")
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.nodes.UpdateNode(
            node_pb2.UpdateNodeRequest(
                node=node_pb2.Node(name=a.name, ipv4_address="100.64.0.9"),
                update_mask=field_mask_pb2.FieldMask(paths=["ipv4_address"]),
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await cp.nodes.UpdateNode(
        node_pb2.UpdateNodeRequest(node=node_pb2.Node(name=a.name, display_name="v2"), update_mask=field_mask_pb2.FieldMask(paths=["display_name"]))
    )
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.nodes.UpdateNode(
            node_pb2.UpdateNodeRequest(
                node=node_pb2.Node(name=a.name, display_name="v3", etag=a.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            )
        )
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert await state_dump(cp.etcd) == before


async def test_addresses_never_reserved_in_v6_either(cp):
    await make_network(cp, cidr="100.64.0.0/30", ipv6_cidr="fd00::/120")
    n1 = await make_node(cp, node_id="a")
    n2 = await make_node(cp, node_id="b")
    v4 = ipaddress.ip_network("100.64.0.0/30")
    assert {n1.ipv4_address, n2.ipv4_address} == {"100.64.0.1", "100.64.0.2"}
    assert str(v4.broadcast_address) not in (n1.ipv4_address, n2.ipv4_address)
    assert {n1.ipv6_address, n2.ipv6_address} == {"fd00::1", "fd00::2"}
    # The /30 has two usable addresses: a third node is refused, never given .0 or .3.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await make_node(cp, node_id="c")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_one_address_in_two_spellings_is_one_claim(cp):
    await make_network(cp, ipv6_cidr="fd00::/64")
    a = await make_node(cp, node_id="a")
    assert a.ipv6_address == "fd00::1"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await make_node(cp, node_id="b", ipv6_address="FD00:0::1")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    c = await make_node(cp, node_id="c", ipv6_address="FD00:0:0::0:9")
    assert c.ipv6_address == "fd00::9"
