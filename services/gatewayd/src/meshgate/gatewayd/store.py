"""gatewayd's state directory: what lets a node restore its data plane alone.

Layout (directory mode 0700)::

    private.key              the node's WireGuard private key (0600, see keys.py)
    desired.pb               the last desired state applied successfully (binary protobuf)
    status.json              what the agent last did: applied revision, errors, counters
    nft.json                 the canonical listing of the loaded nftables table
    wireguard-go.<if>.pid    the supervised wireguard-go process
    wireguard-go.<if>.log    its output

Files are replaced atomically (write, then rename), so a crash leaves the previous
version, never half a file.  The desired state holds pre-shared keys: it is written
0600 like the private key.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.gatewayd import keys


class StateStore:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def nft_cache(self) -> Path:
        return self.dir / "nft.json"

    def keypair(self) -> tuple[keys.Secret, str]:
        return keys.load_or_create(self.dir)

    def _write(self, name: str, data: bytes, mode: int = 0o600) -> None:
        tmp = self.dir / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.dir / name)

    def load_desired(self) -> pb.DesiredState | None:
        try:
            data = (self.dir / "desired.pb").read_bytes()
        except FileNotFoundError:
            return None
        msg = pb.DesiredState()
        msg.ParseFromString(data)
        return msg

    def save_desired(self, msg: pb.DesiredState) -> None:
        self._write("desired.pb", msg.SerializeToString())

    def clear_desired(self) -> None:
        (self.dir / "desired.pb").unlink(missing_ok=True)

    def write_status(self, status: dict[str, Any]) -> None:
        status = dict(status, updated_at=time.time())
        self._write("status.json", json.dumps(status, indent=1, sort_keys=True).encode(), 0o644)

    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}
