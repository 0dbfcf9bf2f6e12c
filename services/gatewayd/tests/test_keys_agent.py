"""Unit tests of issue 5's agent side: signed peers (verification, filtering, reports),
pre-shared-key-only deltas, the pending node key (files, modes, promotion) and the
identity file's key authority keys."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import stat
from dataclasses import dataclass, field

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshgate.api.v1 import agent_pb2
from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.common import signing
from meshgate.gatewayd import keys, trust
from meshgate.gatewayd.agent import Agent
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.errors import ApplyError, InvalidDesiredState
from meshgate.gatewayd.keys import NodeKeys, Secret
from meshgate.gatewayd.model import Desired, compile_desired, compile_peer_delta, expected_observed, merge_delta
from meshgate.gatewayd.planner import Plan, plan
from meshgate.gatewayd.reconciler import Reconciler, Result
from meshgate.gatewayd.sources import Delta, QueueSource, Report, RotateKey, Snapshot
from meshgate.gatewayd.store import StateStore
from meshgate.gatewayd.stream import (
    ControlPlaneSource,
    Identity,
    IdentityError,
    JoinRefused,
    PlaintextRefused,
    channel,
    check_transport,
    is_local_target,
    pins_for,
)
from meshgate.gatewayd.wireguard.userspace import kick_lines, uapi_lines


@dataclass
class _Backend:
    name: str = "stand-in"


@dataclass
class StandIn:
    """The reconciler's boundary (as in test_agent.py), with real node keys."""

    store: StateStore
    settings: Settings
    passes: list[tuple[int, bool]] = field(default_factory=list)
    backend: _Backend = field(default_factory=_Backend)
    keys: NodeKeys | None = None

    def __post_init__(self) -> None:
        self.keys = NodeKeys(self.store.dir)

    def compile(self, msg: pb.DesiredState, restoring: bool = False) -> Desired:
        own = Reconciler.own_key(self, msg, restoring)  # type: ignore[arg-type]
        return compile_desired(msg, settings=self.settings, public_key=own)

    def reconcile(self, desired: Desired, full: bool = True) -> Result:
        if desired.public_key != self.keys.current.public and not self.keys.promote(desired.public_key):
            raise ApplyError("keys", "not held")
        self.passes.append((desired.revision, full))
        return Result(Plan(desired.interface), full, 0.0)

    def alive(self) -> bool:
        return True


async def until(pred, limit: int = 2000) -> None:
    for _ in range(limit):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")

AUTH = Ed25519PrivateKey.generate()
AUTH_PUB = signing.public_bytes(AUTH)


def key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


def node(i: int) -> str:
    return f"networks/n/nodes/p{i}"


def peer(i: int, signed: bool = True, **kw) -> pb.Peer:
    p = pb.Peer(public_key=key(i), resource=node(i), allowed_ips=[f"100.64.0.{i + 1}/32"], **kw)
    if signed:
        p.public_key_signature = signing.sign(AUTH, node(i), key(i))
    return p


def state(rev: int, peers: list[pb.Peer]) -> pb.DesiredState:
    msg = pb.DesiredState(node="networks/n/nodes/a", revision=rev)
    msg.interface.addresses.append("100.64.0.1/24")
    msg.peers.extend(peers)
    return msg


# ---------------------------------------------------------------- verification


NET = "networks/n"


def test_verifier_accepts_signed_and_refuses_forgeries():
    v = trust.PeerVerifier([AUTH_PUB], NET)
    assert v.reason(peer(1)) is None
    assert v.reason(peer(1, signed=False)) == trust.UNSIGNED
    # a valid signature by the authority, for another node
    moved = peer(1)
    moved.public_key_signature = signing.sign(AUTH, node(2), key(1))
    assert v.reason(moved) == trust.BAD_SIGNATURE
    # a valid signature by the authority, for another key of the same node
    other_key = peer(1)
    other_key.public_key_signature = signing.sign(AUTH, node(1), key(9))
    assert v.reason(other_key) == trust.BAD_SIGNATURE
    # signed by someone else
    rogue = peer(1)
    rogue.public_key_signature = signing.sign(Ed25519PrivateKey.generate(), node(1), key(1))
    assert v.reason(rogue) == trust.BAD_SIGNATURE
    no_resource = peer(1)
    no_resource.resource = ""
    assert v.reason(no_resource) == trust.NO_RESOURCE
    # any of several authority keys (current and previous)
    assert trust.PeerVerifier([signing.public_bytes(Ed25519PrivateKey.generate()), AUTH_PUB],
                              NET).reason(peer(1)) is None
    with pytest.raises(ValueError):
        trust.PeerVerifier([], NET)
    with pytest.raises(ValueError):
        trust.PeerVerifier([b"short"], NET)
    with pytest.raises(ValueError):
        trust.PeerVerifier([AUTH_PUB], "")


