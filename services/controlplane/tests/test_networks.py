"""Network CRUD, pagination, field masks and etags through a real gRPC channel."""

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from cptest import details, make_network, make_node, state_dump
from meshgate.api.v1 import network_pb2


async def test_create_applies_defaults_and_get_returns_it(cp):
    net = await make_network(cp, cidr="100.64.0.0/24", display_name="Production", ipv6_cidr="fd00:64::/64")
    assert net.name == "networks/prod"
    assert (net.listen_port, net.mtu, net.persistent_keepalive.seconds) == (51820, 1420, 25)
    assert net.default_policy == network_pb2.ALLOW
    assert net.uid and net.etag and net.create_time.seconds > 0
    got = await cp.networks.GetNetwork(network_pb2.GetNetworkRequest(name="networks/prod"))
    assert got == net


async def test_create_validate_only_stores_nothing(cp):
    before = await state_dump(cp.etcd)
    net = await cp.networks.CreateNetwork(
        network_pb2.CreateNetworkRequest(
            network_id="dry", network=network_pb2.Network(ipv4_cidr="100.64.1.0/24"), validate_only=True
        )
    )
    assert net.name == "networks/dry"
    assert await state_dump(cp.etcd) == before


async def test_duplicate_name_is_already_exists(cp):
    await make_network(cp)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await make_network(cp, cidr="100.64.9.0/24")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_list_pages_through_every_network_once_in_order(cp):
    ids = [f"n{i:02d}" for i in range(23)]
    for i, nid in enumerate(ids):
        await make_network(cp, nid, f"100.64.{i}.0/24")
    seen, token, pages = [], "", 0
    while True:
        resp = await cp.networks.ListNetworks(network_pb2.ListNetworksRequest(page_size=5, page_token=token))
        seen += [n.name for n in resp.networks]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert seen == [f"networks/{i}" for i in ids]
    assert pages == 5


async def test_list_refuses_foreign_page_token(cp):
    await make_network(cp, "a", "100.64.0.0/24")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.networks.ListNetworks(network_pb2.ListNetworksRequest(page_token="not-a-token"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in details(e.value)[0]


async def test_update_with_mask_changes_only_named_fields(cp):
    net = await make_network(cp, display_name="old", description="keep me")
    upd = network_pb2.Network(name=net.name, display_name="new", description="ignored", mtu=1380)
    out = await cp.networks.UpdateNetwork(
        network_pb2.UpdateNetworkRequest(network=upd, update_mask=field_mask_pb2.FieldMask(paths=["display_name", "mtu"]))
    )
    assert (out.display_name, out.description, out.mtu) == ("new", "keep me", 1380)
    assert out.etag != net.etag
    assert out.update_time.ToNanoseconds() > net.update_time.ToNanoseconds()
    got = await cp.networks.GetNetwork(network_pb2.GetNetworkRequest(name=net.name))
    assert got == out


async def test_update_keepalive_duration_and_labels(cp):
    net = await make_network(cp)
    upd = network_pb2.Network(name=net.name, persistent_keepalive=duration_pb2.Duration(seconds=0), labels={"env": "prod"})
    out = await cp.networks.UpdateNetwork(
        network_pb2.UpdateNetworkRequest(
            network=upd, update_mask=field_mask_pb2.FieldMask(paths=["persistent_keepalive", "labels"])
        )
    )
    assert out.persistent_keepalive.seconds == 0 and out.HasField("persistent_keepalive")
    assert dict(out.labels) == {"env": "prod"}


async def test_update_refuses_immutable_and_unknown_paths(cp):
    net = await make_network(cp)
    before = await state_dump(cp.etcd)
    for path in ("ipv4_cidr", "uid", "nonsense"):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await cp.networks.UpdateNetwork(
                network_pb2.UpdateNetworkRequest(
                    network=network_pb2.Network(name=net.name, ipv4_cidr="100.65.0.0/24"),
                    update_mask=field_mask_pb2.FieldMask(paths=[path]),
                )
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "update_mask.paths[0]" in details(e.value)[0]
    assert await state_dump(cp.etcd) == before


async def test_stale_etag_is_aborted_and_changes_nothing(cp):
    net = await make_network(cp)
    fresh = await cp.networks.UpdateNetwork(
        network_pb2.UpdateNetworkRequest(
            network=network_pb2.Network(name=net.name, display_name="v2", etag=net.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    )
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.networks.UpdateNetwork(
            network_pb2.UpdateNetworkRequest(
                network=network_pb2.Network(name=net.name, display_name="v3", etag=net.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            )
        )
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert details(e.value)[1] == "ETAG_MISMATCH"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.networks.DeleteNetwork(network_pb2.DeleteNetworkRequest(name=net.name, etag=net.etag))
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert await state_dump(cp.etcd) == before
    await cp.networks.DeleteNetwork(network_pb2.DeleteNetworkRequest(name=net.name, etag=fresh.etag))


async def test_delete_then_get_is_not_found(cp):
    net = await make_network(cp)
    await cp.networks.DeleteNetwork(network_pb2.DeleteNetworkRequest(name=net.name))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.networks.GetNetwork(network_pb2.GetNetworkRequest(name=net.name))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_with_nodes_needs_force_and_force_leaves_no_orphans(cp):
    await make_network(cp, "other", "100.64.5.0/24")
    other_keys = await state_dump(cp.etcd)
    await make_network(cp, "prod", "100.64.0.0/24", ipv6_cidr="fd00::/64")
    from cptest import key, make_gateway

    await make_node(cp, "prod", "a", public_key=key())
    await make_node(cp, "prod", "b")
    await make_gateway(cp, "prod", "gw", "a")
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.networks.DeleteNetwork(network_pb2.DeleteNetworkRequest(name="networks/prod"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(e.value)[1] == "RESOURCE_IN_USE"
    assert await state_dump(cp.etcd) == before

    await cp.networks.DeleteNetwork(network_pb2.DeleteNetworkRequest(name="networks/prod", force=True))
    after = await state_dump(cp.etcd)
    assert not [k for k in after if b"prod" in k], "forced delete left keys of the network behind"
    # Only the global guard's value (bumped) may differ from before the network existed.
    assert set(after) == set(other_keys)


async def test_network_status_lists_nodes(cp):
    await make_network(cp)
    await make_node(cp, "prod", "a")
    st = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
    assert st.total_nodes == 1 and st.nodes[0].node == "networks/prod/nodes/a"
    assert not st.nodes[0].converged


async def test_forced_delete_removes_key_service_material_of_that_network_only(cp):
    await make_network(cp, "a", "100.64.0.0/24")
    await make_network(cp, "ab", "100.64.1.0/24")
    e, t = cp.etcd, cp.etcd.txn_ops
    planted = [e.key("keys", c, net, "x") for c in ("psk", "nodes", "nodeRotation", "clients") for net in ("a", "ab")]
    planted += [e.key("keys", "rotation", "a"), e.key("keys", "rotation", "ab")]
    await e.txn([], [t.put(k, b"sealed") for k in planted])
    await cp.networks.DeleteNetwork(network_pb2.DeleteNetworkRequest(name="networks/a", force=True))
    left = set(await e.dump())
    assert all(k not in left for k in planted if b"/a/" in k or k.endswith(b"/rotation/a"))
    assert all(k in left for k in planted if b"/ab/" in k or k.endswith(b"/rotation/ab"))
