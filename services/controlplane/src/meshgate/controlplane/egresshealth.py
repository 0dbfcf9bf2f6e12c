"""Egress gateway health: agents' reports become marks in etcd, with hysteresis.

Each gateway node's agent checks its egress path (gatewayd's health.py: the
egress interface's link and carrier, its route to each range, the operator's
probes) and reports `SyncRequest.EgressHealth` at once when it changes. The
replica holding its stream turns the report into a mark:

- unhealthy: `egressHealth/{net}/{gw}` (JSON `{"reason", "by"}`) is written at
  once; the compiler then gives the gateway's ranges to the best healthy
  standby (compiler.active_gateways), as for a node marked down (liveness.py);
- healthy again: the mark is deleted only once the gateway has stayed healthy
  for the failback hold (`--gateway-failback-after`, 10 s), doubled for every
  further failover within ten minutes of the previous one (`Damper`, at most
  five minutes), so a link going up and down every few seconds moves the range
  once, not at every change.

An agent may only report the gateways of its own node. A stream that goes
cancels the pending failbacks of its node (the mark stays: the agent's next
stream reports again, and a vanished agent is liveness.py's business).

The reports are also the agent's heartbeat: a gateway node's agent reports
every second, and a stream that has carried reports but then none for
`STALE_S` (2.5 s) is ended by this replica (`close_stream`), which starts
liveness.py's failover delay. HTTP/2 keepalive should notice a dead peer
first; this does not depend on it (a relay or proxy on the way may answer
the transport while the agent is gone). A control plane whose event loop
stalled (the watchdog's own tick came late) restarts every clock instead of
ending streams it simply did not read.

The marks are etcd writes, like liveness marks: every replica compiles the
same states from them, and agents ack revisions as usual. The network status
shows each gateway's health and use (`fill_status`): a drain is complete when
no node routes the gateway's ranges through it any more.

Hazard: the hold timers run on the replica holding the stream; when the
agent moves to another replica, that one starts the hold again from the
agent's first report (a failback is only ever later, never earlier).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from meshgate.api.v1 import agent_pb2, network_pb2
from meshgate.common import metrics
from meshgate.common.etcd import Etcd
from meshgate.controlplane import compiler
from meshgate.controlplane.cache import Change, StateCache

log = logging.getLogger(__name__)

DEFAULT_FAILBACK_S = 10.0
MAX_FAILBACK_S = 300.0
FLAP_WINDOW_S = 600.0
RETRY_S = 1.0  # after a failed write
STALE_S = 2.5  # a reporting agent silent this long is gone
TICK_S = 0.5


class Damper:
    """How long something that failed over must stay well before it takes its
    ranges back: `base` after one failover, doubled for each further failover
    less than `window` after the previous one, at most `cap`."""

    def __init__(self, base: float, cap: float = MAX_FAILBACK_S, window: float = FLAP_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base = base
        self.cap = cap
        self.window = window
        self.clock = clock
        self._failovers: dict[str, list[float]] = {}

    def failed(self, key: str) -> None:
        """Record one failover of `key` (now)."""
        now = self.clock()
        runs = self._failovers.setdefault(key, [])
        if runs and now - runs[-1] > self.window:
            runs.clear()  # a quiet window ends the run of flaps
        runs.append(now)
        del runs[:-16]

    def hold(self, key: str) -> float:
        """The failback hold of `key` now."""
        runs = self._failovers.get(key, [])
        if runs and self.clock() - runs[-1] > self.window:
            runs = []
        return min(self.cap, self.base * 2 ** max(0, len(runs) - 1))


def mark_key(etcd: Etcd, gateway: str) -> bytes:
    _, net, _, gid = gateway.split("/")
    return etcd.key("egressHealth", net, gid)


class EgressHealth:
    """Agents' egress health reports -> `egressHealth/...` marks (this replica's streams)."""

    def __init__(self, etcd: Etcd, cache: StateCache, failback_s: float = DEFAULT_FAILBACK_S,
                 replica: str = "", damper: Damper | None = None) -> None:
        self.etcd = etcd
        self.cache = cache
        self.replica = replica
        self.damper = damper or Damper(failback_s)
        self.t = etcd.txn_ops
        # gateway -> (node, healthy, reason): the latest report of a stream on this replica
        self._reports: dict[str, tuple[str, bool, str]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}  # gateway -> pending failback
        self._writing: set[str] = set()  # gateways whose mark is being written or deleted
        self._tasks: set[asyncio.Task] = set()
        self.marks_written = 0
        self.marks_cleared = 0
        self.streams_ended = 0
        self.close_stream: Callable[[str, str], None] | None = None
        """Ends `node`'s stream on this replica, with a message (set by the ControlPlane)."""
        self.stale_s = STALE_S
        self._last_seen: dict[str, float] = {}  # node -> when its agent last reported (monotonic)
        self._watchdog: asyncio.Task | None = None
        self._stopped = True

    def start(self) -> None:
        self._stopped = False
        self.cache.listeners.append(self.on_change)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="egress-health-watchdog")

    async def stop(self) -> None:
        self._stopped = True
        if self.on_change in self.cache.listeners:
            self.cache.listeners.remove(self.on_change)
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # inputs -------------------------------------------------------------------

    def report(self, node: str, msg: agent_pb2.SyncRequest.EgressHealth) -> None:
        """A report from `node`'s agent (its stream is on this replica)."""
        net_id = node.split("/")[1]
        st = self.cache.networks.get(net_id)
        if st is None or self._stopped:
            return
        self._last_seen[node] = time.monotonic()
        for g in msg.gateways:
            gw = st.gateways.get(g.gateway)
            if gw is None or gw.node != node:
                log.warning("ignored %s's health report about %s: not one of its gateways", node, g.gateway)
                continue
            before = self._reports.get(g.gateway)
            self._reports[g.gateway] = (node, g.healthy, g.reason[:256])
            if before is None or before[1] != g.healthy:
                log.info("%s reports %s %s%s", node, g.gateway, "healthy" if g.healthy else "UNHEALTHY",
                         "" if g.healthy else f": {g.reason[:256]}")
        self._evaluate()

    def stream_closed(self, node: str) -> None:
        """`node`'s stream on this replica ended: forget its reports, keep its marks."""
        self._last_seen.pop(node, None)
        for gw in [g for g, (n, _, _) in self._reports.items() if n == node]:
            del self._reports[gw]
            self._cancel(gw)

    async def _watch(self) -> None:
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            if now - last_tick > TICK_S + 1.0:
                # This loop stalled: the agents' reports may be waiting unread.
                for node in self._last_seen:
                    self._last_seen[node] = now
            last_tick = now
            for node, seen in list(self._last_seen.items()):
                if not self._runs_gateway(node):
                    # its gateways were deleted or moved: its agent has nothing to report
                    del self._last_seen[node]
                    continue
                if now - seen > self.stale_s and self.close_stream is not None:
                    del self._last_seen[node]
                    self.streams_ended += 1
                    log.warning("no egress health report from %s for %.1fs: ending its stream", node, now - seen)
                    self.close_stream(node, f"no egress health report for {now - seen:.1f}s")

    def _runs_gateway(self, node: str) -> bool:
        st = self.cache.networks.get(node.split("/")[1]) if node.count("/") == 3 else None
        return st is not None and any(g.node == node for g in st.gateways.values())

    async def on_change(self, change: Change) -> None:
        if not self._stopped:
            self._evaluate()

    # decisions ------------------------------------------------------------------

    def _evaluate(self) -> None:
        for gw_name, (node, healthy, reason) in list(self._reports.items()):
            st = self.cache.networks.get(node.split("/")[1])
            gw = st.gateways.get(gw_name) if st is not None else None
            if st is None or gw is None or gw.node != node:
                del self._reports[gw_name]
                self._cancel(gw_name)
                continue
            marked = gw_name in st.unhealthy
            if gw_name in self._writing:
                continue
            if not healthy:
                self._cancel(gw_name)
                if not marked:
                    self._spawn(gw_name, self._mark(gw_name, reason))
            elif marked and gw_name not in self._timers:
                hold = self.damper.hold(gw_name)
                log.info("%s is healthy again; it takes its ranges back after %.0fs of health", gw_name, hold)
                self._timers[gw_name] = asyncio.get_running_loop().call_later(hold, self._failback, gw_name)
            elif not marked:
                self._cancel(gw_name)

    def _failback(self, gw_name: str) -> None:
        self._timers.pop(gw_name, None)
        rep = self._reports.get(gw_name)
        if rep is not None and rep[1] and not self._stopped:
            self._spawn(gw_name, self._clear(gw_name))

    def _cancel(self, gw_name: str) -> None:
        h = self._timers.pop(gw_name, None)
        if h is not None:
            h.cancel()

    def _spawn(self, gw_name: str, coro) -> None:
        self._writing.add(gw_name)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            self._writing.discard(gw_name)
            if not self._stopped:
                self._evaluate()  # the report may have changed meanwhile

        task.add_done_callback(done)

    # writes ---------------------------------------------------------------------

    async def _mark(self, gw_name: str, reason: str) -> None:
        _, net, _, gid = gw_name.split("/")
        value = json.dumps({"reason": reason, "by": self.replica}).encode()
        try:
            ok, _, rev = await self.etcd.txn(
                [self.t.create(self.etcd.key("egressGateways", net, gid)) > 0],
                [self.t.put(mark_key(self.etcd, gw_name), value)],
            )
            if ok:
                await self.cache.wait_for_revision(rev, timeout=10)
        except Exception:  # noqa: BLE001 - etcd away: the next report or change tries again
            log.warning("could not mark %s unhealthy; retrying", gw_name)
            await asyncio.sleep(RETRY_S)
            return
        if ok:
            self.marks_written += 1
            self.damper.failed(gw_name)
            metrics.controlplane.failover("down", "health")
            log.warning("marked %s unhealthy (%s): its ranges move to a healthy standby if there is one",
                        gw_name, reason)

    async def _clear(self, gw_name: str) -> None:
        try:
            _, _, rev = await self.etcd.txn([], [self.t.delete(mark_key(self.etcd, gw_name))])
            await self.cache.wait_for_revision(rev, timeout=10)
        except Exception:  # noqa: BLE001
            log.warning("could not mark %s healthy again; retrying", gw_name)
            await asyncio.sleep(RETRY_S)
            return
        self.marks_cleared += 1
        metrics.controlplane.failover("back", "health")
        log.info("%s takes its ranges back: healthy for its failback hold", gw_name)