def test_verifier_refuses_a_key_signed_for_another_network():
    v = trust.PeerVerifier([AUTH_PUB], NET)
    other = pb.Peer(public_key=key(1), resource="networks/other/nodes/p1", allowed_ips=["100.64.0.2/32"],
                    public_key_signature=signing.sign(AUTH, "networks/other/nodes/p1", key(1)))
    # a genuine signature: the authority did sign that key, for a node of another network
    assert signing.verify(AUTH_PUB, other.resource, other.public_key, other.public_key_signature)
    assert v.reason(other) == "resource is not in this node's network (networks/n)"
    prefix = pb.Peer(public_key=key(1), resource="networks/n-2/nodes/p1",
                     public_key_signature=signing.sign(AUTH, "networks/n-2/nodes/p1", key(1)))
    assert v.reason(prefix) == "resource is not in this node's network (networks/n)"
    client = pb.Peer(public_key=key(2), resource="networks/n/externalClients/c",
                     public_key_signature=signing.sign(AUTH, "networks/n/externalClients/c", key(2)))
    assert v.reason(client) is None


def test_pins_of_secret_and_the_pinned_keys():
    other = signing.public_bytes(Ed25519PrivateKey.generate())
    fp = trust.fingerprint(AUTH_PUB)
    assert len(fp) == 22 and fp == base64.urlsafe_b64encode(
        __import__("hashlib").sha256(AUTH_PUB).digest()[:16]).decode().rstrip("=")
    base = "mgek_n.k." + "A" * 43
    assert trust.pins_of_secret(base) == (base, ())
    assert trust.pins_of_secret(f"{base}.ka_{fp}") == (base, (fp,))
    assert trust.pins_of_secret(f"{base}.ka_{fp}.ka_{trust.fingerprint(other)}") == (
        base, (fp, trust.fingerprint(other)))
    assert trust.pins_of_secret(f"{base}.ka_short") == (f"{base}.ka_short", ())
    assert trust.pinned_keys([other, AUTH_PUB], {fp}) == (AUTH_PUB,)
    with pytest.raises(trust.PinMismatch, match="match none of the pinned"):
        trust.pinned_keys([other], {fp})
    with pytest.raises(trust.PinMismatch):
        trust.pinned_keys([], {fp})
    assert trust.parse_authority_key(base64.b64encode(AUTH_PUB).decode()) == AUTH_PUB
    for bad in ("nope!", base64.b64encode(b"x" * 31).decode()):
        with pytest.raises(ValueError, match="--authority-key"):
            trust.parse_authority_key(bad)


def test_the_control_plane_makes_the_same_fingerprint_and_hashes_without_it():
    from meshgate.controlplane import enrollment

    fp = trust.fingerprint(AUTH_PUB)
    assert enrollment.authority_fingerprint(AUTH_PUB) == fp
    base = "mgek_n.k." + "B" * 43
    assert enrollment.without_pins(f"{base}.ka_{fp}.ka_{fp}") == base
    assert enrollment.parse_secret(enrollment.without_pins(f"{base}.ka_{fp}"), "mgek_") == ("n", "k")


