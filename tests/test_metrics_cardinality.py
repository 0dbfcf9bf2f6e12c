"""Metrics stay bounded: 1,000 simulated agents on one control plane add no
series per node, and gatewayd's per-peer series stop at the cap (or are off).

The agents are the convergence benchmark's (tests/bench/bench_convergence.py:
real Sync streams over gRPC that ack every message); the series are counted in
what `--metrics-listen` serves, with `promtool check metrics` on it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from meshgate.common.testing import ServiceProcess, in_ci

BENCH = Path(__file__).resolve().parent / "bench"
AGENTS = 1000
MAX_SERIES = 400
"""Generous: about 200 with one network (most are histogram buckets); what matters is that it does not grow with N."""


def series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def promtool(text: str) -> None:
    if not Path("/usr/bin/promtool").exists():
        if in_ci():
            pytest.fail("CI=true but promtool is missing (Debian package prometheus)")
        pytest.skip("needs promtool (Debian package prometheus)")
    r = subprocess.run(["/usr/bin/promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def metrics_url(cp: ServiceProcess, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"metrics served at (http://\S+/metrics)", cp.log(tail=0))
        if m:
            return m.group(1)
        time.sleep(0.1)
    raise AssertionError(f"no metrics URL in the log:\n{cp.log()}")


def test_control_plane_series_do_not_grow_with_1000_agents(etcd_server, etcd_prefix):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_convergence as bc
    finally:
        sys.path.remove(str(BENCH))
    cp = ServiceProcess("meshgate-controlplane", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix",
                                                  etcd_prefix, "--metrics-listen", "0"]).start()
    try:
        url = metrics_url(cp)
        args = argparse.Namespace(agents=AGENTS, channels=50, enroll_concurrency=16, pause=0.0)

        async def start(agents) -> None:
            for i in range(0, len(agents), 100):
                batch = agents[i:i + 100]
                for a in batch:
                    a.start()
                await asyncio.wait_for(asyncio.gather(*(a.snapshot_seen.wait() for a in batch)), 120)
            errors = [a.error for a in agents if a.error]
            assert not errors, errors[:3]

        async def load() -> tuple[str, str]:
            r = bc.Run(cp.target, cp.proc.pid, args, admin_token=cp.admin_token)
            try:
                hub, spoke = await r.setup_network()
                await r.enroll_all(hub, spoke, AGENTS)  # before any stream, as the benchmark does
                await r.gateways.CreateEgressGateway(bc.egress_pb2.CreateEgressGatewayRequest(
                    parent=r.parent, egress_gateway_id="hub0",
                    egress_gateway=bc.egress_pb2.EgressGateway(node=f"{r.parent}/nodes/hub0", ranges=[bc.RANGE_A])),
                    timeout=30)
                await start(r.agents[:10])
                small = await asyncio.to_thread(fetch, url)
                await start(r.agents[10:])
                await r.check_converged(AGENTS)
                await r.converge_all(2)  # deltas to every agent, acks, the lag histogram
                await r.check_converged(AGENTS)  # the control plane has taken every ack in
                return small, await asyncio.to_thread(fetch, url)
            finally:
                await r.close()

        small, big = asyncio.run(load())
        promtool(big)
        n_small, n_big = len(series(small)), len(series(big))
        assert n_big <= MAX_SERIES, f"{n_big} series with {AGENTS} agents"
        # Nothing per node: the series of 1,000 agents are those of 10, plus
        # the kinds of calls and messages the bigger run made.
        assert n_big - n_small <= 120, (n_small, n_big)
        assert "s0999" not in big and "s0500" not in big  # no node name in any label
        assert re.search(r'meshgate_controlplane_agents_connected\{network="bench"\} 1000', big), big[:2000]
        assert re.search(r'meshgate_controlplane_nodes_converged\{network="bench"\} 1000', big), \
            re.findall(r"meshgate_controlplane_nodes.*", big)
        count = re.search(r"^meshgate_controlplane_convergence_duration_seconds_count (\S+)", big, re.M)
        assert count and float(count.group(1)) >= 2 * AGENTS
    finally:
        cp.stop()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


GATEWAYD_SCRIPT = textwrap.dedent("""
    import base64, os, sys, types, urllib.request
    from meshgate.common import metrics
    from meshgate.gatewayd.wireguard import PeerStats

    per_peer, cap = sys.argv[1] == "on", int(sys.argv[2])
    setup = metrics.configure("meshgate-gatewayd", "0", environ={})
    metrics.gatewayd.per_peer, metrics.gatewayd.peer_cap = per_peer, cap
    keys = [base64.b64encode(os.urandom(32)).decode() for i in range(1000)]  # WireGuard public keys
    stats = {k: PeerStats("192.0.2.1:51820", 1_700_000_000 + i, 0, 10 * i, 20 * i) for i, k in enumerate(keys)}
    rec = types.SimpleNamespace(peer_stats=lambda: stats, applied=types.SimpleNamespace(peers=dict.fromkeys(keys)))
    from meshgate.api.v1 import desired_state_pb2 as pb
    msg = pb.DesiredState(peers=[pb.Peer(public_key=k, resource=f"networks/n/nodes/p{i}") for i, k in enumerate(keys)])

    class Agent:  # what metrics.gatewayd reads of gatewayd's Agent
        def __init__(self):
            self.rec, self.status, self.source, self.target_msg = rec, {"applied_revision": 7}, None, msg

    agent = Agent()
    metrics.gatewayd.observe(agent)
    print(urllib.request.urlopen(setup.url).read().decode())
    setup.shutdown()
""")


@pytest.mark.parametrize("per_peer,cap,expected", [("on", 100, 100), ("on", 0, 0), ("off", 100, 0)])
def test_gatewayd_per_peer_series_stop_at_the_cap(per_peer, cap, expected):
    out = subprocess.run([sys.executable, "-c", GATEWAYD_SCRIPT, per_peer, str(cap)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    promtool(text)
    lines = series(text)
    handshakes = [s for s in lines if s.startswith("meshgate_gatewayd_peer_handshake_age_seconds{")]
    traffic = [s for s in lines if s.startswith("meshgate_gatewayd_peer_traffic_bytes_total{")]
    assert len(handshakes) == expected and len(traffic) == 2 * expected
    assert all(re.search(r'resource="networks/n/nodes/p\d+"', h) for h in handshakes)  # the peer's node
    # the totals cover all 1,000 peers whatever the cap
    assert re.search(r"^meshgate_gatewayd_peers_peer 1000", text, re.M) or \
        re.search(r"^meshgate_gatewayd_peers 1000", text, re.M), text[:3000]
    rx = re.search(r'^meshgate_gatewayd_peers_traffic_bytes_total\{direction="rx"\} (\S+)', text, re.M)
    assert rx and float(rx.group(1)) == sum(10 * i for i in range(1000))
    assert re.search(r"^meshgate_gatewayd_peers_handshake_max_age_seconds \S+", text, re.M)
    assert len(lines) < 100 + 3 * expected
