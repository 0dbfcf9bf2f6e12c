"""Enrollment keys and joining: validity checks, exactly-once redemption,
secrets stored only as hashes."""

import asyncio
import base64
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from cptest import SimAgent, details, key, make_key, make_network, state_dump
from meshgate.api.v1 import agent_pb2, enrollment_pb2, node_pb2


def _enroll(cp, secret, node_id, pk=None):
    return cp.agents.Enroll(agent_pb2.EnrollRequest(enrollment_secret=secret, node_id=node_id, public_key=pk or key()))


async def test_join_creates_node_with_key_tags_and_counts_the_use(cp):
    await make_network(cp)
    ek = await make_key(cp, tags=["edge"], max_uses=2)
    assert ek.secret.startswith("mgek_prod.k.")
    resp = await _enroll(cp, ek.secret, "n1")
    assert resp.node.name == "networks/prod/nodes/n1" and list(resp.node.tags) == ["edge"]
    assert resp.node.ipv4_address == "100.64.0.1"
    assert resp.credential.token.startswith("mgat_prod.n1.")
    got = await cp.keys.GetEnrollmentKey(enrollment_pb2.GetEnrollmentKeyRequest(name=ek.name))
    assert got.uses == 1 and got.secret == ""


async def test_hostname_gives_node_id(cp):
    await make_network(cp)
    ek = await make_key(cp)
    resp = await cp.agents.Enroll(agent_pb2.EnrollRequest(enrollment_secret=ek.secret, hostname="Web-01.example.org", public_key=key()))
    assert resp.node.name == "networks/prod/nodes/web-01"


@pytest.mark.parametrize("case", ["expired", "revoked", "exhausted", "unknown", "wrong-secret", "garbage"])
async def test_refused_keys(cp, case):
    await make_network(cp)
    expire = None
    if case == "expired":
        expire = timestamp_pb2.Timestamp()
        expire.FromNanoseconds(time.time_ns() + 300_000_000)
    ek = await make_key(cp, max_uses=1, expire_time=expire)
    secret = ek.secret
    if case == "expired":
        while time.time_ns() <= expire.ToNanoseconds():
            await asyncio.sleep(0.05)
    elif case == "revoked":
        await cp.keys.RevokeEnrollmentKey(enrollment_pb2.RevokeEnrollmentKeyRequest(name=ek.name))
    elif case == "exhausted":
        await _enroll(cp, secret, "first")
    elif case == "unknown":
        secret = "mgek_prod.nope." + "A" * 43
    elif case == "wrong-secret":
        secret = secret[:-5] + ("AAAAA" if not secret.endswith("AAAAA") else "BBBBB")
    elif case == "garbage":
        secret = "hello"
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _enroll(cp, secret, "late")
    expected = {
        "expired": grpc.StatusCode.PERMISSION_DENIED,
        "revoked": grpc.StatusCode.PERMISSION_DENIED,
        "exhausted": grpc.StatusCode.PERMISSION_DENIED,
        "unknown": grpc.StatusCode.UNAUTHENTICATED,
        "wrong-secret": grpc.StatusCode.UNAUTHENTICATED,
        "garbage": grpc.StatusCode.UNAUTHENTICATED,
    }[case]
    assert e.value.code() == expected
    assert details(e.value)[1] == "ENROLLMENT_KEY_REFUSED"
    if expected == grpc.StatusCode.PERMISSION_DENIED:
        assert case in e.value.details()
    assert ek.secret not in e.value.details()
    assert await state_dump(cp.etcd) == before


async def test_50_concurrent_redemptions_of_single_use_key_make_one_node(cp):
    await make_network(cp)
    ek = await make_key(cp, max_uses=1)
    results = await asyncio.gather(*(_enroll(cp, ek.secret, f"n{i}") for i in range(50)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(refused) == 49
    assert all(r.code() == grpc.StatusCode.PERMISSION_DENIED for r in refused)
    nodes = await cp.nodes.ListNodes(node_pb2.ListNodesRequest(parent="networks/prod"))
    assert [n.name for n in nodes.nodes] == [ok[0].node.name]


async def test_unlimited_key_counts_uses_without_contention_and_honours_revocation(cp):
    """A fleet-wide key: 40 agents join at once and every one succeeds, without
    the redemptions writing (and so contending on) the key's record; uses are
    counted; a revocation still stops the next join; a delete leaves nothing."""
    await make_network(cp)
    ek = await make_key(cp)  # no max_uses: unlimited
    before = await cp.etcd.get(cp.etcd.key("enrollmentKeys", "prod", "k"))
    resps = await asyncio.gather(*(_enroll(cp, ek.secret, f"n{i}") for i in range(40)))
    assert len({r.node.name for r in resps}) == 40
    after = await cp.etcd.get(cp.etcd.key("enrollmentKeys", "prod", "k"))
    assert after.mod_revision == before.mod_revision  # redemptions never rewrote the record
    got = await cp.keys.GetEnrollmentKey(enrollment_pb2.GetEnrollmentKeyRequest(name=ek.name))
    assert got.uses == 40 and got.etag == ek.etag
    listed = await cp.keys.ListEnrollmentKeys(enrollment_pb2.ListEnrollmentKeysRequest(parent="networks/prod"))
    assert [k.uses for k in listed.enrollment_keys] == [40]
    revoked = await cp.keys.RevokeEnrollmentKey(enrollment_pb2.RevokeEnrollmentKeyRequest(name=ek.name))
    assert revoked.uses == 40
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await _enroll(cp, ek.secret, "late")
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await cp.keys.DeleteEnrollmentKey(enrollment_pb2.DeleteEnrollmentKeyRequest(name=ek.name))
    assert [k for k in await state_dump(cp.etcd) if b"/enrollmentUses/" in k] == []


async def test_secrets_and_tokens_are_stored_only_hashed(cp):
    await make_network(cp)
    ek = await make_key(cp)
    agent = await SimAgent(cp.agents, ek.secret, "n1").enroll()
    blob = b"".join(k + v for k, v in (await state_dump(cp.etcd)).items())
    for secret in (ek.secret, agent.token):
        for form in (secret.encode(), base64.b64encode(secret.encode()), secret.split(".")[-1].encode()):
            assert form not in blob


async def test_enroll_validates_its_input_and_changes_nothing(cp):
    await make_network(cp)
    ek = await make_key(cp)
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.agents.Enroll(agent_pb2.EnrollRequest(enrollment_secret=ek.secret, node_id="ok", public_key="short", endpoint="nope"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"public_key", "endpoint"} <= set(details(e.value)[0])
    assert await state_dump(cp.etcd) == before
