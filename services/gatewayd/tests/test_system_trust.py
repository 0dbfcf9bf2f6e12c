"""Agents that trust only what they should, in network namespaces, through the
user's door (the ``gatewayd`` CLI and real agents joined to a real gRPC
``AgentService`` this test scripts, ``lab.ScriptedControlPlane``):

- the key authority is pinned outside the control plane: a control plane that
  presents another authority is refused at join, only pinned keys are kept and
  used; without a pin, joining needs ``--insecure-no-authority``, which ``run``
  warns about on every start;
- a peer whose key is signed for another network is refused and reported;
- an interface gatewayd did not create (a wireguard-go ``wg`` configured) is
  left exactly as it was, the reason is in the ack and the status, and the agent
  does not crash-loop;
- plaintext to a control plane that is not local needs ``--insecure``;
- default routes need the node's consent, and never on the internet gateway.
"""

from __future__ import annotations

import base64
import json
import os
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from google.rpc import error_details_pb2

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.common import signing
from meshgate.gatewayd.lab import Egress, Host, Lab, Node, ScriptedControlPlane

pytestmark = pytest.mark.root

NET = "networks/lab"


@pytest.fixture
def cp(lab):
    server = ScriptedControlPlane(lab.dir / "agent.sock", Ed25519PrivateKey.generate())
    try:
        yield server
    finally:
        for n in lab.nodes:  # the agents go first, so they do not reconnect to nothing
            n.stop()
        server.close()


def random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def identity(node: Node) -> dict:
    return json.loads((node.state_dir / "identity.json").read_text())


def log_of(node: Node) -> str:
    return node.log_path.read_text(errors="replace") if node.log_path.exists() else ""


def wait_log(node: Node, text: str, count: int = 1, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = log_of(node)
        if got.count(text) >= count:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never logged {count} time(s):\n{log_of(node)}")


def table_routes(host: Host) -> str:
    """gatewayd's IPv4 routes in ``host`` ('' also when its table does not exist)."""
    return host.ip("-4", "route", "show", "table", "51821", check=False).stdout.strip()


def error_info(status) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    assert status.details and status.details[0].Unpack(info), status
    return info


def one_node_state(node: Node, name: str, peers: list[pb.Peer], revision: int = 1) -> pb.DesiredState:
    msg = pb.DesiredState(node=f"{NET}/nodes/{name}", revision=revision)
    msg.interface.name = node.ifname
    msg.interface.addresses.append("100.64.0.1/24")
    msg.peers.extend(peers)
    return msg


def signed_peer(authority: Ed25519PrivateKey, resource: str, i: int) -> pb.Peer:
    p = pb.Peer(public_key=random_key(), resource=resource, allowed_ips=[f"100.64.0.{i + 1}/32"])
    p.public_key_signature = signing.sign(authority, resource, p.public_key)
    return p


# ---------------------------------------------------------------- the key authority's pin


def test_join_pins_the_key_authority_outside_the_control_plane(cp: ScriptedControlPlane, lab: Lab):
    node = lab.node(lab.host("a"), "a")
    real = signing.public_bytes(cp.authority)
    rogue = Ed25519PrivateKey.generate()
    rogue_pub = signing.public_bytes(rogue)

    # The secret pins the real authority; the control plane presents its own.
    cp.presented = [rogue_pub]
    r = node.join_result(cp.target, cp.enrollment_secret(), "a")
    assert r.returncode == 4, r.stdout + r.stderr  # refused, not a bad flag (2)
    assert "join refused: the control plane presented key authority key(s)" in r.stderr
    assert "match none of the pinned fingerprint(s)" in r.stderr
    assert not (node.state_dir / "identity.json").exists()

    # A secret that pins nothing is refused before anything is sent.
    enrolled = len(cp.tokens)
    r = node.join_result(cp.target, cp.enrollment_secret(pinned=None), "a")
    assert r.returncode == 2 and "--insecure-no-authority" in r.stderr and "--authority-key" in r.stderr
    assert len(cp.tokens) == enrolled and not (node.state_dir / "identity.json").exists()

    # --authority-key pins it without the secret: the rogue key presented beside
    # the real one is not kept...
    cp.presented = [rogue_pub, real]
    out = node.join(cp.target, cp.enrollment_secret(pinned=None), "a", authority_keys=(real,))
    assert "key authority pinned by the --authority-key" in out
    saved = identity(node)
    assert saved["key_authority_public_keys"] == [base64.b64encode(real).decode()]
    assert saved["authority_pinned_by"] == "--authority-key" and not saved["insecure_no_authority"]

    # ... so a peer the rogue authority signed is refused by the running agent.
    node.start()
    good, forged = signed_peer(cp.authority, f"{NET}/nodes/b", 1), signed_peer(rogue, f"{NET}/nodes/c", 2)
    cp.snapshot(one_node_state(node, "a", [good, forged]))
    ack = cp.wait_ack(f"{NET}/nodes/a", 1)
    assert ack.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0], ack
    assert error_info(ack.status).metadata["peers"] == f"{NET}/nodes/c"
    node.wait_applied(1)
    assert set(node.peers()) == {good.public_key}
    assert "verified against 1 key authority key(s) pinned by the --authority-key" in log_of(node)


