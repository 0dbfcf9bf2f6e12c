"""System tests of path health, relays and learned endpoints (issue 13), through
a real control plane (`--path-delay 2 --path-recover-after 3`) and real
gatewayd agents on wireguard-go, in namespaces::

    A 192.0.2.2 -- natA (masquerade) ---------\\
    B 192.0.2.6 -- natB (masquerade) ----------+-- inet (router) -- R 203.0.113.2 (relay)
    C 192.0.2.10 - natC (masquerade fully-random)/       |
                                                         +-- P 203.0.113.14 (public)
    D (no link at all; its endpoint leads nowhere)
    C 198.51.100.1 -- T 198.51.100.2 (a LAN host behind C's egress gateway "lan")

A, B and C have no endpoint: every pair of them starts relayed through R. A
and B are behind NATs that keep one mapping per source (endpoint-independent):
R hears them from their mappings, the control plane hands those to the other
side (learned endpoints), their handshakes meet, and after the recovery delay
the pair goes direct. C's NAT maps every destination anew (fully-random), so
the endpoint R learned is no use to A: A-C stays relayed. A-P is direct (P has
an endpoint) until the test cuts it on the router: it moves to R, and back once
the cut is lifted, without flapping while the link is unstable. D is never
reachable: the status says so, with the reason. C runs the egress gateway
"lan" for 198.51.100.0/29: A reaches T through R, NATed by C, as the network
ALLOWs and then under DENY with a policy for one port (the last test).

The topology and the control plane are shared by the module's tests (in order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from meshgate.api.v1 import egress_pb2, enrollment_pb2, network_pb2, node_pb2, node_pb2_grpc
from meshgate.common.testing import ServiceProcess, in_ci
from meshgate.gatewayd.lab import ControlPlaneView, Host, Lab, can_run

pytestmark = pytest.mark.root

DELAY_S, RECOVER_S = 2, 3
OVERLAY = {"r": "100.64.0.1", "p": "100.64.0.2", "a": "100.64.0.3", "b": "100.64.0.4", "c": "100.64.0.5",
           "d": "100.64.0.6"}
MESHGATE = str(Path(sys.executable).with_name("meshgate"))
LAN, T, C_LAN, WEB = "198.51.100.0/29", "198.51.100.2", "198.51.100.1", 8080


def _nat(host: Host, out_if: str, random: bool) -> None:
    host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    how = "masquerade fully-random" if random else "masquerade"
    # A home router's firewall too: unsolicited packets from outside are dropped
    # before conntrack confirms them (else they would hold the mapping's tuple).
    host.run("nft", "-f", "-", input=f"table ip m13nat {{\n chain post {{\n  type nat hook postrouting priority srcnat;"
                                     f" policy accept;\n  oifname \"{out_if}\" {how}\n }}\n"
                                     f" chain in {{\n  type filter hook input priority filter; policy accept;\n"
                                     f"  iifname \"{out_if}\" ct state new drop\n }}\n"
                                     f" chain filt {{\n  type filter hook forward priority filter; policy accept;\n"
                                     f"  iifname \"{out_if}\" ct state new drop\n }}\n}}\n")


class World:
    def __init__(self, lab: Lab, cp: ServiceProcess, view: ControlPlaneView, hosts: dict, nodes: dict):
        self.lab, self.cp, self.view, self.hosts, self.nodes = lab, cp, view, hosts, nodes
        self.node_api = node_pb2_grpc.NodeServiceStub(view.channel)
        self.etcd_endpoint = self.etcd_prefix = ""

    def status_of(self, role: str) -> network_pb2.NodeConvergence:
        st = self.view.status()
        return next(n for n in st.nodes if n.node.endswith(f"/{role}"))

    def path(self, role: str, peer: str) -> network_pb2.PeerPath | None:
        nc = self.status_of(role)
        return next((p for p in nc.unreachable_peers if p.peer.endswith(f"/{peer}")), None)

    def allowed(self, role: str, peer: str) -> list[str]:
        """The allowed IPs of `peer`'s entry on `role`'s interface (wg dump)."""
        key = self.nodes[peer].public_key
        return str(self.nodes[role].peers().get(key, {}).get("allowed_ips", "")).split(",")

    def relayed_by(self, role: str, peer: str) -> bool:
        return f"{OVERLAY[peer]}/32" in self.allowed(role, "r")

    def direct(self, role: str, peer: str) -> bool:
        return f"{OVERLAY[peer]}/32" in self.allowed(role, peer)

    def ping(self, role: str, peer: str, count: int = 1) -> bool:
        r = self.hosts[role].run("ping", "-c", str(count), "-i", "0.2", "-W", "1", OVERLAY[peer], check=False)
        return r.returncode == 0

    def rx_from(self, role: str, peer: str) -> int:
        return int(self.nodes[role].peers().get(self.nodes[peer].public_key, {}).get("rx", 0))

    def cut(self, on: bool) -> None:
        inet = self.hosts["inet"]
        inet.run("nft", "delete", "table", "ip", "m13cut", check=False)
        if on:  # A's mapping is natA's address; P's is its own
            inet.run("nft", "-f", "-", input="table ip m13cut {\n chain filt {\n  type filter hook forward priority 0;"
                     " policy accept;\n  ip saddr 203.0.113.6 ip daddr 203.0.113.14 drop\n"
                     "  ip saddr 203.0.113.14 ip daddr 203.0.113.6 drop\n }\n}\n")

    def dump(self) -> str:
        """What the status and the interfaces say, for failure messages."""
        keys = {n.public_key: role for role, n in self.nodes.items()}
        lines = [str(self.view.status())]
        for role, n in self.nodes.items():
            for k, p in n.peers().items():
                lines.append(f"{role} -> {keys.get(k, k)}: {p}")
        return "\n".join(lines)

    def decided_moves(self, pair: str, since_ns: int) -> int:
        """The moves the control plane decided for `pair` since then (its mark's history)."""
        r = subprocess.run(["etcdctl", "--endpoints", self.etcd_endpoint, "get", "--print-value-only",
                            f"{self.etcd_prefix}/pathRoutes/lab/{pair}"], capture_output=True, text=True, timeout=30)
        rec = json.loads(r.stdout) if r.stdout.strip() else {}
        return sum(1 for t in rec.get("moves", []) if t >= since_ns)

    def path_record(self, role: str) -> dict:
        """What `role`'s agent last reported of its peers (`pathHealth/lab/{role}`, by peer id)."""
        r = subprocess.run(["etcdctl", "--endpoints", self.etcd_endpoint, "get", "--print-value-only",
                            f"{self.etcd_prefix}/pathHealth/lab/{role}"], capture_output=True, text=True, timeout=30)
        rec = json.loads(r.stdout) if r.stdout.strip() else {}
        return {k.rsplit("/", 1)[-1]: v for k, v in rec.items()}

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "MESHGATE_TOKEN": self.cp.admin_token}
        return subprocess.run([MESHGATE, "--target", self.cp.target, *args], env=env,
                              capture_output=True, text=True, timeout=60)


