"""The scheduler under election: one leader, due rotations exactly once, resumption after a crash."""

from __future__ import annotations

import asyncio
import base64
import signal
import time

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from meshgate.api.v1 import external_client_pb2, keys_pb2, keys_pb2_grpc, node_pb2
from meshgate.common.testing import ServiceProcess
from meshgate.keyservice.election import Election
from meshgate.keyservice.sealing import header

HOUR = duration_pb2.Duration(seconds=3600)


def hours_ago(h: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns() - int(h * 3600e9))
    return ts


def hub(n: int, net: str = "prod") -> list[str]:
    return [f"networks/{net}/nodes/hub|networks/{net}/nodes/s{i}" for i in range(n)]


async def generations(etcd, net: str) -> dict[str, tuple[int, int]]:
    base = etcd.key("keys", "psk", net) + b"/"
    kvs, _ = await etcd.list_prefix(base)
    return {kv.key[len(base):].decode(): (header(kv.value)["gen"], header(kv.value)["epoch"]) for kv in kvs}


async def eventually(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not reached within {timeout:.0f}s")
        await asyncio.sleep(0.05)


async def test_one_leader_and_takeover(etcd):
    leading: list[str] = []

    def lead_as(name):
        async def lead(fence):
            leading.append(name)
            await asyncio.Event().wait()
        return lead

    a, b = Election(etcd, "keys/leader", "a", ttl=2), Election(etcd, "keys/leader", "b", ttl=2)
    ta = asyncio.ensure_future(a.run(lead_as("a")))
    await eventually(lambda: asyncio.sleep(0, bool(leading)))
    tb = asyncio.ensure_future(b.run(lead_as("b")))
    try:
        await asyncio.sleep(0.5)
        assert leading == ["a"] and await a.leader() == "a" and not b.leading
        # A fenced write by the non-leader fails; by the leader succeeds.
        ok, _, _ = await etcd.txn(b.fence(), [etcd.txn_ops.put(etcd.key("x"), b"b")])
        assert not ok
        ok, _, _ = await etcd.txn(a.fence(), [etcd.txn_ops.put(etcd.key("x"), b"a")])
        assert ok
        # "a" dies without resigning (its keepalive stops): "b" takes over once the lease expires.
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)
        await eventually(lambda: asyncio.sleep(0, leading == ["a", "b"]))
        assert await b.leader() == "b"
        ok, _, _ = await etcd.txn(a.fence(), [etcd.txn_ops.put(etcd.key("x"), b"a")])
        assert not ok
    finally:
        for t in (ta, tb):
            t.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)
        await a.resign()
        await b.resign()


async def test_due_rotation_runs_once(core, etcd, put_network, secrets):
    await put_network("due", preshared_key_rotation_period=HOUR, create_time=hours_ago(2))
    await put_network("fresh", preshared_key_rotation_period=HOUR)
    await put_network("manual", create_time=hours_ago(100))
    await put_network("off", preshared_key_rotation_period=HOUR, create_time=hours_ago(2), disable_preshared_keys=True)
    for net in ("due", "fresh", "manual"):
        secrets += [p.key for p in await core.psk.issue(f"networks/{net}", hub(5, net))]
    report = await core.scheduler.tick()
    assert report.epochs_started == ["due"] and report.keys_rotated == 5
    assert set((await generations(etcd, "due")).values()) == {(2, 1)}
    for net in ("fresh", "manual"):
        assert set((await generations(etcd, net)).values()) == {(1, 0)}
    # Nothing is due any more; a later tick (even an hour minus a bit later) does nothing.
    report = await core.scheduler.tick(now_ns=time.time_ns() + 3500 * 10**9)
    assert report.epochs_started == [] and report.keys_rotated == 0
    assert set((await generations(etcd, "due")).values()) == {(2, 1)}
    # An hour after that rotation it is due again.
    report = await core.scheduler.tick(now_ns=time.time_ns() + 3601 * 10**9)
    assert report.epochs_started == ["due", "fresh"]
    assert set((await generations(etcd, "due")).values()) == {(3, 2)}
    secrets += [p.key for p in await core.psk.issue("networks/due", hub(5, "due"))]


