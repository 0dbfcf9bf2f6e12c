"""Egress gateway failover by liveness: marking gateway nodes down and up.

A node is *up* while its agent holds a Sync stream: `sessions/{net}/{node}`
exists, attached to the lease of the replica holding the stream (so it also
disappears when that replica dies). A node that runs an egress gateway and has
had no session for the failover delay (`--gateway-failover-after`, 15 s by
default) is marked down with `liveness/{net}/{node}`; once its session is back
the mark is deleted. The compiler gives an egress range to a gateway on a node
that is up before one on a node that is down (compiler.active_gateways), so
the range moves to the standby and back.

The marks are etcd writes, not local opinions: they carry revisions and reach
every replica through the watch like any other change, so all replicas compile
the same states and agents acknowledge a revision as usual. Every replica runs
the timers; the writes compare "the session key does not exist and the mark
does not exist" (to mark) and "the session key exists" (to clear), so racing
replicas write each transition once, and a node that came back meanwhile is
never marked.

The delay absorbs control-plane restarts and short network blips: agents
reconnect within seconds (their backoff starts at a fraction of a second), so
only a node that stays away longer is failed over. A delay of 0 turns
failover off (no marks are written; existing ones are still cleared).

Hazard: the timers use this replica's monotonic clock from the moment it saw
the session go (or started without one); replicas can disagree by their watch
lag, which only decides which of them writes the mark.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from meshgate.common.etcd import Etcd
from meshgate.controlplane.cache import Change, StateCache

log = logging.getLogger(__name__)

DEFAULT_DELAY_S = 15.0
RETRY_S = 2.0  # after a failed mark or clear


def mark_key(etcd: Etcd, node: str) -> bytes:
    _, net, _, nid = node.split("/")
    return etcd.key("liveness", net, nid)


def session_key(etcd: Etcd, node: str) -> bytes:
    _, net, _, nid = node.split("/")
    return etcd.key("sessions", net, nid)


class Liveness:
    """Watches the cache's view of sessions and gateways; writes the marks."""

    def __init__(self, etcd: Etcd, cache: StateCache, delay_s: float = DEFAULT_DELAY_S, replica: str = "") -> None:
        self.etcd = etcd
        self.cache = cache
        self.delay_s = delay_s
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
        self.cache.listeners.append(self.on_change)

    async def stop(self) -> None:
        self._stopped = True
        if self.on_change in self.cache.listeners:
            self.cache.listeners.remove(self.on_change)
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
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
                        self._spawn(self._clear(node))
                elif node not in st.down and self.delay_s > 0:
                    since = self._absent_since.setdefault(node, now)
                    self._arm(node, since + self.delay_s - now)
        for node in [n for n in self._absent_since if n not in tracked]:
            self._cancel(node)

    def _arm(self, node: str, delay: float) -> None:
        if node in self._timers:
            return
        loop = asyncio.get_running_loop()
        self._timers[node] = loop.call_later(max(delay, 0.0), lambda: self._spawn(self._mark(node)))

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
            log.info("%s is back: its agent reconnected", node)

    def _retry_clear(self, node: str) -> None:
        net = node.split("/")[1]
        st = self.cache.networks.get(net)
        if not self._stopped and st is not None and node in st.down and node in self.cache.sessions:
            self._spawn(self._clear(node))

    def _node_key(self, node: str) -> bytes:
        _, net, _, nid = node.split("/")
        return self.etcd.key("nodes", net, nid)
