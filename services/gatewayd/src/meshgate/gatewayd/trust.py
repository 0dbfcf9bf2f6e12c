"""Which peers the agent accepts: signed peer keys.

An agent that holds key authority public keys (from enrollment,
``EnrollResponse.key_authority_public_keys``) accepts a peer only when its
``public_key_signature`` is a valid Ed25519 signature by one of them over the
binding of the peer's resource name and public key
(``meshgate.common.signing``).  A peer that fails is *refused*: dropped from the
desired state before validation and planning (together with the routes and the
default route that name it), while the rest of the state applies.  Refusals are
logged with the peer's resource, public key and reason, and reported to the
control plane in the ack of that revision.

Without authority keys (an agent joined to a control plane that has no key
service, or ``gatewayd run --file``) nothing is verified: the development mode.

Verification results are cached by (resource, public key, signature), so a delta
against a state of thousands of peers costs a dictionary lookup per unchanged
peer, not a signature check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.common import signing

log = logging.getLogger(__name__)

UNSIGNED = "public key not signed by the key authority"
BAD_SIGNATURE = "public key signature is not the key authority's for this peer and key"
NO_RESOURCE = "no resource name to check the key's signature against"
ERROR_REASON = "PEER_KEY_REFUSED"
ERROR_DOMAIN = "gatewayd.meshgate"


@dataclass(frozen=True)
class Refusal:
    resource: str
    public_key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.resource or self.public_key}: {self.reason}"


class PeerVerifier:
    """Checks peers' key signatures against the key authority's public keys."""

    def __init__(self, authority_keys: Iterable[bytes]):
        self.keys: list[Ed25519PublicKey] = []
        for raw in authority_keys:
            # raises ValueError on a malformed key: a broken identity file is a host problem
            self.keys.append(Ed25519PublicKey.from_public_bytes(bytes(raw)))
        if not self.keys:
            raise ValueError("a verifier needs at least one key authority public key")
        self._cache: dict[tuple[str, str, bytes], str | None] = {}

    def reason(self, peer: pb.Peer) -> str | None:
        """Why ``peer`` is refused, or None when its key is properly signed."""
        k = (peer.resource, peer.public_key, bytes(peer.public_key_signature))
        if k in self._cache:
            return self._cache[k]
        if not peer.public_key_signature:
            why: str | None = UNSIGNED
        elif not peer.resource:
            why = NO_RESOURCE
        elif signing.verify_any(self.keys, peer.resource, peer.public_key, peer.public_key_signature):
            why = None
        else:
            why = BAD_SIGNATURE
        if len(self._cache) > 20_000:
            self._cache.clear()
        self._cache[k] = why
        return why

    def refusals(self, peers: Iterable[pb.Peer]) -> dict[str, Refusal]:
        """The refused peers among ``peers``, by public key."""
        out: dict[str, Refusal] = {}
        for p in peers:
            why = self.reason(p)
            if why is not None and p.public_key not in out:
                out[p.public_key] = Refusal(p.resource, p.public_key, why)
        return out


def without(msg: pb.DesiredState, refused: dict[str, Refusal]) -> pb.DesiredState:
    """A copy of ``msg`` without the refused peers, the routes through them and a
    default route through one of them."""
    out = pb.DesiredState()
    out.CopyFrom(msg)
    if not refused:
        return out
    kept = [p for p in msg.peers if p.public_key not in refused]
    del out.peers[:]
    out.peers.extend(kept)
    routes = [r for r in msg.routes if r.via_peer not in refused]
    del out.routes[:]
    out.routes.extend(routes)
    if out.default_route_via_peer in refused:
        out.default_route_via_peer = ""
    return out


def summary(refused: Sequence[Refusal]) -> str:
    """``refused 2 peers: networks/n/nodes/x: <reason>; ...`` (no key material but public keys)."""
    n = len(refused)
    return f"refused {n} peer{'s' if n != 1 else ''}: " + "; ".join(
        str(r) for r in sorted(refused, key=lambda r: (r.resource, r.public_key)))