def test_without_drops_refused_peers_and_what_points_at_them():
    msg = state(1, [peer(1), peer(2, signed=False)])
    msg.routes.add(destination="100.64.0.3/32", via_peer=key(2))
    msg.routes.add(destination="100.64.0.2/32", via_peer=key(1))
    msg.default_route_via_peer = key(2)
    refused = trust.PeerVerifier([AUTH_PUB], NET).refusals(msg.peers)
    assert list(refused) == [key(2)]
    out = trust.without(msg, refused)
    assert [p.public_key for p in out.peers] == [key(1)]
    assert [r.via_peer for r in out.routes] == [key(1)]
    assert out.default_route_via_peer == ""
    assert len(msg.peers) == 2  # the original is untouched
    text = trust.summary(list(refused.values()))
    assert text == "refused 1 peer: networks/n/nodes/p2: public key not signed by the key authority"


@pytest.fixture
def setup(tmp_path):
    settings = Settings(state_dir=tmp_path, backoff_initial=0.01, backoff_max=0.05,
                        supervise_interval=0.01, resync_interval=3600)
    rec = StandIn(StateStore(tmp_path), settings)
    src = QueueSource()
    agent = Agent(rec, settings, src, rng=random.Random(0), authority_keys=[AUTH_PUB],  # type: ignore[arg-type]
                  network=NET)
    return agent, rec, src


async def running(agent: Agent):
    stop = asyncio.Event()
    return stop, asyncio.create_task(agent.run(stop))


async def test_agent_applies_signed_peers_only_and_reports_refusals(setup, caplog):
    agent, rec, src = setup
    stop, task = await running(agent)
    forged = peer(3)
    forged.public_key_signature = signing.sign(AUTH, node(1), key(3))  # valid, for another node
    src.put(Snapshot(state(1, [peer(1), peer(2, signed=False), forged])))
    await until(lambda: src.reports)
    assert set(agent.target.peers) == {key(1)}
    r = src.reports[-1]
    assert r.applied_revision == 1 and r.code == "PERMISSION_DENIED"
    assert r.error.startswith("refused 2 peers: ")
    assert "networks/n/nodes/p2: public key not signed by the key authority" in r.error
    assert "networks/n/nodes/p3: public key signature is not the key authority's" in r.error
    assert {x.resource for x in r.refused} == {node(2), node(3)}
    assert "refused peer networks/n/nodes/p3" in caplog.text
    assert agent.status["applied_revision"] == 1 and len(agent.status["refused_peers"]) == 2
    # desired.pb keeps the state as sent; what is applied is the filtered one
    assert len(rec.store.load_desired().peers) == 3

    # A delta that signs p2 correctly: applied; p3 still refused.
    src.put(Delta(pb.DesiredStateDelta(base_revision=1, upserted_peers=[peer(2)]), revision=2))
    await until(lambda: len(src.reports) == 2)
    assert set(agent.target.peers) == {key(1), key(2)}
    assert src.reports[-1].error.startswith("refused 1 peer: networks/n/nodes/p3")
    # A forged upsert of an accepted peer takes it out (the new version is not trusted).
    bad = peer(1)
    bad.public_key_signature = b"\0" * 64
    src.put(Delta(pb.DesiredStateDelta(base_revision=2, upserted_peers=[bad], removed_peers=[key(3)]), revision=3))
    await until(lambda: len(src.reports) == 3)
    assert set(agent.target.peers) == {key(2)}
    assert src.reports[-1].error == ("refused 1 peer: networks/n/nodes/p1: "
                                     "public key signature is not the key authority's for this peer and key")
    # All good again: an OK report.
    src.put(Delta(pb.DesiredStateDelta(base_revision=3, upserted_peers=[peer(1)]), revision=4))
    await until(lambda: len(src.reports) == 4)
    assert src.reports[-1] == Report(4, None) and agent.status["refused_peers"] == []
    stop.set()
    await task


async def test_no_authority_keys_is_the_development_mode(tmp_path):
    settings = Settings(state_dir=tmp_path, resync_interval=3600)
    rec = StandIn(StateStore(tmp_path), settings)
    src = QueueSource()
    agent = Agent(rec, settings, src)  # type: ignore[arg-type]
    stop, task = await running(agent)
    src.put(Snapshot(state(1, [peer(1, signed=False), peer(2)])))
    await until(lambda: src.reports)
    assert set(agent.target.peers) == {key(1), key(2)} and src.reports[-1] == Report(1, None)
    assert agent.status["verify_peers"] is False
    stop.set()
    await task


