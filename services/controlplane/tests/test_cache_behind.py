"""Streams starting while the control plane is under load (issue 18: at
10,000 agents, 2,176 Sync streams failed with INTERNAL). Two causes, each
reproduced here with real components:

- a state cache that lags etcd: the stream's start (and a status read) now
  answers UNAVAILABLE with reason CACHE_BEHIND and connects once the cache
  caught up; the lag is real, the cache's own watch consumer held at a gate;
- the replica's session lease expired (etcd too slow to take refreshes): the
  lease is replaced at once, every open session's key written again, and the
  stream starts; the expiry is real, the lease revoked in etcd.
"""

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cptest import SimAgent, details, key, make_key, make_network, make_node, wait_until
from meshgate.api.v1 import network_pb2, node_pb2
from meshgate.controlplane import nodes, sync
from meshgate.controlplane.api import ControlPlane as App


@pytest.fixture
def short_wait(monkeypatch):
    monkeypatch.setattr(sync, "CACHE_WAIT_S", 0.5)


def hold_cache(cache) -> asyncio.Event:
    """Hold the cache's watch consumer before it applies the next batch; set
    the returned event to let it go on."""
    gate = asyncio.Event()
    original = cache._apply

    async def gated(batch):
        await gate.wait()
        await original(batch)

    cache._apply = gated
    return gate


async def test_stream_start_on_a_lagging_cache_is_unavailable_then_connects(cp, short_wait):
    await make_network(cp)
    ek = await make_key(cp)
    a = await SimAgent(cp.agents, ek.secret, "a", "192.0.2.1:51820").enroll()
    await wait_until(lambda: cp.app.cache.state_of(a.node.name) is not None, "the cache holds a")
    gate = hold_cache(cp.app.cache)
    # Any write moves etcd past the cache.
    await cp.etcd.client.put(cp.etcd.key("test", "unrelated"), b"x")
    await a.connect()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await a._task
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    _, reason = details(e.value)
    assert reason == "CACHE_BEHIND"
    assert "catching up" in e.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details(e.value)[1] == "CACHE_BEHIND"

    gate.set()
    await a.connect()
    try:
        await wait_until(lambda: a.state is not None, "snapshot once the cache caught up")
        st = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
        assert [n.connected for n in st.nodes] == [True]
    finally:
        await a.close()


async def test_stream_start_after_the_session_lease_expired(cp):
    """The replica's session lease expires under load (etcd too slow to take
    refreshes): a stream starting before the lease is replaced used to fail
    with INTERNAL (etcd: requested lease not found). Now the lease is replaced
    at once, every open session's key written again, and the stream starts."""
    await make_network(cp)
    ek = await make_key(cp)
    a = await (await SimAgent(cp.agents, ek.secret, "a", "192.0.2.1:51820").enroll()).connect()
    b = await SimAgent(cp.agents, ek.secret, "b", "192.0.2.2:51820").enroll()
    try:
        await wait_until(lambda: a.state is not None, "a's snapshot")
        fanout = cp.app.fanout
        old = fanout.lease
        await cp.etcd.client.revoke_lease(old.id)  # what expiry does: the lease and its keys are gone
        sessions = cp.etcd.key("sessions", "prod", "")
        kvs, _ = await cp.etcd.list_prefix(sessions)
        assert kvs == []
        await b.connect()
        await wait_until(lambda: b.state is not None, "b's snapshot after the lease was replaced")
        assert fanout.lease is not old
        kvs, _ = await cp.etcd.list_prefix(sessions)
        assert sorted(kv.key.rsplit(b"/", 1)[1] for kv in kvs) == [b"a", b"b"]  # a's key written again
        info = await cp.etcd.client.get_lease_info(fanout.lease.id)
        assert sorted(info.keys) == sorted(kv.key for kv in kvs)  # on the new lease
    finally:
        await b.close()
        await a.close()


def move_key(name: str, etag: str, new_key: str) -> node_pb2.UpdateNodeRequest:
    return node_pb2.UpdateNodeRequest(
        node=node_pb2.Node(name=name, public_key=new_key, etag=etag),
        update_mask=field_mask_pb2.FieldMask(paths=["public_key"]),
    )


async def test_a_key_freed_by_this_replicas_update_is_free_at_once(cp, monkeypatch):
    monkeypatch.setattr(nodes, "CACHE_WAIT_S", 0.3)
    await make_network(cp)
    k1, k2 = key(), key()
    a = await make_node(cp, node_id="a", public_key=k1)
    await wait_until(lambda: cp.app.cache.state_of(a.name) is not None, "the cache holds a")
    gate = hold_cache(cp.app.cache)
    try:
        await cp.nodes.UpdateNode(move_key(a.name, a.etag, k2))
        b = await make_node(cp, node_id="b", public_key=k1)  # the cache still says a holds k1
        assert b.public_key == k1
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await make_node(cp, node_id="c", public_key=k2)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "networks/prod/nodes/a" in e.value.details()
    finally:
        gate.set()


async def test_a_key_freed_through_another_replica_is_free_at_once(cp, etcd):
    await make_network(cp)
    k1, k2 = key(), key()
    a = await make_node(cp, node_id="a", public_key=k1)
    await wait_until(lambda: cp.app.cache.state_of(a.name) is not None, "the cache holds a")
    other = App(etcd)
    await other.start()
    gate = hold_cache(cp.app.cache)
    try:
        await other.nodes.update(move_key(a.name, a.etag, k2))
        b = await make_node(cp, node_id="b", public_key=k1)  # this replica's cache has not seen it
        assert b.public_key == k1
    finally:
        gate.set()
        await other.stop()
