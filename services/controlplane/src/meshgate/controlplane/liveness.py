"""Egress gateway failover by liveness: marking gateway nodes down and up.

A node is *up* while its agent holds a Sync stream: `sessions/{net}/{node}`
exists, attached to the lease of the replica holding the stream (so it also
disappears when that replica dies). A node that runs an egress gateway and has
had no session for the failover delay (`--gateway-failover-after`, 1 s by
default) is marked down with `liveness/{net}/{node}`; once its session has
been back for the failback hold (`--gateway-failback-after`, 10 s, doubled for
each further failover within ten minutes: egresshealth.Damper) the mark is
deleted, so an unstable link moves the ranges once, not at every reconnect. The compiler gives an egress range to a gateway on a node
that is up before one on a node that is down (compiler.active_gateways), so
the range moves to the standby and back.

The marks are etcd writes, not local opinions: they carry revisions and reach
every replica through the watch like any other change, so all replicas compile
the same states and agents acknowledge a revision as usual. Every replica runs
the timers; the writes compare "the session key does not exist and the mark
does not exist" (to mark) and "the session key exists" (to clear), so racing
replicas write each transition once, and a node that came back meanwhile is
never marked.

A stream that vanished without closing (cable pulled, agent SIGSTOPped) is
noticed by HTTP/2 keepalive within about 2 s (main.AGENT_KEEPALIVE); with the
failover delay and the push to the other nodes, traffic moves within 5 s. A
control plane that starts (or restarts) gives every node the startup grace
(`--gateway-startup-grace`, 15 s: longer than the agents' longest reconnect
backoff, 10 s) before marking it down, so a control-plane restart or outage
fails nothing over: agents keep their applied state meanwhile and reconnect.
A delay of 0 turns failover off (no marks are written; existing ones are
still cleared).

Hazard: the timers use this replica's monotonic clock from the moment it saw
the session go (or started without one); replicas can disagree by their watch
lag, which only decides which of them writes the mark.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from meshgate.common import metrics
from meshgate.common.etcd import Etcd
from meshgate.controlplane.cache import Change, StateCache
from meshgate.controlplane.egresshealth import DEFAULT_FAILBACK_S, Damper

log = logging.getLogger(__name__)

DEFAULT_DELAY_S = 1.0
STARTUP_GRACE_S = 15.0
RETRY_S = 2.0  # after a failed mark or clear


def mark_key(etcd: Etcd, node: str) -> bytes:
    _, net, _, nid = node.split("/")
    return etcd.key("liveness", net, nid)


def session_key(etcd: Etcd, node: str) -> bytes:
    _, net, _, nid = node.split("/")
    return etcd.key("sessions", net, nid)


class Liveness:
    """Watches the cache's view of sessions and gateways; writes the marks."""

    def __init__(self, etcd: Etcd, cache: StateCache, delay_s: float = DEFAULT_DELAY_S, replica: str = "",
                 startup_grace_s: float = STARTUP_GRACE_S, damper: Damper | None = None) -> None:
        self.etcd = etcd
        self.cache = cache
        self.delay_s = delay_s
        self.startup_grace_s = startup_grace_s
        self.damper = damper or Damper(DEFAULT_FAILBACK_S)
        self._started = time.monotonic()
        self._clears: dict[str, asyncio.TimerHandle] = {}  # node back, marked: its failback hold
        self.replica = replica
        self.t = etcd.txn_ops
        self._absent_since: dict[str, float] = {}  # gateway node -> monotonic time its session was last seen gone
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self.marks_written = 0
        self.marks_cleared = 0
        self._stopped = True

    def start(self) -> None:
        self._stopped = False
        self._started = time.monotonic()
        self.cache.listeners.append(self.on_change)

    async def stop(self) -> None:
        self._stopped = True
        if self.on_change in self.cache.listeners:
            self.cache.listeners.remove(self.on_change)
        for h in [*self._timers.values(), *self._clears.values()]:
            h.cancel()
        self._timers.clear()
        self._clears.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled
                pass

    # decisions --------------------------------------------------------------

    async def on_change(self, change: Change) -> None:
        """Re-evaluate after every change: cheap (the gateway nodes of each
        network, a set lookup each)."""
        if self._stopped:
            return
        now = time.monotonic()
        tracked: set[str] = set()
        for st in self.cache.networks.values():
            gateway_nodes = {g.node for g in st.gateways.values() if g.node in st.nodes}
            tracked |= gateway_nodes
            for node in gateway_nodes | (st.down & st.nodes.keys()):
                present = node in self.cache.sessions
                if present:
                    self._cancel(node)
                    if node in st.down:
                        self._arm_clear(node)
                    else:
                        self._cancel_clear(node)
                else:
                    self._cancel_clear(node)
                    if node not in st.down and self.delay_s > 0:
                        since = self._absent_since.setdefault(node, now)
                        due = max(since + self.delay_s, self._started + self.startup_grace_s)
                        self._arm(node, due - now)
        for node in [n for n in self._absent_since if n not in tracked]:
            self._cancel(node)
        for node in [n for n in self._clears if n not in tracked]:
            self._cancel_clear(node)

    def _arm(self, node: str, delay: float) -> None:
        if node in self._timers:
            return
        loop = asyncio.get_running_loop()
        self._timers[node] = loop.call_later(max(delay, 0.0), lambda: self._spawn(self._mark(node)))

    def _arm_clear(self, node: str) -> None:
        if node in self._clears:
            return
        hold = self.damper.hold(node)
        log.info("%s's agent is back; its gateways take their ranges back after %.0fs connected", node, hold)

        def fire() -> None:
            self._clears.pop(node, None)
            self._retry_clear(node)

        self._clears[node] = asyncio.get_running_loop().call_later(hold, fire)

    def _cancel_clear(self, node: str) -> None:
        h = self._clears.pop(node, None)
        if h is not None:
            h.cancel()

    def _cancel(self, node: str) -> None:
        self._absent_since.pop(node, None)
        h = self._timers.pop(node, None)
        if h is not None:
            h.cancel()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # writes -----------------------------------------------------------------

    async def _mark(self, node: str) -> None:
        self._timers.pop(node, None)
        if node in self.cache.sessions:
            self._cancel(node)
            return
        value = json.dumps({"since_s": round(self.delay_s, 3), "by": self.replica}).encode()
        try:
            ok, _, _ = await self.etcd.txn(
                [self.t.create(session_key(self.etcd, node)) == 0, self.t.create(mark_key(self.etcd, node)) == 0,
                 self.t.create(self._node_key(node)) > 0],
                [self.t.put(mark_key(self.etcd, node), value)],
            )
        except Exception:  # noqa: BLE001 - etcd away: try again shortly (a quiet cluster brings no change)
            log.warning("could not mark %s down; retrying in %.0fs", node, RETRY_S)
            self._arm(node, RETRY_S)
            return
        if ok:
            self.marks_written += 1
            self.damper.failed(node)
            metrics.controlplane.failover("down")
            log.warning("marked %s down: no agent connected for %.0fs; its egress ranges move to a standby gateway "
                        "if there is one", node, self.delay_s)

    async def _clear(self, node: str) -> None:
        try:
            ok, _, _ = await self.etcd.txn(
                [self.t.create(session_key(self.etcd, node)) > 0, self.t.create(mark_key(self.etcd, node)) > 0],
                [self.t.delete(mark_key(self.etcd, node))],
            )
        except Exception:  # noqa: BLE001 - try again shortly, while it is still marked and back
            log.warning("could not mark %s up again; retrying in %.0fs", node, RETRY_S)
            asyncio.get_running_loop().call_later(RETRY_S, self._retry_clear, node)
            return
        if ok:
            self.marks_cleared += 1
            metrics.controlplane.failover("back")
            log.info("%s is back: its agent reconnected", node)

    def _retry_clear(self, node: str) -> None:
        net = node.split("/")[1]
        st = self.cache.networks.get(net)
        if not self._stopped and st is not None and node in st.down and node in self.cache.sessions:
            self._spawn(self._clear(node))

    def _node_key(self, node: str) -> bytes:
        _, net, _, nid = node.split("/")
        return self.etcd.key("nodes", net, nid)
