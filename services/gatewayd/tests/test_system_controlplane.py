"""The whole loop in network namespaces: a real control plane (etcd, API, Sync
streams) and real gatewayd agents that joined with an enrollment key. Every
step is confirmed by the convergence status, not by sleeping.

The agents reach the control plane over a Unix socket: a socket file crosses
network namespaces, and the test hosts have no route to the root namespace.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgate.api.v1 import egress_pb2, enrollment_pb2, network_pb2
from meshgate.common.testing import ServiceProcess
from meshgate.gatewayd.lab import ControlPlaneView, Egress, Lab

EXT_PORT = 7070
MESHGATE = str(Path(sys.executable).with_name("meshgate"))
RANGE = "198.51.100.0/24"


class Loop(ControlPlaneView):
    """A control plane process and the API it is driven through (with the
    admin token of the first process on the prefix: a restarted one makes none)."""

    def __init__(self, cp: ServiceProcess, socket: str, token: str = ""):
        self.token = token or cp.admin_token
        super().__init__(cp.target, socket, token=self.token)
        self.cp, self.socket = cp, socket

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """The `meshgate` CLI against this control plane, with its admin token
        and nothing else of the environment's MESHGATE_/OTEL_ settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHGATE_", "OTEL_"))}
        env["MESHGATE_TOKEN"] = self.token
        env["MESHGATE_CONFIG"] = os.devnull
        return subprocess.run([MESHGATE, "--target", self.cp.target, *args], env=env, capture_output=True,
                              text=True, timeout=60)


def start_control_plane(etcd_server, etcd_prefix, socket: str) -> ServiceProcess:
    return ServiceProcess(
        "meshgate-controlplane",
        ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix],
        listen=f"127.0.0.1:0,unix:{socket}",
    ).start()


@contextlib.contextmanager
def loop_for(lab: Lab, etcd_server, etcd_prefix) -> Iterator[Loop]:
    """A control plane for `lab`'s agents (they reach it on a socket in the
    lab's directory); on exit the agents stop first, so that they do not
    reconnect to nothing, then the control plane."""
    socket = str(lab.dir / "cp.sock")
    lp = Loop(start_control_plane(etcd_server, etcd_prefix, socket), f"unix:{socket}")
    try:
        yield lp
    finally:
        for n in lab.nodes:
            n.stop()
        lp.close()
        lp.cp.stop()


@pytest.fixture
def loop(lab, etcd_server, etcd_prefix):
    with loop_for(lab, etcd_server, etcd_prefix) as lp:
        yield lp


def join_all(loop: Loop, eg: Egress) -> None:
    loop.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
        network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
    key = loop.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
        parent="networks/lab", enrollment_key_id="lab", enrollment_key=enrollment_pb2.EnrollmentKey(max_uses=3)))
    # no key service: the secret pins no key authority (the development mode)
    out = eg.gw.join(loop.socket, key.secret, "gateway", endpoint=f"{eg.gw_underlay(0)}:51820",
                     insecure_no_authority=True)
    assert "joined as networks/lab/nodes/gateway: 100.64.0.1" in out
    for i, c in enumerate(eg.clients):
        c.join(loop.socket, key.secret, f"client{i}", insecure_no_authority=True)
    for n in (eg.gw, *eg.clients):
        n.start()


def test_join_egress_nat_then_remove(loop: Loop, egress2: Egress):
    eg = egress2
    join_all(loop, eg)
    loop.wait_converged(3)
    # The health probe agrees: every running agent has applied its state.
    for n in (eg.gw, *eg.clients):
        r = n.gatewayd("check", "--max-age", "300")
        assert r.returncode == 0 and r.stdout.startswith("ok: revision"), r.stdout
    eg.ext.whoami_server(eg.ext_addr, EXT_PORT)
    assert eg.clients[0].host.ask(eg.ext_addr, EXT_PORT, timeout=1) is None  # no gateway yet

    gw = loop.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
        parent="networks/lab", egress_gateway_id="db",
        egress_gateway=egress_pb2.EgressGateway(node="networks/lab/nodes/gateway", ranges=[RANGE])))
    loop.wait_converged(3, at_least=int(gw.etag))
    for c in eg.clients:
        assert c.host.ask(eg.ext_addr, EXT_PORT) == eg.gw_ext_addr  # NATed to the gateway's address

    loop.egress.DeleteEgressGateway(egress_pb2.DeleteEgressGatewayRequest(name=gw.name))
    loop.wait_converged(3, at_least=loop.status().revision)
    for c in eg.clients:
        assert c.host.ask(eg.ext_addr, EXT_PORT, timeout=1) is None
        assert RANGE not in c.host.run("ip", "route", "show", "table", "all").stdout