def until(pred, what: str, timeout: float = 60, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f}s\n{DUMP[0]() if DUMP else ''}")


DUMP: list = []  # the world's dump(), for failure messages


@pytest.fixture(scope="module")
def world(etcd_server):
    reason = can_run()
    if reason is not None:
        if in_ci():
            pytest.fail(f"CI=true but system tests cannot run: {reason}")
        pytest.skip(reason)
    lab = Lab(prefix="m13")
    cp = view = None
    try:
        h = {role: lab.host(role) for role in ("inet", "r", "p", "na", "nb", "nc", "a", "b", "c", "d", "t")}
        inet = h["inet"]
        inet.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        lab.wire(inet, "eth-r", "203.0.113.1/30", h["r"], "eth-up", "203.0.113.2/30")
        lab.wire(inet, "eth-na", "203.0.113.5/30", h["na"], "eth-up", "203.0.113.6/30")
        lab.wire(inet, "eth-nb", "203.0.113.9/30", h["nb"], "eth-up", "203.0.113.10/30")
        lab.wire(inet, "eth-p", "203.0.113.13/30", h["p"], "eth-up", "203.0.113.14/30")
        lab.wire(inet, "eth-nc", "203.0.113.17/30", h["nc"], "eth-up", "203.0.113.18/30")
        for role, gw in (("r", "203.0.113.1"), ("p", "203.0.113.13"), ("na", "203.0.113.5"),
                         ("nb", "203.0.113.9"), ("nc", "203.0.113.17")):
            h[role].ip("route", "add", "default", "via", gw)
        for i, (node, nat) in enumerate((("a", "na"), ("b", "nb"), ("c", "nc"))):
            base = 4 * i
            lab.wire(h[nat], "eth-in", f"192.0.2.{base + 1}/30", h[node], "eth-up", f"192.0.2.{base + 2}/30")
            h[node].ip("route", "add", "default", "via", f"192.0.2.{base + 1}")
            _nat(h[nat], "eth-up", random=(node == "c"))
        lab.wire(h["c"], "eth-lan", f"{C_LAN}/29", h["t"], "eth-up", f"{T}/29")
        h["t"].whoami_server(T, WEB)
        h["t"].whoami_server(T, WEB + 1)

        socket = str(lab.dir / "cp.sock")
        prefix = f"/t-{uuid.uuid4().hex[:12]}"
        cp = ServiceProcess("meshgate-controlplane",
                            ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", prefix,
                             "--path-delay", str(DELAY_S), "--path-recover-after", str(RECOVER_S)],
                            listen=f"127.0.0.1:0,unix:{socket}").start()
        view = ControlPlaneView(cp.target, f"unix:{socket}", token=cp.admin_token)
        view.networks.CreateNetwork(network_pb2.CreateNetworkRequest(network_id="lab", network=network_pb2.Network(
            ipv4_cidr="100.64.0.0/24", persistent_keepalive=duration_pb2.Duration(seconds=1))))
        key = view.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
            parent="networks/lab", enrollment_key_id="k", enrollment_key=enrollment_pb2.EnrollmentKey()))
        nodes = {}
        endpoints = {"r": "203.0.113.2:51820", "p": "203.0.113.14:51820", "d": "198.51.100.77:51820"}
        for role in ("r", "p", "a", "b", "c", "d"):  # in the order of OVERLAY's addresses
            n = nodes[role] = lab.node(h[role], role)
            n.join(view.agent_target, key.secret, role, endpoint=endpoints.get(role, ""), insecure_no_authority=True)
        w = World(lab, cp, view, h, nodes)
        w.etcd_endpoint, w.etcd_prefix = etcd_server.endpoint, prefix
        w.node_api.UpdateNode(node_pb2.UpdateNodeRequest(
            node=node_pb2.Node(name="networks/lab/nodes/r", relay=True),
            update_mask=field_mask_pb2.FieldMask(paths=["relay"])))
        view.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
            parent="networks/lab", egress_gateway_id="lan",
            egress_gateway=egress_pb2.EgressGateway(node="networks/lab/nodes/c", ranges=[LAN])))
        for n in nodes.values():
            n.start()
        view.wait_converged(6, at_least=view.status().revision)
        DUMP[:] = [w.dump]
        yield w
    finally:
        if view is not None:
            view.close()
        if cp is not None:
            cp.stop()
            if os.environ.get("M13_CP_LOG"):
                Path(os.environ["M13_CP_LOG"]).write_text(cp.log(tail=0))
        lab.close()
        left = lab.leftovers()
        assert not left, f"the test left things behind: {left}"


