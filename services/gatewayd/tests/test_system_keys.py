"""Signed peers, pre-shared keys and node key rotation, in network namespaces: real
gatewayd agents joined to a real gRPC AgentService server that this test runs and
scripts (``lab.ScriptedControlPlane``), so every message the agents get is crafted
here and every ack they send is checked.  The full loop through the real control
plane and key service is in ``test_system_keys_e2e.py``.

Loss is measured with ``ping -i 0.1`` (10 packets per second) across the tunnel for
the whole change.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.common import signing
from meshgate.gatewayd import keys
from meshgate.gatewayd.lab import Egress, Node, ScriptedControlPlane

GW = "networks/lab/nodes/gateway"


def client_name(i: int) -> str:
    return f"networks/lab/nodes/client{i}"


def random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def cp(lab):
    server = ScriptedControlPlane(lab.dir / "agent.sock", Ed25519PrivateKey.generate())
    try:
        yield server
    finally:
        for n in lab.nodes:  # the agents go first, so they do not reconnect to nothing
            n.stop()
        server.close()


def up(cp: ScriptedControlPlane, eg: Egress, gw_state: pb.DesiredState | None = None,
       client_states: list[pb.DesiredState] | None = None) -> None:
    """Join and start every node, send each its signed snapshot (revision 1), wait for OK acks."""
    eg.gw.join(cp.target, cp.enrollment_secret(), "gateway")
    for i, c in enumerate(eg.clients):
        c.join(cp.target, cp.enrollment_secret(), f"client{i}")
    states = [gw_state or eg.gateway_state()] + (client_states or [eg.client_state(i) for i in range(len(eg.clients))])
    for n in (eg.gw, *eg.clients):
        n.start()
    for st in states:
        cp.snapshot(cp.sign_all(st))
    for st in states:
        ack = cp.wait_ack(st.node, st.revision)
        assert ack.status.code == 0, ack


def ping(node: Node, count: int, dst: str = "100.64.0.1"):
    return node.host.spawn("ping", "-n", "-i", "0.1", "-c", str(count), "-W", "1", dst)


def lost(p) -> tuple[int, int]:
    """(sent, lost) of a finished ping; prints its round-trip summary, whose maximum
    shows how long packets waited (WireGuard queues them during a handshake)."""
    out, _ = p.communicate(timeout=120)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    rtt = re.search(r"rtt .*", out)
    print(rtt.group(0) if rtt else "no rtt summary")
    return int(m.group(1)), int(m.group(1)) - int(m.group(2))


def wait_first_replies(node: Node, dst: str = "100.64.0.1") -> None:
    """The tunnel carries traffic (a handshake happened) before measuring anything."""
    r = node.host.run("ping", "-n", "-c", "1", "-w", "10", dst, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def psk_of(node: Node, peer: str) -> str:
    """sha256 of the pre-shared key the interface holds for ``peer`` (never the key)."""
    out = node.host.run("wg", "show", node.ifname, "preshared-keys").stdout
    for line in out.splitlines():
        k, _, v = line.partition("\t")
        if k == peer:
            return hashlib.sha256(v.strip().encode()).hexdigest()
    return ""


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def texts(nodes: list[Node]) -> list[bytes]:
    out = []
    for n in nodes:
        for f in (n.log_path, n.state_dir / "status.json"):
            if f.exists():
                out.append(f.read_bytes())
        out.append(n.gatewayd("show").stdout.encode())
    return out


def assert_absent(secret: str, blobs: list[bytes]) -> None:
    raw = base64.b64decode(secret)
    for needle in (secret.encode(), raw.hex().encode()):
        assert not any(needle in b for b in blobs), "a secret reached a log, the status or show"


# ---------------------------------------------------------------- signed peers


def test_forged_peers_are_not_applied_and_the_ack_names_them(cp: ScriptedControlPlane, egress: Egress):
    eg = egress
    up(cp, eg)
    client_key = eg.clients[0].public_key
    genuine = signing.sign(cp.authority, client_name(0), client_key)
    st = cp.sign_all(eg.gateway_state(revision=2))
    forged = {
        # a valid signature by the authority, but for another node (client0)
        "networks/lab/nodes/moved": (random_key(), signing.sign(cp.authority, client_name(0), random_key())),
        # client0's genuine signature, pasted onto another key
        "networks/lab/nodes/pasted": (random_key(), genuine),
        # a signature by another authority
        "networks/lab/nodes/rogue": (random_key(), None),
        # no signature at all
        "networks/lab/nodes/unsigned": (random_key(), b""),
    }
    for i, (resource, (key, sig)) in enumerate(forged.items()):
        if sig is None:
            sig = signing.sign(Ed25519PrivateKey.generate(), resource, key)
        p = st.peers.add(public_key=key, resource=resource, public_key_signature=sig)
        p.allowed_ips.append(f"100.64.0.{100 + i}/32")
    # a route through a refused peer goes with it; the rest of the state applies
    st.routes.add(destination="100.64.1.0/24", via_peer=forged["networks/lab/nodes/unsigned"][0])
    st.peers[-1].allowed_ips.append("100.64.1.0/24")
    cp.snapshot(st)
    ack = cp.wait_ack(GW, 2)
    assert ack.revision == 2 and ack.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    msg = ack.status.message
    assert msg.startswith("refused 4 peers: "), msg
    for resource in forged:
        assert resource in msg
    assert "networks/lab/nodes/unsigned: public key not signed by the key authority" in msg
    assert ack.status.details and ack.status.details[0].type_url.endswith("google.rpc.ErrorInfo")

    wg = eg.gw.peers()
    assert client_key in wg and not any(key in wg for key, _ in forged.values())
    assert "100.64.1.0/24" not in eg.gw.host.run("ip", "route", "show", "table", "all").stdout
    wait_first_replies(eg.clients[0])  # the signed peer works
    st_file = eg.gw.status()
    assert st_file["applied_revision"] == 2 and len(st_file["refused_peers"]) == 4
    log = eg.gw.log_path.read_text()
    assert "refused peer networks/lab/nodes/pasted" in log

    # A peer refused earlier and correctly signed later is applied.
    moved_key = forged["networks/lab/nodes/moved"][0]
    fixed = pb.Peer(public_key=moved_key, resource="networks/lab/nodes/moved", allowed_ips=["100.64.0.100/32"])
    cp.delta(GW, pb.DesiredStateDelta(base_revision=2, upserted_peers=[cp.sign(fixed)]), 3)
    ack = cp.wait_ack(GW, 3)
    assert ack.status.message.startswith("refused 3 peers: ") and "nodes/moved" not in ack.status.message
    assert moved_key in eg.gw.peers()

    # Once the forged peers are gone, the ack is OK again.
    gone = [k for r, (k, _) in forged.items() if r != "networks/lab/nodes/moved"]
    cp.delta(GW, pb.DesiredStateDelta(base_revision=3, removed_peers=gone, routes_changed=True), 4)
    ack = cp.wait_ack(GW, 4)
    assert ack.status.code == 0, ack
    assert eg.gw.status()["refused_peers"] == []


# ---------------------------------------------------------------- pre-shared keys


def test_psk_rotation_on_both_ends_under_ping_loses_nothing(cp: ScriptedControlPlane, egress2: Egress):
    eg = egress2
    psk = {0: random_key(), 1: random_key()}
    gw_state = eg.gateway_state(client0={"preshared_key": psk[0]}, client1={"preshared_key": psk[1]})
    up(cp, eg, gw_state, [eg.client_state(i, preshared_key=psk[i]) for i in (0, 1)])
    c0, c1 = eg.clients
    wait_first_replies(c0)
    wait_first_replies(c1)
    other_before = eg.gw.peers()[c1.public_key]
    assert psk_of(eg.gw, c0.public_key) == sha(psk[0]) == psk_of(c0, eg.gw.public_key)

    p = ping(c0, 60)
    wait_first_replies(c0)
    new = random_key()
    gw_peer = next(x for x in cp.sign_all(eg.gateway_state(client0={"preshared_key": new})).peers
                   if x.public_key == c0.public_key)
    c0_peer = cp.sign_all(eg.client_state(0, preshared_key=new)).peers[0]
    # Only the pre-shared key of one peer changes, on each end.
    cp.delta(GW, pb.DesiredStateDelta(base_revision=1, upserted_peers=[gw_peer]), 2)
    cp.delta(client_name(0), pb.DesiredStateDelta(base_revision=1, upserted_peers=[c0_peer]), 2)
    for node in (GW, client_name(0)):
        assert cp.wait_ack(node, 2).status.code == 0
    for n in (eg.gw, c0):
        st = n.wait_applied(2)
        assert st["last_changes"] == 1  # one UAPI update of that peer, nothing else
    assert psk_of(eg.gw, c0.public_key) == sha(new) == psk_of(c0, eg.gw.public_key)
    assert psk_of(eg.gw, c1.public_key) == sha(psk[1])
    sent, n_lost = lost(p)
    print(f"pre-shared key rotation under ping: {n_lost} of {sent} packets lost")
    assert sent == 60 and n_lost == 0

    # The other peer's session was not touched by the change.
    other_after = eg.gw.peers()[c1.public_key]
    assert other_after["handshake"] == other_before["handshake"]
    assert other_after["rx"] >= other_before["rx"] and other_after["tx"] >= other_before["tx"]

    # Both ends really agree on the new key: a fresh handshake (the client drops and
    # re-adds the gateway peer) works.
    cp.delta(client_name(0), pb.DesiredStateDelta(base_revision=2, removed_peers=[eg.gw.public_key]), 3)
    cp.wait_ack(client_name(0), 3)
    c0_state = cp.sign_all(eg.client_state(0, preshared_key=new, revision=4))
    cp.snapshot(c0_state)
    assert cp.wait_ack(client_name(0), 4).status.code == 0
    wait_first_replies(c0)
    assert c0.peers()[eg.gw.public_key]["handshake"] > 0

    assert_absent(new, texts([eg.gw, c0, c1]))
    for s in psk.values():
        assert_absent(s, texts([eg.gw, c0, c1]))


# ---------------------------------------------------------------- node key rotation


@pytest.mark.parametrize("rotating", ["client", "gateway"])
def test_node_key_rotation_under_ping(cp: ScriptedControlPlane, egress: Egress, rotating: str):
    eg = egress
    up(cp, eg)
    client = eg.clients[0]
    node, name = (client, client_name(0)) if rotating == "client" else (eg.gw, GW)
    other, other_name = (eg.gw, GW) if rotating == "client" else (client, client_name(0))
    old = node.public_key
    wait_first_replies(client)
    p = ping(client, 100)
    wait_first_replies(client)

    # 1. RotateKey -> NewKey: a pending pair, 0600; the interface keeps the old key.
    cp.rotate_key(name)
    new = cp.wait_new_key(name)
    assert new != old and keys.is_valid_key(new)
    pending = node.state_dir / keys.PENDING_KEY_FILE
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    assert node.wg_public_key() == old
    cp.rotate_key(name)  # asked again: the same pending key
    assert cp.wait_new_key(name, count=2) == new
    assert node.status()["pending_public_key"] == new

    # 2. The peer learns the new (signed) key first ...
    node.public_key = new
    other_state = cp.sign_all(eg.gateway_state(revision=2) if rotating == "client" else eg.client_state(0, revision=2))
    cp.snapshot(other_state)
    assert cp.wait_ack(other_name, 2).status.code == 0
    # 3. ... then the node's state names it, and the node switches.
    own = eg.client_state(0) if rotating == "client" else eg.gateway_state()
    own.interface.public_key = new
    cp.delta(name, pb.DesiredStateDelta(base_revision=1, interface=own.interface), 2)
    ack = cp.wait_ack(name, 2)
    assert ack.status.code == 0, ack
    assert node.wg_public_key() == new
    assert not pending.exists()
    private = node.state_dir / keys.PRIVATE_KEY_FILE
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert keys.public_key_of(keys.Secret(private.read_text().strip())) == new
    assert other.peers().keys() == {new}

    sent, n_lost = lost(p)
    print(f"node key rotation of the {rotating} under ping: {n_lost} of {sent} packets lost")
    assert sent == 100 and n_lost <= 10
    wait_first_replies(client)
    assert_absent(private.read_text().strip(), texts([eg.gw, client]))
