"""Drain handoff: a drain or an undrain moves other nodes' routes only once the
gateways that must copy late replies have applied the copying.

A move between two healthy gateways (a drain, an undrain) would lose the
replies already on their way back through the old gateway when a node switches:
that node's WireGuard accepts a source address only from the peer that holds it
now. So the old gateway copies the replies it forwards from the moved ranges to
the new one (`EgressConfig.handoffs`, compiler._handoffs; gatewayd's handoff.py
sends the copies in VXLAN over the overlay), and the copy reaches a node that
has switched through the gateway it routes through now.

The copying has to be in place before any node switches. The compiler gives it
to the old gateway's node as soon as the operator's flag changes
(`drain_requested`), but routes by `drained`: a gateway is drained for routing
only while its mark `egressDrain/{net}/{gw}` exists. This controller writes the
mark once the node of the drained gateway has applied the revision of the
drain (or deletes it, for an undrain, once the nodes of the gateways carrying
its ranges have applied theirs), and only then do the other nodes' states
move their routes. It does not wait for a node whose agent is not connected
to any replica, nor for a gateway that is unhealthy, nor longer than
`max_wait_s` (then the move happens as before, losing at most the replies in
flight).

Every replica runs it; the marks are idempotent etcd writes that every replica
compiles from, like the health and liveness marks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from meshgate.common.etcd import Etcd
from meshgate.controlplane import compiler
from meshgate.controlplane.cache import Change, StateCache

log = logging.getLogger(__name__)

TICK_S = 0.05  # while a handoff waits for acks
MAX_WAIT_S = 3.0
RETRY_S = 1.0


def mark_key(etcd: Etcd, gateway: str) -> bytes:
    _, net, _, gid = gateway.split("/")
    return etcd.key("egressDrain", net, gid)


class DrainHandoff:
    """Writes and deletes `egressDrain` marks when their handoff is ready."""

    def __init__(self, etcd: Etcd, cache: StateCache, fanout: Any, replica: str = "",
                 max_wait_s: float = MAX_WAIT_S) -> None:
        self.etcd = etcd
        self.cache = cache
        self.fanout = fanout  # sync.Fanout: its sessions' acks
        self.replica = replica
        self.max_wait_s = max_wait_s
        self.t = etcd.txn_ops
        self._pending: dict[str, float] = {}  # gateway -> when its handoff started waiting (monotonic)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.moves = 0  # marks written or deleted
        self.timeouts = 0  # of those, after `max_wait_s` without every ack

    def start(self) -> None:
        self.cache.listeners.append(self.on_change)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="drain-handoff")

    async def stop(self) -> None:
        if self.on_change in self.cache.listeners:
            self.cache.listeners.remove(self.on_change)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def on_change(self, change: Change) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S if self._pending else None)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - etcd away: the next tick tries again
                log.warning("drain handoff: could not check or write a mark; retrying", exc_info=True)
                await asyncio.sleep(RETRY_S)

    async def step(self) -> None:
        """One pass over every network: write or delete the marks whose handoff is ready."""
        seen: set[str] = set()
        for net_id, st in list(self.cache.networks.items()):
            for name in sorted(st.drain_marks - set(st.gateways)):
                await self._write(name, False)  # its gateway is gone
            for name, gw in sorted(st.gateways.items()):
                want = compiler.drain_requested(st, gw)
                if want == (name in st.drain_marks):
                    continue
                seen.add(name)
                started = self._pending.setdefault(name, time.monotonic())
                waited = time.monotonic() - started
                if waited < self.max_wait_s and not await self._ready(net_id, st, gw, want):
                    continue
                if waited >= self.max_wait_s:
                    self.timeouts += 1
                    log.warning("%s: %s without every gateway's ack after %.1fs", name,
                                "draining" if want else "undraining", waited)
                await self._write(name, want)
        for name in set(self._pending) - seen:
            del self._pending[name]

    def _waits_for(self, st: compiler.NetworkState, gw: Any, want: bool) -> set[str]:
        """The nodes that must copy late replies before the move: for a drain the
        gateway's own node, for an undrain the nodes of the gateways carrying its
        ranges now; only healthy gateways (an unhealthy one carries nothing)."""
        if want:
            return {gw.node} if compiler.healthy(st, gw) else set()
        by_range, _ = compiler.active_gateways(st)
        return {g.node for r in [*gw.ranges, *compiler.learned_ranges(st, gw)]
                if (g := by_range.get(r)) is not None and g.name != gw.name and g.node != gw.node
                and compiler.healthy(st, g)}

    async def _ready(self, net_id: str, st: compiler.NetworkState, gw: Any, want: bool) -> bool:
        node = st.nodes.get(gw.node)
        revision = max(int(gw.etag or 0), int(node.etag or 0) if node is not None else 0)
        remote = []
        for n in self._waits_for(st, gw, want):
            s = self.fanout.sessions.get(n)
            if s is not None:
                if s.acked < revision:
                    return False
            else:
                remote.append(n)
        for n in remote:
            nid = n.rsplit("/", 1)[1]
            if await self.etcd.get(self.etcd.key("sessions", net_id, nid)) is None:
                continue  # not connected anywhere: nothing to wait for
            kv = await self.etcd.get(self.etcd.key("status", net_id, nid))
            if kv is None or json.loads(kv.value).get("applied_revision", 0) < revision:
                return False
        return True

    async def _write(self, name: str, drained: bool) -> None:
        key = mark_key(self.etcd, name)
        _, net, _, gid = name.split("/")
        if drained:
            value = json.dumps({"by": self.replica}).encode()
            ok, _, rev = await self.etcd.txn([self.t.create(self.etcd.key("egressGateways", net, gid)) > 0],
                                             [self.t.put(key, value)])
        else:
            ok, _, rev = await self.etcd.txn([], [self.t.delete(key)])
        if ok:
            self.moves += 1
            self._pending.pop(name, None)
            log.info("%s %s: the other nodes move their routes", name, "drained" if drained else "undrained")
            await self.cache.wait_for_revision(rev, timeout=10)