def test_nat_pairs_relayed_then_direct_where_the_nat_allows(world: World):
    w = world
    # Relayed from the start: neither side has an endpoint. Data flows through R.
    assert w.relayed_by("a", "b") and w.relayed_by("b", "a") and not w.direct("a", "b")
    until(lambda: w.ping("a", "b"), "A reaches B (through R)")
    until(lambda: w.ping("a", "c"), "A reaches C (through R)")
    # Endpoint-independent NATs: learned endpoints, handshakes meet, direct after the recovery delay.
    until(lambda: w.direct("a", "b") and w.direct("b", "a"), "A-B direct", timeout=60)
    assert not w.relayed_by("a", "b")
    until(lambda: w.ping("a", "b"), "A reaches B directly")
    # ... and then the data goes direct: R hears nothing of it.
    before = w.rx_from("r", "a")
    assert w.ping("a", "b", count=20)
    assert w.rx_from("r", "a") - before < 20 * 84, "A's pings to B still went through R"
    # C's NAT maps per destination: A-C stays relayed (well past the time A-B took).
    time.sleep(RECOVER_S + DELAY_S)
    assert w.relayed_by("a", "c") and w.relayed_by("c", "a")
    assert w.ping("a", "c")
    p = w.path("a", "c")
    assert p is not None and p.relay.endswith("/r") and p.state == network_pb2.PATH_NEVER_CONNECTED, p


