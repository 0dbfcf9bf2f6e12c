"""Encryption at rest: AES-256-GCM envelopes under operator-held key-encryption keys.

Every secret the key service keeps in etcd is stored as one envelope:

    b"mgs1" | u16 header length | header | 12-byte nonce | ciphertext+tag

The header is compact JSON with sorted keys. It is not secret (it names the
key-encryption key, "kek", and carries metadata such as a pre-shared key's
generation), so anything may read it without a key (`header()`), but it is
authenticated: the associated data of the encryption is

    b"meshgate-keyservice-sealed-v1\\0" + the etcd key below the prefix + b"\\0" + header

so a ciphertext copied to another key path, or a header edited (another
generation, another KEK id), no longer decrypts.

A key-encryption key (KEK) is 32 random bytes with an id. Operators give them
as lines `<id>:<base64 of 32 bytes>` in a file or an environment variable;
several may be held at once during a rotation.

The key service refuses a KEK file that others could read
(`check_private_file`): no access for "others", and no group access either,
except in the layout of a Kubernetes Secret volume (owned by root, group the
service's own group, `defaultMode: 0440`), where the group is the pod's.

Hazards:
- Nothing here may put key material into an exception message, a log record
  or a repr. `Keyring.__repr__` shows ids only.
- A nonce must never repeat under one KEK: nonces are 96 random bits per seal
  (safe far beyond the number of secrets a key service keeps).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"mgs1"
AD_DOMAIN = b"meshgate-keyservice-sealed-v1\0"
NONCE_LEN = 12
KEK_LEN = 32
KEK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
KEK_ID_RULE = "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"


class KekError(Exception):
    """The key-encryption keys are missing, malformed or do not match the store (fatal at start)."""


class SealError(Exception):
    """A stored envelope is malformed or does not decrypt under the key it names."""


def generate_kek() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def kek_line(kek_id: str, key: bytes | None = None) -> str:
    """A line for a KEK file: `<id>:<base64>` (a new random key unless one is given)."""
    if not KEK_ID_RE.match(kek_id):
        raise KekError(f"KEK id {kek_id!r} is not valid: {KEK_ID_RULE}")
    return f"{kek_id}:{base64.b64encode(key or generate_kek()).decode()}"


def parse_keks(text: str, source: str) -> list[tuple[str, bytes]]:
    """KEKs from `<id>:<base64>` entries, one per line (or separated by commas or spaces).

    `#` starts a comment. Error messages name the source and the entry's
    position, never its content."""
    out: list[tuple[str, bytes]] = []
    entries: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        entries += [e for e in re.split(r"[\s,]+", line) if e]
    seen: set[str] = set()
    for n, entry in enumerate(entries, 1):
        kek_id, sep, b64 = entry.partition(":")
        if not sep:
            raise KekError(f"{source}: entry {n} is not '<id>:<base64 of 32 bytes>'")
        if not KEK_ID_RE.match(kek_id):
            raise KekError(f"{source}: entry {n}: KEK id is not valid ({KEK_ID_RULE})")
        try:
            key = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise KekError(f"{source}: KEK {kek_id!r} is not valid base64") from None
        if len(key) != KEK_LEN:
            raise KekError(f"{source}: KEK {kek_id!r} is {len(key)} bytes; a KEK is 32 random bytes")
        if kek_id in seen:
            raise KekError(f"{source}: KEK {kek_id!r} is given twice")
        seen.add(kek_id)
        out.append((kek_id, key))
    return out


def _header_bytes(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def split(value: bytes) -> tuple[bytes, dict[str, Any], bytes, bytes]:
    """(raw header, header, nonce, ciphertext) of an envelope."""
    if len(value) < 6 or value[:4] != MAGIC:
        raise SealError("not a sealed value")
    (hlen,) = struct.unpack(">H", value[4:6])
    raw = value[6 : 6 + hlen]
    rest = value[6 + hlen :]
    if len(raw) != hlen or len(rest) < NONCE_LEN + 16:
        raise SealError("truncated sealed value")
    try:
        hdr = json.loads(raw)
    except ValueError:
        raise SealError("sealed value has a malformed header") from None
    if not isinstance(hdr, dict) or not isinstance(hdr.get("kek"), str):
        raise SealError("sealed value header names no KEK")
    return raw, hdr, rest[:NONCE_LEN], rest[NONCE_LEN:]


def header(value: bytes) -> dict[str, Any]:
    """The authenticated-but-public header of an envelope, read without any key."""
    return split(value)[1]


def _ad(path: str, raw_header: bytes) -> bytes:
    return AD_DOMAIN + path.encode() + b"\0" + raw_header


def check_private_file(path: str, st: os.stat_result) -> None:
    """Raise KekError unless the KEK file ``path`` (``st`` from fstat of the open
    file) is readable by its owner only: owned by this process's user or root,
    no permission bits for others, none for the group unless it is root's file
    whose group is this process's own (a Kubernetes Secret volume with fsGroup)."""
    mode = stat.S_IMODE(st.st_mode)
    euid = os.geteuid()
    fix = f"make it readable by its owner only (chmod 600 {path})"
    if st.st_uid not in (euid, 0):
        raise KekError(f"refusing the KEK file {path}: it is owned by uid {st.st_uid}, neither this "
                       f"service's user (uid {euid}) nor root; {fix}")
    if mode & 0o007:
        raise KekError(f"refusing the KEK file {path}: it is accessible by every user of this host "
                       f"(mode {mode:04o}); {fix}")
    if mode & 0o070:
        k8s = st.st_uid == 0 and euid != 0 and st.st_gid in {os.getegid(), *os.getgroups()} and not mode & 0o020
        if not k8s:
            raise KekError(f"refusing the KEK file {path}: it is accessible by its group (gid {st.st_gid}, "
                           f"mode {mode:04o}); {fix}")


