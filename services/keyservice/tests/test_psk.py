"""Pre-shared keys: issue (bulk, race-safe), rotate, epochs, and bad input."""

from __future__ import annotations

import asyncio
import base64

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from meshgate.api.v1 import keys_pb2
from meshgate.keyservice.client import KeyClient
from meshgate.keyservice.core import KeyServiceCore
from meshgate.keyservice.sealing import header


def node(n: str, net: str = "prod") -> str:
    return f"networks/{net}/nodes/{n}"


def violations(err) -> dict[str, str]:
    status = rpc_status.from_call(err)
    br = error_details_pb2.BadRequest()
    for d in status.details:
        if d.Unpack(br):
            return {v.field: v.description for v in br.field_violations}
    return {}


def hub(n: int, net: str = "prod") -> list[str]:
    return [f"{node('hub', net)}|{node(f's{i}', net)}" for i in range(n)]


async def issue(ks, pairs, net="prod"):
    return (await ks.stub.IssuePresharedKeys(keys_pb2.IssuePresharedKeysRequest(network=f"networks/{net}",
                                                                                   pairs=pairs))).keys


async def test_issue_returns_current_keys_and_is_stable(ks, put_network, secrets):
    await put_network("prod")
    keys = await issue(ks, [f"{node('b')}|{node('a')}", f"{node('a')}|networks/prod/externalClients/phone"])
    secrets += [base64.b64decode(k.key) for k in keys]
    assert [k.name for k in keys] == ["networks/prod/presharedKeys/a.b", "networks/prod/presharedKeys/a.~phone"]
    assert list(keys[0].peers) == [node("a"), node("b")]
    assert list(keys[1].peers) == [node("a"), "networks/prod/externalClients/phone"]
    assert all(k.generation == 1 and len(base64.b64decode(k.key)) == 32 for k in keys)
    assert keys[0].key != keys[1].key
    # Same pair, either order, any time: the same key.
    again = await issue(ks, [f"{node('a')}|{node('b')}"])
    assert again[0].key == keys[0].key and again[0].generation == 1
    # Stored sealed: the header is readable, the key is not there.
    kv = await ks.etcd.get(ks.etcd.key("keys", "psk", "prod", "a.b"))
    assert header(kv.value)["gen"] == 1 and header(kv.value)["kek"] == "k1"


async def test_bulk_issue_1000_pairs_few_writes_and_race_safe(ks, etcd, keks, put_network, secrets):
    await put_network("prod")
    other = KeyServiceCore(etcd, keks.ring("k1"), scheduler=False)
    await other.start()
    try:
        rev0 = await etcd.revision()
        pairs = hub(1000)
        a, b = await asyncio.gather(ks.core.psk.issue("networks/prod", pairs), other.psk.issue("networks/prod", pairs))
        secrets += [p.key for p in a]
        assert [p.key for p in a] == [p.key for p in b]  # two replicas racing agree
        assert len({p.key for p in a}) == 1000
        writes = await etcd.revision() - rev0
        assert writes <= 2 * 9  # ceil(1000 / 120) transactions each, at most
        rev1 = await etcd.revision()
        again = await ks.core.psk.issue("networks/prod", pairs)
        assert [p.key for p in again] == [p.key for p in a]
        assert await etcd.revision() == rev1  # reading issued keys writes nothing
    finally:
        await other.stop()


async def test_python_client_bulk(ks, put_network, secrets):
    await put_network("prod")
    import grpc as g

    async with g.aio.insecure_channel(ks.target) as ch:
        client = KeyClient(ch)
        want = [(node(f"s{i}"), node("hub")) for i in range(300)]
        got = await client.preshared_keys("networks/prod", want)
        secrets += [base64.b64decode(k.key) for k in got.values()]
        assert len(got) == 300
        assert set(got) == {tuple(sorted(p)) for p in want}
        authority = await client.authority_public_keys()
        assert len(authority) == 1


async def test_rotate_named_pairs_and_all(ks, put_network, secrets):
    await put_network("prod")
    first = await issue(ks, hub(5))
    r = await ks.stub.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(network="networks/prod",
                                                                              pairs=hub(2)))
    assert r.rotated == 2
    now = await issue(ks, hub(5))
    assert [k.generation for k in now] == [2, 2, 1, 1, 1]
    assert [k.key != f.key for k, f in zip(now, first, strict=True)] == [True, True, False, False, False]
    r = await ks.stub.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(network="networks/prod"))
    assert r.rotated == 5
    last = await issue(ks, hub(5))
    assert [k.generation for k in last] == [3, 3, 2, 2, 2]
    assert len({k.key for k in [*first, *now, *last]}) == 5 + 2 + 5
    secrets += [base64.b64decode(k.key) for k in [*first, *now, *last]]
    st = await ks.core.psk.rotation_state("prod")
    assert (st.epoch, st.state, st.rotated) == (1, "done", 5)