async def test_restore_filters_the_state_on_disk(setup):
    agent, rec, src = setup
    rec.store.save_desired(state(5, [peer(1), peer(2, signed=False)]))
    stop, task = await running(agent)
    await until(lambda: rec.passes)
    assert set(agent.target.peers) == {key(1)}
    stop.set()
    await task


# ---------------------------------------------------------------- pre-shared keys


def test_psk_only_delta_updates_just_that_peer():
    settings = Settings()
    own = key(200)
    psk1, psk2 = key(101), key(102)
    msg = state(1, [peer(1, preshared_key=psk1), peer(2, preshared_key=key(103))])
    prev = compile_desired(msg, settings=settings, public_key=own)
    delta = pb.DesiredStateDelta(base_revision=1, upserted_peers=[peer(1, preshared_key=psk2)])
    nxt = compile_peer_delta(prev, delta, 2)
    p = plan(nxt, expected_observed(prev))
    assert p.device is None and len(p.peers) == 1
    op = p.peers[0]
    assert (op.kind, op.public_key, op.preshared_key) == ("update", key(1), Secret(psk2))
    assert op.endpoint is None and op.allowed_ips is None and op.keepalive is None
    lines = uapi_lines(None, p.device, p.peers)
    assert lines == ["public_key=" + base64.b64decode(key(1)).hex(), "update_only=true",
                     "preshared_key=" + base64.b64decode(psk2).hex()]
    assert p.changes() == [f"update peer {key(1)[:8]}… preshared key"]
    for s in (psk1, psk2):
        assert s not in repr(p) and s not in repr(nxt) and s not in "\n".join(p.changes())
    # the full path agrees with the fast path
    assert compile_desired(merge_delta(msg, delta), settings=settings, public_key=own).peers == nxt.peers


# ---------------------------------------------------------------- node key rotation


def test_pending_key_lifecycle_and_file_modes(tmp_path):
    nk = NodeKeys(tmp_path)
    old = nk.current.public
    priv_file, next_file = tmp_path / keys.PRIVATE_KEY_FILE, tmp_path / keys.PENDING_KEY_FILE
    assert nk.pending is None and not next_file.exists()
    new = nk.ensure_pending()
    assert new != old and stat.S_IMODE(next_file.stat().st_mode) == 0o600
    assert nk.ensure_pending() == new  # idempotent
    assert NodeKeys(tmp_path).pending.public == new  # survives a restart
    assert nk.holds(old) and nk.holds(new) and not nk.holds(key(9))
    assert "private" not in repr(nk.pending)
    assert nk.pending.private.reveal() not in repr(nk.pending)
    assert not nk.promote(key(9))
    assert nk.promote(new)
    assert nk.current.public == new and nk.pending is None and not next_file.exists()
    assert stat.S_IMODE(priv_file.stat().st_mode) == 0o600
    assert keys.load_or_create(tmp_path)[1] == new
    assert nk.promote(new)  # already current: nothing to do
    assert not nk.holds(old)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_broken_pending_file_is_discarded(tmp_path):
    NodeKeys(tmp_path)
    (tmp_path / keys.PENDING_KEY_FILE).write_text("garbage\n")
    nk = NodeKeys(tmp_path)
    assert nk.pending is None and not (tmp_path / keys.PENDING_KEY_FILE).exists()


def test_own_key_names_current_pending_or_is_rejected(tmp_path):
    rec = StandIn(StateStore(tmp_path), Settings(state_dir=tmp_path))
    cur = rec.keys.current.public
    msg = state(1, [peer(1)])
    assert rec.compile(msg).public_key == cur
    msg.interface.public_key = cur
    assert rec.compile(msg).public_key == cur
    msg.interface.public_key = key(77)
    with pytest.raises(InvalidDesiredState) as e:
        rec.compile(msg)
    assert "interface.public_key: names " + key(77) in str(e.value) and "none pending" in str(e.value)
    assert rec.compile(msg, restoring=True).public_key == cur  # our own file after a crash
    new = rec.keys.ensure_pending()
    msg.interface.public_key = new
    assert rec.compile(msg).public_key == new
    assert Reconciler.own_key(rec, msg) == new  # type: ignore[arg-type]


