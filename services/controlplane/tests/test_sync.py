"""The agent stream: snapshot then deltas, acks and convergence status, auth,
fan-out only to affected nodes, two replicas, slow agents."""

import asyncio

import grpc
import pytest

from cptest import SimAgent, authed_channel, make_gateway, make_key, make_network, mint_token, wait_until
from meshgate.api.v1 import agent_pb2, agent_pb2_grpc, network_pb2, node_pb2, policy_pb2
from meshgate.api.v1 import desired_state_pb2 as ds
from meshgate.common.config import ServerConfig
from meshgate.common.etcd import Etcd
from meshgate.common.server import GrpcServer
from meshgate.controlplane import sync
from meshgate.controlplane.api import ControlPlane


async def status(cp, name="networks/prod"):
    return await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name=name))


async def all_converged(cp, n):
    st = await status(cp)
    return st.total_nodes == n and st.converged_nodes == n


async def test_snapshot_then_delta_then_converged(cp):
    await make_network(cp)
    ek = await make_key(cp)
    a = await (await SimAgent(cp.agents, ek.secret, "a", "192.0.2.1:51820").enroll()).connect()
    try:
        await wait_until(lambda: a.state is not None, "snapshot")
        assert a.received[0].WhichOneof("message") == "snapshot"
        assert list(a.state.interface.addresses) == ["100.64.0.1/24"] and not a.state.peers
        b = await (await SimAgent(cp.agents, ek.secret, "b", "192.0.2.2:51820").enroll()).connect()
        try:
            await wait_until(lambda: a.state is not None and len(a.state.peers) == 1, "delta with b")
            assert a.received[-1].WhichOneof("message") == "delta"
            peer = a.state.peers[0]
            assert (peer.public_key, peer.endpoint, list(peer.allowed_ips)) == (b.public_key, "192.0.2.2:51820", ["100.64.0.2/32"])
            await wait_until(lambda: all_converged(cp, 2), "both nodes converged")
            st = await status(cp)
            assert all(n.connected and n.applied_revision >= n.desired_revision for n in st.nodes)
            # A gateway on b: a's desired state changes (route), the status says
            # not converged until a acks, then converged again.
            a.auto_ack = False
            await make_gateway(cp, node="b", ranges=["198.51.100.0/24"])
            await wait_until(lambda: any(r.destination == "198.51.100.0/24" for r in a.state.routes), "route via b")
            st = await status(cp)
            a_status = next(n for n in st.nodes if n.node.endswith("/a"))
            assert not a_status.converged
            await a._acks.put(agent_pb2.SyncRequest(ack=agent_pb2.SyncRequest.Ack(revision=a.state.revision)))
            await wait_until(lambda: all_converged(cp, 2), "converged after ack")
        finally:
            await b.close()
    finally:
        await a.close()


async def test_failed_apply_is_reported_in_status(cp):
    await make_network(cp)
    ek = await make_key(cp)
    a = await (await SimAgent(cp.agents, ek.secret, "a", ack=False).enroll()).connect()
    try:
        await wait_until(lambda: a.state is not None, "snapshot")
        from google.rpc import status_pb2

        await a._acks.put(agent_pb2.SyncRequest(ack=agent_pb2.SyncRequest.Ack(
            revision=a.state.revision, status=status_pb2.Status(code=13, message="nft: No such file or directory"))))

        async def reported():
            n = (await status(cp)).nodes[0]
            return n.last_error == "nft: No such file or directory" and not n.converged

        await wait_until(reported, "error in status")
    finally:
        await a.close()


async def test_stream_needs_its_own_credential(cp):
    await make_network(cp)
    ek = await make_key(cp)
    a = await SimAgent(cp.agents, ek.secret, "a").enroll()
    b = await SimAgent(cp.agents, ek.secret, "b").enroll()

    async def first_error(token, node):
        async def reqs():
            yield agent_pb2.SyncRequest(hello=agent_pb2.SyncRequest.Hello(node=node))
            await asyncio.sleep(5)

        call = cp.agents.Sync(reqs(), metadata=(("authorization", f"Bearer {token}"),))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call:
                pass
        return e.value.code()

    assert await first_error("mgat_prod.a." + "A" * 43, a.node.name) == grpc.StatusCode.UNAUTHENTICATED
    assert await first_error("nonsense", a.node.name) == grpc.StatusCode.UNAUTHENTICATED
    assert await first_error(a.token, b.node.name) == grpc.StatusCode.PERMISSION_DENIED


