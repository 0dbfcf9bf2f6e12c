"""The control plane with a real key service: signed peer keys, pre-shared
keys delivered to both ends and rotated, node key rotation through the
stream, and forged keys left unsigned.

Every test runs under the "never in the open" guard (`secret_guard`, root
conftest): the KEKs, every secret they open in the store (pre-shared keys, the
authority's signing key, the CA key), the enrollment secrets and the agents'
tokens must appear in no log record (this process's or the key service's),
no raw etcd value and no span (the in-process control plane's, and the key
service process's, exported to the guard)."""

import asyncio
import base64
import os
from types import SimpleNamespace

import grpc
import pytest

from cptest import SimAgent, authed_channel, key, make_key, make_network, mint_token, wait_until
from meshgate.api.v1 import keys_pb2, keys_pb2_grpc, network_pb2, node_pb2
from meshgate.common import signing
from meshgate.common.config import ServerConfig
from meshgate.common.server import GrpcServer
from meshgate.common.testing import ServiceProcess, kek_line, keyservice_pki, write_kek_file
from meshgate.controlplane import sync
from meshgate.controlplane.api import ControlPlane


def new_keks(guard, *ids: str) -> dict[str, bytes]:
    """Fresh KEKs, known to the guard (it searches for them and opens the store with them)."""
    keks = {i: os.urandom(32) for i in ids}
    guard.keks.update(keks)
    return keks


KS = "/meshgate.api.v1.KeyService/"


@pytest.fixture
async def keyed(etcd, etcd_server, etcd_prefix, tmp_path, secret_guard):
    """A key service process and a control plane using it, on one etcd prefix."""
    kek_file = tmp_path / "kek"
    write_kek_file(kek_file, new_keks(secret_guard, "t1"))
    # The key service with mTLS, its certificates from the real offline command.
    pki = keyservice_pki(str(tmp_path / "pki"), etcd_server.endpoint, etcd_prefix, str(kek_file))
    ks = ServiceProcess(
        "meshgate-keyservice",
        ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix, "--kek-file", str(kek_file),
         *pki.server_args], credentials=pki.credentials(),
    ).start()
    app = ControlPlane(etcd, ks.target, keyservice_credentials=pki.credentials("controlplane"))
    await app.start()
    server = GrpcServer(ServerConfig(listen="127.0.0.1:0", shutdown_grace=0), app.bindings)
    port = await server.start()
    admin_token = await mint_token(app)
    secret_guard.add_token(admin_token)  # an API token is a secret like the others
    channel = authed_channel(f"127.0.0.1:{port}", admin_token)
    # The test calls the key service as the operator (rotations) and as the
    # control plane (pre-shared keys), with their certificates.
    ks_channel = grpc.aio.secure_channel(ks.target, pki.credentials("operator"))
    ks_cp_channel = grpc.aio.secure_channel(ks.target, pki.credentials("controlplane"))
    from meshgate.api.v1 import (
        agent_pb2_grpc,
        enrollment_pb2_grpc,
        external_client_pb2_grpc,
        network_pb2_grpc,
        node_pb2_grpc,
    )

    cp = SimpleNamespace()
    cp.clients = external_client_pb2_grpc.ExternalClientServiceStub(channel)
    cp.networks = network_pb2_grpc.NetworkServiceStub(channel)
    cp.nodes = node_pb2_grpc.NodeServiceStub(channel)
    cp.keys = enrollment_pb2_grpc.EnrollmentKeyServiceStub(channel)
    cp.agents = agent_pb2_grpc.AgentServiceStub(channel)
    cp.ks = keys_pb2_grpc.KeyServiceStub(ks_channel)
    cp.ks_as_cp = keys_pb2_grpc.KeyServiceStub(ks_cp_channel)
    cp.ks_proc, cp.etcd, cp.app, cp.kek_file, cp.guard = ks, etcd, app, kek_file, secret_guard
    cp.sim_agents = []
    try:
        yield cp
    finally:
        # Every pre-shared key delivered, rotated-away ones too (the store keeps only the current).
        for agent in cp.sim_agents:
            await agent.close()
            for msg in agent.received:
                peers = msg.snapshot.state.peers if msg.WhichOneof("message") == "snapshot" else msg.delta.delta.upserted_peers
                secret_guard.add(*(base64.b64decode(p.preshared_key) for p in peers if p.preshared_key))
        await channel.close()
        await ks_channel.close()
        await ks_cp_channel.close()
        await server.stop(0)
        await app.stop()
        ks.stop()
        secret_guard.process_logs.append(ks.log(tail=0))