async def test_network_rotation_writes_each_spokes_pairs_in_one_transaction(ks, put_network, secrets):
    """Two hubs and 150 spokes: a whole-network rotation writes both pairs of
    every spoke in the same transaction (one mod revision), so the control
    plane sends each spoke one patch per rotation, not one per hub."""
    await put_network("prod")
    spokes = [f"s{i:03d}" for i in range(150)]
    pairs = [f"{node(h)}|{node(s)}" for s in spokes for h in ("hub-a", "hub-b")]
    pairs.append(f"{node('hub-a')}|{node('hub-b')}")
    secrets += [base64.b64decode(k.key) for k in await issue(ks, pairs)]
    r = await ks.stub.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(network="networks/prod"))
    assert r.rotated == len(pairs)
    base = ks.etcd.key("keys", "psk", "prod", "")
    kvs, _ = await ks.etcd.list_prefix(base)
    revisions: dict[str, set[int]] = {}
    for kv in kvs:
        for seg in kv.key[len(base):].decode().split("."):
            revisions.setdefault(seg, set()).add(kv.mod_revision)
    assert len(kvs) == len(pairs)
    assert {s: len(revisions[s]) for s in spokes} == dict.fromkeys(spokes, 1)
    assert len(revisions["hub-a"]) > 1  # 301 pairs: more than one transaction in all
    secrets += [base64.b64decode(k.key) for k in await issue(ks, pairs)]


async def test_network_rotation_leaves_external_client_pairs_alone(ks, put_network, secrets):
    await put_network("prod")
    client_pair = ["networks/prod/nodes/hub|networks/prod/externalClients/phone"]
    (before,) = await issue(ks, client_pair)
    nodes_before = await issue(ks, hub(3))
    r = await ks.stub.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(network="networks/prod"))
    assert r.rotated == 3
    (after,) = await issue(ks, client_pair)
    assert (after.generation, after.key) == (before.generation, before.key)
    assert [k.generation for k in await issue(ks, hub(3))] == [g.generation + 1 for g in nodes_before]
    # Named, it rotates (the operator then gives the client a new configuration).
    r = await ks.stub.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(network="networks/prod",
                                                                              pairs=client_pair))
    assert r.rotated == 1
    (named,) = await issue(ks, client_pair)
    assert named.generation == before.generation + 1
    secrets += [base64.b64decode(k.key) for k in (before, named, *nodes_before)]


async def test_disabled_or_unknown_network(ks, put_network):
    await put_network("off", disable_preshared_keys=True)
    before = await ks.etcd.dump()
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await issue(ks, hub(1, "off"), net="off")
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "disable_preshared_keys" in ei.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await issue(ks, hub(1, "nope"), net="nope")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert await ks.etcd.dump() == before


@pytest.mark.parametrize(
    "network,pairs,fields",
    [
        ("", [], {"network"}),
        ("networks/Prod", [], {"network"}),
        ("networks/prod", ["networks/prod/nodes/a"], {"pairs[0]"}),
        ("networks/prod", [f"{node('a')}|{node('a')}"], {"pairs[0]"}),
        ("networks/prod", [f"{node('a')}|{node('b', 'dev')}"], {"pairs[0]"}),
        ("networks/prod", [f"{node('a')}|{node('b')}", "x|y", f"{node('a')}|{node('b')}|{node('c')}"],
         {"pairs[1]", "pairs[2]"}),
    ],
)
async def test_bad_pairs(ks, put_network, network, pairs, fields):
    await put_network("prod")
    before = await ks.etcd.dump()
    for method in ("IssuePresharedKeys", "RotatePresharedKeys"):
        req = getattr(keys_pb2, f"{method}Request")(network=network, pairs=pairs)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await getattr(ks.stub, method)(req)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(violations(ei.value)) == fields
    assert await ks.etcd.dump() == before


async def test_forget(ks, put_network):
    await put_network("prod")
    await issue(ks, hub(3) + [f"{node('s0')}|{node('s1')}"])
    assert await ks.core.psk.forget("networks/prod", node("s0")) == 2
    kvs, _ = await ks.etcd.list_prefix(ks.etcd.key("keys", "psk", "prod") + b"/")
    assert sorted(kv.key.rsplit(b"/", 1)[1] for kv in kvs) == [b"hub.s1", b"hub.s2"]
    assert await ks.core.psk.forget("networks/prod") == 2
    kvs, _ = await ks.etcd.list_prefix(ks.etcd.key("keys", "psk", "prod") + b"/")
    assert kvs == []