def test_without_a_pin_the_development_mode_is_explicit_and_loud(cp: ScriptedControlPlane, lab: Lab):
    node = lab.node(lab.host("a"), "a")
    cp.presented = []  # a control plane without a key service
    out = node.join(cp.target, cp.enrollment_secret(pinned=None), "a", insecure_no_authority=True)
    assert "WARNING: no key authority" in out
    assert identity(node)["insecure_no_authority"] is True
    warning = "INSECURE: development mode (joined with --insecure-no-authority): peer keys are NOT verified"
    for start in (1, 2):  # on every start
        node.start()
        wait_log(node, warning, count=start)
        node.stop()
    # An identity file of an older gatewayd (authority keys on the control plane's word): a clear error.
    saved = identity(node)
    del saved["format"]
    (node.state_dir / "identity.json").write_text(json.dumps(saved))
    r = node.gatewayd("run")
    assert r.returncode == 3 and "written by an older gatewayd" in r.stderr and "gatewayd join" in r.stderr


# ---------------------------------------------------------------- signed for this network


def test_a_peer_signed_for_another_network_is_refused_and_reported(cp: ScriptedControlPlane, lab: Lab):
    node = lab.node(lab.host("a"), "a")
    node.join(cp.target, cp.enrollment_secret(), "a")
    node.start()
    ours = signed_peer(cp.authority, f"{NET}/nodes/b", 1)
    # a genuine signature by the pinned authority, for a node of another network
    theirs = signed_peer(cp.authority, "networks/other/nodes/b", 2)
    assert signing.verify(signing.public_bytes(cp.authority), theirs.resource, theirs.public_key,
                          theirs.public_key_signature)
    cp.snapshot(one_node_state(node, "a", [ours, theirs]))
    ack = cp.wait_ack(f"{NET}/nodes/a", 1)
    assert ack.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0], ack
    assert ack.status.message == ("refused 1 peer: networks/other/nodes/b: resource is not in this node's "
                                  "network (networks/lab)")
    info = error_info(ack.status)
    assert info.reason == "PEER_KEY_REFUSED" and info.metadata["peers"] == "networks/other/nodes/b"
    st = node.wait_applied(1)
    assert st["refused_peers"] == ["networks/other/nodes/b: resource is not in this node's network (networks/lab)"]
    assert set(node.peers()) == {ours.public_key}
    assert f"refused peer networks/other/nodes/b (public key {theirs.public_key})" in log_of(node)


# ---------------------------------------------------------------- an interface it did not create


def their_interface(host: Host, ifname: str) -> tuple[str, str, str]:
    """What the operator's interface looks like: wg's dump (private key, port,
    peers), its addresses and its link."""
    return (host.run("wg", "show", ifname, "dump").stdout,
            host.ip("-o", "address", "show", "dev", ifname).stdout,
            host.ip("-o", "link", "show", "dev", ifname).stdout)


def test_an_interface_gatewayd_did_not_create_is_left_untouched(cp: ScriptedControlPlane, lab: Lab):
    host = lab.host("a")
    ifname = lab.ifname("wg0")
    private = base64.b64encode(X25519PrivateKey.generate().private_bytes_raw()).decode()
    their_peer = random_key()
    lab.plain_wireguard(host, ifname, f"""
[Interface]
PrivateKey = {private}
ListenPort = 51999
Address = 192.0.2.77/24
Table = off
[Peer]
PublicKey = {their_peer}
AllowedIPs = 192.0.2.78/32
Endpoint = 203.0.113.9:51820
""")
    before = their_interface(host, ifname)
    assert their_peer in before[0] and "192.0.2.77/24" in before[1]

    node = lab.node(host, "g")
    node.ifname = ifname  # gatewayd is configured with the operator's interface name
    peer = signed_peer(cp.authority, f"{NET}/nodes/b", 1)
    peer.endpoint = "203.0.113.10:51820"
    state = one_node_state(node, "a", [peer])
    state.interface.listen_port = 51820

    # gatewayd apply: refused, exit 1, and the reason.
    r = node.apply(state, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{ifname} already exists and gatewayd did not create it: leaving it untouched" in r.stderr
    r = node.gatewayd("plan", "--file", str(node.write(state, "plan.json")))
    assert r.returncode == 1 and "did not create it" in r.stderr
    # gatewayd down does not remove it either.
    r = node.gatewayd("down", "--interface", ifname)
    assert r.returncode == 0 and f"left {ifname} alone: gatewayd did not create it" in r.stdout
    assert their_interface(host, ifname) == before

    # The agent, streaming: the ack and the status say why; it keeps retrying
    # slowly, alive, and changes nothing.
    node.join(cp.target, cp.enrollment_secret(), "a")
    node.start(env={"MESHGATE_GATEWAYD_BACKOFF_MAX": "1"})
    cp.snapshot(cp.sign_all(state))
    ack = cp.wait_ack(f"{NET}/nodes/a", 1)
    assert ack.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], ack
    assert f"interface: {ifname} already exists and gatewayd did not create it" in ack.status.message
    st = node.wait_status(lambda s: s.get("attempt", 0) >= 3)
    assert "did not create it" in st["last_error"] and st["applied_revision"] is None
    pid = node.daemon.pid
    time.sleep(1)
    assert node.daemon.poll() is None and node.daemon.pid == pid
    assert their_interface(host, ifname) == before
    assert table_routes(host) == ""
    assert host.run("nft", "list", "tables").stdout.find("meshgate") < 0
    assert log_of(node).count("did not create it") >= 3

    # Once its owner removes it, the next retry makes gatewayd's own.
    for w in lab.plain:
        w.down()
    node.wait_applied(1)
    assert set(node.peers()) == {peer.public_key}
    assert node.wg_public_key() == node.public_key != base64.b64encode(
        X25519PrivateKey.from_private_bytes(base64.b64decode(private)).public_key().public_bytes_raw()).decode()