def fill_status(out: network_pb2.NetworkStatus, st: compiler.NetworkState) -> None:
    """`out.gateways` from the network's state and `out.nodes` (their convergence)."""
    by_range, internet = compiler.active_gateways(st)
    converged = {n.node: n.converged for n in out.nodes}
    for name in sorted(st.gateways):
        gw = st.gateways[name]
        mine = set(gw.ranges) | set(compiler.learned_ranges(st, gw))  # a domain's learned addresses count
        active = sorted(r for r, g in by_range.items() if g.name == name and r in mine)
        if internet is not None and internet.name == name:
            active.append("0.0.0.0/0")
        reason = st.unhealthy.get(name, "") if name in st.unhealthy else ""
        if gw.node in st.down:
            reason = reason or "its node is marked down: its agent has been disconnected for the failover delay"
        healthy = compiler.healthy(st, gw)
        if not healthy and not reason:
            reason = "reported unhealthy by its agent"
        # Still in use while it carries a range, or while a node that may
        # route through it has not applied the state that routes elsewhere.
        waiting = [n for n in st.nodes if n != gw.node and compiler.uses(st, gw, n) and not converged.get(n, False)]
        out.gateways.add(gateway=name, healthy=healthy, reason=reason, active_ranges=active,
                         drained=compiler.drain_requested(st, gw), in_use=bool(active) or bool(waiting))
