"""Which peers the agent accepts: signed peer keys, of its own network, by a
key authority pinned outside the control plane.

**Pinning.** The key authority's public keys reach the agent in the control
plane's answer to ``Enroll`` (``key_authority_public_keys``), but the agent
keeps only those that match a pin it got elsewhere: the fingerprints the
enrollment secret carries (``mgek_....ka_<fingerprint>``, one suffix per
authority key, added by a control plane that has a key service; see
``pins_of_secret``) or the keys given with ``gatewayd join --authority-key``.
A control plane that presents another authority is refused at join, so it
cannot have its own keys signed into the mesh.  The fingerprint is the first
128 bits of SHA-256 of the raw 32-byte Ed25519 key, unpadded base64url
(``fingerprint``): finding another key with the same fingerprint costs 2^128
work.

**Verification.** An agent that holds authority keys accepts a peer only when
its ``public_key_signature`` is a valid Ed25519 signature by one of them over
the binding of the peer's resource name and public key
(``meshgate.common.signing``) and that resource belongs to the agent's own
network (``networks/<its network>/...``): a key properly signed for a node of
another network is refused like an unsigned one.  A peer that fails is
*refused*: dropped from the desired state before validation and planning
(together with the routes and the default route that name it), while the rest
of the state applies.  Refusals are logged with the peer's resource, public key
and reason, and reported to the control plane in the ack of that revision.

Without authority keys (an agent joined with ``--insecure-no-authority`` to a
control plane that has no key service, or ``gatewayd run --file``) nothing is
verified: the development mode, which ``gatewayd run`` logs as a WARNING on
every start.

Verification results are cached by (resource, public key, signature), so a delta
against a state of thousands of peers costs a dictionary lookup per unchanged
peer, not a signature check.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.common import signing
from meshgate.common.signing import authority_fingerprint, split_pins

log = logging.getLogger(__name__)

UNSIGNED = "public key not signed by the key authority"
BAD_SIGNATURE = "public key signature is not the key authority's for this peer and key"
NO_RESOURCE = "no resource name to check the key's signature against"
OTHER_NETWORK = "resource is not in this node's network ({network})"
ERROR_REASON = "PEER_KEY_REFUSED"
ERROR_DOMAIN = "gatewayd.meshgate"


@dataclass(frozen=True)
class Refusal:
    resource: str
    public_key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.resource or self.public_key}: {self.reason}"




fingerprint = authority_fingerprint  # the pin of one authority key (meshgate.common.signing)
pins_of_secret = split_pins  # (the secret without its pins, the fingerprints it carries)


def parse_authority_key(text: str) -> bytes:
    """A ``--authority-key`` value: the standard base64 of a raw 32-byte Ed25519
    public key (as ``KeyAuthority.public_keys``).  Raises ValueError."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"--authority-key {text!r} is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"--authority-key {text!r} is {len(raw)} bytes, not a 32-byte Ed25519 public key")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError(f"--authority-key {text!r} is not an Ed25519 public key") from None
    return raw


class PinMismatch(Exception):
    """The control plane presented key authority keys that match no pin."""


def pinned_keys(presented: Iterable[bytes], pins: Iterable[str]) -> tuple[bytes, ...]:
    """The presented authority keys that match one of ``pins`` (fingerprints), in
    the order presented; raises PinMismatch when none does."""
    want = set(pins)
    presented = [bytes(k) for k in presented]
    kept = tuple(k for k in presented if fingerprint(k) in want)
    if not kept:
        shown = ", ".join(fingerprint(k) for k in presented) or "none"
        raise PinMismatch(
            f"the control plane presented key authority key(s) {shown}, which match none of the pinned "
            f"fingerprint(s) {', '.join(sorted(want))}: it is not the key authority this node was told to trust")
    return kept


class PeerVerifier:
    """Checks peers' key signatures against the key authority's public keys, and
    that each peer belongs to ``network`` (``networks/<id>``)."""

    def __init__(self, authority_keys: Iterable[bytes], network: str):
        self.keys: list[Ed25519PublicKey] = []
        for raw in authority_keys:
            # raises ValueError on a malformed key: a broken identity file is a host problem
            self.keys.append(Ed25519PublicKey.from_public_bytes(bytes(raw)))
        if not self.keys:
            raise ValueError("a verifier needs at least one key authority public key")
        parts = network.split("/")
        if len(parts) != 2 or parts[0] != "networks" or not parts[1]:
            raise ValueError(f"a verifier needs this node's network (networks/<id>), not {network!r}")
        self.network = network
        self._prefix = network + "/"
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
        elif not peer.resource.startswith(self._prefix) or peer.resource.count("/") != 3:
            why = OTHER_NETWORK.format(network=self.network)
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
