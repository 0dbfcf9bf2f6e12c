"""Where control-plane state lives in etcd, and how it is encoded.

Layout under the prefix (default `/meshgate`):

    networks/{net}                      Network
    nodes/{net}/{node}                  Node
    egressGateways/{net}/{gw}           EgressGateway
    externalClients/{net}/{client}      ExternalClient (never its config or private key)
    ipam/{net}/v4/{address}             the node or external client holding the address
    ipam/{net}/v6/{address}
    pubkeys/{net}/{urlsafe key}         the node or external client holding the public key
    guards/networks                     bumped by every network create/delete
    guards/{net}/nodes                  bumped by every node create/delete
    guards/{net}/egress                 bumped by every egress gateway write
    accessPolicies/{net}/{policy}       AccessPolicy
    enrollmentKeys/{net}/{key}          EnrollmentKey (without its secret)
    enrollmentSecrets/{net}/{key}       SHA-256 of the key's secret
    enrollmentUses/{net}/{key}/{node}.{random}  empty: one redemption of an unlimited key
    agents/{net}/{node}                 SHA-256 of the node agent's bearer token
    status/{net}/{node}                 the agent's last acknowledgement (NodeConvergence)
    sessions/{net}/{node}               the agent's stream, on the holding replica's lease
    liveness/{net}/{node}               a gateway node marked down (liveness.py)
    clientHealth/{net}/{client}         an external client's tunnel as its gateway node reported it (JSON)
    clientIssued/{net}/{client}         what its configuration was made with (JSON; no secret)
    changes/trace                       W3C traceparent of the newest change (see sync.py)

Values are binary protobuf. A resource's etag is its key's mod revision, so
etags cost nothing to store and are checked by etcd itself in the transaction.

Guard keys turn "no other writer changed this set while I decided" into a single
compare in a transaction: a writer that validated against a set of resources
(network ranges, egress ranges, the nodes of a network) compares the guard's
mod revision, and every writer that changes the set puts the guard.

Hazard: every key of a network lives under one of the per-network prefixes
below; a forced network delete removes exactly those, so a new per-network
collection must be added to `network_prefixes`.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from meshgate.common.etcd import KV, Etcd, prefix_end

M = TypeVar("M", bound=Message)

# Every collection whose keys are `{collection}/{net}/...`.
PER_NETWORK = (
    "nodes", "egressGateways", "ipam", "pubkeys", "guards", "enrollmentKeys", "enrollmentSecrets", "enrollmentUses",
    "externalClients", "accessPolicies", "agents", "status", "liveness", "clientHealth", "clientIssued", "sessions",
    "learned", "egressHealth", "egressDrain",
)


# The key service's collections under `keys/{collection}/{net}/...` (docs/keys.md).
KEY_SERVICE_PER_NETWORK = ("psk", "nodes", "nodeRotation", "clients", "clientKeys")


class Keys:
    def __init__(self, etcd: Etcd) -> None:
        self.e = etcd

    def network(self, net: str) -> bytes:
        return self.e.key("networks", net)

    def networks(self) -> bytes:
        return self.e.key("networks", "")

    def node(self, net: str, node: str) -> bytes:
        return self.e.key("nodes", net, node)

    def nodes(self, net: str) -> bytes:
        return self.e.key("nodes", net, "")

    def egress(self, net: str, gw: str) -> bytes:
        return self.e.key("egressGateways", net, gw)

    def egresses(self, net: str) -> bytes:
        return self.e.key("egressGateways", net, "")

    def ipam(self, net: str, family: str, address: str) -> bytes:
        return self.e.key("ipam", net, family, address)

    def pubkey(self, net: str, public_key: str) -> bytes:
        return self.e.key("pubkeys", net, base64.urlsafe_b64encode(base64.b64decode(public_key)).decode())

    def guard_networks(self) -> bytes:
        return self.e.key("guards", "networks")

    def guard(self, net: str, what: str) -> bytes:
        return self.e.key("guards", net, what)

    def network_prefixes(self, net: str) -> list[bytes]:
        """Every prefix holding keys of network `net` (besides its own key),
        the key service's included (its sealed values need no KEK to delete)."""
        return [self.e.key(c, net, "") for c in PER_NETWORK] + [
            self.e.key("keys", c, net, "") for c in KEY_SERVICE_PER_NETWORK
        ]

    def network_singles(self, net: str) -> list[bytes]:
        """Single keys (not prefixes) that belong to network `net`: deleted
        exactly, since as a prefix `keys/rotation/a` would also cover `.../ab`."""
        return [self.e.key("keys", "rotation", net)]


def etag_of(kv: KV) -> str:
    return str(kv.mod_revision)


def decode(cls: type[M], kv: KV) -> M:
    """The resource stored in `kv`, its etag set from the key's revision."""
    msg: Any = cls.FromString(kv.value)  # every resource message has an etag
    msg.etag = etag_of(kv)
    return msg


def encode(msg) -> bytes:
    copy = type(msg)()
    copy.CopyFrom(msg)
    copy.etag = ""
    return copy.SerializeToString(deterministic=True)


def now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def new_uid() -> str:
    return str(uuid.uuid4())


def range_after(prefix: bytes, after: str) -> tuple[bytes, bytes]:
    """Keys under `prefix` strictly after the id `after` (all when empty)."""
    start = prefix + after.encode() + b"\0" if after else prefix
    return start, prefix_end(prefix)
