"""The node's WireGuard key pair and the ``Secret`` wrapper for key material.

The private key is generated here, on the node, and never leaves it: it is written
once to ``<state_dir>/private.key``, created with mode 0600 (never chmod-ed after the
fact, so it is never readable by others even for an instant), and is only revealed to
the WireGuard backend.  ``Secret`` keeps keys out of ``repr``/``str`` so they cannot
reach a log line or an exception message by accident.

Node key rotation (``NodeKeys``): when the control plane asks for a new key, a second
pair is generated into ``<state_dir>/private.key.next`` (created 0600 under a temporary
name, then renamed into place, so a crash never leaves half a key) while the current
key stays in use.  When a desired state names the pending key's public half, the
pending file is renamed over ``private.key`` (atomic; the old private key is gone) and
the interface switches.  Asking again while a key is pending returns the same key.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_LEN = 32
PRIVATE_KEY_FILE = "private.key"
PENDING_KEY_FILE = "private.key.next"

log = logging.getLogger(__name__)


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


def _read_key_file(path: Path) -> Secret | None:
    """The private key in ``path``; None when absent.  Raises ValueError when the file
    does not hold a key (its content is never echoed)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if decode_key(text) is None:
        raise ValueError(f"{path} does not hold a WireGuard private key")
    return Secret(text)


def _write_key_file(path: Path, private: Secret) -> None:
    """Create ``path`` holding ``private``, mode 0600 from the first byte on: written
    under a temporary name (O_EXCL, O_NOFOLLOW) and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (private.reveal() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class KeyPair:
    private: Secret = field(repr=False)
    public: str


class NodeKeys:
    """The node's current key pair and, during a rotation, the pending one.

    Thread-safe: the agent asks for a pending key on its event loop while a pass
    (in a worker thread) may be promoting one.  ``current`` and ``pending`` are
    replaced whole, so readers never see half a switch.
    """

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self._lock = threading.Lock()
        private, public = load_or_create(self.dir)
        self.current = KeyPair(private, public)
        self.pending: KeyPair | None = None
        try:
            pending = _read_key_file(self.dir / PENDING_KEY_FILE)
        except ValueError as e:
            log.warning("%s; discarding it (a new one is made when a rotation asks)", e)
            (self.dir / PENDING_KEY_FILE).unlink(missing_ok=True)
            pending = None
        if pending is not None:
            pub = public_key_of(pending)
            if pub == public:  # cannot happen with rename, but never keep a twin
                (self.dir / PENDING_KEY_FILE).unlink(missing_ok=True)
            else:
                self.pending = KeyPair(pending, pub)

    def private_for(self, public_key: str) -> Secret | None:
        for pair in (self.current, self.pending):
            if pair is not None and pair.public == public_key:
                return pair.private
        return None

    def holds(self, public_key: str) -> bool:
        return self.private_for(public_key) is not None

    def ensure_pending(self) -> str:
        """The pending key's public half, generating the pair if none is pending."""
        with self._lock:
            if self.pending is None:
                private = generate_private_key()
                _write_key_file(self.dir / PENDING_KEY_FILE, private)
                self.pending = KeyPair(private, public_key_of(private))
                log.info("generated a new key pair for rotation; pending public key %s",
                         self.pending.public)
            return self.pending.public

    def promote(self, public_key: str) -> bool:
        """Make the pending key (whose public half is ``public_key``) the current one:
        ``private.key.next`` is renamed over ``private.key``.  False when that key is not
        pending (already promoted, or never generated here)."""
        with self._lock:
            if self.pending is None or self.pending.public != public_key:
                return self.current.public == public_key
            os.replace(self.dir / PENDING_KEY_FILE, self.dir / PRIVATE_KEY_FILE)
            _fsync_dir(self.dir)
            old = self.current.public
            self.current, self.pending = self.pending, None
            log.info("switched node key from %s to %s", old, self.current.public)
            return True
