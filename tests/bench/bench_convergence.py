"""Convergence benchmark: N simulated agents (`--agents`, default 1,000) on one control plane (or `--replicas` K).

Run as `.venv/bin/python tests/bench/bench_convergence.py`. It starts its own
etcd (temporary data directory, free loopback ports) and a real
`meshgate-controlplane` process against it. This process is the load: it makes
the API calls and runs the simulated agents (lightweight grpc.aio Sync streams
that ack every message they receive), so every figure is measured on one
clock, from the start of the API call to the moment the last affected agent
has received the change and handed its ack to gRPC. stdout carries only
`BENCH <name> <value> <unit>` lines (names as in issue 4); the rest goes to
stderr.

The network (sized to N: at least a /21) is hub-and-spoke with default policy
DENY: two hubs (tag `hub`, with endpoints) meshed with each other, N - 2 spokes (tag `spoke`) that peer only
with the hubs, and an egress gateway on hub0 that every other node routes
through. All nodes join through `Enroll` with two unlimited enrollment keys.

Figures (N is `--agents`, followed by `_Kreplicas` with `--replicas` K > 1; the
numbers below are for the default 1,000; the two names without N gain `_N`
away from the default):
- `enroll_N_joins_s`: joins per second, `--enroll-concurrency` joiners at once.
- `streams_failed_N`: Sync streams that failed while connecting (goal 0).
- `converge_all_N_p50_ms`, `converge_all_N_p99_ms`: UpdateEgressGateway
  toggling a second range on hub0's gateway. That changes every node's desired
  state (hub0's egress configuration, everybody else's routes and the allowed
  IPs of their hub0 peer): 1,000 messages, 1,000 acks.
- `converge_one_N_p99_ms`: UpdateNode of one spoke's `listen_port`. The listen
  port is in the node's own interface but in no peer's view (peers see the
  `endpoint`), so exactly one desired state changes and the control plane
  recomputes only that node (`compiler.PEER_VISIBLE_FIELDS`). A spoke's
  endpoint change instead touches the two hubs and not the spoke itself;
  stderr reports it too, as "spoke endpoint change".
- `msgs_per_spoke_join`: messages the agents receive when one more spoke
  enrolls and connects (its snapshot plus one delta per hub: 3 expected).
- `cp_rss_N_streams_mb`: VmRSS of the control-plane process with the 1,000
  streams open and converged.
- `etcd_put_to_watch_p50_ms`: raw etcd latency from a put to its watch event
  (meshgate.common.etcd + etcdwatch), measured in this run before the load.
- `psk_rotate_all_N_ms` (median of `--psk-reps`, p99 and max on stderr):
  the control plane runs with a real `meshgate-keyservice` (its own KEK file
  in the temporary directory, scheduler off), so every peer carries a
  pre-shared key. Measured last: from the start of
  `KeyService.RotatePresharedKeys(network)` (a whole-network epoch) until
  every agent has received the new pre-shared key of every one of its peers
  and acked the message that carried it. The agents follow their peers' PSKs
  through snapshots and deltas; afterwards both ends of every pair are
  checked to hold the same key. At that point the network has 1,001 nodes
  (the 1,000 plus the spoke that joined): 1 hub-hub pair + 2 x 999
  hub-spoke pairs = 1,999 pairs; stderr reports the pairs counted in etcd,
  the keys rotated, the etcd write transactions the rotation took (distinct
  mod revisions of the PSK records, plus the epoch's claim and finish), the
  messages the agents received and the CPU each process spent.

`--replicas K` starts K control-plane processes on the one etcd; the API calls
go to the first and the agents' channels take the replicas in turn, so a
change converges only once both have sent it (figure names carry the replicas:
`converge_all_10000_2replicas_p99_ms`; CPU and RSS are the replicas' sums;
`--profile` samples the first). `--profile` samples the control plane with
py-spy (if installed) during each phase and prints its busiest functions.

On a 2-core machine etcd, the control plane and this load process share both
cores, so the figures are an honest upper bound on latency: stderr gives the
CPU both processes spent per change (the agents' Python costs about half of
what the control plane spends), when the API call returned and when the first
agent acked. p99 over a few dozen changes is close to the maximum, and the
maximum is where garbage-collection pauses of either process land. The control
plane freezes its startup heap (meshgate.controlplane.gctune); this load
process, once the 1,000 streams are connected and before the first measured
change, does the same (gc.collect, gc.freeze, young threshold 20,000; said on
stderr): 1,000 agents stand in for 1,000 machines, and full collections over
one process holding all of their streams are an artefact of the harness, not a
cost any agent has. Everything the
script starts (etcd, the control plane, temporary directories) is stopped by
its handle and removed, also on failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time

import grpc
from benchkit import AdminToken, Profiler, bench, info, percentile
from google.protobuf import field_mask_pb2

from meshgate.api.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    egress_pb2,
    egress_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from meshgate.common import etcdwatch
from meshgate.common.etcd import Etcd, prefix_end
from meshgate.common.etcdproc import EtcdProcess
from meshgate.common.testing import ServiceProcess, write_kek_file

NET = "bench"


def cidr_for(agents: int) -> str:
    """The network's range, sized to the agents with room for the spoke that
    joins later and the addresses IPAM reserves (at least the /21 the
    1,000-agent figures were measured with)."""
    bits = max(11, math.ceil(math.log2(agents + 64)))
    return f"100.64.0.0/{32 - bits}"

HUBS = 2
RANGE_A = "198.51.100.0/24"
RANGE_B = "203.0.113.0/24"


def wg_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def figure_n(args) -> str:
    """N in the figures' names: the agents, and the replicas when more than one
    (`converge_all_10000_2replicas_p99_ms`)."""
    return f"{args.agents}" if args.replicas == 1 else f"{args.agents}_{args.replicas}replicas"


def name_suffix(args) -> str:
    """For the figures whose names issue 4 gave without N: nothing at the
    default 1,000 agents on one replica, else `_N` (so `make bench-10k` does not
    print them under `make bench`'s names)."""
    return "" if args.agents == 1000 and args.replicas == 1 else f"_{figure_n(args)}"


# the control-plane process ----------------------------------------------------


def rss_mb(pid: int | tuple[int, ...]) -> float:
    """VmRSS in MB; of several processes (the replicas), their sum."""
    if isinstance(pid, tuple):
        return sum(rss_mb(p) for p in pid)
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int | tuple[int, ...]) -> float:
    """User and system CPU seconds; of several processes, their sum."""
    if isinstance(pid, tuple):
        return sum(cpu_s(p) for p in pid)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# etcd put-to-watch ----------------------------------------------------------------


