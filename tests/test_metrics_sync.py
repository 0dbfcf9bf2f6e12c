"""The fan-out's counters, seen where an operator sees them (`--metrics-listen`):
an agent that stops reading its stream is resynced with a snapshot once its
queue overflows, and `meshgate_controlplane_sync_resyncs_total{reason="slow_agent"}`
counts it, while a reading agent gets deltas.

The agents are the convergence benchmark's (tests/bench/bench_convergence.py),
plus one raw Sync stream with a 1 KiB receive window that reads its snapshot
and nothing more."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from meshgate.api.v1 import agent_pb2, agent_pb2_grpc
from meshgate.common.testing import ServiceProcess

BENCH = Path(__file__).resolve().parent / "bench"


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def bench_harness():
    """tests/bench/bench_convergence.py, whose simulated agents these tests use."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_convergence
    finally:
        sys.path.remove(str(BENCH))
    return bench_convergence


def metrics_url(cp: ServiceProcess) -> str:
    """Where a process started with `--metrics-listen 0` serves (its log says)."""
    m = re.search(r"metrics served at (http://\S+/metrics)", cp.log(tail=0))
    assert m, cp.log()
    return m.group(1)


def value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_slow_agent_resync_is_counted(etcd_server, etcd_prefix):
    bc = bench_harness()
    cp = ServiceProcess("meshgate-controlplane", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix",
                                                  etcd_prefix, "--metrics-listen", "0"]).start()
    try:
        url = metrics_url(cp)

        async def load() -> str:
            args = argparse.Namespace(agents=3, channels=3, enroll_concurrency=1, pause=0.0)
            r = bc.Run(cp.target, cp.proc.pid, args, admin_token=cp.admin_token)
            ch = grpc.aio.insecure_channel(cp.target, options=[
                ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024),
                ("grpc.use_local_subchannel_pool", 1)])
            try:
                hub, spoke = await r.setup_network()
                await r.enroll_all(hub, spoke, 3)
                await r.gateways.CreateEgressGateway(bc.egress_pb2.CreateEgressGatewayRequest(
                    parent=r.parent, egress_gateway_id="hub0",
                    egress_gateway=bc.egress_pb2.EgressGateway(node=f"{r.parent}/nodes/hub0", ranges=[bc.RANGE_A])),
                    timeout=30)
                fast, slow = r.agents[0], r.agents[2]
                fast.start()
                await asyncio.wait_for(fast.snapshot_seen.wait(), 30)
                call = agent_pb2_grpc.AgentServiceStub(ch).Sync(metadata=(("authorization", f"Bearer {slow.token}"),))
                await call.write(agent_pb2.SyncRequest(hello=agent_pb2.SyncRequest.Hello(node=slow.node)))
                assert (await call.read()).WhichOneof("message") == "snapshot"
                # ... and it reads nothing more. Every change below reaches every node.
                deadline = time.monotonic() + 60
                text = ""
                for i in range(2000):
                    ranges = [bc.RANGE_A, bc.RANGE_B] if i % 2 == 0 else [bc.RANGE_A]
                    await r.gateways.UpdateEgressGateway(bc.egress_pb2.UpdateEgressGatewayRequest(
                        egress_gateway=bc.egress_pb2.EgressGateway(name=f"{r.parent}/egressGateways/hub0",
                                                                   ranges=ranges),
                        update_mask=bc.field_mask_pb2.FieldMask(paths=["ranges"])), timeout=30)
                    if i % 20 == 19:
                        text = await asyncio.to_thread(fetch, url)
                        if value(text, 'meshgate_controlplane_sync_resyncs_total{reason="slow_agent"}') >= 1:
                            break
                    assert time.monotonic() < deadline, "the slow agent's queue never overflowed"
                call.cancel()
                return text
            finally:
                await ch.close()
                await r.close()

        text = asyncio.run(load())
        assert value(text, 'meshgate_controlplane_sync_resyncs_total{reason="slow_agent"}') >= 1
        # the reading agent got its changes as deltas; snapshots: the two first, and the resync
        assert value(text, 'meshgate_controlplane_sync_messages_total{kind="delta"}') >= 20
        assert value(text, 'meshgate_controlplane_sync_messages_total{kind="snapshot"}') >= 3
        assert value(text, 'meshgate_controlplane_sync_bytes_total{kind="delta"}') > 0
        assert "meshgate_controlplane_sync_change_messages_count" in text
    finally:
        cp.stop()


def test_a_failover_on_egress_health_is_counted(etcd_server, etcd_prefix):
    """A gateway whose agent reports its egress path broken fails over, and
    `meshgate_controlplane_gateway_failovers_total{cause="health"}` counts it
    (only failovers of a vanished agent were counted at first), and its return."""
    bc = bench_harness()
    cp = ServiceProcess("meshgate-controlplane", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix",
                                                  etcd_prefix, "--metrics-listen", "0", "--gateway-startup-grace",
                                                  "0", "--gateway-failback-after", "0.5"]).start()
    try:
        url = metrics_url(cp)
        series = 'meshgate_controlplane_gateway_failovers_total{cause="health",direction="%s"}'

        async def wait_for(what: str, pred) -> None:
            deadline = time.monotonic() + 60
            while not pred(await asyncio.to_thread(fetch, url)):
                assert time.monotonic() < deadline, what
                await asyncio.sleep(0.2)

        async def load() -> None:
            args = argparse.Namespace(agents=2, channels=2, enroll_concurrency=1, pause=0.0)
            r = bc.Run(cp.target, cp.proc.pid, args, admin_token=cp.admin_token)
            ch = grpc.aio.insecure_channel(cp.target)
            try:
                hub, spoke = await r.setup_network()
                await r.enroll_all(hub, spoke, 2)
                gw = await r.gateways.CreateEgressGateway(bc.egress_pb2.CreateEgressGatewayRequest(
                    parent=r.parent, egress_gateway_id="hub0",
                    egress_gateway=bc.egress_pb2.EgressGateway(node=f"{r.parent}/nodes/hub0", ranges=[bc.RANGE_A])),
                    timeout=30)
                agent = r.agents[0]  # hub0, the gateway's node
                call = agent_pb2_grpc.AgentServiceStub(ch).Sync(metadata=(("authorization", f"Bearer {agent.token}"),))
                await call.write(agent_pb2.SyncRequest(hello=agent_pb2.SyncRequest.Hello(node=agent.node)))
                assert (await call.read()).WhichOneof("message") == "snapshot"

                async def report(healthy: bool) -> None:
                    h = agent_pb2.SyncRequest.EgressHealth()
                    h.gateways.add(gateway=gw.name, healthy=healthy, reason="" if healthy else "eth1: no carrier")
                    await call.write(agent_pb2.SyncRequest(egress_health=h))

                await report(False)
                await wait_for("the health failover counted", lambda t: value(t, series % "down") == 1)
                for _ in range(10):  # healthy for longer than the failback hold
                    await report(True)
                    await asyncio.sleep(0.2)
                await wait_for("its return counted", lambda t: value(t, series % "back") == 1)
                call.cancel()
            finally:
                await ch.close()
                await r.close()

        asyncio.run(load())
    finally:
        cp.stop()
