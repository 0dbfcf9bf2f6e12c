"""Key pairs for external clients (remote-access devices without an agent).

The key service generates an X25519 (WireGuard) key pair, returns the private
half to the caller exactly once, and keeps it only sealed at
`keys/clients/{net}/{client}` (the public key in the envelope header). In the
same transaction it records the key authority's signature of the public key
for the client's resource name at `keys/clientKeys/{net}/{client}` (public, a
`SignedNodeKey`): the client's gateway node applies it as a peer only with
that signature, exactly as for node keys. A second request for the same client
is refused with ALREADY_EXISTS: the private key is never handed out again.
A request with `replace` (a rotation) makes a new pair in place of the
current one, whose private key is then gone.
`forget()` removes both records when the client is deleted (the control plane
also deletes them in the transaction that deletes the client).
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshgate.api.v1 import keys_pb2
from meshgate.common.errors import FieldViolation, already_exists, invalid_argument
from meshgate.keyservice import names
from meshgate.keyservice.authority import Authority
from meshgate.keyservice.vault import Vault

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientKeyPair:
    public_key: str  # base64
    private_key: str  # base64; secret
    signed: keys_pb2.SignedNodeKey

    def __repr__(self) -> str:
        return f"ClientKeyPair(public_key={self.public_key!r})"


def _parse(name: str) -> tuple[str, str]:
    parsed = names.parse_child(name, "externalClients")
    if parsed is None:
        raise invalid_argument([FieldViolation(
            "external_client", f"must be networks/{{network}}/externalClients/{{client}}, each id {names.ID_RULE}")])
    return parsed


def signature_path(net: str, client: str) -> str:
    return f"keys/clientKeys/{net}/{client}"


class ClientKeys:
    def __init__(self, vault: Vault, authority: Authority) -> None:
        self.vault = vault
        self.authority = authority

    async def issue(self, external_client: str, replace: bool = False) -> ClientKeyPair:
        """A new pair for the client; with `replace`, instead of its current one
        (a rotation), else only if it has none."""
        net, client = _parse(external_client)
        v = self.vault
        path = f"keys/clients/{net}/{client}"
        private = X25519PrivateKey.generate()
        raw_private = private.private_bytes_raw()
        raw_public = private.public_key().public_bytes_raw()
        public = base64.b64encode(raw_public).decode()
        signed = await self.authority.sign(external_client, raw_public)
        sealed = v.seal(path, {"public": public, "created": time.time_ns()}, raw_private)
        compare = [v.guard()] if replace else [v.t.create(v.key(path)) == 0, v.guard()]
        ok, _, _ = await v.etcd.txn(
            compare,
            [v.t.put(v.key(path), sealed), v.t.put(v.key(signature_path(net, client)), signed.SerializeToString())],
        )
        if not ok:
            if not replace and await v.etcd.get(v.key(path)) is not None:
                raise already_exists("ExternalClient key pair", external_client)
            await v.refresh_active()
            return await self.issue(external_client, replace)
        log.info("%s a key pair for %s", "replaced" if replace else "issued", external_client)
        return ClientKeyPair(public, base64.b64encode(raw_private).decode(), signed)

    async def forget(self, external_client: str) -> bool:
        net, client = _parse(external_client)
        v = self.vault
        ok, _, _ = await v.etcd.txn(
            [], [v.t.delete(v.key(f"keys/clients/{net}/{client}")), v.t.delete(v.key(signature_path(net, client)))]
        )
        return ok