async def _converged(cp) -> bool:
    st = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
    return st.converged_nodes == st.total_nodes == 2


async def enrolled(cp, agent):
    await agent.enroll()
    cp.guard.add_token(agent.token)
    cp.sim_agents.append(agent)
    return agent


async def two_agents(cp):
    # The calls below must make spans (the control plane's here, the key
    # service's in its process), for the guard to search them.
    cp.guard.expect_span("/meshgate.api.v1.AgentService/Enroll", "in-process", at_least=2)
    cp.guard.expect_span(KS + "RegisterNodeKey", "meshgate-keyservice", at_least=2)
    cp.guard.expect_span(KS + "IssuePresharedKeys", "meshgate-keyservice")
    await make_network(cp)
    ek = await make_key(cp)
    cp.guard.add_token(ek.secret)
    a = await (await enrolled(cp, SimAgent(cp.agents, ek.secret, "a", "192.0.2.1:51820"))).connect()
    b = await (await enrolled(cp, SimAgent(cp.agents, ek.secret, "b", "192.0.2.2:51820"))).connect()
    await wait_until(lambda: all(x.state is not None and len(x.state.peers) == 1 for x in (a, b)), "a and b peer")
    return a, b


async def test_peers_are_signed_and_share_one_psk(keyed):
    cp = keyed
    a, b = await two_agents(cp)
    try:
        assert a.authority and a.authority == b.authority
        await wait_until(lambda: all(x.state.peers[0].public_key_signature and x.state.peers[0].preshared_key for x in (a, b)),
                         "signatures and PSKs")
        pa, pb = a.state.peers[0], b.state.peers[0]
        assert signing.verify_any(a.authority, pa.resource, pa.public_key, pa.public_key_signature)
        assert signing.verify_any(b.authority, pb.resource, pb.public_key, pb.public_key_signature)
        assert pa.preshared_key == pb.preshared_key and len(base64.b64decode(pa.preshared_key)) == 32
        assert a.state.interface.public_key == a.public_key
    finally:
        await a.close()
        await b.close()


async def test_key_written_straight_into_etcd_is_not_signed(keyed):
    cp = keyed
    a, b = await two_agents(cp)
    try:
        await wait_until(lambda: a.state.peers[0].public_key_signature, "signed")
        # An attacker with etcd access replaces b's key in b's node record.
        kv = await cp.etcd.get(cp.etcd.key("nodes", "prod", "b"))
        node = node_pb2.Node.FromString(kv.value)
        node.public_key = key()
        await cp.etcd.put(kv.key, node.SerializeToString())
        await wait_until(lambda: a.state.peers[0].public_key == node.public_key, "a sees the forged key")
        assert a.state.peers[0].public_key_signature == b""
        # ... and a forged signature record for it does not verify.
        forged = keys_pb2.SignedNodeKey(node=node.name, public_key=node.public_key, signature=os.urandom(64))
        await cp.etcd.put(cp.etcd.key("keys", "nodes", "prod", "b"), forged.SerializeToString())
        await wait_until(lambda: a.state.peers[0].public_key_signature == forged.signature, "forged signature passed on")
        p = a.state.peers[0]
        assert not signing.verify_any(a.authority, p.resource, p.public_key, p.public_key_signature)
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("coalesced", [False, True], ids=["patched-at-once", "coalesced"])
async def test_psk_rotation_reaches_both_ends_and_kek_rotation_sends_nothing(keyed, coalesced, monkeypatch):
    """`coalesced`: every session counts as large (a hub's), so its new keys
    are gathered and sent in one delta a moment later (sync.PSK_COALESCE_PEERS)."""
    if coalesced:
        monkeypatch.setattr(sync, "PSK_COALESCE_PEERS", 0)
    cp = keyed
    a, b = await two_agents(cp)
    try:
        await wait_until(lambda: all(x.state.peers[0].preshared_key for x in (a, b)), "PSKs")
        old = a.state.peers[0].preshared_key
        await cp.ks.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(network="networks/prod"))
        await wait_until(lambda: all(x.state.peers[0].preshared_key not in ("", old) for x in (a, b)), "new PSK on both ends")
        assert a.state.peers[0].preshared_key == b.state.peers[0].preshared_key
        assert (cp.app.fanout._psk_later_task is not None) == coalesced  # the path taken
        # The rotation travels as a delta of just that peer, nothing else.
        last = a.received[-1].delta.delta
        assert [p.resource for p in last.upserted_peers] == ["networks/prod/nodes/b"]
        assert not (last.removed_peers or last.routes_changed or last.egress_changed or last.HasField("interface"))
        await wait_until(lambda: _converged(cp), "converged after the rotation")
        # Re-wrapping every secret under a new KEK changes no key: no message to anyone.
        sent = cp.app.fanout.messages_sent
        received = (len(a.received), len(b.received))
        # The operator adds the new KEK to the file, then rotates (online).
        with open(cp.kek_file, "a") as f:
            f.write(kek_line("t2", new_keks(cp.guard, "t2")["t2"]) + "\n")
        r = await cp.ks.RotateKeyEncryptionKey(keys_pb2.RotateKeyEncryptionKeyRequest(new_key_id="t2"))
        assert r.rewrapped >= 2
        st = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
        assert st.converged_nodes == 2 and not any(n.last_error for n in st.nodes)
        assert cp.app.fanout.messages_sent == sent and (len(a.received), len(b.received)) == received
        # The PSKs still come out of the re-wrapped store, and unchanged.
        got = await cp.ks_as_cp.IssuePresharedKeys(keys_pb2.IssuePresharedKeysRequest(
            network="networks/prod", pairs=["networks/prod/nodes/a|networks/prod/nodes/b"]))
        assert got.keys[0].key == a.state.peers[0].preshared_key
    finally:
        await a.close()
        await b.close()


