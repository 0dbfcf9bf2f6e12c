"""The key authority: the Ed25519 key that signs node public keys.

Created once, by whichever replica first needs it: the creation is a
transaction that succeeds only if `keys/authority/current` does not exist yet
(create revision 0), so two replicas racing both end up with the winner's key.
The private key is stored only sealed; the public key travels in the
envelope's header so listing the authority needs no decryption.

Registering a node key validates the node's resource name and the key, signs
the binding defined in `signing.py`, and records the `SignedNodeKey` (public)
at `keys/nodes/{net}/{node}`. External clients' keys are signed the same way
when the key service generates them (clients.py), recorded at
`keys/clientKeys/{net}/{client}`.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshgate.api.v1 import keys_pb2
from meshgate.common import metrics, signing
from meshgate.common.errors import ApiError, FieldViolation, failed_precondition, invalid_argument
from meshgate.keyservice import names
from meshgate.keyservice.sealing import header
from meshgate.keyservice.vault import Retry, Vault, optimistic

log = logging.getLogger(__name__)

CURRENT = "keys/authority/current"
KEYS = "keys/authority/keys/"


@dataclass(frozen=True)
class AuthorityKey:
    key_id: str
    public_key: bytes


class Authority:
    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self._signer: tuple[str, Ed25519PrivateKey] | None = None

    async def ensure(self) -> str:
        """The current key id, creating the authority key if there is none (race-safe)."""
        v = self.vault

        async def attempt() -> str:
            kv = await v.etcd.get(v.key(CURRENT))
            if kv is not None:
                return kv.value.decode()
            private = Ed25519PrivateKey.generate()
            public = signing.public_bytes(private)
            kid = signing.key_id(public)
            path = KEYS + kid
            sealed = v.seal(path, {"public": base64.b64encode(public).decode()}, private.private_bytes_raw())
            await v.commit(
                [v.t.create(v.key(CURRENT)) == 0],
                [v.t.put(v.key(CURRENT), kid.encode()), v.t.put(v.key(path), sealed)],
            )
            log.info("created the key authority %s", kid)
            return kid

        return await optimistic(attempt, "creating the key authority")

    async def public_keys(self) -> list[AuthorityKey]:
        """Every authority key agents should accept, the current one first."""
        current = await self.ensure()
        kvs, _ = await self.vault.etcd.list_prefix(self.vault.key(KEYS))
        keys = [
            AuthorityKey(self.vault.path(kv.key)[len(KEYS):], base64.b64decode(header(kv.value)["public"]))
            for kv in kvs
        ]
        keys.sort(key=lambda k: k.key_id != current)
        return keys

    async def _private(self) -> tuple[str, Ed25519PrivateKey]:
        kid = await self.ensure()
        if self._signer is not None and self._signer[0] == kid:
            return self._signer
        path = KEYS + kid
        kv = await self.vault.etcd.get(self.vault.key(path))
        if kv is None:
            raise Retry()
        _, raw = self.vault.unseal(path, kv.value)
        self._signer = (kid, Ed25519PrivateKey.from_private_bytes(raw))
        return self._signer

    async def sign(self, resource: str, raw: bytes) -> keys_pb2.SignedNodeKey:
        """A `SignedNodeKey` binding the raw key to `resource` (a node or an
        external client) under the current authority key; not recorded."""
        kid, private = await optimistic(self._private, "loading the key authority")
        signed = keys_pb2.SignedNodeKey(
            node=resource, public_key=base64.b64encode(raw).decode(), signature=signing.sign(private, resource, raw),
            key_id=kid,
        )
        signed.sign_time.GetCurrentTime()
        metrics.keyservice.signatures.add(1, {"kind": "node_key"})
        return signed

    async def register(self, node: str, public_key: str, detached: bool = False) -> keys_pb2.SignedNodeKey:
        """Validate, sign and record a node's public key (`detached`: sign
        only; the caller records it in its own transaction)."""
        errs = []
        parsed = names.parse_child(node, "nodes")
        if parsed is None:
            errs.append(FieldViolation("node", names.node_rule()))
        raw = signing.raw_key(public_key)
        if not public_key:
            errs.append(FieldViolation("public_key", "is required"))
        elif raw is None:
            errs.append(FieldViolation("public_key", "must be the base64 of a 32-byte WireGuard public key"))
        elif raw == bytes(32):
            errs.append(FieldViolation("public_key", "is the all-zero key"))
        if errs:
            raise invalid_argument(errs)
        assert parsed is not None and raw is not None
        net, node_id = parsed
        canonical = base64.b64encode(raw).decode()
        kid, _ = await optimistic(self._private, "loading the key authority")
        v = self.vault
        path = f"keys/nodes/{net}/{node_id}"
        # Only for a network that exists, fenced on its record: a signature
        # for a node of a network that does not exist (or is being deleted)
        # is never written.
        network = await v.etcd.get(v.key(f"networks/{net}"))
        if network is None:
            raise failed_precondition(f"network {net!r} does not exist; no key of its nodes is signed",
                                      "NETWORK_NOT_FOUND", f"networks/{net}", "meshgate.io/Network")
        old = await v.etcd.get(v.key(path))
        if old is not None:
            prev = keys_pb2.SignedNodeKey.FromString(old.value)
            if prev.public_key == canonical and prev.key_id == kid:
                return prev
        signed = await self.sign(node, raw)
        if detached:
            log.info("signed the public key of %s with %s (recorded by the caller)", node, kid)
            return signed
        t = v.etcd.txn_ops
        ok, _, _ = await v.etcd.txn([t.mod(network.key) == network.mod_revision],
                                    [t.put(v.key(path), signed.SerializeToString())])
        if not ok:
            raise ApiError(grpc.StatusCode.ABORTED, f"network {net!r} changed while signing; retry",
                           "CONCURRENT_MODIFICATION")
        log.info("signed the public key of %s with %s", node, kid)
        return signed
