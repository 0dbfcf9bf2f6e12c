"""Lease-based leader election on one etcd key, for singleton jobs.

A candidate grants itself a lease and runs a transaction that creates the
election key, holding its identity and attached to the lease, only if the key
does not exist (create revision 0). The winner keeps the lease alive (every
ttl/3); the others watch the key and try again when it is deleted, which
etcd does when the leader resigns or its lease expires (a killed leader is
replaced within ttl seconds).

The leader's work gets `fence()`: compares to add to each of its
transactions, so a leader that lost its lease without noticing yet (paused,
partitioned) cannot write anything.

Hazard: leadership ends the moment the lease expires, not when this process
notices; the fence, not the `leading` flag, is what makes writes safe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from meshgate.common import etcdwatch, metrics
from meshgate.common.etcd import Etcd, EtcdUnavailable

log = logging.getLogger(__name__)


def default_identity() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class Election:
    def __init__(self, etcd: Etcd, path: str, identity: str = "", ttl: int = 10) -> None:
        self.etcd = etcd
        self.key = etcd.prefix + b"/" + path.encode()
        self.identity = identity or default_identity()
        self.ttl = max(2, int(ttl))
        self.leading = False
        self._lease: Any = None

    def fence(self) -> list[Any]:
        return [self.etcd.txn_ops.value(self.key) == self.identity.encode()]

    async def leader(self) -> str | None:
        kv = await self.etcd.get(self.key)
        return kv.value.decode() if kv else None

    async def run(self, lead: Callable[[list[Any]], Awaitable[None]]) -> None:
        """Campaign forever; while leading, run `lead(fence)` (cancelled when leadership is lost)."""
        while True:
            try:
                await self._acquire()
            except EtcdUnavailable as e:
                log.warning("election: %s; retrying", e)
                await asyncio.sleep(self.ttl / 3)
                continue
            self.leading = True
            metrics.keyservice.leading(True)
            log.info("elected scheduler leader as %s", self.identity)
            work = asyncio.ensure_future(lead(self.fence()))
            keep = asyncio.ensure_future(self._keepalive())
            try:
                await asyncio.wait([work, keep], return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.leading = False
                metrics.keyservice.leading(False)
                for t in (work, keep):
                    t.cancel()
                await asyncio.gather(work, keep, return_exceptions=True)
            if work.done() and not work.cancelled() and work.exception() is not None:
                log.error("scheduler stopped with an error; resigning", exc_info=work.exception())
                await self.resign()
            log.info("no longer the scheduler leader")

    async def _acquire(self) -> None:
        t = self.etcd.txn_ops
        while True:
            lease = await self.etcd._call(self.etcd.client.lease(self.ttl))
            ok, _, _ = await self.etcd.txn(
                [t.create(self.key) == 0], [t.put(self.key, self.identity.encode(), lease=lease.id)]
            )
            if ok:
                self._lease = lease
                return
            await self.etcd._call(self.etcd.client.revoke_lease(lease.id))
            kv = await self.etcd.get(self.key)
            if kv is None:
                continue
            await self._wait_deleted(kv.mod_revision + 1)

    async def _wait_deleted(self, start_revision: int) -> None:
        async def watch() -> None:
            async for batch in etcdwatch.watch(self.etcd, self.key, self.key + b"\0", start_revision):
                if any(not e.put for e in batch.events):
                    return

        try:
            # The timeout is only a safety net against a silently stuck watch.
            await asyncio.wait_for(watch(), timeout=self.ttl * 3)
        except (TimeoutError, etcdwatch.Compacted):
            pass

    async def _keepalive(self) -> None:
        lease = self._lease
        deadline = time.monotonic() + self.ttl
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                reply = await self.etcd._call(lease.refresh())
            except EtcdUnavailable as e:
                if time.monotonic() > deadline:
                    log.warning("lost the scheduler lease (etcd unreachable: %s)", e)
                    return
                continue
            if reply is None or reply.TTL <= 0:
                log.warning("lost the scheduler lease (expired)")
                return
            deadline = time.monotonic() + reply.TTL

    async def resign(self) -> None:
        """Give up leadership now (deletes the key so another replica takes over at once)."""
        lease, self._lease = self._lease, None
        self.leading = False
        if lease is not None:
            try:
                await self.etcd._call(self.etcd.client.revoke_lease(lease.id))
            except EtcdUnavailable:
                pass
