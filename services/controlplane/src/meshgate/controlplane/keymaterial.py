"""The control plane's access to key material, through the key service.

- Signatures: node public keys are registered with the key service on the API
  paths that set them (enrollment, create/update of a node, a rotation). The
  signed records (`keys/nodes/{net}/{node}`, public) reach the compiler through
  the state cache's watch; a key that reached etcd any other way has no
  signature, and agents refuse it.
- Pre-shared keys: fetched in bulk with `IssuePresharedKeys` (which issues the
  ones missing) and kept in memory per pair with their generation. A watch
  event on `keys/psk/{net}/{pair}` drops the pair from memory, so the next
  compile fetches it again: a rotation reaches both ends, and a re-wrap under a
  new KEK (same generation) changes nothing.
- The control plane never holds a key-encryption key, only the PSKs agents
  must receive anyway.

Without a key service (`--keyservice` unset, development) nothing is signed and
no PSKs are used; agents joined to such a control plane get no key authority
and verify nothing.

Hazard: PSKs are secrets: never log them or put them in errors or spans.
"""

from __future__ import annotations

import logging
from typing import Iterable

import grpc

from meshgate.api.v1 import keys_pb2, keys_pb2_grpc
from meshgate.common.errors import ApiError

log = logging.getLogger(__name__)

CHUNK = 5000  # pairs per IssuePresharedKeys call, well inside 4 MiB


def pair_id(a: str, b: str) -> str:
    """The key service's id of the pair of nodes `a` and `b` (resource names)."""
    x, y = sorted((a.rsplit("/", 1)[1], b.rsplit("/", 1)[1]))
    return f"{x}.{y}"


class KeyMaterial:
    def __init__(self, target: str = "", timeout: float = 10) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(target) if target else None
        self.stub = keys_pb2_grpc.KeyServiceStub(self._channel) if self._channel else None
        self._psks: dict[tuple[str, str], tuple[int, str]] = {}
        self._authority: list[bytes] = []

    @property
    def enabled(self) -> bool:
        return self.stub is not None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def register(self, node: str, public_key: str) -> None:
        """Have the key service sign `node`'s key; refuse the write if it cannot."""
        if not self.enabled or not public_key:
            return
        try:
            await self.stub.RegisterNodeKey(
                keys_pb2.RegisterNodeKeyRequest(node=node, public_key=public_key), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"the key service refused the key: {e.details()}",
                               "INVALID_FIELD") from None
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the key service could not sign the node's key; retry",
                           "KEY_SERVICE_UNAVAILABLE") from None

    async def authority_keys(self) -> list[bytes]:
        if not self.enabled:
            return []
        if not self._authority:
            try:
                ka = await self.stub.GetKeyAuthority(keys_pb2.GetKeyAuthorityRequest(), timeout=self.timeout)
            except grpc.aio.AioRpcError:
                raise ApiError(grpc.StatusCode.UNAVAILABLE, "the key service is unavailable; retry",
                               "KEY_SERVICE_UNAVAILABLE") from None
            self._authority = list(ka.public_keys)
        return list(self._authority)

    def psk(self, net_id: str, a: str, b: str) -> str:
        got = self._psks.get((net_id, pair_id(a, b)))
        return got[1] if got else ""

    def forget(self, net_id: str, pair: str) -> None:
        self._psks.pop((net_id, pair), None)

    def forget_network(self, net_id: str) -> None:
        for k in [k for k in self._psks if k[0] == net_id]:
            del self._psks[k]

    async def ensure(self, net_id: str, pairs: Iterable[tuple[str, str]]) -> bool:
        """Fetch the PSKs of `pairs` (node names) not in memory; False if the key
        service could not be reached (the caller retries later)."""
        if not self.enabled:
            return True
        missing = {}
        for a, b in pairs:
            pid = pair_id(a, b)
            if (net_id, pid) not in self._psks:
                missing[pid] = (a, b)
        if not missing:
            return True
        items = list(missing.values())
        try:
            for i in range(0, len(items), CHUNK):
                resp = await self.stub.IssuePresharedKeys(
                    keys_pb2.IssuePresharedKeysRequest(
                        network=f"networks/{net_id}", pairs=[f"{a}|{b}" for a, b in items[i : i + CHUNK]]
                    ),
                    timeout=self.timeout,
                )
                for k in resp.keys:
                    a, b = k.peers
                    self._psks[(net_id, pair_id(a, b))] = (k.generation, k.key)
        except grpc.aio.AioRpcError as e:
            # Never compile without a pair's key on an error: the two ends would
            # disagree. (Networks with PSKs turned off never get here.)
            log.warning("fetching %d pre-shared keys for networks/%s failed: %s", len(items), net_id, e.code().name)
            return False
        return True