async def measure_put_to_watch(endpoint: str, warmup: int, ops: int) -> list[float]:
    etcd = Etcd(endpoint, "/bench-watch")
    await etcd.connect()
    prefix = etcd.key("w", "")
    seen: dict[bytes, float] = {}
    arrived = asyncio.Event()
    rev = await etcd.revision()

    async def watcher():
        async for batch in etcdwatch.watch(etcd, prefix, prefix_end(prefix), rev + 1):
            now = time.perf_counter()
            for ev in batch.events:
                seen[ev.key] = now
            if batch.events:
                arrived.set()

    task = asyncio.create_task(watcher())
    try:
        await asyncio.sleep(0.2)  # let the watch be created
        lat = []
        for i in range(warmup + ops):
            key = etcd.key("w", f"k{i:05d}")
            arrived.clear()
            start = time.perf_counter()
            await etcd.put(key, b"v")
            while key not in seen:
                await asyncio.wait_for(arrived.wait(), 5)
                arrived.clear()
            if i >= warmup:
                lat.append((seen[key] - start) * 1000)
        return lat
    finally:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
        await etcd.close()


# simulated agents -------------------------------------------------------------


class Tracker:
    """Counts down the agents that still have to ack revision `target`."""

    def __init__(self) -> None:
        self.target = 0
        self.waiting: set[int] = set()
        self.done = asyncio.Event()

    def arm(self, target: int, agents: list[Agent]) -> None:
        self.target = target
        self.waiting = {a.idx for a in agents if a.acked < target}
        if not self.waiting:
            self.done.set()

    def reset(self) -> None:
        self.target = 0
        self.waiting = set()
        self.done = asyncio.Event()

    def on_ack(self, agent: Agent) -> None:
        if self.target and agent.acked >= self.target and agent.idx in self.waiting:
            self.waiting.discard(agent.idx)
            if not self.waiting:
                self.done.set()


class PskTracker:
    """Counts down the agents that still hold (or have not acked) a peer's old
    pre-shared key: an agent is done once it has acked a message after which
    every one of its peers has a non-empty key different from the one it had
    when the tracker was armed."""

    def __init__(self, agents: list[Agent]) -> None:
        self.old = {a.idx: dict(a.psks) for a in agents}
        self.waiting = {a.idx for a in agents}
        self.done_at: dict[int, float] = {}
        self.done = asyncio.Event()
        for a in agents:
            a.psk_watch = self

    @staticmethod
    def renewed(old: dict[str, str], new: dict[str, str]) -> bool:
        return all(v and v != old.get(pk) for pk, v in new.items())

    def on_ack(self, agent: Agent) -> None:
        if agent.idx in self.waiting and self.renewed(self.old[agent.idx], agent.psks):
            self.waiting.discard(agent.idx)
            self.done_at[agent.idx] = agent.ack_time
            if not self.waiting:
                self.done.set()


