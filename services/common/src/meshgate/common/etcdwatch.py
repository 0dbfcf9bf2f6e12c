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
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from aetcd import rpc

from meshgate.common.etcd import Etcd, EtcdUnavailable


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
    await etcd.client.connect()
    stub = rpc.WatchStub(etcd.client.channel)
    create = rpc.WatchRequest(
        create_request=rpc.WatchCreateRequest(
            key=start, range_end=end, start_revision=start_revision, progress_notify=True
        )
    )
    done = asyncio.Event()

    async def requests():
        yield create
        try:
            await done.wait()
        except asyncio.CancelledError:
            return  # the call is being torn down; nothing to send

    call = stub.Watch(requests(), metadata=etcd.client.metadata)
    try:
        async for resp in call:
            if resp.compact_revision:
                raise Compacted(resp.compact_revision)
            if resp.canceled:
                raise EtcdUnavailable(f"etcd cancelled the watch: {resp.cancel_reason}")
            if resp.created and not resp.events:
                continue
            if not resp.events:
                yield Batch(resp.header.revision, [])
                continue
            for rev, group in itertools.groupby(resp.events, key=lambda e: e.kv.mod_revision):
                yield Batch(
                    rev,
                    [Event(e.type == rpc.Event.PUT, e.kv.key, e.kv.value, e.kv.mod_revision) for e in group],
                )
    except grpc.aio.AioRpcError as e:
        raise EtcdUnavailable(f"etcd watch failed: {e.code().name}") from e
    finally:
        done.set()
        call.cancel()