async def test_rotation_interrupted_midway_finishes_each_pair_once(core, etcd, put_network, secrets):
    await put_network("due", preshared_key_rotation_period=HOUR, create_time=hours_ago(2))
    secrets += [p.key for p in await core.psk.issue("networks/due", hub(400, "due"))]
    # A leader claims the epoch and gets through 150 pairs before it dies: that state,
    # built with the same operations the dying leader would have committed.
    epoch = await core.psk.claim_epoch("due", "schedule")
    assert epoch == 1
    await core.psk.rotate("networks/due", hub(150, "due"))
    gens = await generations(etcd, "due")
    assert sum(1 for g in gens.values() if g == (2, 1)) == 150
    # The next leader's tick resumes the running epoch: the other 250 pairs, once.
    report = await core.scheduler.tick()
    assert report.epochs_resumed == ["due"] and report.epochs_started == [] and report.keys_rotated == 250
    assert set((await generations(etcd, "due")).values()) == {(2, 1)}
    st = await core.psk.rotation_state("due")
    assert (st.epoch, st.state) == (1, "done")
    # Two workers finishing the same epoch at once still rotate each pair once.
    await core.psk.claim_epoch("due", "test")
    n = await asyncio.gather(core.psk.run_epoch("due", 2), core.psk.run_epoch("due", 2))
    assert sum(n) == 400
    assert set((await generations(etcd, "due")).values()) == {(3, 2)}
    secrets += [p.key for p in await core.psk.issue("networks/due", hub(400, "due"))]


async def test_node_key_age_requests_rotation_once(core, etcd, put_network):
    await put_network("prod", max_node_key_age=HOUR)
    for name, age in (("old", 2), ("new", 0.1)):
        n = node_pb2.Node(name=f"networks/prod/nodes/{name}", public_key="x" * 44, public_key_create_time=hours_ago(age))
        await etcd.put(etcd.key("nodes", "prod", name), n.SerializeToString())
    report = await core.scheduler.tick()
    assert report.node_rotations_requested == ["networks/prod/nodes/old"]
    kv = await etcd.get(etcd.key("keys", "nodeRotation", "prod", "old"))
    assert keys_pb2.RotateNodeKeyResponse.FromString(kv.value).request_time.seconds > 0
    assert (await core.scheduler.tick()).node_rotations_requested == []


async def test_node_key_age_skips_nodes_serving_external_clients(core, etcd, put_network):
    await put_network("prod", max_node_key_age=HOUR)
    for name in ("gw", "plain"):
        n = node_pb2.Node(name=f"networks/prod/nodes/{name}", public_key="x" * 44, public_key_create_time=hours_ago(2))
        await etcd.put(etcd.key("nodes", "prod", name), n.SerializeToString())
    client = external_client_pb2.ExternalClient(name="networks/prod/externalClients/phone",
                                                gateway_node="networks/prod/nodes/gw")
    await etcd.put(etcd.key("externalClients", "prod", "phone"), client.SerializeToString())
    report = await core.scheduler.tick()
    assert report.node_rotations_requested == ["networks/prod/nodes/plain"]
    assert report.node_rotations_skipped == ["networks/prod/nodes/gw"]
    assert await etcd.get(etcd.key("keys", "nodeRotation", "prod", "gw")) is None


def leader_of(procs: list[ServiceProcess], value: str) -> ServiceProcess:
    pid = int(value.split("/")[1])
    (p,) = [p for p in procs if p.proc.pid == pid]
    return p


