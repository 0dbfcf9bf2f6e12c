"""The agent loop of ``gatewayd run``: one serial worker that keeps the host at the
latest desired state.

- On start it restores the last applied state from disk and does a full pass, so a
  node rebooted or restarted without a control plane comes back on its own; with
  nothing on disk it deletes nothing and waits for a first complete desired state.
- Each update from the source is validated before anything is applied; a bad one is
  reported and the previous state stays in place.
- A good update goes through the delta path; a failed apply is retried with capped,
  jittered backoff, as a full pass; a full resync runs every ``resync_interval``
  (jittered), on SIGHUP, and when the supervised wireguard-go process is gone.
- SIGTERM/SIGINT stop the agent and leave the data plane as it is.

Updates that arrive while a pass runs are coalesced: the next pass plans the newest
target against what the kernel holds, so nothing is replayed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from typing import Any

from opentelemetry import propagate, trace

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.common import logsetup
from meshgate.gatewayd.backoff import Backoff, jittered
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.errors import ApplyError, FieldViolation, InvalidDesiredState
from meshgate.gatewayd.model import Desired, compile_peer_delta, merge_delta, peers_only
from meshgate.gatewayd.reconciler import Reconciler
from meshgate.gatewayd.sources import Delta, DesiredStateSource, Report, Snapshot, Unreadable, Update

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, reconciler: Reconciler, settings: Settings,
                 source: DesiredStateSource | None = None, rng: random.Random | None = None):
        self.rec = reconciler
        self.settings = settings
        self.source = source
        self.rng = rng or random.Random()
        self.backoff = Backoff(settings.backoff_initial, settings.backoff_max, self.rng)
        self.target_msg: pb.DesiredState | None = None
        self.target: Desired | None = None
        self._target_gen = 0
        self._applied_gen = -1
        self._need_full = True
        self._wake = asyncio.Event()
        # Trace contexts of the updates not applied yet: the next pass is a child
        # of the newest and links the others (updates coalesce into one pass).
        self._traces: list[str] = []
        self.status: dict[str, Any] = {
            "state": "waiting", "applied_revision": None, "last_error": None, "attempt": 0,
            "full_syncs": 0, "delta_syncs": 0, "rejected": 0, "backend": reconciler.backend.name,
        }

    # -- control

    def resync_now(self) -> None:
        self._need_full = True
        self._wake.set()

    async def run_forever(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.resync_now)
        await self.run(stop)
        self.rec.nft.settle()
        log.info("stopping; the data plane stays as it is")
        return 0

    async def run(self, stop: asyncio.Event) -> None:
        self._restore()
        feeder = asyncio.create_task(self._feed()) if self.source else None
        stopper = asyncio.create_task(stop.wait())
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_resync = now + jittered(self.settings.resync_interval, self.settings.resync_jitter, self.rng)
        next_supervise = now + self.settings.supervise_interval
        retry_at: float | None = None
        try:
            while not stop.is_set():
                now = loop.time()
                if now >= next_resync:
                    self._need_full = True
                if now >= next_supervise:
                    next_supervise = now + self.settings.supervise_interval
                    if self._applied_gen >= 0 and not await asyncio.to_thread(self.rec.alive):
                        log.warning("data plane of %s is gone; full resync", self.target and self.target.interface)
                        self._need_full = True
                due = self.target is not None and (
                    self._applied_gen != self._target_gen or self._need_full)
                if due and (retry_at is None or now >= retry_at):
                    ok = await self._pass()
                    now = loop.time()
                    if ok:
                        retry_at = None
                        next_resync = now + jittered(self.settings.resync_interval,
                                                     self.settings.resync_jitter, self.rng)
                    else:
                        delay = self.backoff.next_delay()
                        retry_at = now + delay
                        log.warning("apply failed (attempt %d); retrying in %.2fs as a full pass",
                                    self.backoff.attempt, delay)
                    continue
                deadlines = [next_resync, next_supervise] + ([retry_at] if retry_at else [])
                timeout = max(0.0, min(deadlines) - loop.time())
                self._wake.clear()
                waker = asyncio.create_task(self._wake.wait())
                await asyncio.wait({waker, stopper}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                if self._wake.is_set() and retry_at is not None and self._applied_gen != self._target_gen:
                    retry_at = None  # a new target deserves an immediate attempt
        finally:
            stopper.cancel()
            if feeder:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)

    # -- internals

    def _restore(self) -> None:
        msg = self.rec.store.load_desired()
        if msg is None:
            log.info("no desired state on disk; waiting for one (nothing is deleted meanwhile)")
            return
        try:
            self._set_target(msg, self.rec.compile(msg))
            log.info("restored revision %d from disk", msg.revision)
        except InvalidDesiredState as e:
            log.error("the desired state on disk no longer validates on this host: %s", e)
            self._record_error(str(e), rejected=True)

    def _set_target(self, msg: pb.DesiredState, desired: Desired) -> None:
        if self.target is None or self.target.node != desired.node:
            logsetup.bind(node=desired.node)  # identity on every record from here on
        self.target_msg, self.target = msg, desired
        self._target_gen += 1
        self._wake.set()

    async def _feed(self) -> None:
        assert self.source is not None
        try:
            async for update in self.source.updates():
                self.accept(update)
        except asyncio.CancelledError:
            raise
        except Exception:
            # the data plane keeps the last state; the source's owner must restart it
            log.exception("desired-state source failed; keeping the current state")
            self._record_error("desired-state source failed")

    def accept(self, update: Update) -> bool:
        """Validate an update and make it the target; False (and reported) if rejected."""
        try:
            if isinstance(update, Unreadable):
                raise update.error
            if isinstance(update, Snapshot):
                msg = update.state
                desired = self.rec.compile(msg)
            elif isinstance(update, Delta):
                if self.target_msg is None or self.target is None:
                    raise InvalidDesiredState([FieldViolation(
                        "base_revision", "no snapshot to apply a delta to")])
                if update.delta.base_revision != self.target_msg.revision:
                    raise InvalidDesiredState([FieldViolation(
                        "base_revision", f"is {update.delta.base_revision}, the current "
                        f"revision is {self.target_msg.revision}; a snapshot is needed")])
                msg = merge_delta(self.target_msg, update.delta)
                msg.revision = update.revision
                if peers_only(update.delta):
                    desired = compile_peer_delta(self.target, update.delta, update.revision)
                else:
                    desired = self.rec.compile(msg)
            else:  # pragma: no cover
                raise TypeError(update)
        except InvalidDesiredState as e:
            log.error("rejected desired state: %s", e)
            self._record_error(str(e), rejected=True)
            return False
        if getattr(update, "traceparent", ""):
            self._traces.append(update.traceparent)
        self._set_target(msg, desired)
        return True

    async def _pass(self) -> bool:
        assert self.target is not None and self.target_msg is not None
        full, gen, target, msg = self._need_full, self._target_gen, self.target, self.target_msg
        self._need_full = False
        traces, self._traces = self._traces, []
        try:
            try:
                with _apply_span(traces, target, full):
                    result = await asyncio.to_thread(self.rec.reconcile, target, full)
            except ApplyError:
                raise
            except Exception as e:  # a bug or an unexpected host error: keep the agent alive
                log.exception("unexpected error during a %s pass", "full" if full else "delta")
                raise ApplyError("internal", f"{type(e).__name__}") from None
        except ApplyError as e:
            self._traces = traces + self._traces  # the retry continues the same traces
            self._need_full = True
            self._record_error(str(e))
            self.status["state"] = "retrying"
            self.status["attempt"] = self.backoff.attempt + 1
            self._write_status()
            await self._report(Report(None, str(e)))
            return False
        self._applied_gen = gen
        self.rec.store.save_desired(msg)
        self.backoff.reset()
        changes = result.plan.changes()
        self.status.update(
            state="applied", applied_revision=target.revision, attempt=0, last_error=None,
            node=target.node, last_changes=len(changes),
        )
        self.status["full_syncs" if result.full else "delta_syncs"] += 1
        self._write_status()
        if changes:
            log.info("%s pass applied revision %d: %s", "full" if result.full else "delta",
                     target.revision, "; ".join(changes[:20]) + (" …" if len(changes) > 20 else ""))
        await self._report(Report(target.revision, None))
        return True

    def _record_error(self, message: str, rejected: bool = False) -> None:
        self.status["last_error"] = message
        if rejected:
            self.status["rejected"] += 1
        self._write_status()

    def _write_status(self) -> None:
        try:
            self.rec.store.write_status(self.status)
        except OSError as e:
            log.warning("cannot write status: %s", e)

    async def _report(self, report: Report) -> None:
        if self.source is not None:
            try:
                await self.source.report(report)
            except Exception as e:  # a reporting failure must not stop reconciling
                log.warning("report to source failed: %s", e)


_tracer = trace.get_tracer("meshgate.gatewayd")


def _apply_span(traceparents: list[str], target: Desired, full: bool):
    """The span of one pass: a child of the newest change's trace, with links to
    the other changes it also applies."""
    contexts = [propagate.extract({"traceparent": tp}) for tp in traceparents if tp]
    parent = contexts[-1] if contexts else None
    links = []
    for ctx in contexts[:-1]:
        sc = trace.get_current_span(ctx).get_span_context()
        if sc.is_valid:
            links.append(trace.Link(sc))
    return _tracer.start_as_current_span(
        "gatewayd.apply",
        context=parent,
        links=links,
        attributes={"meshgate.node": target.node, "meshgate.revision": target.revision, "meshgate.full": full},
    )