async def test_an_unsolicited_new_key_is_refused(keyed):
    """Whoever holds an agent's credential cannot have the control plane sign
    and distribute their key: a NewKey nobody asked for changes nothing."""
    from meshgate.api.v1 import agent_pb2

    cp = keyed
    a, b = await two_agents(cp)
    try:
        before = await cp.nodes.GetNode(node_pb2.GetNodeRequest(name=a.node.name))
        await a._acks.put(agent_pb2.SyncRequest(new_key=agent_pb2.SyncRequest.NewKey(public_key=key())))

        async def refused():
            st = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
            return any("no key rotation was requested" in n.last_error for n in st.nodes)

        await wait_until(refused, "the refusal in the network status")
        after = await cp.nodes.GetNode(node_pb2.GetNodeRequest(name=a.node.name))
        assert after.public_key == before.public_key and after.etag == before.etag
        assert b.state.peers[0].public_key == before.public_key
    finally:
        await a.close()
        await b.close()


async def test_node_key_rotation_through_the_stream(keyed):
    cp = keyed
    a, b = await two_agents(cp)
    try:
        await cp.ks.RotateNodeKey(keys_pb2.RotateNodeKeyRequest(node=a.node.name))
        await wait_until(lambda: a.rotations_asked == 1, "a asked to rotate")
        new_key = key()
        from meshgate.api.v1 import agent_pb2

        await a._acks.put(agent_pb2.SyncRequest(new_key=agent_pb2.SyncRequest.NewKey(public_key=new_key)))
        await wait_until(lambda: a.state.interface.public_key == new_key and b.state.peers[0].public_key == new_key,
                         "a's state names its new key and b peers with it")
        p = b.state.peers[0]
        assert signing.verify_any(b.authority, p.resource, p.public_key, p.public_key_signature)
        node = await cp.nodes.GetNode(node_pb2.GetNodeRequest(name=a.node.name))
        assert node.public_key == new_key
    finally:
        await a.close()
        await b.close()


