"""Egress gateway failover in namespaces, through a real control plane
(`--gateway-failover-after 2`) and real gatewayd agents:

    client --203.0.113.0/28-- primary --198.51.100.0/25--- ext (whoami 198.51.100.10)
       \\----203.0.113.16/28-- standby --198.51.100.128/25--/

Both gateway nodes declare 198.51.100.0/24 (the primary with the higher
priority), NAT on. The primary's machine dies (its agent is killed and its
links go down): once its agent has been away for the failover delay, the
client's traffic to the range leaves through the standby (the service sees the
standby's address). The primary comes back: the range returns to it.
"""

from __future__ import annotations

import signal
import time

import pytest

from meshgate.api.v1 import egress_pb2, enrollment_pb2, network_pb2
from meshgate.common.testing import ServiceProcess
from meshgate.gatewayd.lab import ControlPlaneView, Lab

pytestmark = pytest.mark.root

RANGE = "198.51.100.0/24"
EXT, PORT = "198.51.100.10", 7070
PRIMARY_NAT, STANDBY_NAT = "198.51.100.1", "198.51.100.129"
DELAY_S = 2


def ask_until(host, want: str, deadline_s: float) -> float:
    """Seconds until the whoami service sees `want`; fails past the deadline."""
    t0 = time.monotonic()
    seen = None
    while time.monotonic() - t0 < deadline_s:
        seen = host.ask(EXT, PORT, timeout=1)
        if seen == want:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"the service never saw {want} within {deadline_s:.0f}s (last: {seen})")


def test_primary_dies_range_moves_to_standby_and_back(lab: Lab, etcd_server, etcd_prefix):
    c, p, s, ext = lab.host("c"), lab.host("p"), lab.host("s"), lab.host("ext")
    lab.wire(c, "eth-p", "203.0.113.2/28", p, "eth-c", "203.0.113.1/28")
    lab.wire(c, "eth-s", "203.0.113.18/28", s, "eth-c", "203.0.113.17/28")
    lab.wire(p, "eth-x", f"{PRIMARY_NAT}/25", ext, "eth-p", f"{EXT}/25")
    lab.wire(s, "eth-x", f"{STANDBY_NAT}/25", ext, "eth-s", "198.51.100.130/25")
    s.ip("route", "add", f"{EXT}/32", "via", "198.51.100.130")
    client, primary, standby = lab.node(c, "c"), lab.node(p, "p"), lab.node(s, "s")

    socket = str(lab.dir / "cp.sock")
    proc = ServiceProcess(
        "meshgate-controlplane",
        ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix,
         "--gateway-failover-after", str(DELAY_S),
         # no startup grace (the agents join after the start) and a short failback hold:
         # this test looks at the delay (test_system_failover_health.py at the rest)
         "--gateway-startup-grace", "0", "--gateway-failback-after", "1"],
        listen=f"127.0.0.1:0,unix:{socket}",
    ).start()
    view = ControlPlaneView(proc.target, f"unix:{socket}", token=proc.admin_token)
    try:
        view.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
            network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
        key = view.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
            parent="networks/lab", enrollment_key_id="k", enrollment_key=enrollment_pb2.EnrollmentKey()))
        # no key service: the development mode
        primary.join(view.agent_target, key.secret, "primary", endpoint="203.0.113.1:51820",
                     insecure_no_authority=True)
        standby.join(view.agent_target, key.secret, "standby", endpoint="203.0.113.17:51820",
                     insecure_no_authority=True)
        client.join(view.agent_target, key.secret, "client", insecure_no_authority=True)
        for n in (primary, standby, client):
            n.start()
        for node, prio in (("primary", 10), ("standby", 1)):
            view.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
                parent="networks/lab", egress_gateway_id=node,
                egress_gateway=egress_pb2.EgressGateway(node=f"networks/lab/nodes/{node}", ranges=[RANGE],
                                                        priority=prio)))
        view.wait_converged(3, at_least=view.status().revision)
        ext.whoami_server("0.0.0.0", PORT)
        c.wait_reachable("100.64.0.1")  # the primary's overlay address (the first to join)
        c.wait_reachable("100.64.0.2")  # and the standby's: the tunnel to it is up before it is needed
        assert c.ask(EXT, PORT) == PRIMARY_NAT

        # The primary's machine dies: agent killed, links down (wireguard-go is left, unreachable).
        primary.stop(signal.SIGKILL)
        p.ip("link", "set", "eth-c", "down")
        took = ask_until(c, STANDBY_NAT, deadline_s=60)
        st = view.status()
        gone = next(n for n in st.nodes if n.node.endswith("/primary"))
        assert not gone.connected
        print(f"failover: the service saw the standby {took:.1f}s after the primary died "
              f"(failover delay {DELAY_S}s)")

        # The primary comes back: the range returns to it.
        p.ip("link", "set", "eth-c", "up")
        primary.start()
        took_back = ask_until(c, PRIMARY_NAT, deadline_s=60)
        print(f"failback: the service saw the primary again {took_back:.1f}s after it restarted")
    finally:
        view.close()
        proc.stop()