def test_a_relayed_gateway_s_egress_goes_through_the_relay(world: World):
    """A-C is relayed for good (C's NAT maps per destination): A reaches T, in
    the range C's gateway carries, through R, and T sees C's LAN address (NAT)."""
    w = world
    assert w.relayed_by("a", "c")
    assert LAN in w.allowed("a", "r") and LAN not in w.allowed("a", "c")
    assert LAN in w.allowed("r", "c")
    before = w.rx_from("r", "a")
    seen = until(lambda: w.hosts["a"].ask(T, WEB, timeout=3), "A reaches T through R and C")
    assert seen == C_LAN, seen
    assert w.rx_from("r", "a") > before  # it went through R
    # A measures its round trip to the relay (for the choice among several) and reports it
    until(lambda: w.path_record("a").get("r", {}).get("rtt_us"), "A reports its round trip to R", timeout=30)


def test_cut_direct_path_moves_to_relay_and_back_without_flapping(world: World):
    w = world
    until(lambda: w.direct("a", "p") and w.ping("a", "p"), "A-P direct")
    moves = Moves(w, "a", "p")
    cut_ns = time.time_ns()
    w.cut(True)
    try:
        until(lambda: w.relayed_by("a", "p") and w.relayed_by("p", "a"), "A-P relayed after the cut", timeout=60)
        until(lambda: w.ping("a", "p"), "A reaches P through R while the direct path is cut")
        p = until(lambda: w.path("p", "a"), "the status lists A-P")
        assert p.relay.endswith("/r") and p.state == network_pb2.PATH_STALE, p
        moves_at_cut = until(lambda: moves.count, "the sampler saw the move", timeout=10)
        assert moves_at_cut == 1, moves.seen
        # An unstable link for most of a minute: open for less than the
        # recovery delay, then cut for long enough to be seen (the relayed
        # pair's direct entry carries only keepalives, one a second).
        for _ in range(6):
            w.cut(False)
            time.sleep(RECOVER_S * 2 / 3)
            w.cut(True)
            time.sleep(6)
        assert moves.count == moves_at_cut, f"the pair moved while the link was unstable: {moves.seen}"
    finally:
        w.cut(False)
    until(lambda: w.direct("a", "p") and w.direct("p", "a"), "A-P direct again after the cut", timeout=90)
    assert w.ping("a", "p")
    time.sleep(1)
    assert moves.stop() == 2, f"A-P did not move exactly twice (to the relay and back): {moves.seen}"
    assert w.decided_moves("a~p", cut_ns) == 2  # not even a flip too quick for the interface to show
    # The status through the CLI agrees: nothing between A and P any more.
    r = w.cli("network", "get-status", "networks/lab", "-o", "json")
    assert r.returncode == 0, r.stderr
    nodes = {n["node"]: n for n in json.loads(r.stdout)["nodes"]}
    assert not any(p["peer"].endswith("/p") for p in nodes["networks/lab/nodes/a"].get("unreachablePeers", []))