class Agent:
    """One stream: hello, then for every message record it and ack it.

    It tracks only revisions (the simulated data plane is a no-op), and checks
    that every delta builds on the revision it last received."""

    __slots__ = ("idx", "node_id", "node", "token", "channel", "tracker", "call", "task", "received",
                 "kinds", "revision", "acked", "ack_time", "base_mismatches", "snapshot_seen", "error",
                 "psks", "psk_watch", "public_key", "retries", "last_retry_reason")

    def __init__(self, idx: int, node_id: str, node: str, token: str, channel, tracker: Tracker) -> None:
        self.idx, self.node_id, self.node, self.token = idx, node_id, node, token
        self.channel, self.tracker = channel, tracker
        self.call = None
        self.task: asyncio.Task | None = None
        self.received = 0
        self.kinds = {"snapshot": 0, "delta": 0}
        self.revision = 0
        self.acked = 0
        self.ack_time = 0.0
        self.base_mismatches = 0
        self.snapshot_seen = asyncio.Event()
        self.error: str | None = None
        self.retries = 0
        self.last_retry_reason = ""
        self.psks: dict[str, str] = {}  # peer public key -> its pre-shared key, as last received
        self.psk_watch: PskTracker | None = None
        self.public_key = ""  # the node's own, from its snapshots

    def _follow_psks(self, msg, kind: str) -> None:
        if kind == "snapshot":
            self.public_key = msg.snapshot.state.interface.public_key or self.public_key
            self.psks = {p.public_key: p.preshared_key for p in msg.snapshot.state.peers}
        else:
            d = msg.delta.delta
            for pk in d.removed_peers:
                self.psks.pop(pk, None)
            for p in d.upserted_peers:
                self.psks[p.public_key] = p.preshared_key

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        """One stream; UNAVAILABLE (the control plane asking to retry, e.g.
        CACHE_BEHIND under a connection storm) is retried as gatewayd does,
        with capped jittered backoff, and counted in `retries`."""
        delay = 0.2
        while True:
            await self._stream()
            if self.error is None or not self.error.startswith("UNAVAILABLE"):
                return
            self.retries += 1
            self.last_retry_reason = self.error
            self.error = None
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 10.0)

    async def _stream(self) -> None:
        stub = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.call = stub.Sync(metadata=(("authorization", f"Bearer {self.token}"),))
        try:
            await self.call.write(agent_pb2.SyncRequest(hello=agent_pb2.SyncRequest.Hello(node=self.node, agent_version="bench")))
            while True:
                msg = await self.call.read()
                if msg is grpc.aio.EOF:
                    return
                kind = msg.WhichOneof("message")
                if kind == "heartbeat":
                    continue
                self.received += 1
                self.kinds[kind] += 1
                if kind == "delta" and msg.delta.delta.base_revision != self.revision:
                    self.base_mismatches += 1
                    await self.call.write(agent_pb2.SyncRequest(resync=agent_pb2.SyncRequest.ResyncRequest(reason="base")))
                    continue
                self.revision = msg.revision
                if kind in ("snapshot", "delta"):
                    self._follow_psks(msg, kind)
                await self.call.write(agent_pb2.SyncRequest(ack=agent_pb2.SyncRequest.Ack(revision=msg.revision)))
                self.ack_time = time.perf_counter()
                self.acked = msg.revision
                if kind == "snapshot":
                    self.snapshot_seen.set()
                self.tracker.on_ack(self)
                if self.psk_watch is not None:
                    self.psk_watch.on_ack(self)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            self.error = f"{e.code().name}: {e.details()}"
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                self.snapshot_seen.set()

    async def stop(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except BaseException:  # noqa: BLE001 - cancelled stream
                pass


# the run -----------------------------------------------------------------------


class Run:
    def __init__(self, target: str, cp_pid: int | tuple[int, ...], args, ks_target: str = "", ks_pid: int = 0,
                 admin_token: str = "", agent_targets: list[str] | None = None) -> None:
        self.target, self.cp_pid, self.args = target, cp_pid, args
        # Agents' channels take the replicas in turn (--replicas); the API calls go to the first.
        self.agent_targets = agent_targets or [target]
        self.ks_pid = ks_pid
        self.ks_channel = grpc.aio.insecure_channel(ks_target) if ks_target else None
        self.ks = keys_pb2_grpc.KeyServiceStub(self.ks_channel) if self.ks_channel else None
        self.api = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1), ("bench.api", 1)],
                                             interceptors=[AdminToken(admin_token)] if admin_token else None)
        # Enroll authenticates with the enrollment secret, not as an admin.
        self.agent_api = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                                    ("bench.enroll", 1)])
        self.networks = network_pb2_grpc.NetworkServiceStub(self.api)
        self.nodes = node_pb2_grpc.NodeServiceStub(self.api)
        self.gateways = egress_pb2_grpc.EgressGatewayServiceStub(self.api)
        self.keys = enrollment_pb2_grpc.EnrollmentKeyServiceStub(self.api)
        self.policies = policy_pb2_grpc.AccessPolicyServiceStub(self.api)
        self.enroller = agent_pb2_grpc.AgentServiceStub(self.agent_api)
        self.channels: list[grpc.aio.Channel] = []
        self.tracker = Tracker()
        self.agents: list[Agent] = []
        self.parent = f"networks/{NET}"
        self.results: dict[str, float] = {}

    def channel_for(self, i: int):
        n = self.args.channels
        while len(self.channels) < n and len(self.channels) <= i % n:
            k = len(self.channels)
            self.channels.append(grpc.aio.insecure_channel(
                self.agent_targets[k % len(self.agent_targets)], options=[("grpc.use_local_subchannel_pool", 1), ("bench.channel", k)]))
        return self.channels[i % n]

    async def close(self) -> None:
        await asyncio.gather(*(a.stop() for a in self.agents), return_exceptions=True)
        for c in self.channels:
            await c.close()
        await self.api.close()
        await self.agent_api.close()
        if self.ks_channel is not None:
            await self.ks_channel.close()

    # set-up ------------------------------------------------------------------

    async def setup_network(self) -> tuple[str, str]:
        await self.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
            network_id=NET, network=network_pb2.Network(ipv4_cidr=cidr_for(self.args.agents), default_policy=network_pb2.DENY)), timeout=10)
        for pid, src, dst in (("hub-spoke", "tag:spoke", "tag:hub"), ("hub-hub", "tag:hub", "tag:hub")):
            await self.policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
                parent=self.parent, access_policy_id=pid,
                access_policy=policy_pb2.AccessPolicy(sources=[src], destinations=[dst])), timeout=10)
        secrets = []
        for kid, tag in (("hubs", "hub"), ("spokes", "spoke")):
            ek = await self.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
                parent=self.parent, enrollment_key_id=kid,
                enrollment_key=enrollment_pb2.EnrollmentKey(tags=[tag])), timeout=10)  # max_uses 0: unlimited
            secrets.append(ek.secret)
        return secrets[0], secrets[1]

    async def enroll(self, secret: str, node_id: str, endpoint: str = "") -> agent_pb2.EnrollResponse:
        return await self.enroller.Enroll(agent_pb2.EnrollRequest(
            enrollment_secret=secret, node_id=node_id, public_key=wg_key(), endpoint=endpoint, listen_port=51820),
            timeout=60)

    def add_agent(self, node_id: str, resp: agent_pb2.EnrollResponse) -> Agent:
        i = len(self.agents)
        a = Agent(i, node_id, resp.node.name, resp.credential.token, self.channel_for(i), self.tracker)
        a.public_key = resp.node.public_key
        self.agents.append(a)
        return a

    async def enroll_all(self, hub_secret: str, spoke_secret: str, n: int) -> None:
        ids = [(f"hub{i}", hub_secret, f"192.0.2.{i + 1}:51820") for i in range(HUBS)]
        ids += [(f"s{i:04d}", spoke_secret, "") for i in range(n - HUBS)]
        out: dict[str, agent_pb2.EnrollResponse] = {}
        it = iter(ids)
        lat: list[float] = []

        async def worker():
            for node_id, secret, ep in it:
                t = time.perf_counter()
                out[node_id] = await self.enroll(secret, node_id, ep)
                lat.append((time.perf_counter() - t) * 1000)

        cpu0, t0 = cpu_s(self.cp_pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(self.args.enroll_concurrency)))
        wall = time.perf_counter() - t0
        info(f"enrolled {n} nodes in {wall:.1f} s ({n / wall:.0f}/s, {self.args.enroll_concurrency} concurrent, "
             f"one unlimited key per tag): p50 {statistics.median(lat):.1f} ms, p99 {percentile(lat, 99):.1f} ms; "
             f"control-plane CPU {cpu_s(self.cp_pid) - cpu0:.1f} s")
        self.results["enroll_s"] = wall
        for node_id, _, _ in ids:
            self.add_agent(node_id, out[node_id])

    async def connect_all(self) -> None:
        cpu0, t0 = cpu_s(self.cp_pid), time.perf_counter()
        for i in range(0, len(self.agents), 100):
            batch = self.agents[i:i + 100]
            for a in batch:
                a.start()
            await asyncio.wait_for(asyncio.gather(*(a.snapshot_seen.wait() for a in batch)), 120)
        retried = [a for a in self.agents if a.retries]
        if retried:
            info(f"{len(retried)} streams were retried ({sum(a.retries for a in retried)} retries), "
                 f"last reason: {retried[-1].last_retry_reason}")
        errors = [a.error for a in self.agents if a.error]
        if errors:
            raise RuntimeError(f"{len(errors)} streams failed, first: {errors[0]}")
        # Deltas may still be in flight for agents that connected early: wait
        # until everyone has acked the newest revision the control plane had.
        net = await self.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name=self.parent), timeout=60)
        await self.wait_acked(net.revision, 60, only_changed=True)
        info(f"connected {len(self.agents)} streams over {len(self.channels)} channels in "
             f"{time.perf_counter() - t0:.1f} s; control-plane CPU {cpu_s(self.cp_pid) - cpu0:.1f} s")

    async def wait_acked(self, revision: int, timeout: float, only_changed: bool = False) -> None:
        """Wait until every agent whose desired state is at `revision` or
        newer has acked it (`only_changed`: agents that received nothing newer
        are done)."""
        if only_changed:
            deadline = time.monotonic() + timeout
            while any(a.acked < a.revision for a in self.agents):
                if time.monotonic() > deadline:
                    raise RuntimeError("agents did not ack what they received")
                await asyncio.sleep(0.05)
            return
        self.tracker.reset()
        self.tracker.arm(revision, self.agents)
        await asyncio.wait_for(self.tracker.done.wait(), timeout)

    async def check_converged(self, expect: int) -> None:
        t = time.perf_counter()
        deadline = time.monotonic() + 60
        while True:
            st = await self.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name=self.parent), timeout=60)
            if st.total_nodes == expect and st.converged_nodes == expect:
                break
            if time.monotonic() > deadline:
                late = [n for n in st.nodes if not n.converged][:5]
                raise RuntimeError(
                    f"GetNetworkStatus: {st.converged_nodes} of {st.total_nodes} converged, want {expect}; not converged: "
                    + "; ".join(f"{n.node} (connected {n.connected}, applied {n.applied_revision}, "
                                f"error {n.last_error!r})" for n in late))
            await asyncio.sleep(0.2)
        info(f"GetNetworkStatus: {st.converged_nodes}/{st.total_nodes} converged (took {(time.perf_counter() - t) * 1000:.0f} ms)")

    # measurements ---------------------------------------------------------------

    def counts(self) -> list[int]:
        return [a.received for a in self.agents]

    async def settle(self, s: float) -> None:
        await asyncio.sleep(s)

    async def converge_all(self, reps: int) -> list[float]:
        gw_name = f"{self.parent}/egressGateways/hub0"
        lat: list[float] = []
        cpu0, own0 = cpu_s(self.cp_pid), time.process_time()
        for r in range(reps):
            ranges = [RANGE_A, RANGE_B] if r % 2 == 0 else [RANGE_A]
            before = self.counts()
            self.tracker.reset()
            t0 = time.perf_counter()
            gw = await self.gateways.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
                egress_gateway=egress_pb2.EgressGateway(name=gw_name, ranges=ranges),
                update_mask=field_mask_pb2.FieldMask(paths=["ranges"])), timeout=30)
            call_ms = (time.perf_counter() - t0) * 1000
            self.tracker.arm(int(gw.etag), self.agents)
            await asyncio.wait_for(self.tracker.done.wait(), 60)
            acks = [a.ack_time for a in self.agents]
            ms = (max(acks) - t0) * 1000
            lat.append(ms)
            got = sum(c - b for c, b in zip(self.counts(), before, strict=True))
            info(f"  converge_all #{r}: {ms:.0f} ms (API call returned at {call_ms:.0f} ms, first ack at "
                 f"{(min(acks) - t0) * 1000:.0f} ms), {got} messages")
            await self.settle(self.args.pause)
        extra = sum(1 for a in self.agents if a.base_mismatches)
        if extra:
            raise RuntimeError(f"{extra} agents got deltas on a base revision they did not have")
        info(f"converge_all: CPU per change: control plane {(cpu_s(self.cp_pid) - cpu0) / reps * 1000:.0f} ms, "
             f"this load process {(time.process_time() - own0) / reps * 1000:.0f} ms (both including the pauses)")
        return lat

    async def converge_one(self, reps: int, field: str) -> tuple[list[float], list[int]]:
        """Update one spoke's `field` (listen_port or endpoint) per rep; returns
        (latency until the affected agents acked, agents that received a message)."""
        lat: list[float] = []
        calls: list[float] = []
        touched: list[int] = []
        spokes = self.agents[HUBS:]
        for r in range(reps):
            a = spokes[(r * 37) % len(spokes)]
            if field == "listen_port":
                node = node_pb2.Node(name=a.node, listen_port=51821 + r)
            else:
                # outside the egress ranges (an endpoint inside one is refused)
                node = node_pb2.Node(name=a.node, endpoint=f"192.0.2.{r % 200 + 50}:51820")
            before = self.counts()
            self.tracker.reset()
            t0 = time.perf_counter()
            upd = await self.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
                node=node, update_mask=field_mask_pb2.FieldMask(paths=[field])), timeout=30)
            calls.append((time.perf_counter() - t0) * 1000)
            rev = int(upd.etag)
            expected = [a] if field == "listen_port" else self.agents[:HUBS]
            self.tracker.arm(rev, expected)
            await asyncio.wait_for(self.tracker.done.wait(), 30)
            lat.append((max(x.ack_time for x in expected) - t0) * 1000)
            await self.settle(self.args.pause_one)
            touched.append(sum(1 for c, b in zip(self.counts(), before, strict=True) if c != b))
        slow = sorted(zip(lat, calls, strict=True), reverse=True)[:3]
        info(f"  UpdateNode {field}: call p50 {statistics.median(calls):.1f} ms; slowest (converged, call returned): "
             + ", ".join(f"({a:.0f}, {b:.0f}) ms" for a, b in slow))
        return lat, touched

    async def spoke_join(self, spoke_secret: str) -> tuple[int, dict[str, int]]:
        before = self.counts()
        sent_before = len(self.agents)
        resp = await self.enroll(spoke_secret, "s-new")
        a = self.add_agent("s-new", resp)
        a.start()
        rev = int(resp.node.etag)
        self.tracker.reset()
        self.tracker.arm(rev, self.agents[:HUBS] + [a])
        await asyncio.wait_for(self.tracker.done.wait(), 30)
        await self.settle(1.0)  # anything else that would arrive
        after = self.counts()
        per = {self.agents[i].node_id: after[i] - (before[i] if i < sent_before else 0)
               for i in range(len(after)) if after[i] != (before[i] if i < sent_before else 0)}
        return sum(per.values()), per

    async def psk_rotate_all(self, reps: int, etcd: Etcd) -> list[float]:
        """Rotate every pre-shared key of the network `reps` times; returns the
        latency until every agent acked the new keys of all its peers."""
        missing = [a.node_id for a in self.agents if not a.psks or not all(a.psks.values())]
        if missing:
            raise RuntimeError(f"{len(missing)} agents have a peer without a pre-shared key, first {missing[0]}")
        base = etcd.key("keys", "psk", NET, "")
        lat: list[float] = []
        for r in range(reps):
            before = self.counts()
            rev0 = await etcd.revision()
            cpu0, ks0, own0 = cpu_s(self.cp_pid), cpu_s(self.ks_pid), time.process_time()
            tracker = PskTracker(self.agents)
            t0 = time.perf_counter()
            resp = await self.ks.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(network=self.parent), timeout=120)
            call_ms = (time.perf_counter() - t0) * 1000
            try:
                await asyncio.wait_for(tracker.done.wait(), 120)
            except TimeoutError:
                left = sorted(self.agents[i].node_id for i in tracker.waiting)
                raise RuntimeError(f"PSK rotation #{r}: {len(left)} agents still lack a new key after 120 s, "
                                   f"e.g. {left[:5]}") from None
            finally:
                for a in self.agents:
                    a.psk_watch = None
            done = tracker.done_at.values()
            ms = (max(done) - t0) * 1000
            lat.append(ms)
            cpu_cp, cpu_ks, cpu_own = cpu_s(self.cp_pid) - cpu0, cpu_s(self.ks_pid) - ks0, time.process_time() - own0
            got = sum(c - b for c, b in zip(self.counts(), before, strict=True))
            kvs, _ = await etcd.list_prefix(base)
            txns = {kv.mod_revision for kv in kvs if kv.mod_revision > rev0}
            rotated_here = sum(1 for kv in kvs if kv.mod_revision > rev0)
            info(f"  psk_rotate_all #{r}: {ms:.0f} ms (RotatePresharedKeys returned at {call_ms:.0f} ms, rotated "
                 f"{resp.rotated}; first agent done at {(min(done) - t0) * 1000:.0f} ms); {len(kvs)} pairs in etcd, "
                 f"{rotated_here} rewritten in {len(txns)} write transactions (+2: epoch claim and finish); "
                 f"{got} messages to {len(self.agents)} agents; CPU: control plane {cpu_cp:.2f} s, key service "
                 f"{cpu_ks:.2f} s, this load process {cpu_own:.2f} s")
            await self.settle(self.args.pause)
        # Both ends of every pair hold the same key.
        by_pk = {a.public_key: a for a in self.agents}
        ends = mismatched = 0
        for a in self.agents:
            for pk, k in a.psks.items():
                ends += 1
                other = by_pk.get(pk)
                if other is None or other.psks.get(a.public_key) != k:
                    mismatched += 1
        if mismatched:
            raise RuntimeError(f"{mismatched} of {ends} pair ends hold a key the other end does not")
        info(f"psk_rotate_all: both ends of all {ends // 2} pairs hold the same pre-shared key")
        return lat


