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

Signed peers (``trust.py``): with key authority keys, every peer of a new state is
checked; refused peers are left out of what is compiled and applied, and the ack of
that revision carries ``PERMISSION_DENIED`` naming them.  ``target_msg`` is the state
as the control plane sent it (deltas merge onto it, and it is what ``desired.pb``
keeps); the filter runs on every compile, so a peer refused earlier and correctly
signed later is applied.

Routes (``consent.py``): unless the operator accepted them, the default routes
of a new state are left out the same way (and always on a node that is the
internet gateway itself), and so are routes outside the operator's allow-list
(``--accept-routes``), with their allowed IPs; the change is logged once, kept
in the status (``declined_routes``) and said in the (OK) ack of that revision.

Node key rotation: a ``RotateKey`` update makes a pending key pair (``keys.NodeKeys``)
and announces its public half to the source; the switch happens in the pass that
applies a state naming that key (``reconciler.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import signal
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import propagate, trace

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.common import logsetup, metrics
from meshgate.gatewayd import consent, health
from meshgate.gatewayd.backoff import Backoff, jittered
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.drift import DriftWatcher
from meshgate.gatewayd.errors import ApplyError, FieldViolation, InvalidDesiredState
from meshgate.gatewayd.model import Desired, compile_peer_delta, merge_delta, peers_only
from meshgate.gatewayd.pathwatch import PathWatch
from meshgate.gatewayd.reconciler import Reconciler
from meshgate.gatewayd.sources import (
    Delta,
    DesiredStateSource,
    Report,
    RotateKey,
    Snapshot,
    Unreadable,
    Update,
)
from meshgate.gatewayd.trust import PeerVerifier, Refusal, summary, without

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, reconciler: Reconciler, settings: Settings,
                 source: DesiredStateSource | None = None, rng: random.Random | None = None,
                 authority_keys: Sequence[bytes] = (), network: str = "",
                 accept_default_route: bool = False, accept_routes: Sequence[str] | None = None,
                 no_default_route: bool = False):
        self.rec = reconciler
        self.verifier = PeerVerifier(authority_keys, network) if authority_keys else None
        """None: the development mode, nothing is verified."""
        self.refused: dict[str, Refusal] = {}
        """Peers of the current target left out (by public key)."""
        self.accept_default_route = accept_default_route and not no_default_route
        self.no_default_route = no_default_route
        """The operator said ``--no-default-route`` (not just no consent)."""
        self.accept_routes = None if accept_routes is None else tuple(accept_routes)
        """The operator's allow-list of routes; None: every non-default route."""
        self.declined: tuple[consent.Declined, ...] = ()
        """Routes of the current target left out."""
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
        self._rtts: dict[str, int] = {}  # public key -> last round-trip time (us) over the overlay, 0: none
        # Trace contexts of the updates not applied yet: the next pass is a child
        # of the newest and links the others (updates coalesce into one pass).
        self._traces: list[str] = []
        self.drift: DriftWatcher | None = None
        """Started by ``run`` unless ``settings.drift_watch`` is off."""
        self._last_report: Report | None = None
        """The ack of the last pass, sent again when the drift watcher's state changes."""
        self.status: dict[str, Any] = {
            "state": "waiting", "applied_revision": None, "last_error": None, "attempt": 0,
            "full_syncs": 0, "delta_syncs": 0, "rejected": 0, "backend": reconciler.backend.name,
            "verify_peers": self.verifier is not None, "refused_peers": [],
            "accept_default_route": self.accept_default_route,
            "accept_routes": None if self.accept_routes is None else list(self.accept_routes),
            "declined_routes": [],
        }
        self._key_status()
        metrics.gatewayd.observe(self)  # gauges: peers, last success, stream, per-peer handshakes

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
        self.drift = self._watch_drift(asyncio.get_running_loop())
        feeder = asyncio.create_task(self._feed()) if self.source else None
        monitor = health.start(self.source, self._egress_view)  # the egress gateways' health (health.py)
        stopper = asyncio.create_task(stop.wait())
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_resync = now + jittered(self.settings.resync_interval, self.settings.resync_jitter, self.rng)
        next_supervise = now + self.settings.supervise_interval
        # Path health (pathwatch.py): the peers are sampled every
        # path_check_interval and what changed is reported at once, in one
        # message; a complete report every health_interval.
        health_every = self.settings.health_interval
        send_health = getattr(self.source, "send_health", None) if health_every > 0 else None
        check_every = min(self.settings.path_check_interval, health_every) if send_health else 0.0
        next_health = now + check_every if send_health else float("inf")
        watch = PathWatch(full_every_s=health_every)
        next_rtt, rtt_task = now, None  # type: tuple[float, asyncio.Task[None] | None]  # round-trip times to relays (rtt_address), for the relay choice
        streams_seen = -1
        retry_at: float | None = None
        try:
            while not stop.is_set():
                now = loop.time()
                if now >= next_resync:
                    self._need_full = True
                if send_health is not None and now >= next_health:
                    next_health = now + check_every
                    try:
                        opened = getattr(self.source, "streams_opened", 0)
                        if opened != streams_seen:  # a new stream hears everything once
                            streams_seen = opened
                            watch.reset()
                        probes = {k: p.keepalive for k, p in self.target.peers.items()
                                  if not p.allowed_ips and p.keepalive} if self.target is not None else {}
                        keepalives = {k: p.keepalive for k, p in self.target.peers.items()
                                      if p.keepalive} if self.target is not None else {}
                        if now >= next_rtt and self.target is not None:
                            next_rtt = now + self.settings.path_rtt_interval
                            want = {k: p.rtt_address for k, p in self.target.peers.items() if p.rtt_address}
                            self._rtts = {k: v for k, v in self._rtts.items() if k in want}
                            if want and (rtt_task is None or rtt_task.done()):
                                rtt_task = asyncio.create_task(self._measure_rtts(want))
                        found = watch.observe(await asyncio.to_thread(self.rec.peer_stats), time.time_ns(), probes,
                                              keepalives, self._rtts)
                        if found is not None and not await send_health(*found):
                            watch.reset()  # not sent: say it all on the next stream
                    except Exception as e:  # noqa: BLE001 - a report is best effort
                        log.warning("could not report peer health: %s", e)
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
                        log.warning("apply failed (attempt %d): %s; retrying in %.2fs as a full pass",
                                    self.backoff.attempt, self.status["last_error"], delay)
                    continue
                deadlines = [next_resync, next_supervise, next_health] + ([retry_at] if retry_at else [])
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
            if rtt_task is not None:
                rtt_task.cancel()
                await asyncio.gather(rtt_task, return_exceptions=True)
            if monitor is not None:
                monitor.cancel()
                await asyncio.gather(monitor, return_exceptions=True)
            if self.drift is not None:
                await asyncio.to_thread(self.drift.stop)
            if feeder:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)

    # -- internals

    def _egress_view(self) -> tuple[pb.DesiredState | None, str]:
        """The state whose egress gateways health.py checks, and the overlay interface."""
        return self.target_msg, self.target.interface if self.target is not None else ""

    def _restore(self) -> None:
        msg = self.rec.store.load_desired()
        if msg is None:
            log.info("no desired state on disk; waiting for one (nothing is deleted meanwhile)")
            return
        try:
            refused = self._refusals(msg.peers)
            kept, declined = self._consented(without(msg, refused))
            self._set_target(msg, self.rec.compile(kept, restoring=True), refused, declined)
            log.info("restored revision %d from disk", msg.revision)
        except InvalidDesiredState as e:
            log.error("the desired state on disk no longer validates on this host: %s", e)
            self._record_error(str(e), rejected=True)

    def _set_target(self, msg: pb.DesiredState, desired: Desired,
                    refused: dict[str, Refusal] | None = None,
                    declined: tuple[consent.Declined, ...] = ()) -> None:
        if self.target is None or self.target.node != desired.node:
            logsetup.bind(node=desired.node)  # identity on every record from here on
        if declined != self.declined:
            if declined:
                log.warning("%s", consent.summary(declined))
            else:
                log.info("no routes declined any more")
            self.declined = declined
            self.status["declined_routes"] = [str(d) for d in declined]
        refused = refused or {}
        for key, r in refused.items():
            if key not in self.refused or self.refused[key] != r:
                log.warning("refused peer %s (public key %s): %s", r.resource or "(no resource)",
                            r.public_key, r.reason)
        for key, r in self.refused.items():
            if key not in refused:
                log.info("peer %s (public key %s) is no longer refused", r.resource, r.public_key)
        self.refused = refused
        self.status["refused_peers"] = [str(r) for r in refused.values()]
        self.target_msg, self.target = msg, desired
        self._target_gen += 1
        self._wake.set()

    def _refusals(self, peers) -> dict[str, Refusal]:
        return self.verifier.refusals(peers) if self.verifier is not None else {}

    def _consented(self, msg: pb.DesiredState) -> tuple[pb.DesiredState, tuple[consent.Declined, ...]]:
        """``msg`` without the routes this node declines, and those."""
        declined = tuple(consent.declined_routes(msg, self.accept_default_route, self.accept_routes,
                                                 explicit=self.no_default_route))
        return consent.without_declined(msg, declined), declined

    def _key_status(self) -> None:
        keys = getattr(self.rec, "keys", None)
        if keys is not None:
            self.status["public_key"] = keys.current.public
            self.status["pending_public_key"] = keys.pending.public if keys.pending else None

    async def rotate_key(self, reason: str = "") -> str:
        """Make (or reuse) the pending key pair and announce its public half."""
        public = await asyncio.to_thread(self.rec.keys.ensure_pending)
        log.info("key rotation requested (%s); announcing pending public key %s",
                 reason or "no reason given", public)
        self._key_status()
        self._write_status()
        announce = getattr(self.source, "announce_key", None)
        if announce is not None:
            try:
                await announce(public)
            except Exception as e:  # noqa: BLE001 - announcing is retried; the key is already in use
                log.warning("announcing the new key failed: %s", e)
        return public

    async def _feed(self) -> None:
        assert self.source is not None
        try:
            async for update in self.source.updates():
                if isinstance(update, RotateKey):
                    await self.rotate_key(update.reason)
                elif not self.accept(update):
                    # rejected: the ack of that revision says why (the previous state stays)
                    await self._report(Report(None, self.status["last_error"]))
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
            declined = self.declined
            if isinstance(update, Snapshot):
                msg = update.state
                refused = self._refusals(msg.peers)
                kept, declined = self._consented(without(msg, refused))
                desired = self.rec.compile(kept)
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
                if not self.refused:
                    # the other peers were verified when they arrived
                    refused = self._refusals(update.delta.upserted_peers)
                else:
                    refused = self._refusals(msg.peers)
                if peers_only(update.delta) and not refused and not self.refused:
                    # routes and the default route are unchanged: so are the declines,
                    # and the upserted peers lose the same allowed IPs
                    delta = consent.narrow_delta(update.delta, msg, self.declined)
                    desired = compile_peer_delta(self.target, delta, update.revision)
                else:
                    kept, declined = self._consented(without(msg, refused))
                    desired = self.rec.compile(kept)
            else:  # pragma: no cover
                raise TypeError(update)
        except InvalidDesiredState as e:
            log.error("rejected desired state: %s", e)
            metrics.gatewayd.rejected()
            self._record_error(str(e), rejected=True)
            return False
        if getattr(update, "traceparent", ""):
            self._traces.append(update.traceparent)
        self._set_target(msg, desired, refused, declined)
        return True

    async def _measure_rtts(self, want: dict[str, str]) -> None:
        """Ping each relay (public key -> overlay address) three times, at once:
        the least time, in microseconds (0: no answer), into `_rtts`."""
        got = await asyncio.gather(*(_rtt_us(addr) for addr in want.values()))
        self._rtts.update(zip(want, got, strict=True))

    async def _pass(self) -> bool:
        assert self.target is not None and self.target_msg is not None
        full, gen, target, msg = self._need_full, self._target_gen, self.target, self.target_msg
        refused = tuple(self.refused.values())
        declined = self.declined
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
            metrics.gatewayd.failed(e, full)
            self._traces = traces + self._traces  # the retry continues the same traces
            self._need_full = True
            self._record_error(str(e))
            self.status["state"] = "retrying"
            self.status["attempt"] = self.backoff.attempt + 1
            self._write_status()
            await self._report(Report(None, str(e)))
            return False
        metrics.gatewayd.applied(result, same_target=gen == self._applied_gen)  # drift: a full pass of the same target
        self._applied_gen = gen
        self.rec.store.save_desired(msg)
        self.backoff.reset()
        changes = result.plan.changes()
        note = summary(refused) if refused else None
        self.status.update(
            state="applied", applied_revision=target.revision, attempt=0, last_error=note,
            node=target.node, last_changes=len(changes),
        )
        self.status["full_syncs" if result.full else "delta_syncs"] += 1
        self._key_status()
        self._write_status()
        if changes:
            log.info("%s pass applied revision %d: %s", "full" if result.full else "delta",
                     target.revision, "; ".join(changes[:20]) + (" …" if len(changes) > 20 else ""))
        if refused:
            await self._report(Report(target.revision, note, code="PERMISSION_DENIED", refused=refused,
                                      declined=declined))
        else:
            await self._report(Report(target.revision, None, declined=declined))
        return True

    def _record_error(self, message: str, rejected: bool = False) -> None:
        self.status["last_error"] = message
        if rejected:
            self.status["rejected"] += 1
        self._write_status()

    def _watch_drift(self, loop: asyncio.AbstractEventLoop) -> DriftWatcher | None:
        """Start the drift watcher (drift.py): a drift it finds is repaired by a full
        pass now; a fight (repairs held back) is written to the status and sent in
        the last ack again, with the watcher's counts."""
        if not self.settings.drift_watch or not isinstance(self.rec, Reconciler):
            return None  # (a stand-in reconciler of the unit tests has no kernel to watch)
        watcher = DriftWatcher(self.rec, self.settings,
                               on_drift=lambda changes: loop.call_soon_threadsafe(self.resync_now),
                               on_status=lambda report: loop.call_soon_threadsafe(self._drift_changed, report))
        watcher.start()
        return watcher

    def _drift_changed(self, report: bool) -> None:
        self._write_status()
        if report and self._last_report is not None:
            asyncio.get_running_loop().create_task(self._report(self._last_report))

    def _write_status(self) -> None:
        if self.drift is not None:
            self.status["drift"] = self.drift.status()
        try:
            self.rec.store.write_status(self.status)
        except OSError as e:
            log.warning("cannot write status: %s", e)

    async def _report(self, report: Report) -> None:
        if report.applied_revision is not None:
            self._last_report = report
        if self.drift is not None:
            report = dataclasses.replace(report, drift=self.drift.status())
        if self.source is not None:
            try:
                await self.source.report(report)
            except Exception as e:  # noqa: BLE001 - a reporting failure must not stop reconciling
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