def test_a_key_change_is_planned_and_set_with_the_new_private_key(tmp_path):
    nk = NodeKeys(tmp_path)
    msg = state(1, [peer(1)])
    prev = compile_desired(msg, settings=Settings(), public_key=nk.current.public)
    new = nk.ensure_pending()
    msg.interface.public_key = new
    nxt = compile_desired(msg, settings=Settings(), public_key=new)
    p = plan(nxt, expected_observed(prev))
    assert p.device is not None and p.device.set_private_key and not p.peers
    assert p.changes() == ["set private key"]
    lines = uapi_lines(nk.pending.private, p.device, p.peers)
    assert lines == ["private_key=" + base64.b64decode(nk.pending.private.reveal()).hex()]
    kl = kick_lines({key(1): 0, key(2): 25})
    h1, h2 = (base64.b64decode(key(i)).hex() for i in (1, 2))
    assert kl[:9] == [f"public_key={h1}", "update_only=true", "persistent_keepalive_interval=0",
                      f"public_key={h1}", "update_only=true", "persistent_keepalive_interval=1",
                      f"public_key={h1}", "update_only=true", "persistent_keepalive_interval=0"]
    assert kl[-1] == "persistent_keepalive_interval=25" and f"public_key={h2}" in kl


async def test_rotate_key_announces_one_pending_key_and_the_state_switches(setup):
    agent, rec, src = setup
    stop, task = await running(agent)
    old = rec.keys.current.public
    src.put(Snapshot(state(1, [peer(1)])))
    await until(lambda: rec.passes)
    new = await agent.rotate_key("test")
    assert await agent.rotate_key("again") == new and src.announced == [new, new]
    assert rec.keys.current.public == old and agent.status["pending_public_key"] == new
    # a state naming a key the node does not hold is rejected; the previous one stays
    bad = pb.DesiredStateDelta(base_revision=1, interface=pb.InterfaceConfig(
        addresses=["100.64.0.1/24"], public_key=key(55)))
    assert not agent.accept(Delta(bad, revision=2))
    assert "does not hold" in agent.status["last_error"] and agent.target.revision == 1
    # naming the pending key switches, in the pass that applies it
    good = pb.DesiredStateDelta(base_revision=1, interface=pb.InterfaceConfig(
        addresses=["100.64.0.1/24"], public_key=new))
    src.put(Delta(good, revision=2))
    await until(lambda: agent.status["applied_revision"] == 2)
    assert rec.keys.current.public == new and rec.keys.pending is None
    assert agent.status["public_key"] == new and agent.status["pending_public_key"] is None
    # empty or current: nothing to do
    src.put(Delta(pb.DesiredStateDelta(base_revision=2, interface=pb.InterfaceConfig(
        addresses=["100.64.0.1/24"])), revision=3))
    await until(lambda: agent.status["applied_revision"] == 3)
    assert rec.keys.current.public == new
    stop.set()
    await task


async def test_rotate_key_from_the_feed(setup):
    agent, rec, src = setup
    stop, task = await running(agent)
    src.put(RotateKey("scheduled"))
    await until(lambda: src.announced)
    assert src.announced == [rec.keys.pending.public]
    stop.set()
    await task


# ---------------------------------------------------------------- the stream's side