async def test_sigkill_the_leader_due_rotation_still_happens_once(etcd_server, etcd_prefix, etcd, keks, kek_env,
                                                                  put_network, secrets, process_logs, tmp_path,
                                                                  secret_guard):
    keks.new("k1")
    # Both calls go to the survivor, which exports its spans when it stops.
    secret_guard.expect_span("/meshgate.api.v1.KeyService/IssuePresharedKeys", "meshgate-keyservice", at_least=2)
    env = kek_env("k1", path=str(tmp_path / "kek"))
    args = ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix,
            "--scheduler-interval", "0.2", "--election-ttl", "2", "--log-level", "debug", "--insecure"]
    procs = [ServiceProcess("meshgate-keyservice", args, env=env, log_path=str(tmp_path / f"ks{i}.log")).start()
             for i in range(2)]
    try:
        leader_key = etcd.key("keys", "leader")
        first = await eventually(lambda: etcd.get(leader_key))
        leader = leader_of(procs, first.value.decode())
        survivor = next(p for p in procs if p is not leader)
        # Pairs issued through the survivor; the network is not due yet.
        await put_network("due", preshared_key_rotation_period=HOUR)
        async with grpc.aio.insecure_channel(survivor.target) as ch:
            stub = keys_pb2_grpc.KeyServiceStub(ch)
            issued = await stub.IssuePresharedKeys(keys_pb2.IssuePresharedKeysRequest(
                network="networks/due", pairs=hub(2000, "due")), timeout=60)
        secrets += [__import__("base64").b64decode(k.key) for k in issued.keys]
        # Make it due, and kill the leader right away: it may have started, finished
        # or not even seen the rotation; either way it must happen exactly once.
        await put_network("due", preshared_key_rotation_period=HOUR, create_time=hours_ago(2))
        leader.signal(signal.SIGKILL)
        leader.proc.wait(10)

        async def done():
            st = (await etcd.get(etcd.key("keys", "rotation", "due")))
            return st is not None and b'"state": "done"' in st.value

        await eventually(done, timeout=60)
        new_leader = await eventually(lambda: etcd.get(leader_key))
        assert leader_of(procs, new_leader.value.decode()) is survivor
        gens = await generations(etcd, "due")
        assert len(gens) == 2000 and set(gens.values()) == {(2, 1)}
        # The survivor keeps ticking as leader; nothing more is due, so nothing more rotates.
        log_mark = survivor.log(tail=0).count("elected scheduler leader")
        await asyncio.sleep(1.0)
        assert set((await generations(etcd, "due")).values()) == {(2, 1)}
        assert survivor.log(tail=0).count("elected scheduler leader") == log_mark
        async with grpc.aio.insecure_channel(survivor.target) as ch:
            stub = keys_pb2_grpc.KeyServiceStub(ch)
            now = await stub.IssuePresharedKeys(keys_pb2.IssuePresharedKeysRequest(
                network="networks/due", pairs=hub(2000, "due")), timeout=60)
        secrets += [__import__("base64").b64decode(k.key) for k in now.keys]
        assert all(k.generation == 2 for k in now.keys)
        assert not {k.key for k in now.keys} & {k.key for k in issued.keys}
    finally:
        for p in procs:
            p.stop()
    for p in procs:
        log = p.log(tail=0)
        process_logs.append(log)
        # (grpc logs a cancelled watch's request iterator as a DEBUG traceback; errors would be ERROR.)
        assert " ERROR " not in log and " CRITICAL " not in log, log


async def test_sweep_deletes_key_material_of_deleted_owners_only_when_old(core, etcd, put_network, secrets):
    """PSKs of pairs with a deleted peer, key pairs and signatures of deleted
    clients, signatures and rotation requests of deleted nodes go; what
    belongs to existing owners, or is younger than the grace, stays."""
    from meshgate.keyservice.scheduler import SWEEP_GRACE_S

    await put_network("prod")
    for n in ("a", "b"):
        node = node_pb2.Node(name=f"networks/prod/nodes/{n}")
        await etcd.put(etcd.key("nodes", "prod", n), node.SerializeToString())
    await etcd.put(etcd.key("externalClients", "prod", "phone"), b"")
    live = ["networks/prod/nodes/a|networks/prod/nodes/b", "networks/prod/nodes/a|networks/prod/externalClients/phone"]
    dead = ["networks/prod/nodes/a|networks/prod/nodes/gone", "networks/prod/nodes/b|networks/prod/externalClients/old"]
    secrets += [p.key for p in await core.psk.issue("networks/prod", live + dead)]
    for c in ("phone", "old"):
        pair = await core.clients.issue(f"networks/prod/externalClients/{c}")
        secrets.append(base64.b64decode(pair.private_key))
    for n in ("a", "gone"):
        await core.authority.register(f"networks/prod/nodes/{n}", base64.b64encode(bytes(range(1, 33))).decode())
    await etcd.put(etcd.key("keys", "nodeRotation", "prod", "gone"), keys_pb2.RotateNodeKeyResponse().SerializeToString())
    before = set(await etcd.dump())
    # Young: nothing goes (except the rotation request, which carries no time).
    report = await core.scheduler.sweep()
    assert report.swept == 1 and not await etcd.get(etcd.key("keys", "nodeRotation", "prod", "gone"))
    # Old enough: exactly the orphans go.
    report = await core.scheduler.sweep(now_ns=time.time_ns() + int((SWEEP_GRACE_S + 1) * 1e9))
    after = set(await etcd.dump())
    gone = {k.decode().split("/keys/", 1)[1] for k in before - after}
    assert gone == {"psk/prod/a.gone", "psk/prod/b.~old", "clients/prod/old", "clientKeys/prod/old", "nodes/prod/gone",
                    "nodeRotation/prod/gone"}
    assert report.swept == 5
