"""Signatures over node public keys: the one definition of what is signed.

The key authority (an Ed25519 key held by the key service) signs a canonical
binding of a node's resource name, which includes its network, and the node's
raw 32-byte WireGuard public key. An agent accepts a peer only if the peer's
key carries a valid signature for exactly that peer's resource name, so a key
written into etcd by anything else, or a signed key moved to another node or
network, is refused.

This module depends only on `cryptography` (and the standard library) so that
gatewayd can import it without pulling in the key service, gRPC or etcd.

Hazard: `binding()` is a wire format. Changing it invalidates every signature
in the field; a new format needs a new domain tag (`meshgate-node-key-v2`) and
a period in which agents accept both.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DOMAIN = b"meshgate-node-key-v1\0"
KEY_LEN = 32


def raw_key(public_key: str | bytes) -> bytes | None:
    """The 32 raw bytes of a WireGuard key given raw or as standard base64; None if it is neither."""
    if isinstance(public_key, (bytes, bytearray)):
        raw = bytes(public_key)
    else:
        try:
            raw = base64.b64decode(public_key, validate=True)
        except (binascii.Error, ValueError):
            return None
    return raw if len(raw) == KEY_LEN else None


def binding(node: str, public_key: bytes) -> bytes:
    """The exact bytes the authority signs for `node` (`networks/{n}/nodes/{id}`) and its raw key."""
    if len(public_key) != KEY_LEN:
        raise ValueError("a WireGuard public key is 32 bytes")
    if "\0" in node:
        raise ValueError("a resource name cannot contain NUL")
    return DOMAIN + node.encode() + b"\0" + public_key


def key_id(authority_public_key: bytes) -> str:
    """The id of an authority key: `ed25519:` and the first 16 hex digits of SHA-256 of its raw bytes."""
    return "ed25519:" + hashlib.sha256(authority_public_key).hexdigest()[:16]


def public_bytes(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(private_key: Ed25519PrivateKey, node: str, public_key: str | bytes) -> bytes:
    raw = raw_key(public_key)
    if raw is None:
        raise ValueError("public_key is not a 32-byte key (raw or base64)")
    return private_key.sign(binding(node, raw))


def verify(authority_public_key: bytes | Ed25519PublicKey, node: str, public_key: str | bytes, signature: bytes) -> bool:
    """True if `signature` is the authority's signature binding `public_key` to `node`.

    `authority_public_key` is the raw 32-byte Ed25519 key (as in
    `KeyAuthority.public_keys` and `EnrollResponse.key_authority_public_keys`);
    `public_key` is the peer's WireGuard key, raw or base64 (as in
    `Peer.public_key`); `node` is the peer's resource name (`Peer.resource`).
    Never raises on bad input: anything malformed is simply not valid.
    """
    raw = raw_key(public_key)
    if raw is None or not signature or "\0" in node:
        return False
    try:
        if not isinstance(authority_public_key, Ed25519PublicKey):
            authority_public_key = Ed25519PublicKey.from_public_bytes(bytes(authority_public_key))
        authority_public_key.verify(bytes(signature), binding(node, raw))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def verify_any(
    authority_public_keys: Iterable[bytes | Ed25519PublicKey], node: str, public_key: str | bytes, signature: bytes
) -> bool:
    """True if any of the authority keys (current and previous) signed the binding."""
    return any(verify(k, node, public_key, signature) for k in authority_public_keys)


# Pins of the key authority on enrollment secrets: trailing `.ka_{fingerprint}`
# segments, which the control plane appends (and ignores when hashing) and
# gatewayd requires the presented authority keys to match.
PIN_PREFIX = "ka_"
_PIN_RE = re.compile(r"ka_([A-Za-z0-9_-]{22})")


def authority_fingerprint(public_key: bytes) -> str:
    """The pin of one raw 32-byte Ed25519 authority key: 22 characters of
    unpadded base64url (the first 128 bits of its SHA-256)."""
    return base64.urlsafe_b64encode(hashlib.sha256(bytes(public_key)).digest()[:16]).decode().rstrip("=")


def split_pins(secret: str) -> tuple[str, tuple[str, ...]]:
    """(the secret without its pins, the fingerprints it carries, in order)."""
    base = secret
    pins: list[str] = []
    while True:
        head, sep, tail = base.rpartition(".")
        m = _PIN_RE.fullmatch(tail) if sep else None
        if m is None:
            return base, tuple(reversed(pins))
        pins.append(m.group(1))
        base = head