def test_identity_keeps_pinned_keys_and_refuses_old_files(tmp_path):
    ident = Identity("networks/n/nodes/a", "unix:/x", Secret("tok"), "", (AUTH_PUB,), "enrollment key",
                     accept_default_route=True)
    ident.save(tmp_path)
    assert stat.S_IMODE((tmp_path / "identity.json").stat().st_mode) == 0o600
    loaded = Identity.load(tmp_path)
    assert loaded.authority_keys == (AUTH_PUB,) and loaded.token == Secret("tok")
    assert loaded.pinned_by == "enrollment key" and loaded.accept_default_route and not loaded.insecure
    assert loaded.network == "networks/n"
    assert "tok" not in repr(loaded)
    data = json.loads((tmp_path / "identity.json").read_text())
    assert data["key_authority_public_keys"] == [base64.b64encode(AUTH_PUB).decode()]
    # written by an older gatewayd: the keys were the control plane's word
    old = {k: data[k] for k in ("node", "control_plane", "ca_file", "credential", "key_authority_public_keys")}
    (tmp_path / "identity.json").write_text(json.dumps(old))
    with pytest.raises(IdentityError, match="older gatewayd.*Join again"):
        Identity.load(tmp_path)
    # no keys and no --insecure-no-authority: not a usable identity
    (tmp_path / "identity.json").write_text(json.dumps(dict(data, key_authority_public_keys=[])))
    with pytest.raises(IdentityError, match="--insecure-no-authority"):
        Identity.load(tmp_path)
    (tmp_path / "identity.json").write_text("{not json")
    with pytest.raises(IdentityError, match="unreadable"):
        Identity.load(tmp_path)


def test_plaintext_only_to_a_local_control_plane(caplog):
    for local in ("unix:/run/cp.sock", "127.0.0.1:7400", "127.1.2.3:1", "[::1]:7400", "localhost:7400",
                  "dns:///localhost:7400", "ipv4:127.0.0.1:7400", "ipv6:[::1]:7400", "unix-abstract:cp"):
        assert is_local_target(local), local
        check_transport(local, "", False)
    for remote in ("192.0.2.1:7400", "cp.example.net:7400", "[2001:db8::1]:7400", "dns:///cp:7400",
                   "0.0.0.0:7400", "localhost.example.net:1"):
        assert not is_local_target(remote), remote
        with pytest.raises(PlaintextRefused, match="--insecure"):
            check_transport(remote, "", False)
        check_transport(remote, "/etc/ca.pem", False)  # TLS: fine
    caplog.clear()
    check_transport("192.0.2.1:7400", "", True)
    assert "INSECURE: plaintext to the control plane at 192.0.2.1:7400" in caplog.text
    with pytest.raises(PlaintextRefused):
        channel("192.0.2.1:7400")


def test_pins_for_a_join():
    fp = trust.fingerprint(AUTH_PUB)
    other = signing.public_bytes(Ed25519PrivateKey.generate())
    base = "mgek_n.k." + "C" * 43
    assert pins_for(f"{base}.ka_{fp}", (), False) == ({fp}, "enrollment key")
    assert pins_for(base, (AUTH_PUB,), False) == ({fp}, "--authority-key")
    assert pins_for(f"{base}.ka_{fp}", (AUTH_PUB, other), False)[1] == "--authority-key"
    with pytest.raises(JoinRefused, match="different authorities"):
        pins_for(f"{base}.ka_{fp}", (other,), False)
    with pytest.raises(JoinRefused, match="--insecure-no-authority"):
        pins_for(base, (), False)
    assert pins_for(base, (), True) == (set(), "")


async def test_stream_acks_refusals_and_sends_new_key():
    src = ControlPlaneSource(Identity("networks/n/nodes/a", "unix:/x", Secret("t")))
    src._out = asyncio.Queue()
    refusal = trust.Refusal(node(2), key(2), trust.UNSIGNED)
    await src.report(Report(7, trust.summary([refusal]), code="PERMISSION_DENIED", refused=(refusal,)))
    ack = src._out.get_nowait().ack
    assert ack.revision == 7 and ack.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert ack.status.message == "refused 1 peer: networks/n/nodes/p2: public key not signed by the key authority"
    from google.rpc import error_details_pb2

    info = error_details_pb2.ErrorInfo()
    assert ack.status.details[0].Unpack(info)
    assert info.reason == "PEER_KEY_REFUSED" and info.metadata["peers"] == node(2)
    await src.announce_key(key(5))
    assert src._out.get_nowait() == agent_pb2.SyncRequest(new_key=agent_pb2.SyncRequest.NewKey(public_key=key(5)))