class Keyring:
    """The KEKs this process holds, by id, in the order the operator listed them.

    `reload()` re-reads the sources (the KEK file), so a new KEK added to the
    file is picked up without a restart when a record or a rotation names it.
    """

    def __init__(self, keys: list[tuple[str, bytes]], loader: Callable[[], list[tuple[str, bytes]]] | None = None):
        self._keys = dict(keys)
        self._order = [k for k, _ in keys]
        self._loader = loader

    @classmethod
    def from_config(cls, kek_file: str, kek_inline: str, *, private_file: bool = False) -> Keyring:
        """The KEKs of the file and the inline entries.  ``private_file`` (the key
        service does this at start and on every re-read): refuse a KEK file that
        others may read (``check_private_file``)."""
        def load() -> list[tuple[str, bytes]]:
            keys: list[tuple[str, bytes]] = []
            if kek_file:
                try:
                    with open(kek_file, encoding="ascii", errors="replace") as f:
                        if private_file:
                            check_private_file(kek_file, os.fstat(f.fileno()))
                        text = f.read()
                except OSError as e:
                    raise KekError(f"cannot read the KEK file {kek_file}: {e.strerror}") from None
                keys += parse_keks(text, f"KEK file {kek_file}")
            if kek_inline:
                for kid, key in parse_keks(kek_inline, "KEK from the environment/flag"):
                    if any(kid == k for k, _ in keys):
                        raise KekError(f"KEK {kid!r} is given both in the file and in the environment/flag")
                    keys.append((kid, key))
            return keys

        keys = load()
        if not keys:
            raise KekError(
                "no key-encryption key configured: pass --kek-file (or MESHGATE_KEYSERVICE_KEK_FILE) naming a file "
                "of '<id>:<base64 of 32 bytes>' lines, or set MESHGATE_KEYSERVICE_KEK; "
                "create one with `python -m meshgate.keyservice.sealing new <id>`"
            )
        return cls(keys, load)

    def __repr__(self) -> str:
        return f"Keyring(ids={self._order!r})"

    @property
    def ids(self) -> list[str]:
        return list(self._order)

    @property
    def primary(self) -> str:
        return self._order[0]

    def has(self, kek_id: str) -> bool:
        return kek_id in self._keys

    def reload(self) -> None:
        """Re-read the KEK sources; keeps the current keys if reading fails."""
        if self._loader is None:
            return
        try:
            keys = self._loader()
        except KekError:
            return
        if keys:
            self._keys = dict(keys)
            self._order = [k for k, _ in keys]

    def seal(self, kek_id: str, path: str, meta: dict[str, Any], secret: bytes) -> bytes:
        if kek_id not in self._keys:
            raise KekError(f"key-encryption key {kek_id!r} is not held by this replica")
        hdr = dict(meta)
        hdr["kek"] = kek_id
        raw = _header_bytes(hdr)
        if len(raw) > 0xFFFF:
            raise ValueError("header too large")
        nonce = os.urandom(NONCE_LEN)
        ct = AESGCM(self._keys[kek_id]).encrypt(nonce, secret, _ad(path, raw))
        return MAGIC + struct.pack(">H", len(raw)) + raw + nonce + ct

    def open(self, path: str, value: bytes) -> tuple[dict[str, Any], bytes]:
        """(header, secret) of an envelope stored at `path`. Raises SealError or KekError."""
        raw, hdr, nonce, ct = split(value)
        kek_id = hdr["kek"]
        if kek_id not in self._keys:
            self.reload()
        if kek_id not in self._keys:
            raise KekError(f"the secret at {path} is encrypted under key-encryption key {kek_id!r}, "
                           "which this replica does not hold")
        try:
            return hdr, AESGCM(self._keys[kek_id]).decrypt(nonce, ct, _ad(path, raw))
        except InvalidTag:
            raise SealError(f"the secret at {path} does not decrypt under key-encryption key {kek_id!r} "
                            "(wrong key, or the value was moved or altered)") from None


def main(argv: list[str] | None = None) -> None:
    """`python -m meshgate.keyservice.sealing new <id>`: print a new KEK line."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "new":
        raise SystemExit("usage: python -m meshgate.keyservice.sealing new <kek-id>  (prints '<id>:<base64>')")
    try:
        print(kek_line(args[1]))
    except KekError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
