"""The key service's storage in etcd: its layout, sealed records and the active KEK.

Layout below `{prefix}/keys/` (paths in this module are relative to the prefix):

    keys/kek/active                  id of the KEK that seals new secrets (plain text)
    keys/kek/check/{kek}             envelope of a fixed constant: proves a KEK is the right one
    keys/authority/current           key id of the Ed25519 signing key in use (plain text)
    keys/authority/keys/{key id}     envelope: Ed25519 private key (32 raw bytes); header: public key
    keys/ca/current                  id of the CA key in use (plain text)
    keys/ca/keys/{id}                envelope: CA private key (PKCS#8 DER); header: CA certificate (PEM)
    keys/nodes/{net}/{node}          SignedNodeKey (binary protobuf; public)
    keys/psk/{net}/{pair}            envelope: 32-byte pre-shared key; header: generation, epoch
    keys/rotation/{net}              pre-shared-key rotation epoch of the network (JSON; see psk.py)
    keys/nodeRotation/{net}/{node}   RotateNodeKeyResponse: when a node key rotation was requested
    keys/clients/{net}/{client}      envelope: X25519 private key of an external client; header: public key
    keys/leader                      replica id of the scheduler leader, attached to its lease

Every write that stores an envelope commits in a transaction that also
compares `keys/kek/active` with the KEK it sealed under, so once a KEK
rotation switched the active KEK, no replica can land a secret sealed under
the old one; the loser re-reads the active KEK and retries.

Hazard: starting against a store whose active KEK this process does not hold
(or whose check value does not decrypt) must fail before anything is
written; `open()` does its checks read-only and writes only to initialise an
empty store.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from meshgate.common.errors import ApiError
from meshgate.common.etcd import Etcd, prefix_end
from meshgate.keyservice.sealing import KekError, Keyring, SealError

log = logging.getLogger(__name__)

T = TypeVar("T")

ACTIVE = "keys/kek/active"
CHECK = "keys/kek/check/"
CHECK_PLAINTEXT = b"meshgate key-encryption key check v1"
# Every collection holding envelopes: what a KEK rotation re-wraps.
SEALED = ("keys/authority/keys/", "keys/ca/keys/", "keys/psk/", "keys/clients/")
# etcd's default --max-txn-ops is 128 (per compare and per success list).
TXN_BATCH = 120
ATTEMPTS = 25


class Retry(Exception):
    """A compare lost to another writer: read again and retry."""


def kek_not_held(e: KekError) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, str(e), "KEK_NOT_HELD")


def sealed_broken(e: SealError) -> ApiError:
    return ApiError(grpc.StatusCode.DATA_LOSS, str(e), "SEALED_VALUE_INVALID")


async def optimistic(fn: Callable[[], Awaitable[T]], what: str) -> T:
    """Run `fn` until it does not raise `Retry` (jittered backoff; ABORTED after 25 tries)."""
    for attempt in range(ATTEMPTS):
        try:
            return await fn()
        except Retry:
            await asyncio.sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))
    raise ApiError(grpc.StatusCode.ABORTED, f"{what}: too much contention; retry", "CONTENTION")


class Vault:
    def __init__(self, etcd: Etcd, keyring: Keyring) -> None:
        self.etcd = etcd
        self.keyring = keyring
        self.t = etcd.txn_ops
        self.active = ""

    def __repr__(self) -> str:
        return f"Vault(active={self.active!r}, keyring={self.keyring!r})"

    def key(self, path: str) -> bytes:
        return self.etcd.prefix + b"/" + path.encode()

    def path(self, key: bytes) -> str:
        return key[len(self.etcd.prefix) + 1 :].decode()

    # --- start-up -------------------------------------------------------------

    async def open(self) -> None:
        """Check the configured KEKs against the store (initialising an empty one).

        Raises KekError with a message for the operator; writes nothing unless
        the store has no active KEK and no sealed secret yet."""
        for _ in range(ATTEMPTS):
            kv = await self.etcd.get(self.key(ACTIVE))
            if kv is not None:
                await self._check(kv.value.decode())
                self.active = kv.value.decode()
                log.info("key-encryption key %r is active; this replica holds %s", self.active, self.keyring.ids)
                return
            for prefix in SEALED:
                kvs, _, _ = await self.etcd.range(self.key(prefix), prefix_end(self.key(prefix)), limit=1, keys_only=True)
                if kvs:
                    raise KekError(
                        f"the store holds sealed secrets ({self.path(kvs[0].key)}) but no {ACTIVE}: refusing to "
                        "start; restore the key service's keys from a backup"
                    )
            kek = self.keyring.primary
            check = self.keyring.seal(kek, CHECK + kek, {}, CHECK_PLAINTEXT)
            ok, _, _ = await self.etcd.txn(
                [self.t.create(self.key(ACTIVE)) == 0],
                [self.t.put(self.key(ACTIVE), kek.encode()), self.t.put(self.key(CHECK + kek), check)],
            )
            if ok:
                self.active = kek
                log.info("initialised an empty key store with key-encryption key %r", kek)
                return
        raise KekError("could not read or initialise the active key-encryption key (contention)")

    async def _check(self, kek: str) -> None:
        if not self.keyring.has(kek):
            raise KekError(
                f"the stored secrets are encrypted under key-encryption key {kek!r}, which is not configured "
                f"(this replica holds {', '.join(repr(i) for i in self.keyring.ids)}): refusing to start; "
                "give the service that KEK (--kek-file or MESHGATE_KEYSERVICE_KEK)"
            )
        kv = await self.etcd.get(self.key(CHECK + kek))
        if kv is None:
            raise KekError(f"no check value for key-encryption key {kek!r} in the store: refusing to start")
        try:
            _, plain = self.keyring.open(CHECK + kek, kv.value)
        except SealError:
            plain = b""
        if plain != CHECK_PLAINTEXT:
            raise KekError(
                f"the configured key-encryption key {kek!r} is not the one the stored secrets were encrypted "
                "with (its check value does not decrypt): refusing to start; nothing was changed"
            )

    # --- sealed records -----------------------------------------------------------

    def seal(self, path: str, meta: dict[str, Any], secret: bytes) -> bytes:
        try:
            return self.keyring.seal(self.active, path, meta, secret)
        except KekError as e:
            raise kek_not_held(e) from None

    def unseal(self, path: str, value: bytes) -> tuple[dict[str, Any], bytes]:
        try:
            return self.keyring.open(path, value)
        except KekError as e:
            raise kek_not_held(e) from None
        except SealError as e:
            raise sealed_broken(e) from None

    def guard(self) -> Any:
        return self.t.value(self.key(ACTIVE)) == self.active.encode()

    async def refresh_active(self) -> None:
        kv = await self.etcd.get(self.key(ACTIVE))
        if kv is not None and kv.value.decode() != self.active:
            new = kv.value.decode()
            log.info("the active key-encryption key changed from %r to %r", self.active, new)
            self.active = new
            if not self.keyring.has(new):
                self.keyring.reload()

    async def commit(self, compares: Sequence[Any], ops: Sequence[Any]) -> int:
        """Commit `ops` if `compares` hold and the active KEK is unchanged; returns the revision.

        Raises Retry when a compare failed (after refreshing the active KEK)."""
        ok, _, rev = await self.etcd.txn([*compares, self.guard()], ops)
        if not ok:
            await self.refresh_active()
            raise Retry()
        return rev

    # --- KEK rotation ---------------------------------------------------------------

    async def rotate_kek(self, new: str) -> int:
        """Make `new` the active KEK and re-wrap every sealed secret under it; returns how many.

        Idempotent and resumable: calling it again finishes a rotation that was
        interrupted. Afterwards no record names another KEK and the other check
        values are deleted, so an old KEK decrypts nothing in the store."""
        if not self.keyring.has(new):
            self.keyring.reload()
        if not self.keyring.has(new):
            raise ApiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this replica does not hold key-encryption key {new!r}; add it to the KEK file of every replica first",
                "KEK_NOT_HELD",
            )

        async def switch() -> None:
            kv = await self.etcd.get(self.key(ACTIVE))
            current = kv.value.decode() if kv else ""
            self.active = current
            if current == new:
                return
            check = self.keyring.seal(new, CHECK + new, {}, CHECK_PLAINTEXT)
            ok, _, _ = await self.etcd.txn(
                [self.t.value(self.key(ACTIVE)) == current.encode()],
                [self.t.put(self.key(CHECK + new), check), self.t.put(self.key(ACTIVE), new.encode())],
            )
            if not ok:
                raise Retry()
            self.active = new
            log.info("key-encryption key %r is now active (was %r); re-wrapping", new, current)

        await optimistic(switch, "switching the active key-encryption key")
        rewrapped = 0
        for prefix in SEALED:
            rewrapped += await self._rewrap(prefix, new)
        # Old check values are the last thing an old KEK could decrypt.
        kvs, _ = await self.etcd.list_prefix(self.key(CHECK))
        stale = [kv.key for kv in kvs if self.path(kv.key) != CHECK + new]
        if stale:
            ok, _, _ = await self.etcd.txn([self.t.value(self.key(ACTIVE)) == new.encode()],
                                           [self.t.delete(k) for k in stale])
            if not ok:
                raise ApiError(grpc.StatusCode.ABORTED, "another KEK rotation ran concurrently; retry", "CONTENTION")
        log.info("re-wrapped %d sealed secrets under key-encryption key %r", rewrapped, new)
        return rewrapped

    async def _rewrap(self, prefix: str, new: str) -> int:
        done = 0
        for _ in range(ATTEMPTS):
            kvs, _ = await self.etcd.list_prefix(self.key(prefix))
            todo = []
            for kv in kvs:
                path = self.path(kv.key)
                meta, secret = self.unseal(path, kv.value)
                if meta["kek"] != new:
                    del meta["kek"]
                    todo.append((kv, self.keyring.seal(new, path, meta, secret)))
            if not todo:
                return done
            lost = False
            for i in range(0, len(todo), TXN_BATCH):
                batch = todo[i : i + TXN_BATCH]
                ok, _, _ = await self.etcd.txn(
                    [self.t.mod(kv.key) == kv.mod_revision for kv, _ in batch],
                    [self.t.put(kv.key, sealed) for kv, sealed in batch],
                )
                if ok:
                    done += len(batch)
                else:
                    lost = True
            if not lost:
                return done
            active = await self.etcd.get(self.key(ACTIVE))
            if active is None or active.value.decode() != new:
                raise ApiError(grpc.StatusCode.ABORTED, "another KEK rotation ran concurrently; retry", "CONTENTION")
        raise ApiError(grpc.StatusCode.ABORTED, "re-wrapping: too much contention; retry", "CONTENTION")
