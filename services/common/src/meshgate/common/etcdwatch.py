"""A watch over an etcd key range that keeps etcd's own grouping.

aetcd's watch hands out single events and drops the response structure. Here
each yielded `Batch` holds every event of one revision (one transaction), so a
consumer can treat a transaction as one change, and progress notifications
arrive as empty batches that advance the revision.

Hazards:
- A start revision older than the compaction point raises `Compacted`; the
  consumer must list again and watch from the listed revision.
- Any other failure of the stream raises `EtcdUnavailable`; the consumer
  decides how to back off and resume (from its last revision + 1).
- With etcd authentication the stream carries the adapter's auth token, which
  etcd checks when the watch is created (events of a created watch keep
  coming after the token expires). A creation refused for an expired token is
  tried once more after re-authenticating; any other refusal (no permission
  for the range) raises `EtcdRefused`, which says what to configure.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from aetcd import rpc

from meshgate.common import metrics
from meshgate.common.etcd import Etcd, EtcdRefused, EtcdUnavailable, token_rejected


class Compacted(Exception):
    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch start revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class Event:
    put: bool  # False for a delete
    key: bytes
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Batch:
    revision: int
    events: list[Event]


async def watch(etcd: Etcd, start: bytes, end: bytes, start_revision: int) -> AsyncIterator[Batch]:
    """Batches of events in [start, end) from `start_revision` on, forever."""
    create = rpc.WatchRequest(
        create_request=rpc.WatchCreateRequest(
            key=start, range_end=end, start_revision=start_revision, progress_notify=True
        )
    )
    call, responses, done, resp = await _open(etcd, create)
    try:
        while resp is not None:
            if resp.compact_revision:
                raise Compacted(resp.compact_revision)
            if resp.canceled:
                reason = etcd.explain(resp.cancel_reason)
                if reason is not None:
                    raise EtcdRefused(f"etcd at {etcd.endpoints} {reason}")
                raise EtcdUnavailable(f"etcd cancelled the watch: {resp.cancel_reason}")
            if resp.created and not resp.events:
                pass  # the creation's answer
            elif not resp.events:
                yield Batch(resp.header.revision, [])
            else:
                metrics.etcd.watch_lag.set(resp.header.revision - resp.events[0].kv.mod_revision)
                for rev, group in itertools.groupby(resp.events, key=lambda e: e.kv.mod_revision):
                    metrics.etcd.watched(rev)
                    yield Batch(
                        rev,
                        [Event(e.type == rpc.Event.PUT, e.kv.key, e.kv.value, e.kv.mod_revision) for e in group],
                    )
            resp = await anext(responses, None)  # None: the stream ended
    except grpc.aio.AioRpcError as e:
        raise EtcdUnavailable(f"etcd watch failed: {e.code().name}") from e
    finally:
        done.set()
        call.cancel()


async def _open(etcd: Etcd, create: rpc.WatchRequest):
    """A watch stream and its first response (etcd's answer to the creation;
    None when the stream ended at once), authenticated again once when etcd
    rejected the token."""
    for attempt in (1, 2):
        await etcd.open()
        token = etcd.client.metadata
        done = asyncio.Event()

        async def requests(done=done):
            yield create
            try:
                await done.wait()
            except asyncio.CancelledError:
                return  # the call is being torn down; nothing to send

        call = rpc.WatchStub(etcd.client.channel).Watch(requests(), metadata=token)
        responses = call.__aiter__()
        try:
            first = await anext(responses, None)
        except grpc.aio.AioRpcError as e:
            done.set()
            call.cancel()
            if attempt == 1 and etcd.client.authenticating and token_rejected(e):
                await etcd.reauthenticate(token)
                continue
            raise etcd.error(e) from e
        expired = first is not None and first.canceled and token_rejected(first.cancel_reason)
        if expired and attempt == 1 and etcd.client.authenticating:
            done.set()
            call.cancel()
            await etcd.reauthenticate(token)
            continue
        return call, responses, done, first
    raise AssertionError("unreachable")
