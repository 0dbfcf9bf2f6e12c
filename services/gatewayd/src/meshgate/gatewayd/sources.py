"""Where desired states come from: the seam between the agent and the control plane.

A source is an async iterator of updates: a full ``Snapshot`` or a ``Delta`` on top of
the last snapshot.  The agent consumes it and tells the source what it applied via
``report`` (the streaming source turns that into acknowledgements).  Today there are
two: ``FileSource`` (``gatewayd run --file``: re-read a JSON file when it changes) and
``QueueSource`` (in-process, for tests, benchmarks and embedding).  The control-plane
stream (issue "Enrollment and desired-state streaming") is a third implementation of
the same protocol; nothing else in the agent needs to change for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from google.protobuf import json_format

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.gatewayd.errors import FieldViolation, InvalidDesiredState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    state: pb.DesiredState
    traceparent: str = ""
    """W3C trace context of the change that caused it (the apply joins that trace)."""


@dataclass(frozen=True)
class Delta:
    delta: pb.DesiredStateDelta
    revision: int
    """The revision the state is at once the delta is applied."""
    traceparent: str = ""


@dataclass(frozen=True)
class Unreadable:
    """The source got something it could not parse; the agent reports and ignores it."""

    error: InvalidDesiredState


@dataclass(frozen=True)
class RotateKey:
    """The control plane asks for a new node key pair (``SyncResponse.rotate_key``): the
    agent makes one pending and answers with its public half (``announce_key``)."""

    reason: str = ""


Update = Snapshot | Delta | Unreadable | RotateKey


@dataclass(frozen=True)
class Report:
    applied_revision: int | None
    error: str | None
    code: str = ""
    """A ``grpc.StatusCode`` name for the ack's status when ``error`` is set
    (default FAILED_PRECONDITION)."""
    refused: tuple = ()
    """``trust.Refusal``s of peers left out of the applied state (``PERMISSION_DENIED``)."""
    declined: tuple = ()
    """``consent.Declined`` default routes left out of the applied state; with no
    ``error`` the ack is OK and says what was declined."""
    drift: dict | None = None
    """The drift watcher's counts (``drift.DriftWatcher.status``), sent in the ack's
    ``drift``; None when it does not run."""


class DesiredStateSource(Protocol):
    def updates(self) -> AsyncIterator[Update]:
        ...

    async def report(self, report: Report) -> None:
        ...

    # Optional: ``async def announce_key(self, public_key: str) -> None`` (sources that
    # can send RotateKey answer with the pending key's public half).


def parse_json(text: str) -> pb.DesiredState:
    msg = pb.DesiredState()
    try:
        json_format.Parse(text, msg)
    except json_format.ParseError as e:
        raise InvalidDesiredState([FieldViolation("(json)", str(e))]) from None
    return msg


class FileSource:
    """Follows a desired-state JSON file: yields a snapshot whenever its content changes."""

    def __init__(self, path: Path, poll_interval: float = 0.5):
        self.path = path
        self.poll_interval = poll_interval

    async def updates(self) -> AsyncIterator[Update]:
        last: tuple | None = None
        while True:
            try:
                st = os.stat(self.path)
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                key = None
            if key is not None and key != last:
                last = key
                try:
                    yield Snapshot(parse_json(self.path.read_text()))
                except InvalidDesiredState as e:
                    yield Unreadable(e)
            await asyncio.sleep(self.poll_interval)

    async def report(self, report: Report) -> None:
        return None


class QueueSource:
    """Updates pushed by the embedding program (``put``); reports are kept for inspection."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.reports: list[Report] = []
        self.announced: list[str] = []

    def put(self, update: Update) -> None:
        self.queue.put_nowait(update)

    async def updates(self) -> AsyncIterator[Update]:
        while True:
            yield await self.queue.get()

    async def report(self, report: Report) -> None:
        self.reports.append(report)

    async def announce_key(self, public_key: str) -> None:
        self.announced.append(public_key)
