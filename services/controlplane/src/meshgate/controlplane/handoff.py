"""Drain handoff: a drain or an undrain moves other nodes' routes only once the
gateways that must copy late replies have applied the copying.

A move between two healthy gateways (a drain, an undrain) would lose the
replies already on their way back through the old gateway when a node switches:
that node's WireGuard accepts a source address only from the peer that holds it
now. So the old gateway copies the replies it forwards from the moved ranges to
the new one (`EgressConfig.handoffs`, compiler._handoffs; gatewayd's handoff.py
sends the copies in VXLAN over the overlay), and the copy reaches a node that
has switched through the gateway it routes through now.

The copying has to be in place before any node switches. So the API writes,
in the transaction that changes a gateway's or a node's `drain`, a mark
`egressDrain/{net}/{gw}` holding the drain routing keeps meanwhile (JSON
`{"drained": ...}`, `hold_ops`); the compiler ranks by it (`drained`) but
already gives the copying to the gateways that need it (it ranks the target by
`drain_requested`). This controller deletes the mark once the node of the
drained gateway has applied the mark's revision (for an undrain: the nodes of
the gateways carrying its ranges meanwhile), and only then do the other
nodes' states move their routes. It does not wait for a node whose agent is
connected to no replica, nor for one with nothing to copy (an internet
gateway, IPv6 ranges, no healthy standby), nor longer than `max_wait_s`
(then the move happens as before, losing at most the replies in flight). A
gateway drained before this existed has no mark: it stays drained.

Every replica runs it; the deletes are guarded etcd writes that every replica
compiles from, like the health and liveness marks. A replica that does not
know the marks (a rolling upgrade) routes by the flag at once.
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


async def hold_ops(etcd: Etcd, net_id: str, changes: list[tuple[str, bool]]) -> tuple[list, list]:
    """(compares, ops) for a transaction changing the drain of gateways:
    `changes` are (gateway name, its drain before the change). Each gateway
    without a mark gets one holding its drain before; one with a mark keeps it
    (routing still holds the value from before the pending change); the
    compares fail the transaction if a mark appears or goes meanwhile."""
    t = etcd.txn_ops
    compares, ops = [], []
    for name, before in changes:
        key = mark_key(etcd, name)
        kv = await etcd.get(key)
        if kv is None:
            compares.append(t.version(key) == 0)
            ops.append(t.put(key, json.dumps({"drained": before}).encode()))
        else:
            compares.append(t.mod(key) == kv.mod_revision)
    return compares, ops


class DrainHandoff:
    """Deletes `egressDrain` marks when their handoff is ready."""

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
        self.moves = 0  # marks deleted: drains and undrains that took effect
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
                log.warning("drain handoff: could not check or delete a mark; retrying", exc_info=True)
                await asyncio.sleep(RETRY_S)

    async def step(self) -> None:
        """One pass over every network: delete the marks whose handoff is ready."""
        seen: set[str] = set()
        for net_id, st in list(self.cache.networks.items()):
            for name, (held, revision) in sorted(st.drain_held.items()):
                gw = st.gateways.get(name)
                if gw is None or compiler.drain_requested(st, gw) == held:
                    await self._release(name, "gone" if gw is None else "back as it was")
                    continue
                seen.add(name)
                want = not held
                started = self._pending.setdefault(name, time.monotonic())
                waited = time.monotonic() - started
                if waited < self.max_wait_s and not await self._ready(net_id, st, gw, want, revision):
                    continue
                if waited >= self.max_wait_s:
                    self.timeouts += 1
                    log.warning("%s: %s without every gateway's ack after %.1fs", name,
                                "draining" if want else "undraining", waited)
                await self._release(name, "drained" if want else "undrained")
        for name in set(self._pending) - seen:
            del self._pending[name]

    def _waits_for(self, st: compiler.NetworkState, gw: Any, want: bool) -> set[str]:
        """The nodes that must copy late replies before the move: for a drain the
        gateway's own node, for an undrain the nodes of the gateways carrying its
        ranges meanwhile; only those with something to copy."""
        if want:
            gws = [gw]
        else:
            by_range, _ = compiler.active_gateways(st)
            gws = [g for r in [*gw.ranges, *compiler.learned_ranges(st, gw)]
                   if (g := by_range.get(r)) is not None and g.name != gw.name and g.node != gw.node]
        return {g.node for g in gws if compiler.gateway_handoffs(st, g)}

    async def _ready(self, net_id: str, st: compiler.NetworkState, gw: Any, want: bool, revision: int) -> bool:
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

    async def _release(self, name: str, why: str) -> None:
        key = mark_key(self.etcd, name)
        ok, _, rev = await self.etcd.txn([self.t.version(key) > 0], [self.t.delete(key)])
        self._pending.pop(name, None)
        if ok:
            self.moves += 1
            log.info("%s %s: the other nodes route by its drain now", name, why)
            await self.cache.wait_for_revision(rev, timeout=10)
