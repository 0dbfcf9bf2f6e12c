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

- The key authority's public keys: given to agents in `EnrollResponse`, and
  their fingerprints added to every enrollment secret this control plane mints
  (enrollment.py), which is what gatewayd pins: an agent keeps only the
  presented keys that match the fingerprints in its secret.

Without a key service (`--keyservice` unset, development) nothing is signed and
no PSKs are used; enrollment secrets carry no fingerprint, and gatewayd joins
such a control plane only with `--insecure-no-authority` (nothing verified).

Hazard: PSKs are secrets: never log them or put them in errors or spans.
"""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshgate.api.v1 import keys_pb2, keys_pb2_grpc
from meshgate.common.errors import ApiError

log = logging.getLogger(__name__)

CHUNK = 5000  # pairs per IssuePresharedKeys call, well inside 4 MiB


@dataclass(frozen=True)
class ClientKeyPair:
    public_key: str
    private_key: str  # secret: goes only into the configuration create returns

    def __repr__(self) -> str:
        return f"ClientKeyPair(public_key={self.public_key!r})"


def _segment(name: str) -> str:
    """A peer's segment in pair ids: a node's id, or `~` and an external client's id."""
    _, _, collection, rid = name.split("/")
    return f"~{rid}" if collection == "externalClients" else rid


@functools.lru_cache(maxsize=1 << 17)
def pair_id(a: str, b: str) -> str:
    """The key service's id of the pair of peers `a` and `b` (node or external client resource names).

    Cached: every compile looks up the key of each of its peers' pairs, and the
    pairs recur from change to change."""
    x, y = sorted((_segment(a), _segment(b)))
    return f"{x}.{y}"


class KeyMaterial:
    def __init__(self, target: str = "", timeout: float = 10, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = None
        if target:
            from opentelemetry.instrumentation.grpc import aio_client_interceptors

            # Client spans carry the caller's trace to the key service, so its
            # spans join the API call that needed them.
            if credentials is not None:
                self._channel = grpc.aio.secure_channel(target, credentials, interceptors=aio_client_interceptors())
            else:
                self._channel = grpc.aio.insecure_channel(target, interceptors=aio_client_interceptors())
        self.stub = keys_pb2_grpc.KeyServiceStub(self._channel) if self._channel else None
        self._psks: dict[tuple[str, str], tuple[int, str]] = {}
        self._authority: list[bytes] = []
        self._signed: dict[tuple[str, str], keys_pb2.SignedNodeKey] = {}

    @property
    def enabled(self) -> bool:
        return self.stub is not None

    def _ks(self) -> keys_pb2_grpc.KeyServiceAsyncStub:
        """The key service's stub: callers check `enabled` first."""
        if self.stub is None:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "no key service is configured", "NO_KEY_SERVICE")
        return self.stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def register(self, node: str, public_key: str) -> keys_pb2.SignedNodeKey | None:
        """The key service's signature of `node`'s key, for the caller to record
        (`signature_op`) in the transaction that commits the key; refuse the
        write if it cannot be had. None without a key service."""
        if not self.enabled or not public_key:
            return None
        cached = self._signed.get((node, public_key))
        if cached is not None:
            return cached  # a retried transaction: the same signature
        try:
            signed = await self._ks().RegisterNodeKey(
                keys_pb2.RegisterNodeKeyRequest(node=node, public_key=public_key, detached=True), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"the key service refused the key: {e.details()}",
                               "INVALID_FIELD") from None
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the key service could not sign the node's key; retry",
                           "KEY_SERVICE_UNAVAILABLE") from None
        if len(self._signed) > 4096:
            self._signed.clear()
        self._signed[(node, public_key)] = signed
        return signed

    @staticmethod
    def signature_op(etcd, node: str, signed: keys_pb2.SignedNodeKey | None) -> list:
        """The transaction op that records `signed` (none when None)."""
        if signed is None:
            return []
        _, net, _, node_id = node.split("/")
        return [etcd.txn_ops.put(etcd.key("keys", "nodes", net, node_id), signed.SerializeToString())]

    async def sign_certificate(self, csr: bytes, node: str):
        """An agent's certificate for `node` (an AgentCredential: the chain and
        its expiry), signed by the key service's CA from the agent's CSR."""
        from meshgate.api.v1 import agent_pb2

        if not self.enabled:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "no key service: agent certificates cannot be issued",
                           "NO_KEY_SERVICE")
        try:
            cert = await self._ks().SignCertificate(keys_pb2.SignCertificateRequest(csr=csr, identity=node),
                                                   timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"the key service refused the CSR: {e.details()}",
                               "INVALID_FIELD") from None
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the key service could not sign the agent's certificate; retry",
                           "KEY_SERVICE_UNAVAILABLE") from None
        return agent_pb2.AgentCredential(certificate_chain=cert.certificate_chain, expire_time=cert.expire_time)

    async def issue_client(self, external_client: str, replace: bool = False) -> ClientKeyPair | None:
        """A new key pair for `external_client`, generated by the key service
        (which keeps the private key sealed and signs the public one); None
        when the key service already holds one for that name. Without a key
        service the pair is generated here and kept nowhere."""
        if not self.enabled:
            private = X25519PrivateKey.generate()
            return ClientKeyPair(base64.b64encode(private.public_key().public_bytes_raw()).decode(),
                                 base64.b64encode(private.private_bytes_raw()).decode())
        try:
            pair = await self._ks().IssueClientKeyPair(
                keys_pb2.IssueClientKeyPairRequest(external_client=external_client, replace=replace),
                timeout=self.timeout
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                return None
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the key service could not issue the client's key pair; retry",
                           "KEY_SERVICE_UNAVAILABLE") from None
        return ClientKeyPair(pair.public_key, pair.private_key)

    async def rotate_pair(self, net_id: str, a: str, b: str) -> str:
        """A new generation of the pre-shared key of peers `a` and `b`; returns it."""
        try:
            await self._ks().RotatePresharedKeys(
                keys_pb2.RotatePresharedKeysRequest(network=f"networks/{net_id}", pairs=[f"{a}|{b}"]),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the key service could not rotate the pre-shared key; retry",
                           "KEY_SERVICE_UNAVAILABLE") from None
        self.forget(net_id, pair_id(a, b))
        return await self.pair_psk(net_id, a, b)

    async def pair_psk(self, net_id: str, a: str, b: str) -> str:
        """The pre-shared key of peers `a` and `b`, issued if missing."""
        if not await self.ensure(net_id, [(a, b)]):
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the key service could not issue the pre-shared key; retry",
                           "KEY_SERVICE_UNAVAILABLE")
        return self.psk(net_id, a, b)

    async def authority_keys(self) -> list[bytes]:
        if not self.enabled:
            return []
        if not self._authority:
            try:
                ka = await self._ks().GetKeyAuthority(keys_pb2.GetKeyAuthorityRequest(), timeout=self.timeout)
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
                resp = await self._ks().IssuePresharedKeys(
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
