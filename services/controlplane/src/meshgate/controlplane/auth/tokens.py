"""API tokens: create, revoke, list; a watch-fed cache that checks them.

Layout under the prefix:

    auth/tokens/{id}         Token (never its secret)
    auth/tokenHashes/{id}    SHA-256 (hex) of the whole bearer token
    auth/bootstrapped        present once the bootstrap admin token was made
    tokenUse/{id}            last use, nanoseconds since the epoch (batched)

A bearer token is `mgtk_{id}.{secret}`; only its hash is stored. Every
replica keeps the tokens and hashes in memory, listed and then watched from
etcd, so a revocation or deletion reaches every replica as fast as the watch
(milliseconds), and checking a token costs a dict lookup and one hash.

Hazards:
- The secret exists in the clear only in the CreateToken response and in the
  bootstrap file; it never reaches a log line, a span, an error or an audit
  record (the guard records field paths, never values).
- Last-use times are written at most every `USE_FLUSH_S` per replica, outside
  the `auth/` range the cache watches, so using a token causes no watch churn.
- Until the first listing is in, the cache knows no token: every call is
  refused with UNAVAILABLE, not UNAUTHENTICATED, so clients retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import random
import secrets
import time
from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2

from meshgate.api.v1 import auth_pb2
from meshgate.common import etcdwatch
from meshgate.common.aiotasks import cancel_and_wait
from meshgate.common.errors import ApiError, FieldViolation, already_exists, etag_mismatch, invalid_argument, not_found
from meshgate.common.etcd import Etcd, EtcdUnavailable, prefix_end
from meshgate.controlplane import names, store, validation
from meshgate.controlplane.auth.principal import Binding, Principal, grantable, make_binding
from meshgate.controlplane.txn import decode_page_token, encode_page_token

log = logging.getLogger(__name__)

TOKEN_PREFIX = "mgtk_"
TYPE = "meshgate.io/Token"
USE_FLUSH_S = 30.0
DEFAULT_MAX_TTL_S = 366 * 86400


def token_hash(bearer: str) -> str:
    return hashlib.sha256(bearer.encode()).hexdigest()


def new_bearer(token_id: str) -> str:
    return f"{TOKEN_PREFIX}{token_id}.{secrets.token_urlsafe(32)}"


def parse_bearer(bearer: str) -> str | None:
    """The token id of a meshgate API token, or None if it is not one."""
    if not bearer.startswith(TOKEN_PREFIX):
        return None
    token_id, dot, secret = bearer[len(TOKEN_PREFIX):].rpartition(".")
    if not dot or not secret or not names.valid_id(token_id):
        return None
    return token_id


def unauthenticated(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, message, reason)


def bindings_of(token: auth_pb2.Token) -> tuple[Binding, ...]:
    return tuple(make_binding(b.role, list(b.permissions), list(b.networks)) for b in token.bindings)


@dataclass
class _Entry:
    token: auth_pb2.Token
    hash: str = ""
    principal: Principal | None = None


class TokenCache:
    """Every token and hash, from an etcd list and then a watch."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.tokens_prefix = etcd.key("auth", "tokens", "")
        self.hashes_prefix = etcd.key("auth", "tokenHashes", "")
        self.start_key = etcd.key("auth", "token")  # covers both prefixes, nothing else
        self.entries: dict[str, _Entry] = {}
        self.ready = asyncio.Event()
        self.revision = 0
        self._task: asyncio.Task | None = None
        self._revision_waiters: list[tuple[int, asyncio.Future]] = []

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="token-cache")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def wait_for_revision(self, revision: int, timeout: float = 5) -> None:
        """Until the cache has seen `revision` (a writer's own change)."""
        if self.revision >= revision:
            return
        fut = asyncio.get_running_loop().create_future()
        self._revision_waiters.append((revision, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass

    def _advance(self, revision: int) -> None:
        self.revision = max(self.revision, revision)
        keep = []
        for rev, fut in self._revision_waiters:
            if rev <= self.revision:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((rev, fut))
        self._revision_waiters = keep

    def _apply(self, key: bytes, value: bytes | None) -> None:
        if key.startswith(self.tokens_prefix):
            tid = key[len(self.tokens_prefix):].decode()
            if value is None:
                self.entries.pop(tid, None)
                return
            entry = self.entries.setdefault(tid, _Entry(auth_pb2.Token()))
            entry.token = auth_pb2.Token.FromString(value)
            entry.principal = None
        elif key.startswith(self.hashes_prefix):
            tid = key[len(self.hashes_prefix):].decode()
            if value is None:
                if tid in self.entries:
                    self.entries[tid].hash = ""
                return
            self.entries.setdefault(tid, _Entry(auth_pb2.Token())).hash = value.decode()

    async def _load(self) -> int:
        kvs, _, rev = await self.etcd.range(self.start_key, prefix_end(self.start_key))
        self.entries = {}
        for kv in kvs:
            self._apply(kv.key, kv.value)
        # Entries with no token record (a hash alone) are unusable: drop them.
        self.entries = {k: e for k, e in self.entries.items() if e.token.name}
        self._advance(rev)
        self.ready.set()
        return rev

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                rev = await self._load()
                delay = 0.1
                async for batch in etcdwatch.watch(self.etcd, self.start_key, prefix_end(self.start_key), rev + 1):
                    for ev in batch.events:
                        self._apply(ev.key, ev.value if ev.put else None)
                    self._advance(batch.revision)
            except asyncio.CancelledError:
                raise
            except etcdwatch.Compacted as e:
                log.warning("token watch fell behind compaction (%s); listing again", e)
            except EtcdUnavailable as e:
                log.warning("token watch lost (%s); listing again in %.1fs", e, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)

    def check(self, bearer: str, token_id: str, now: float) -> Principal:
        """The principal of a valid token, or UNAUTHENTICATED with a reason."""
        if not self.ready.is_set():
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the token cache is loading; retry", "AUTH_LOADING")
        entry = self.entries.get(token_id)
        if entry is None or not entry.hash or not hmac.compare_digest(entry.hash, token_hash(bearer)):
            raise unauthenticated("TOKEN_INVALID", "unknown API token or wrong secret")
        t = entry.token
        if t.HasField("revoke_time"):
            raise unauthenticated("TOKEN_REVOKED", f"API token {t.name} was revoked")
        expire = t.expire_time.ToNanoseconds() / 1e9 if t.HasField("expire_time") else None
        if expire is not None and now >= expire:
            raise unauthenticated("TOKEN_EXPIRED", f"API token {t.name} expired")
        if entry.principal is None:
            try:
                entry.principal = Principal(t.name, "token", bindings_of(t), expire, token_id=token_id)
            except ValueError as e:  # a binding this version no longer knows (a permission gone)
                raise unauthenticated("TOKEN_UNUSABLE", f"API token {t.name} has a binding this control plane "
                                      f"does not know ({e}); make a new one") from None
        return entry.principal


class Tokens:
    """TokenService's core: validation and the etcd transactions."""

    def __init__(self, etcd: Etcd, cache: TokenCache, max_ttl_s: float = DEFAULT_MAX_TTL_S) -> None:
        self.etcd = etcd
        self.cache = cache
        self.t = etcd.txn_ops
        self.max_ttl_s = max_ttl_s
        self._used: dict[str, int] = {}
        self._flusher: asyncio.Task | None = None

    # keys ----------------------------------------------------------------

    def key(self, tid: str) -> bytes:
        return self.etcd.key("auth", "tokens", tid)

    def hash_key(self, tid: str) -> bytes:
        return self.etcd.key("auth", "tokenHashes", tid)

    def use_key(self, tid: str) -> bytes:
        return self.etcd.key("tokenUse", tid)

    def parse_name(self, name: str, field: str = "name") -> str:
        parts = name.split("/")
        if len(parts) != 2 or parts[0] != "tokens" or not names.valid_id(parts[1]):
            raise invalid_argument([FieldViolation(field, f"{name!r} is not a token name (tokens/{{token}})")])
        return parts[1]

    # last use --------------------------------------------------------------

    def used(self, token_id: str) -> None:
        self._used[token_id] = time.time_ns()

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name="token-last-use")

    async def stop(self) -> None:
        await cancel_and_wait(self._flusher)
        try:
            await self.flush()
        except EtcdUnavailable as e:
            log.warning("could not record tokens' last use at shutdown: %s", e)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(USE_FLUSH_S * random.uniform(0.8, 1.2))
            try:
                await self.flush()
            except EtcdUnavailable as e:
                log.warning("could not record tokens' last use: %s", e)

    async def flush(self) -> None:
        used, self._used = self._used, {}
        if used:
            await self.etcd.txn([], [self.t.put(self.use_key(tid), str(ns).encode()) for tid, ns in used.items()])

    # bootstrap ---------------------------------------------------------------

    async def bootstrap(self, path: str, ttl_s: float) -> bool:
        """On the first start against an empty prefix, create the admin token
        `tokens/bootstrap-admin` and write it, once, to `path` (mode 0600).
        Returns whether this call made it."""
        marker = self.etcd.key("auth", "bootstrapped")
        if await self.etcd.get(marker) is not None:
            return False
        if os.path.isdir(path):  # noqa: ASYNC240 - once, at start, before serving
            raise SystemExit(f"--bootstrap-token-file {path} is a directory; name a file in it")
        tid = "bootstrap-admin"
        bearer = new_bearer(tid)
        token = auth_pb2.Token(name=f"tokens/{tid}", description="bootstrap admin token, made on the first start",
                               bindings=[auth_pb2.RoleBinding(role="admin")], creator="meshgate-controlplane",
                               uid=store.new_uid(), create_time=store.now())
        token.expire_time.FromNanoseconds(int((time.time() + ttl_s) * 1e9))
        # The file first, then the transaction: a crash in between leaves a
        # file etcd knows nothing of (refused at the next start, with this
        # message), never a token nobody has.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SystemExit(f"--bootstrap-token-file {path} exists but etcd holds no bootstrap token: "
                             "remove the stale file (meshgate never overwrites it)") from None
        except OSError as e:
            raise SystemExit(f"--bootstrap-token-file {path}: cannot create it: {e.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(bearer + "\n")
        # If the transaction fails without an answer it may still have
        # committed: the file stays (a stale one is refused, with its reason,
        # at the next start), so the token is never lost.
        ok, _, rev = await self.etcd.txn(
            [self.t.create(marker) == 0],
            [self.t.put(marker, b"1"), self.t.put(self.key(tid), store.encode(token)),
             self.t.put(self.hash_key(tid), token_hash(bearer).encode())],
        )
        if not ok:
            os.unlink(path)  # another replica bootstrapped first: its file, not ours
            log.info("another replica made the bootstrap admin token")
            return False
        # Serve only once the token cache holds it: the first call with the
        # file's token must not be refused as unknown (seen in CI against a
        # three-member etcd, whose watch lagged the write).
        await self.cache.wait_for_revision(rev, 30)
        log.warning("created the bootstrap admin token tokens/%s; it is in %s (mode 0600)", tid, path)
        return True

    async def any(self) -> bool:
        """Whether any token exists."""
        return await self.etcd.count_prefix(self.etcd.key("auth", "tokens", "")) > 0

    # API -----------------------------------------------------------------------

    def _validate(self, req: auth_pb2.CreateTokenRequest) -> list[FieldViolation]:
        out = []
        if not names.valid_id(req.token_id):
            out.append(FieldViolation("token_id", "must be 1-63 lowercase letters, digits or hyphens, starting with a letter"))
        t = req.token
        out += validation.check_text("token.description", t.description, validation.MAX_DESCRIPTION)
        if not t.bindings:
            out.append(FieldViolation("token.bindings", "give at least one role binding"))
        if len(t.bindings) > 64:
            out.append(FieldViolation("token.bindings", "at most 64 bindings"))
        for i, b in enumerate(t.bindings):
            try:
                make_binding(b.role, list(b.permissions), list(b.networks))
            except ValueError as e:
                out.append(FieldViolation(f"token.bindings[{i}]", str(e)))
        now = time.time()
        if not t.HasField("expire_time"):
            out.append(FieldViolation("token.expire_time", "is required: API tokens expire"))
        elif not validation.valid_timestamp(t.expire_time):
            out.append(FieldViolation("token.expire_time", "is not a valid time"))
        else:
            exp = t.expire_time.ToNanoseconds() / 1e9
            if exp <= now:
                out.append(FieldViolation("token.expire_time", "is in the past"))
            elif exp - now > self.max_ttl_s:
                out.append(FieldViolation("token.expire_time", f"is more than {self.max_ttl_s / 86400:.0f} days away"))
        return out

    async def create(self, req: auth_pb2.CreateTokenRequest, creator: str,
                     principal: Principal | None = None) -> auth_pb2.Token:
        """A new token; `principal` (the caller) must hold all it grants."""
        errs = self._validate(req)
        if errs:
            raise invalid_argument(errs)
        if principal is not None:
            for i, b in enumerate(req.token.bindings):
                if not grantable(principal, make_binding(b.role, list(b.permissions), list(b.networks))):
                    raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                                   f"{principal.name} may not grant token.bindings[{i}]: it would give permissions "
                                   "the caller does not hold itself", "GRANT_EXCEEDS_CALLER")
        tid = req.token_id
        bearer = new_bearer(tid)
        token = auth_pb2.Token(
            name=f"tokens/{tid}", description=req.token.description, bindings=req.token.bindings,
            expire_time=req.token.expire_time, creator=creator, uid=store.new_uid(), create_time=store.now(),
        )
        key = self.key(tid)
        ok, _, rev = await self.etcd.txn(
            [self.t.create(key) == 0],
            [self.t.put(key, store.encode(token)), self.t.put(self.hash_key(tid), token_hash(bearer).encode()),
             self.t.delete(self.use_key(tid))],
        )
        if not ok:
            raise already_exists(TYPE, token.name)
        await self.cache.wait_for_revision(rev)
        token.etag = str(rev)
        token.secret = bearer
        return token

    async def _read(self, name: str):
        tid = self.parse_name(name)
        kv = await self.etcd.get(self.key(tid))
        if kv is None:
            raise not_found(TYPE, name)
        return tid, kv, store.decode(auth_pb2.Token, kv)

    async def _with_use(self, tokens: list[auth_pb2.Token]) -> list[auth_pb2.Token]:
        """The tokens with their last use (this replica's, or the stored one):
        one range read over the page's ids, not one read per token."""
        if not tokens:
            return tokens
        ids = [t.name.split("/", 1)[1] for t in tokens]  # sorted: a page of an etcd range
        kvs, _, _ = await self.etcd.range(self.use_key(min(ids)), self.use_key(max(ids)) + b"\0")
        stored = {kv.key.rsplit(b"/", 1)[1].decode(): int(kv.value) for kv in kvs}
        for t, tid in zip(tokens, ids, strict=True):
            ns = max(self._used.get(tid) or 0, stored.get(tid, 0))
            if ns:
                ts = timestamp_pb2.Timestamp()
                ts.FromNanoseconds(ns - ns % 60_000_000_000)
                t.last_use_time.CopyFrom(ts)
        return tokens

    async def get(self, name: str) -> auth_pb2.Token:
        _, _, token = await self._read(name)
        return (await self._with_use([token]))[0]

    async def list(self, page_size: int, page_token: str) -> tuple[list[auth_pb2.Token], str]:
        size, errs = validation.page_size("page_size", page_size)
        if errs:
            raise invalid_argument(errs)
        after = decode_page_token(page_token, "tokens")
        prefix = self.etcd.key("auth", "tokens", "")
        start, end = store.range_after(prefix, after)
        kvs, more, _ = await self.etcd.range(start, end, limit=size)
        items = [store.decode(auth_pb2.Token, kv) for kv in kvs]
        token = encode_page_token("tokens", kvs[-1].key[len(prefix):].decode()) if more and kvs else ""
        return await self._with_use(items), token

    async def revoke(self, req: auth_pb2.RevokeTokenRequest) -> auth_pb2.Token:
        tid, kv, token = await self._read(req.name)
        if req.etag and req.etag != store.etag_of(kv):
            raise etag_mismatch(TYPE, req.name)
        if not token.HasField("revoke_time"):
            token.revoke_time.CopyFrom(store.now())
        ok, _, rev = await self.etcd.txn([self.t.mod(kv.key) == kv.mod_revision], [self.t.put(kv.key, store.encode(token))])
        if not ok:
            raise etag_mismatch(TYPE, req.name)
        await self.cache.wait_for_revision(rev)
        token.etag = str(rev)
        return token

    async def delete(self, req: auth_pb2.DeleteTokenRequest) -> None:
        tid, kv, _ = await self._read(req.name)
        if req.etag and req.etag != store.etag_of(kv):
            raise etag_mismatch(TYPE, req.name)
        ok, _, rev = await self.etcd.txn(
            [self.t.mod(kv.key) == kv.mod_revision],
            [self.t.delete(kv.key), self.t.delete(self.hash_key(tid)), self.t.delete(self.use_key(tid))],
        )
        if not ok:
            raise etag_mismatch(TYPE, req.name)
        await self.cache.wait_for_revision(rev)