# ---------------------------------------------------------------- plaintext


def test_plaintext_to_a_control_plane_that_is_not_local_needs_insecure(cp: ScriptedControlPlane, lab: Lab):
    host, cp_host = lab.host("a"), lab.host("cp")
    # the control plane on another host of the network (its Unix socket relayed there)
    lab.wire(host, "eth0", "192.0.2.2/24", cp_host, "eth0", "192.0.2.1/24")
    cp_host.forward("192.0.2.1", 7400, str(cp.socket_path))
    remote = "192.0.2.1:7400"
    node = lab.node(host, "a")
    secret = cp.enrollment_secret()

    r = node.join_result(remote, secret, "a")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refusing plaintext to the control plane at 192.0.2.1:7400" in r.stderr and "--insecure" in r.stderr
    assert not cp.tokens and not (node.state_dir / "identity.json").exists()

    node.join(remote, secret, "a", insecure=True)
    warning = "INSECURE: plaintext to the control plane at 192.0.2.1:7400 (--insecure)"
    for start in (1, 2):  # saved by join; warned about on every start
        node.start()
        wait_log(node, warning, count=start)
        cp.wait_connected(f"{NET}/nodes/a")
        node.stop()

    # Joined over the Unix socket: pointing `run` at a remote address needs --insecure too.
    other = lab.node(host, "b")
    other.join(cp.target, secret, "b")
    r = other.gatewayd("run", "--control-plane", remote)
    assert r.returncode == 2 and "refusing plaintext to the control plane at 192.0.2.1:7400" in r.stderr


# ---------------------------------------------------------------- default routes


def test_default_routes_need_the_nodes_consent(cp: ScriptedControlPlane, egress: Egress):
    eg = egress
    gw, client = eg.gw, eg.clients[0]
    gw.join(cp.target, cp.enrollment_secret(), "gateway", accept_default_route=True)
    client.join(cp.target, cp.enrollment_secret(), "client0")  # no consent
    gw.start()
    client.start()
    # The internet gateway, which a control plane also tells to route everything through the client...
    gs = eg.gateway_state(internet_gateway=True, client0={"allowed_ips": ["0.0.0.0/0"]})
    gs.default_route_via_peer = client.public_key
    # ... and the client, told to route everything through the gateway, also as split default routes.
    cs = eg.client_state(0, internet_gateway=True)
    for dst in ("0.0.0.0/1", "128.0.0.0/1"):
        cs.routes.add(destination=dst, via_peer=gw.public_key)
    for st in (gs, cs):
        cp.snapshot(cp.sign_all(st))

    ack = cp.wait_ack(gs.node, 1)
    assert ack.status.code == 0, ack
    assert ack.status.message.startswith("declined 1 default route (this node is the internet gateway itself)")
    ack = cp.wait_ack(cs.node, 1)
    assert ack.status.code == 0, ack
    assert ack.status.message.startswith("declined 3 default routes (default routes need this node's consent")
    info = error_info(ack.status)
    assert info.reason == "DEFAULT_ROUTE_DECLINED" and info.metadata["routes"] == "default route,0.0.0.0/1,128.0.0.0/1"
    st = client.wait_applied(1)
    assert len(st["declined_routes"]) == 3 and st["accept_default_route"] is False
    for n in (gw, client):
        assert table_routes(n.host) == "", n.host.name
    assert client.host.route_dev(eg.ext_addr) == "eth0"
    assert "declined 3 default routes" in log_of(client)

    # The operator consents (for this run): the state on disk applies with its
    # default route, and the client's traffic leaves through the gateway.
    client.stop()
    client.start(extra=("--accept-default-route",))
    st = client.wait_status(lambda s: s.get("accept_default_route") is True and s.get("state") == "applied")
    assert st["declined_routes"] == []
    routes = table_routes(client.host)
    assert "default dev" in routes and "0.0.0.0/1 dev" in routes and "128.0.0.0/1 dev" in routes
    assert client.host.route_dev(eg.ext_addr) == client.ifname
    eg.ext.whoami_server(eg.ext_addr, 7070)
    client.host.wait_reachable("100.64.0.1")
    assert client.host.ask(eg.ext_addr, 7070) == eg.gw_ext_addr
    # the gateway still never routes through its client
    assert table_routes(gw.host) == ""
