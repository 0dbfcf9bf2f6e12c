"""Key pairs for external clients (remote-access devices without an agent).

The key service generates an X25519 (WireGuard) key pair, returns the private
half to the caller exactly once, and keeps it only sealed at
`keys/clients/{net}/{client}` (the public key in the envelope header). A
second request for the same client is refused with ALREADY_EXISTS: the
private key is never handed out again. `forget()` removes it when the client
is deleted.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshgate.common.errors import FieldViolation, already_exists, invalid_argument
from meshgate.keyservice import names
from meshgate.keyservice.vault import Vault

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientKeyPair:
    public_key: str  # base64
    private_key: str  # base64; secret

    def __repr__(self) -> str:
        return f"ClientKeyPair(public_key={self.public_key!r})"


def _parse(name: str) -> tuple[str, str]:
    parsed = names.parse_child(name, "externalClients")
    if parsed is None:
        raise invalid_argument([FieldViolation(
            "external_client", f"must be networks/{{network}}/externalClients/{{client}}, each id {names.ID_RULE}")])
    return parsed


class ClientKeys:
    def __init__(self, vault: Vault) -> None:
        self.vault = vault

    async def issue(self, external_client: str) -> ClientKeyPair:
        net, client = _parse(external_client)
        v = self.vault
        path = f"keys/clients/{net}/{client}"
        private = X25519PrivateKey.generate()
        raw_private = private.private_bytes_raw()
        public = base64.b64encode(private.public_key().public_bytes_raw()).decode()
        sealed = v.seal(path, {"public": public, "created": time.time_ns()}, raw_private)
        ok, _, _ = await v.etcd.txn([v.t.create(v.key(path)) == 0, v.guard()], [v.t.put(v.key(path), sealed)])
        if not ok:
            if await v.etcd.get(v.key(path)) is not None:
                raise already_exists("ExternalClient key pair", external_client)
            await v.refresh_active()
            return await self.issue(external_client)
        log.info("issued a key pair for %s", external_client)
        return ClientKeyPair(public, base64.b64encode(raw_private).decode())

    async def forget(self, external_client: str) -> bool:
        net, client = _parse(external_client)
        ok, _, _ = await self.vault.etcd.txn(
            [], [self.vault.t.delete(self.vault.key(f"keys/clients/{net}/{client}"))]
        )
        return ok