async def run(targets: list[str], cp_pids: tuple[int, ...], etcd_endpoint: str, args, ks_target: str, ks_pid: int,
              out: dict[str, float], admin_token: str) -> None:
    """Fills `out` as figures come in, so that a failed run still reports those it has."""
    n = figure_n(args)
    sfx = name_suffix(args)
    target, cp_pid = targets[0], cp_pids
    ptw = await measure_put_to_watch(etcd_endpoint, warmup=50, ops=args.watch_ops)
    out[f"etcd_put_to_watch_p50_ms{sfx}"] = statistics.median(ptw)
    info(f"etcd put-to-watch: {len(ptw)} sequential puts, p50 {statistics.median(ptw):.3f} ms, p99 {percentile(ptw, 99):.3f} ms")

    r = Run(target, cp_pid, args, ks_target, ks_pid, admin_token, agent_targets=targets)
    prof = Profiler(cp_pids[0], args.profile)
    try:
        hub_secret, spoke_secret = await r.setup_network()
        with prof.phase("enroll"):
            await r.enroll_all(hub_secret, spoke_secret, args.agents)
        out[f"enroll_{n}_joins_s"] = args.agents / r.results["enroll_s"]
        await r.gateways.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
            parent=r.parent, egress_gateway_id="hub0",
            egress_gateway=egress_pb2.EgressGateway(node=f"{r.parent}/nodes/hub0", ranges=[RANGE_A])), timeout=30)
        info(f"control plane after enrolment: RSS {rss_mb(cp_pid):.0f} MB, CPU {cpu_s(cp_pid):.1f} s")
        try:
            with prof.phase("connect"):
                await r.connect_all()
        finally:
            out[f"streams_failed_{n}"] = sum(1 for a in r.agents if a.error)
        await r.check_converged(args.agents)
        # The agents' objects belong to 1,000 machines: keep them out of this
        # process's GC passes (see the docstring).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 10, 10)
        info(f"load process: {gc.get_freeze_count()} objects frozen, GC thresholds {gc.get_threshold()}")
        await asyncio.sleep(1.0)
        out[f"cp_rss_{n}_streams_mb"] = rss_mb(cp_pid)
        info(f"control plane with {args.agents} streams: RSS {out[f'cp_rss_{n}_streams_mb']:.0f} MB, CPU {cpu_s(cp_pid):.1f} s")

        with prof.phase("converge_all"):
            lat = await r.converge_all(args.reps)
        out[f"converge_all_{n}_p50_ms"] = statistics.median(lat)
        out[f"converge_all_{n}_p99_ms"] = percentile(lat, 99)
        info(f"converge_all: {len(lat)} changes, p50 {statistics.median(lat):.0f} ms, p99 {percentile(lat, 99):.0f} ms, "
             f"min {min(lat):.0f} ms, max {max(lat):.0f} ms")

        with prof.phase("converge_one"):
            lat1, touched = await r.converge_one(args.reps_one, "listen_port")
        out[f"converge_one_{n}_p99_ms"] = percentile(lat1, 99)
        info(f"converge_one (spoke listen_port): {len(lat1)} changes, p50 {statistics.median(lat1):.1f} ms, "
             f"p99 {percentile(lat1, 99):.1f} ms; agents receiving a message per change: {sorted(set(touched))}")
        lat2, touched2 = await r.converge_one(max(5, args.reps_one // 4), "endpoint")
        info(f"spoke endpoint change (reaches the {HUBS} hubs): p50 {statistics.median(lat2):.1f} ms, "
             f"p99 {percentile(lat2, 99):.1f} ms; agents receiving a message per change: {sorted(set(touched2))}")

        msgs, per = await r.spoke_join(spoke_secret)
        out[f"msgs_per_spoke_join{sfx}"] = msgs
        info(f"spoke join: {msgs} messages received: {per}")
        await r.check_converged(args.agents + 1)

        if args.psk_reps > 0:  # 0: skipped (make bench-10k's two-replica run)
            etcd = Etcd(etcd_endpoint, "/bench")
            await etcd.connect()
            try:
                with prof.phase("psk_rotate_all"):
                    lat3 = await r.psk_rotate_all(args.psk_reps, etcd)
            finally:
                await etcd.close()
            out[f"psk_rotate_all_{n}_ms"] = statistics.median(lat3)
            info(f"psk_rotate_all ({len(r.agents)} agents): {len(lat3)} rotations, p50 {statistics.median(lat3):.0f} ms, "
                 f"p99 {percentile(lat3, 99):.0f} ms, min {min(lat3):.0f} ms, max {max(lat3):.0f} ms")
            await r.check_converged(args.agents + 1)
        info(f"control plane at the end: RSS {rss_mb(cp_pid):.0f} MB, CPU {cpu_s(cp_pid):.1f} s total; "
             f"key service CPU {cpu_s(ks_pid):.1f} s total")
    finally:
        await r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--channels", type=int, default=1000, help="gRPC channels (TCP connections) the agents share")
    ap.add_argument("--reps", type=int, default=50, help="changes touching every agent")
    ap.add_argument("--reps-one", type=int, default=200, help="changes touching one agent")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between changes touching every agent")
    ap.add_argument("--pause-one", type=float, default=0.05, help="seconds after each one-agent change")
    ap.add_argument("--enroll-concurrency", type=int, default=4)
    ap.add_argument("--watch-ops", type=int, default=500)
    ap.add_argument("--psk-reps", type=int, default=5, help="whole-network pre-shared key rotations")
    ap.add_argument("--replicas", type=int, default=1,
                    help="control-plane replicas on the one etcd; the agents' channels take them in turn")
    ap.add_argument("--profile", action="store_true",
                    help="sample the control plane with py-spy during each phase and print where its CPU went")
    args = ap.parse_args()
    if args.replicas < 1:
        ap.error("--replicas must be at least 1")

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    tmp = tempfile.mkdtemp(prefix="meshgate-bench-conv-")
    etcd_proc: EtcdProcess | None = None
    cps: list[ServiceProcess] = []
    ks: ServiceProcess | None = None
    ok = False
    res: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        etcd_proc = EtcdProcess(os.path.join(tmp, "etcd")).start()
        info(f"etcd on {etcd_proc.endpoint} (pid {etcd_proc.proc.pid})")
        env_clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MESHGATE_"))}
        kek_file = os.path.join(tmp, "kek")
        write_kek_file(kek_file, {"bench1": os.urandom(32)})
        common = ["--etcd-endpoints", etcd_proc.endpoint, "--etcd-prefix", "/bench", "--log-level", "warning"]
        ks = ServiceProcess("meshgate-keyservice", args=[*common, "--kek-file", kek_file, "--no-scheduler", "--insecure"])
        cps = [ServiceProcess("meshgate-controlplane", args=list(common)) for _ in range(max(1, args.replicas))]
        saved_env = dict(os.environ)
        os.environ.clear()
        os.environ.update(env_clean)
        try:
            ks.start()
            info(f"key service on {ks.target} (pid {ks.proc.pid})")
            for cp in cps:
                cp.args += ["--keyservice", ks.target, "--agent-bearer-tokens"]  # simulated agents use tokens
                cp.start()
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
        for cp in cps:
            info(f"control plane on {cp.target} (pid {cp.proc.pid})")

        n, sfx = figure_n(args), name_suffix(args)
        try:
            asyncio.run(run([cp.target for cp in cps], tuple(cp.proc.pid for cp in cps), etcd_proc.endpoint, args,
                            ks.target, ks.proc.pid, res, cps[0].admin_token))
        finally:
            for name, unit in (
                (f"enroll_{n}_joins_s", "joins/s"),
                (f"streams_failed_{n}", "streams"),
                (f"converge_all_{n}_p50_ms", "ms"),
                (f"converge_all_{n}_p99_ms", "ms"),
                (f"converge_one_{n}_p99_ms", "ms"),
                (f"msgs_per_spoke_join{sfx}", "msgs"),
                (f"cp_rss_{n}_streams_mb", "MB"),
                (f"etcd_put_to_watch_p50_ms{sfx}", "ms"),
                (f"psk_rotate_all_{n}_ms", "ms"),
            ):
                if name in res:
                    bench(name, res[name], unit)
        ok = True
    except Exception as e:  # report, then clean up below
        info(f"benchmark failed: {type(e).__name__}: {e}")
        for cp in cps:
            if cp.proc is not None:
                info(f"control-plane log tail:\n{cp.log()}")
        if ks is not None and ks.proc is not None:
            info(f"key-service log tail:\n{ks.log()}")
    finally:
        for svc in (*cps, ks):
            if svc is not None:
                svc.stop()
                if svc.log_path:
                    shutil.rmtree(os.path.dirname(svc.log_path), ignore_errors=True)
        if etcd_proc is not None:
            etcd_proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        info(f"total {time.perf_counter() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