def test_control_plane_restart_loses_no_packets(loop: Loop, egress: Egress, etcd_server, etcd_prefix):
    eg = egress
    join_all(loop, eg)
    loop.wait_converged(2)
    client = eg.clients[0]
    # Continuous ping across the tunnel (10 per second) for the whole restart,
    # once the tunnel passes packets (the first handshake may need a retry).
    client.host.wait_reachable("100.64.0.1")
    ping = client.host.spawn("ping", "-n", "-i", "0.1", "-c", "100", "-W", "1", "100.64.0.1")
    time.sleep(1)
    loop.cp.stop()
    opened = {n.host.name: _streams_opened(n) for n in (eg.gw, client)}
    loop.cp = start_control_plane(etcd_server, etcd_prefix, loop.socket[len("unix:"):])
    loop.close()
    loop.__init__(loop.cp, loop.socket, loop.token)
    # Each agent reconnected (a new stream, a fresh snapshot) and converged again.
    loop.wait_converged(2)
    for n in (eg.gw, client):
        assert _streams_opened(n) > opened[n.host.name]
    out, _ = ping.communicate(timeout=60)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    sent, received = int(m.group(1)), int(m.group(2))
    assert sent == 100 and received == sent, out


def _streams_opened(node) -> int:
    return len(re.findall(r"streaming desired state from", node.log_path.read_text()))


def test_one_trace_from_api_call_to_every_agents_apply(lab, egress2: Egress, etcd_server, etcd_prefix):
    """A change made through the API is one trace at a real OTLP receiver: the
    API call, the control plane's fan-out, and gatewayd's apply on each node
    the change affects."""
    import asyncio
    import threading

    from meshgate.common.testing import OtlpReceiver

    eg = egress2
    receiver_box: dict = {}
    ready = threading.Event()
    loop_ = asyncio.new_event_loop()

    def serve():
        asyncio.set_event_loop(loop_)
        receiver_box["r"] = loop_.run_until_complete(OtlpReceiver().start(unix_path=str(lab.dir / "otlp.sock")))
        ready.set()
        loop_.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ready.wait(10)
    otlp = receiver_box["r"]
    socket = str(lab.dir / "cp.sock")
    cp = ServiceProcess(
        "meshgate-controlplane",
        ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix],
        listen=f"127.0.0.1:0,unix:{socket}",
        env=otlp.env("meshgate-controlplane"),
    ).start()
    lp = Loop(cp, f"unix:{socket}")
    try:
        lp.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
            network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
        key = lp.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
            parent="networks/lab", enrollment_key_id="lab", enrollment_key=enrollment_pb2.EnrollmentKey()))
        eg.gw.join(lp.socket, key.secret, "gateway", endpoint=f"{eg.gw_underlay(0)}:51820",
                   insecure_no_authority=True)
        for i, c in enumerate(eg.clients):
            c.join(lp.socket, key.secret, f"client{i}", insecure_no_authority=True)
        for n in (eg.gw, *eg.clients):
            n.start(env=otlp.env("meshgate-gatewayd", via_unix=True))
        lp.wait_converged(3)

        gw = lp.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
            parent="networks/lab", egress_gateway_id="db",
            egress_gateway=egress_pb2.EgressGateway(node="networks/lab/nodes/gateway", ranges=[RANGE])))
        lp.wait_converged(3, at_least=int(gw.etag))

        api_name = "/meshgate.api.v1.EgressGatewayService/CreateEgressGateway"
        deadline = time.monotonic() + 30
        spans = []
        while time.monotonic() < deadline:
            api = [s for svc, s in otlp.spans if s.name == api_name]
            if api:
                spans = otlp.trace(api[0].trace_id)
                if sum(1 for _, s in spans if s.name == "gatewayd.apply") >= 3:
                    break
            time.sleep(0.2)
        by_name: dict[str, list] = {}
        for svc, s in spans:
            by_name.setdefault(s.name, []).append((svc, s))
        assert api_name in by_name, [s.name for _, s in otlp.spans]
        (_, api_span), = by_name[api_name]
        (_, fanout), = by_name["controlplane.fanout"]
        assert fanout.parent_span_id == api_span.span_id
        applies = by_name["gatewayd.apply"]
        nodes = set()
        for svc, s in applies:
            assert svc == "meshgate-gatewayd" and s.parent_span_id == api_span.span_id
            attrs = {a.key: a.value for a in s.attributes}
            nodes.add(attrs["meshgate.node"].string_value)
            assert attrs["meshgate.revision"].int_value == int(gw.etag)
        assert nodes == {"networks/lab/nodes/gateway", "networks/lab/nodes/client0", "networks/lab/nodes/client1"}
    finally:
        for n in (eg.gw, *eg.clients):
            n.stop()
        lp.close()
        cp.stop()
        asyncio.run_coroutine_threadsafe(otlp.stop(), loop_).result(10)
        loop_.call_soon_threadsafe(loop_.stop)
        t.join(10)
