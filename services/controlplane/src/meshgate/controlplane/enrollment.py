"""Enrollment keys, joining a network, and agent credentials.

A key's secret is `mgek_{network}.{key id}.{random}`: the network and id let
the control plane find the key directly, and only a SHA-256 of it is stored
(the random part has 256 bits, so a plain hash is enough). With a key service,
the secret also carries the fingerprint of each key authority public key,
`.ka_{fingerprint}` (the first 128 bits of SHA-256 of the raw Ed25519 key,
unpadded base64url): gatewayd pins the authority to those, so a control plane
that later presents another authority is refused at join. The fingerprints are
public, not part of what is hashed: enrollment ignores them.
Redeeming a key compares the key's mod revision in the transaction that
creates the node, so a revoked, deleted or changed key is never redeemed. A
key with a use limit also counts the use in its own record in that
transaction, so a single-use key makes exactly one node however many agents
race for it. A key without a limit records each use as its own key,
`enrollmentUses/{net}/{key}/{node}.{random}`, and leaves its record unchanged: agents
joining at once with one fleet-wide key do not contend on it (its `uses` is
the record's count plus those keys).

The credential returned by `Enroll` is, on a control plane with an mTLS agent
listener (`--agent-listen`), a short-lived certificate for the key the agent
generated (its CSR), naming the node, signed by the key service's CA; the
agent streams with it on the agent endpoint. The node's `agents/{net}/{node}`
record holds the SHA-256 of that key (`spki:{hex}`), written with the node:
a stream's certificate must name the node and carry a key that record lists,
so a race's loser, or the holder of a deleted node's certificate once a node
of that name exists again, is refused. (Signing comes before the commit, so a
failed signing consumes no use of the enrollment key.)
Otherwise (development, or `--agent-bearer-tokens`) it is a bearer token
`mgat_{network}.{node}.{random}`, also stored only as a hash; agents present
it as `authorization: Bearer ...` on every later call.

Hazards: secrets and tokens must never be logged or put in error messages;
failures say which check failed, never the value. Unknown keys and wrong
secrets get the same answer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time

import grpc

from meshgate.api.v1 import agent_pb2, enrollment_pb2, node_pb2
from meshgate.common.errors import ApiError, FieldViolation, already_exists, invalid_argument
from meshgate.common.identity import spki_sha256
from meshgate.common.signing import PIN_PREFIX, authority_fingerprint, split_pins
from meshgate.controlplane import names, store, validation
from meshgate.controlplane.base import Kind, Resources
from meshgate.controlplane.networks import Networks
from meshgate.controlplane.nodes import Nodes
from meshgate.controlplane.txn import retrying

KIND = Kind("meshgate.io/EnrollmentKey", "enrollmentKeys", enrollment_pb2.EnrollmentKey)
SECRET_PREFIX = "mgek_"
TOKEN_PREFIX = "mgat_"
_SECRET_RE = re.compile(r"^(mgek_|mgat_)([a-z][a-z0-9-]{0,62})\.([a-z][a-z0-9-]{0,62})\.([A-Za-z0-9_-]{43})$")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _mint(prefix: str, net: str, rid: str) -> str:
    return f"{prefix}{net}.{rid}.{base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip('=')}"


def without_pins(secret: str) -> str:
    """The secret without its trailing `.ka_{fingerprint}` segments (what is hashed)."""
    return split_pins(secret)[0]


def parse_secret(secret: str, prefix: str) -> tuple[str, str] | None:
    m = _SECRET_RE.match(secret)
    if not m or m.group(1) != prefix:
        return None
    return m.group(2), m.group(3)


def _refused(cause: str, message: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.PERMISSION_DENIED, message, "ENROLLMENT_KEY_REFUSED", metadata={"cause": cause}
    )


UNKNOWN_KEY = ApiError(grpc.StatusCode.UNAUTHENTICATED, "enrollment key not recognised", "ENROLLMENT_KEY_REFUSED", metadata={"cause": "unknown"})
BAD_TOKEN = ApiError(grpc.StatusCode.UNAUTHENTICATED, "agent credential not recognised", "UNAUTHENTICATED")


def node_id_from_hostname(hostname: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", hostname.lower().split(".")[0]).strip("-")
    if s and not s[0].isalpha():
        s = "n-" + s
    return s[:63].rstrip("-")


class EnrollmentKeys(Resources[enrollment_pb2.EnrollmentKey]):
    kind = KIND

    def __init__(self, etcd, networks: Networks, nodes: Nodes) -> None:
        super().__init__(etcd)
        self.networks = networks
        self.nodes = nodes
        # Set by the control plane when it serves an mTLS agent listener: where
        # agents stream, the CA that signed its certificate and theirs, and
        # whether an agent without a CSR may still get a bearer token.
        self.agent_endpoint = ""
        self.agent_ca = b""
        self.agent_tokens = True

    def secret_key(self, net: str, rid: str) -> bytes:
        return self.etcd.key("enrollmentSecrets", net, rid)

    def agent_key(self, net: str, node: str) -> bytes:
        return self.etcd.key("agents", net, node)

    def uses_prefix(self, net: str, rid: str) -> bytes:
        return self.etcd.key("enrollmentUses", net, rid, "")

    def present(self, msg):
        msg.secret = ""
        return msg

    async def _with_uses(self, msg):
        """`msg` with the uses of an unlimited key counted in (see the module docstring)."""
        if not msg.max_uses:
            net, rid = self.parse_name(msg.name)
            msg.uses += await self.etcd.count_prefix(self.uses_prefix(net, rid))
        return msg

    async def get(self, name: str):
        return await self._with_uses(await super().get(name))

    async def list_children(self, parent: str, page_size: int, page_token: str):
        items, token = await super().list_children(parent, page_size, page_token)
        for item in items:
            await self._with_uses(item)
        return items, token

    async def create(self, req: enrollment_pb2.CreateEnrollmentKeyRequest) -> enrollment_pb2.EnrollmentKey:
        net_id = self.parse_parent(req.parent)
        k = req.enrollment_key
        errs = validation.check_id("enrollment_key_id", req.enrollment_key_id)
        errs += validation.check_text("enrollment_key.description", k.description, validation.MAX_DESCRIPTION)
        errs += validation.check_tags("enrollment_key.tags", list(k.tags))
        if k.HasField("expire_time") and k.expire_time.ToNanoseconds() <= time.time_ns():
            errs.append(FieldViolation("enrollment_key.expire_time", "is in the past"))
        if errs:
            raise invalid_argument(errs)
        name = names.child_name(net_id, KIND.collection, req.enrollment_key_id)
        key = self.key_of(net_id, req.enrollment_key_id)
        # empty without a key service (development): such secrets pin nothing
        pins = "".join(f".{PIN_PREFIX}{authority_fingerprint(k)}"
                       for k in await self.nodes.key_material.authority_keys())

        async def attempt(_: int):
            _net, net_kv = await self.networks.require(net_id, "parent")
            if await self.etcd.get(key) is not None:
                raise already_exists(KIND.type_name, name)
            ek = enrollment_pb2.EnrollmentKey()
            ek.CopyFrom(k)
            ek.name = name
            ek.uses = 0
            ek.ClearField("revoke_time")
            ek.uid = store.new_uid()
            ek.create_time.CopyFrom(store.now())
            ek.update_time.CopyFrom(ek.create_time)
            ek.secret = ""
            ek.etag = ""
            secret = _mint(SECRET_PREFIX, net_id, req.enrollment_key_id)
            rev = await self.commit(
                [self.t.mod(net_kv.key) == net_kv.mod_revision, self.t.create(key) == 0],
                [self.t.put(key, store.encode(ek)), self.t.put(self.secret_key(net_id, req.enrollment_key_id), _digest(secret))],
            )
            ek.etag = str(rev)
            ek.secret = secret + pins
            return ek

        return await retrying(attempt, f"create {name}")

    async def revoke(self, req: enrollment_pb2.RevokeEnrollmentKeyRequest) -> enrollment_pb2.EnrollmentKey:
        async def attempt(_: int):
            ek, kv = await self.read(req.name)
            self.check_etag(req.etag, kv, req.name)
            if ek.HasField("revoke_time"):
                return await self._with_uses(self.present(ek))
            ek.revoke_time.CopyFrom(store.now())
            ek.update_time.CopyFrom(ek.revoke_time)
            rev = await self.commit(
                [self.t.mod(kv.key) == kv.mod_revision], [self.t.put(kv.key, store.encode(ek))],
                etag=req.etag, kv=kv, name=req.name,
            )
            ek.etag = str(rev)
            return await self._with_uses(self.present(ek))

        return await retrying(attempt, f"revoke {req.name}")

    async def delete(self, req: enrollment_pb2.DeleteEnrollmentKeyRequest) -> None:
        net_id, rid = self.parse_name(req.name)

        async def attempt(_: int) -> None:
            _ek, kv = await self.read(req.name)
            self.check_etag(req.etag, kv, req.name)
            await self.commit(
                [self.t.mod(kv.key) == kv.mod_revision],
                [self.t.delete(kv.key), self.t.delete(self.secret_key(net_id, rid)),
                 self.t.delete(self.uses_prefix(net_id, rid), store.range_after(self.uses_prefix(net_id, rid), "")[1])],
                etag=req.etag, kv=kv, name=req.name,
            )

        await retrying(attempt, f"delete {req.name}")

    # joining -----------------------------------------------------------------

    async def enroll(self, req: agent_pb2.EnrollRequest) -> agent_pb2.EnrollResponse:
        secret = without_pins(req.enrollment_secret)
        parsed = parse_secret(secret, SECRET_PREFIX)
        if parsed is None:
            raise UNKNOWN_KEY
        net_id, key_id = parsed
        node_id = req.node_id or node_id_from_hostname(req.hostname)
        errs = validation.check_id("node_id" if req.node_id else "hostname", node_id)
        if not req.public_key:
            errs.append(FieldViolation("public_key", "is required"))
        errs += validation.check_public_key("public_key", req.public_key)
        errs += validation.check_endpoint("endpoint", req.endpoint)
        errs += validation.check_port("listen_port", req.listen_port)
        certified = bool(self.agent_endpoint and req.csr)
        if self.agent_endpoint and not req.csr and not self.agent_tokens:
            errs.append(FieldViolation("csr", "is required: this control plane issues agent certificates"))
        if req.csr:
            errs += check_csr(req.csr)
        if errs:
            raise invalid_argument(errs)
        ekey = self.key_of(net_id, key_id)
        signed: dict[str, agent_pb2.AgentCredential] = {}  # one certificate across retried attempts

        async def attempt(n: int) -> agent_pb2.EnrollResponse:
            kv = await self.etcd.get(ekey)
            digest = await self.etcd.get(self.secret_key(net_id, key_id))
            if kv is None or digest is None or not hmac.compare_digest(digest.value, _digest(secret)):
                raise UNKNOWN_KEY
            ek = store.decode(enrollment_pb2.EnrollmentKey, kv)
            if ek.HasField("revoke_time"):
                raise _refused("revoked", f"enrollment key {ek.name} has been revoked")
            if ek.HasField("expire_time") and ek.expire_time.ToNanoseconds() <= time.time_ns():
                raise _refused("expired", f"enrollment key {ek.name} has expired")
            if ek.max_uses and ek.uses >= ek.max_uses:
                raise _refused("exhausted", f"enrollment key {ek.name} is exhausted: used {ek.uses} of {ek.max_uses} times")
            token = _mint(TOKEN_PREFIX, net_id, node_id)
            if certified and "credential" not in signed:
                signed["credential"] = await self.nodes.key_material.sign_certificate(
                    req.csr, names.child_name(net_id, "nodes", node_id))
            if ek.max_uses:
                ek.uses += 1
                ek.update_time.CopyFrom(store.now())
                use = self.t.put(ekey, store.encode(ek))
            else:
                # one key per redemption (a node id can be enrolled again after a delete)
                use = self.t.put(self.uses_prefix(net_id, key_id) + f"{node_id}.{secrets.token_hex(6)}".encode(), b"")
            template = node_pb2.Node(
                tags=list(ek.tags), endpoint=req.endpoint, listen_port=req.listen_port, public_key=req.public_key,
                display_name=req.hostname[:validation.MAX_DISPLAY_NAME],
            )
            node = await self.nodes.create_in_txn(
                net_id, node_id, template, n,
                compare_extra=[self.t.mod(ekey) == kv.mod_revision], endpoint_field="endpoint",
                ops_extra=[use, self.t.put(self.agent_key(net_id, node_id),
                                           csr_binding(req.csr) if certified else _digest(token))],
            )
            credential = signed["credential"] if certified else agent_pb2.AgentCredential(token=token)
            return agent_pb2.EnrollResponse(
                node=node,
                credential=credential,
                key_authority_public_keys=await self.nodes.key_material.authority_keys(),
                ca_certificates=self.agent_ca if certified else b"",
                agent_endpoint=self.agent_endpoint if certified else "",
            )

        return await retrying(attempt, f"enroll into networks/{net_id}")

    async def authenticate(self, metadata) -> str:
        """The node name an agent's bearer token belongs to."""
        auth = ""
        for k, v in metadata or ():
            if k == "authorization":
                auth = v
        if not auth.startswith("Bearer "):
            raise BAD_TOKEN
        token = auth[len("Bearer "):].strip()
        parsed = parse_secret(token, TOKEN_PREFIX)
        if parsed is None:
            raise BAD_TOKEN
        net_id, node_id = parsed
        kv = await self.etcd.get(self.agent_key(net_id, node_id))
        if kv is None or not hmac.compare_digest(kv.value, _digest(token)):
            raise BAD_TOKEN
        return names.child_name(net_id, "nodes", node_id)


def check_csr(csr: bytes) -> list[FieldViolation]:
    """A CSR the CA will accept: PEM, self-signed by its key (the key service
    checks again; this refuses before the node is created)."""
    from cryptography import x509

    if len(csr) > 64 * 1024:
        return [FieldViolation("csr", "is larger than 64 KiB")]
    try:
        req = x509.load_pem_x509_csr(csr)
    except ValueError:
        return [FieldViolation("csr", "is not a PEM certificate signing request")]
    if not req.is_signature_valid:
        return [FieldViolation("csr", "is not signed by its own key")]
    return []


def csr_binding(csr: bytes) -> bytes:
    """The `agents/{net}/{node}` value that binds a node to the key of `csr`."""
    from cryptography import x509

    return b"spki:" + spki_sha256(x509.load_pem_x509_csr(csr).public_key()).encode()


def bound_keys(value: bytes) -> set[str]:
    """The key hashes an `agents/{net}/{node}` value binds (none for a token's)."""
    if not value.startswith(b"spki:"):
        return set()
    return {h for h in value[len(b"spki:"):].decode().split(",") if h}