_rtt_warned = False  # said once per process why no round trip can be measured


async def _rtt_us(addr: str, timeout: float = 1.0) -> int:
    """The least round-trip time of three ICMP echoes to `addr` (through the
    tunnel), in microseconds; 0 when none is answered. Measured by `ping`
    (iputils), which needs CAP_NET_RAW or an unprivileged ICMP socket
    (net.ipv4.ping_group_range); when ping is missing or not permitted, that
    is logged once as a warning, since then no relay is ever ranked."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", f"{timeout:.1f}", addr,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        _rtt_unmeasurable("ping is not installed or cannot run (%s); install iputils-ping", e)
        return 0
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout + 5)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 0
    # "rtt min/avg/max/mdev = 0.045/0.051/0.060/0.006 ms"
    for line in out.decode(errors="replace").splitlines():
        if "min/avg/max" in line and "=" in line:
            try:
                return max(1, int(float(line.split("=", 1)[1].split("/")[0]) * 1000))
            except ValueError:
                return 0
    said = err.decode(errors="replace")
    if "not permitted" in said or "Permission denied" in said:
        # iputils: "ping: socket: Operation not permitted" (no CAP_NET_RAW, no ping_group_range)
        _rtt_unmeasurable("ping is not permitted to open an ICMP socket (%s); give gatewayd CAP_NET_RAW "
                          "or allow its group in net.ipv4.ping_group_range", said.strip().splitlines()[-1])
    return 0


def _rtt_unmeasurable(msg: str, *args: object) -> None:
    global _rtt_warned
    if not _rtt_warned:
        _rtt_warned = True
        log.warning("cannot measure round trips to relays, so none is ranked closest: %s", msg % args)
