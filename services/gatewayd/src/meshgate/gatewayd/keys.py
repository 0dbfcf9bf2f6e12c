"""The node's WireGuard key pair and the ``Secret`` wrapper for key material.

The private key is generated here, on the node, and never leaves it: it is written
once to ``<state_dir>/private.key``, created with mode 0600 (never chmod-ed after the
fact, so it is never readable by others even for an instant), and is only revealed to
the WireGuard backend.  ``Secret`` keeps keys out of ``repr``/``str`` so they cannot
reach a log line or an exception message by accident.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_LEN = 32
PRIVATE_KEY_FILE = "private.key"


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


def decode_key(text: str) -> bytes | None:
    """The 32 raw bytes of a base64 WireGuard key, or None when it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_LEN else None


def is_valid_key(text: str) -> bool:
    return decode_key(text) is not None


def _clamp(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def generate_private_key() -> Secret:
    raw = X25519PrivateKey.generate().private_bytes_raw()
    return Secret(base64.b64encode(_clamp(raw)).decode())


def public_key_of(private: Secret) -> str:
    raw = decode_key(private.reveal())
    if raw is None:
        raise ValueError("private key is not a 32-byte base64 key")
    pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    return base64.b64encode(pub).decode()


def public_key_of_raw(raw: bytes) -> str:
    pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    return base64.b64encode(pub).decode()


def load_or_create(state_dir: Path) -> tuple[Secret, str]:
    """The node's (private, public) key pair, generating and storing it on first use."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / PRIVATE_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        text = path.read_text().strip()
        if decode_key(text) is None:
            raise ValueError(f"{path} does not hold a WireGuard private key") from None
        private = Secret(text)
        return private, public_key_of(private)
    private = generate_private_key()
    try:
        os.fchmod(fd, 0o600)  # the umask can only remove bits; make the mode exact
        os.write(fd, (private.reveal() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return private, public_key_of(private)
