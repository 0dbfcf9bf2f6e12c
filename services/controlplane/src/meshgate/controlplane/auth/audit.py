"""The audit log: one record per mutation, refused call and secret-returning call.

Layout under the prefix:

    audit/{ns:019d}-{random}    AuditRecord (binary protobuf); keys sort by time

A record is written in the same etcd transaction as the change it describes:
`with_audit(etcd)` makes every write transaction made while a call is being
served also put that call's record (status OK). A call that commits nothing
(refused, invalid, lost a race) gets its record written after it ends, with
its final status; a call that committed and then failed has its record
rewritten with that status (the same key, so still one record). Every record
is also logged as one JSON line on the `meshgate.audit` logger.

Hazards:
- Records hold field paths, never values: a secret cannot reach one.
- Refusals (UNAUTHENTICATED, PERMISSION_DENIED) cost an etcd write each; past
  `REFUSAL_BURST` per second per replica they are logged but not stored, and
  the next stored record says how many were dropped; texts the caller chooses
  (resource name, peer, message) are clipped to `MAX_TEXT` characters (a flood
  must not fill etcd).
- Retention: each replica deletes records older than the retention period and
  beyond the record limit, once a minute; deletes are idempotent, so replicas
  need no election for it.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from google.api import resource_pb2

from meshgate.api.v1 import auth_pb2
from meshgate.common import etcdwatch
from meshgate.common.aiotasks import cancel_and_wait
from meshgate.common.errors import FieldViolation, invalid_argument
from meshgate.common.etcd import Etcd, EtcdUnavailable, prefix_end
from meshgate.controlplane import validation
from meshgate.controlplane.txn import decode_page_token, encode_page_token

log = logging.getLogger(__name__)
audit_log = logging.getLogger("meshgate.audit")

REFUSAL_BURST = 50  # refusals (UNAUTHENTICATED, PERMISSION_DENIED) stored per second per replica
MAX_TEXT = 512  # characters kept of a caller-supplied text (resource name, peer, message)
REFUSALS = ("UNAUTHENTICATED", "PERMISSION_DENIED")
SWEEP_S = 60.0
DEFAULT_RETENTION_S = 90 * 86400
DEFAULT_MAX_RECORDS = 1_000_000


@dataclass
class AuditScope:
    """The record of the call being served, while it is being served."""

    key: bytes
    record: auth_pb2.AuditRecord
    active: bool = True  # cleared when the call ends: later transactions are not its own
    committed: bool = False  # a transaction carried the record


current: contextvars.ContextVar[AuditScope | None] = contextvars.ContextVar("meshgate_audit", default=None)


def with_audit(etcd: Etcd) -> Etcd:
    """Make every write transaction made inside an audited call carry its
    record. Idempotent: replicas sharing one adapter (tests) wrap it once,
    since etcd refuses a transaction that puts one key twice."""
    if getattr(etcd, "_meshgate_audited", False):
        return etcd
    etcd._meshgate_audited = True  # type: ignore[attr-defined]
    original = etcd.txn

    async def txn(compare, success, failure=()):
        scope = current.get()
        success = list(success)
        if scope is None or not scope.active or not success:
            return await original(compare, success, failure)
        rec = auth_pb2.AuditRecord()
        rec.CopyFrom(scope.record)
        rec.status_code = "OK"
        success.append(etcd.txn_ops.put(scope.key, rec.SerializeToString(deterministic=True)))
        result = await original(compare, success, failure)
        if result[0]:
            scope.committed = True
        return result

    etcd.txn = txn  # type: ignore[method-assign]
    return etcd


def record_key(etcd: Etcd, ns: int) -> tuple[bytes, str]:
    rid = f"{ns:019d}-{os.urandom(4).hex()}"
    return etcd.key("audit", rid), rid


@dataclass
class _Filter:
    resource: str
    principal: str
    networks: frozenset[str] | None  # None: every record; else only those of these networks

    def wants(self, rec: auth_pb2.AuditRecord) -> bool:
        if self.resource and not (rec.resource == self.resource or rec.resource.startswith(self.resource + "/")):
            return False
        if self.principal and rec.principal != self.principal:
            return False
        return self.networks is None or rec.network in self.networks


class AuditLog:
    def __init__(self, etcd: Etcd, retention_s: float = DEFAULT_RETENTION_S,
                 max_records: int = DEFAULT_MAX_RECORDS) -> None:
        self.etcd = etcd
        self.prefix = etcd.key("audit", "")
        self.retention_s = retention_s
        self.max_records = max_records
        self._bucket = (0, 0)  # (second, refusals stored in it)
        self._dropped = 0
        self._sweeper: asyncio.Task | None = None

    def new_scope(self, record: auth_pb2.AuditRecord) -> AuditScope:
        # Callers choose these texts: a record's size must not be theirs to choose.
        record.resource = clip(record.resource)
        record.peer = clip(record.peer)
        record.network = clip(record.network)
        del record.field_paths[64:]
        ns = time.time_ns()
        key, rid = record_key(self.etcd, ns)
        record.name = f"auditRecords/{rid}"
        record.time.FromNanoseconds(ns)
        return AuditScope(key, record)

    async def finish(self, scope: AuditScope) -> None:
        """The call ended with `scope.record.status_code`: log it, and store it
        unless the change's own transaction already did (with this status)."""
        scope.active = False
        rec = scope.record
        rec.status_message = clip(rec.status_message)
        if audit_log.isEnabledFor(logging.INFO):
            audit_log.info("%s", record_json(rec))
        if scope.committed and rec.status_code == "OK":
            return
        if rec.status_code in REFUSALS:
            sec = int(time.time())
            second, n = self._bucket
            n = n + 1 if second == sec else 1
            self._bucket = (sec, n)
            if n > REFUSAL_BURST:
                self._dropped += 1
                return
        if self._dropped:
            rec.status_message = (rec.status_message + f" [{self._dropped} refusals before this "
                                  "one were logged but not stored]").strip()
            self._dropped = 0
        try:
            await self.etcd.put(scope.key, rec.SerializeToString(deterministic=True))
        except EtcdUnavailable as e:
            # The call already failed (etcd is what failed, most likely); the
            # JSON line above still carries the record.
            log.warning("audit record %s not stored: %s", rec.name, e)

    # reading -----------------------------------------------------------------

    @staticmethod
    def _filter(req, networks: frozenset[str] | None) -> _Filter:
        return _Filter(req.resource, req.principal, networks)

    async def list(self, req: auth_pb2.ListAuditRecordsRequest, networks: frozenset[str] | None
                   ) -> tuple[list[auth_pb2.AuditRecord], str]:
        size, errs = validation.page_size("page_size", req.page_size)
        for name in ("start_time", "end_time"):
            if req.HasField(name) and (not validation.valid_timestamp(getattr(req, name))
                                       or getattr(req, name).seconds < 0):
                errs.append(FieldViolation(name, "is not a valid time"))
        if errs:
            raise invalid_argument(errs)
        if req.HasField("start_time") and req.HasField("end_time") and \
                req.end_time.ToNanoseconds() <= req.start_time.ToNanoseconds():
            errs.append(FieldViolation("end_time", "must be after start_time"))
        if errs:
            raise invalid_argument(errs)
        listing = f"audit:{req.resource}:{req.principal}:{req.start_time.ToNanoseconds()}:{req.end_time.ToNanoseconds()}"
        after = decode_page_token(req.page_token, listing)
        start = self.prefix + after.encode() + b"\0" if after else (
            self.prefix + f"{req.start_time.ToNanoseconds():019d}".encode() if req.HasField("start_time") else self.prefix)
        end = self.prefix + f"{req.end_time.ToNanoseconds():019d}".encode() if req.HasField("end_time") \
            else prefix_end(self.prefix)
        flt = self._filter(req, networks)
        out: list[auth_pb2.AuditRecord] = []
        last, exhausted, scanned, cur = b"", False, 0, start
        # A filtered listing may have to skip many records: scan a bounded
        # number per page and hand back a token to continue from there.
        while scanned < 20 * size + 1000:
            kvs, more, _ = await self.etcd.range(cur, end, limit=200)
            for kv in kvs:
                scanned += 1
                last = kv.key
                rec = auth_pb2.AuditRecord.FromString(kv.value)
                if flt.wants(rec):
                    out.append(rec)
                    if len(out) == size:
                        break
            if len(out) == size:
                exhausted = not more and last == kvs[-1].key
                break
            if not more:
                exhausted = True
                break
            cur = last + b"\0"
        token = encode_page_token(listing, last[len(self.prefix):].decode()) if last and not exhausted else ""
        return out, token

    async def watch(self, req: auth_pb2.WatchAuditRecordsRequest, networks: frozenset[str] | None
                    ) -> AsyncIterator[auth_pb2.AuditRecord]:
        flt = self._filter(req, networks)
        rev = await self.etcd.revision()
        async for batch in etcdwatch.watch(self.etcd, self.prefix, prefix_end(self.prefix), rev + 1):
            for ev in batch.events:
                if not ev.put:
                    continue
                rec = auth_pb2.AuditRecord.FromString(ev.value)
                if flt.wants(rec):
                    yield rec

    # retention -------------------------------------------------------------------

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="audit-retention")

    async def stop(self) -> None:
        await cancel_and_wait(self._sweeper)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S * random.uniform(0.8, 1.2))
            try:
                await self.sweep()
            except EtcdUnavailable as e:
                log.warning("audit retention sweep failed: %s", e)

    async def sweep(self, now_ns: int | None = None) -> int:
        """Delete records past the retention period and beyond the record limit."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        cutoff = self.prefix + f"{max(0, now_ns - int(self.retention_s * 1e9)):019d}".encode()
        t = self.etcd.txn_ops
        deleted = 0
        _, responses, _ = await self.etcd.txn([], [t.delete(self.prefix, range_end=cutoff)])
        for r in responses:
            deleted += getattr(getattr(r, "response_delete_range", None), "deleted", 0)
        excess = await self.etcd.count_prefix(self.prefix) - self.max_records
        if excess > 0:
            kvs, _, _ = await self.etcd.range(self.prefix, prefix_end(self.prefix), limit=excess, keys_only=True)
            if kvs:
                _, responses, _ = await self.etcd.txn([], [t.delete(self.prefix, range_end=kvs[-1].key + b"\0")])
                for r in responses:
                    deleted += getattr(getattr(r, "response_delete_range", None), "deleted", 0)
        return deleted


def clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"...[{len(text) - MAX_TEXT} more]"


def record_json(rec: auth_pb2.AuditRecord) -> str:
    """One record as a compact JSON object: its set fields by proto name
    (built by hand: json_format costs more than the rest of the guard)."""
    out: dict[str, object] = {}
    for fd, value in rec.ListFields():
        if fd.name == "time":
            out["time"] = value.ToJsonString()
        elif fd.is_repeated:
            out[fd.name] = list(value)
        else:
            out[fd.name] = value
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def changed_paths(request, rule_id_field: str) -> list[str]:
    """The field paths a request sets or changes (never their values)."""
    paths: list[str] = []
    skip = {"name", "parent", "etag", "update_mask", "page_size", "page_token", "validate_only", rule_id_field}
    mask = getattr(request, "update_mask", None)
    for fd, value in request.ListFields():
        if fd.name in skip:
            continue
        if fd.message_type is not None and not fd.is_repeated and \
                fd.message_type.GetOptions().HasExtension(resource_pb2.resource):
            if mask is not None and mask.paths:
                paths += [f"{fd.name}.{p}" for p in mask.paths]
            else:
                paths += [f"{fd.name}.{sub.name}" for sub, _ in value.ListFields() if sub.name not in ("name", "etag")]
        else:
            paths.append(fd.name)
    return sorted(set(paths))