async def test_deleted_node_stream_is_closed(cp):
    await make_network(cp)
    ek = await make_key(cp)
    a = await (await SimAgent(cp.agents, ek.secret, "a").enroll()).connect()
    await wait_until(lambda: a.state is not None, "snapshot")
    await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name=a.node.name))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await a._task
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_hub_and_spoke_messages_match_affected_nodes(cp):
    await make_network(cp, cidr="100.64.0.0/22", default_policy=network_pb2.DENY)
    await cp.policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
        parent="networks/prod", access_policy_id="hub-spoke",
        access_policy=policy_pb2.AccessPolicy(sources=["tag:spoke"], destinations=["tag:hub"])))
    hub_key = await make_key(cp, key_id="hubs", tags=["hub"])
    spoke_key = await make_key(cp, key_id="spokes", tags=["spoke"])
    agents = []
    try:
        for i in range(2):
            agents.append(await (await SimAgent(cp.agents, hub_key.secret, f"hub{i}", f"192.0.2.{i + 1}:51820").enroll()).connect())
        for i in range(98):
            agents.append(await (await SimAgent(cp.agents, spoke_key.secret, f"s{i}").enroll()).connect())
        await wait_until(lambda: all_converged(cp, 100), "100 agents converged", timeout=60)
        hubs = agents[:2]
        assert all(len(h.state.peers) == 98 for h in hubs)
        counts = [len(ag.received) for ag in agents]
        sent = cp.app.fanout.messages_sent
        # One spoke joins: the spoke and the two hubs are affected, nobody else.
        new = await (await SimAgent(cp.agents, spoke_key.secret, "s-new").enroll()).connect()
        agents.append(new)
        await wait_until(lambda: all(len(h.state.peers) == 99 for h in hubs) and new.state is not None, "hubs and spoke updated")
        await wait_until(lambda: all_converged(cp, 101), "converged")
        assert cp.app.fanout.messages_sent - sent == 3
        assert [len(ag.received) - c for ag, c in zip(agents[:-1], counts, strict=True)] == [1, 1] + [0] * 98
        assert [p.resource for p in new.state.peers] == ["networks/prod/nodes/hub0", "networks/prod/nodes/hub1"]
    finally:
        await asyncio.gather(*(ag.close() for ag in agents))


@pytest.fixture
async def cp2(etcd_server, etcd_prefix):
    """A second control-plane replica on the same etcd prefix."""
    etcd = Etcd(etcd_server.endpoint, etcd_prefix)
    await etcd.connect()
    app = ControlPlane(etcd)
    await app.start()
    server = GrpcServer(ServerConfig(listen="127.0.0.1:0", shutdown_grace=0), app.bindings)
    port = await server.start()
    channel = authed_channel(f"127.0.0.1:{port}", await mint_token(app))
    yield agent_pb2_grpc.AgentServiceStub(channel)
    await channel.close()
    await server.stop(0)
    await app.stop()
    await etcd.close()


async def test_agents_on_either_replica_converge_on_change_made_through_the_other(cp, cp2):
    await make_network(cp)
    ek = await make_key(cp)
    a = await (await SimAgent(cp.agents, ek.secret, "a", "192.0.2.1:51820").enroll()).connect()
    b = await (await SimAgent(cp2, ek.secret, "b", "192.0.2.2:51820").enroll()).connect()
    try:
        await wait_until(lambda: all_converged(cp, 2), "converged")
        await make_gateway(cp, node="a", ranges=["198.51.100.0/24"])  # through replica 1
        await wait_until(lambda: any(r.destination == "198.51.100.0/24" for r in b.state.routes), "b (on replica 2) routes via a")
        await wait_until(lambda: all_converged(cp, 2), "converged after the change")
        assert len(a.state.egress) == 1 and a.state.egress[0].nat
    finally:
        await a.close()
        await b.close()


def test_slow_agent_queue_overflow_becomes_one_snapshot():
    s = sync.Session("networks/n/nodes/a")
    for rev in range(1, sync.QUEUE_SIZE + 30):
        st = ds.DesiredState(node=s.node, revision=rev)
        st.interface.mtu = 1280 + rev
        s.push(st, "")
    assert s.overflows >= 1
    assert s.queue.qsize() <= sync.QUEUE_SIZE
    msgs = [s.queue.get_nowait() for _ in range(s.queue.qsize())]
    # After the overflow the agent first gets a snapshot, then deltas on top of it.
    first_snapshot = next(i for i, m in enumerate(msgs) if m.WhichOneof("message") == "snapshot")
    assert all(m.delta.delta.base_revision == msgs[i - 1].revision for i, m in enumerate(msgs) if i > first_snapshot)
    assert msgs[-1].revision == sync.QUEUE_SIZE + 29