async def test_change_during_a_slow_connect_is_not_lost(keyed):
    """An agent connects while the key service is slow to hand out its pairs'
    keys, and a node joins meanwhile (a new peer for it) whose keys come fast:
    the connecting agent must end on the newest state (the connect's older
    snapshot must not be sent after the fan-out's newer one), and the status
    must say so."""
    import asyncio

    cp = keyed
    a, b = await two_agents(cp)
    ek = await make_key(cp, key_id="late")
    cp.guard.add_token(ek.secret)
    c = await enrolled(cp, SimAgent(cp.agents, ek.secret, "c"))
    km = cp.app.fanout.keys
    gate = asyncio.Event()
    real_ensure = km.ensure
    calls = 0

    async def slow_first_ensure(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:  # the connect's fetch is slow; the fan-out's are not
            await gate.wait()
        return await real_ensure(*args, **kwargs)

    km.ensure = slow_first_ensure
    d = SimAgent(cp.agents, ek.secret, "d")
    try:
        await c.connect()
        await wait_until(lambda: calls >= 1, "c's connect waits for its keys")
        await enrolled(cp, d)  # a new peer for c, while c's connect waits
        await asyncio.sleep(0.3)
        gate.set()
        await wait_until(lambda: c.state is not None and len(c.state.peers) == 3, "c peers with a, b and d")

        async def all_converged():
            st = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
            return st.total_nodes == 4 and all(n.converged for n in st.nodes if n.connected) and \
                sum(n.connected for n in st.nodes) == 3

        await wait_until(all_converged, "every connected node converged")
    finally:
        km.ensure = real_ensure
        gate.set()
        for x in (a, b, c):
            await x.close()


async def test_a_refused_key_change_leaves_every_signature_as_it_was(keyed):
    """The key service signs detached; the control plane records a signature
    only in the transaction that commits its key: refused updates and lost
    enrollment races leave no signature for a key a node does not hold."""
    import asyncio

    from google.protobuf import field_mask_pb2

    from meshgate.api.v1 import keys_pb2 as kpb

    cp = keyed
    a, b = await two_agents(cp)

    async def signed_key(node_id: str) -> str:
        kv = await cp.etcd.get(cp.etcd.key("keys", "nodes", "prod", node_id))
        return kpb.SignedNodeKey.FromString(kv.value).public_key

    try:
        assert await signed_key("b") == b.public_key
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
                node=node_pb2.Node(name=b.node.name, public_key=a.public_key),
                update_mask=field_mask_pb2.FieldMask(paths=["public_key"])))
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert await signed_key("b") == b.public_key and await signed_key("a") == a.public_key
        # Concurrent joins for one node id: one wins, and the signature is its key.
        ek = await make_key(cp, key_id="race")
        cp.guard.add_token(ek.secret)
        racers = [SimAgent(cp.agents, ek.secret, "dup") for _ in range(6)]
        results = await asyncio.gather(*(r.enroll() for r in racers), return_exceptions=True)
        winners = [r for r, res in zip(racers, results, strict=True) if not isinstance(res, BaseException)]
        assert len(winners) == 1, results
        for r, res in zip(racers, results, strict=True):
            if isinstance(res, BaseException):
                assert res.code() == grpc.StatusCode.ALREADY_EXISTS
            else:
                cp.guard.add_token(r.token)
        node = await cp.nodes.GetNode(node_pb2.GetNodeRequest(name="networks/prod/nodes/dup"))
        assert node.public_key == winners[0].public_key == await signed_key("dup")
    finally:
        await a.close()
        await b.close()


async def test_a_peer_deleted_while_keys_are_gathered_gets_no_key_again(keyed, monkeypatch):
    """Every session counts as large, and the gathering lasts a second: a
    rotation's new keys wait; meanwhile c is deleted (its pairs' keys with it)
    and a's pair with b rotates again. The gathered patch gives a and b their
    new key and issues none for c."""
    monkeypatch.setattr(sync, "PSK_COALESCE_PEERS", 0)
    monkeypatch.setattr(sync, "PSK_COALESCE_S", 1.0)
    cp = keyed
    a, b = await two_agents(cp)
    ek = await make_key(cp, key_id="k3")
    cp.guard.add_token(ek.secret)
    c = await (await enrolled(cp, SimAgent(cp.agents, ek.secret, "c", "192.0.2.3:51820"))).connect()
    try:
        await wait_until(lambda: all(x.state is not None and len(x.state.peers) == 2
                                     and all(p.preshared_key for p in x.state.peers) for x in (a, b, c)),
                         "three peers with keys")
        old = a.state.peers[0].preshared_key
        await cp.ks.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(network="networks/prod"))
        await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name=c.node.name))
        # A later key of a's, within the same gathering: merged with the first.
        await cp.ks.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(
            network="networks/prod", pairs=["networks/prod/nodes/a|networks/prod/nodes/b"]))
        await wait_until(lambda: [p.resource for p in a.state.peers] == ["networks/prod/nodes/b"]
                         and a.state.peers[0].preshared_key not in ("", old)
                         and a.state.peers[0].preshared_key == b.state.peers[0].preshared_key, "a and b rotated")
        await asyncio.sleep(sync.PSK_COALESCE_S + 0.5)  # past any gathered patch
        left = [k for k in await cp.etcd.dump() if b"/keys/psk/prod/" in k and b"c" in k.rsplit(b"/", 1)[1]]
        assert left == []
    finally:
        for x in (a, b, c):
            await x.close()