def test_a_local_send_failure_is_seen_by_the_sender(world: World):
    """A drops its own packets to P on its underlay (an output rule): wireguard-go
    counts none of them, so A's traffic is never "unanswered" by bytes; A's
    agent still reports the pair (its tx stands still while keepalives are due)."""
    w = world
    until(lambda: w.direct("a", "p") and w.ping("a", "p"), "A-P direct")
    a = w.hosts["a"]
    a.run("nft", "-f", "-", input="table ip m13out {\n chain out {\n  type filter hook output priority 0;"
          " policy accept;\n  ip daddr 203.0.113.14 udp dport 51820 drop\n }\n}\n")
    try:
        def a_says_unanswered() -> bool:
            rec = w.path_record("a").get("p", {})
            return bool(rec.get("unanswered_ns"))
        until(a_says_unanswered, "A's own report of P: unanswered", timeout=60)
        until(lambda: w.relayed_by("a", "p"), "A-P relayed", timeout=30)
        until(lambda: w.ping("a", "p"), "A reaches P through R")
    finally:  # (the way back is the cut test's; the later tests do not need A-P direct)
        a.run("nft", "delete", "table", "ip", "m13out", check=False)


def test_a_node_nobody_reaches_is_unhealthy_with_the_reason(world: World):
    w = world
    nc = until(lambda: (s := w.status_of("d")) and not s.healthy and s, "D unhealthy", timeout=30)
    paths = {p.peer.rsplit("/", 1)[1]: p for p in nc.unreachable_peers}
    assert paths["p"].state == network_pb2.PATH_NEVER_CONNECTED
    assert "no handshake" in paths["p"].reason
    assert nc.converged  # it applied its configuration: converged, and still unhealthy
    r = w.cli("network", "get-status", "networks/lab")
    assert r.returncode == 0, r.stderr
    assert "never connected" in r.stdout


class Moves:
    """Counts the moves of a pair between direct and relayed, as `role`'s
    WireGuard interface shows them, sampled in a thread."""

    def __init__(self, w: World, role: str, peer: str):
        import threading

        self.w, self.role, self.peer = w, role, peer
        self.count, self.state = 0, w.relayed_by(role, peer)
        self.seen: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                now = self.w.relayed_by(self.role, self.peer)
            except Exception:  # noqa: BLE001 - a failed read (wg busy) is not a move; read again
                continue
            if now != self.state:
                self.state, self.count = now, self.count + 1
                self.seen.append((round(time.monotonic(), 1), now))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.count


def test_relayed_egress_under_deny_follows_the_policies(world: World):
    """Last (it turns the network to DENY): A may reach T's port 8080 and no
    other; the relay and the gateway both enforce it."""
    from meshgate.api.v1 import policy_pb2, policy_pb2_grpc

    w = world
    policies = policy_pb2_grpc.AccessPolicyServiceStub(w.view.channel)
    for pid, pol in (("via-relay", policy_pb2.AccessPolicy(sources=["*"], destinations=["node:r"])),
                     ("a-web", policy_pb2.AccessPolicy(sources=["node:a"], destinations=["egress:lan"],
                                                       protocol=policy_pb2.TCP,
                                                       ports=[policy_pb2.PortRange(first=WEB)]))):
        policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
            parent="networks/lab", access_policy_id=pid, access_policy=pol))
    w.view.networks.UpdateNetwork(network_pb2.UpdateNetworkRequest(
        network=network_pb2.Network(name="networks/lab", default_policy=network_pb2.DENY),
        update_mask=field_mask_pb2.FieldMask(paths=["default_policy"])))
    until(lambda: LAN in w.allowed("a", "r") and w.relayed_by("a", "c"), "A routes the LAN through R under DENY")
    seen = until(lambda: w.hosts["a"].ask(T, WEB, timeout=3), "A reaches T:8080 through R under DENY")
    assert seen == C_LAN, seen
    assert w.hosts["a"].ask(T, WEB + 1, timeout=3) is None  # another port: refused
    assert w.hosts["a"].run("ping", "-c", "1", "-W", "1", T, check=False).returncode != 0  # ICMP: not allowed
