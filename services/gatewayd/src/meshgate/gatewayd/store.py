"""gatewayd's state directory: what lets a node restore its data plane alone.

Layout (directory mode 0700)::

    private.key              the node's WireGuard private key (0600, see keys.py)
    identity.json            the node's identity and join options (0600, see stream.py)
    interfaces.json          the WireGuard interfaces gatewayd created (and so may manage)
    run.json                 the interface name `run` was given, for `show` and `down` (main.py)
    desired.pb               the last desired state applied successfully (binary protobuf)
    status.json              what the agent last did: applied revision, errors, counters
    nft.json                 the canonical listing of the loaded nftables table
    wireguard-go.<if>.pid    the supervised wireguard-go process
    wireguard-go.<if>.log    its output

Files are replaced atomically (write, then rename), so a crash leaves the previous
version, never half a file.  The desired state holds pre-shared keys: it is written
0600 like the private key.

``interfaces.json`` is what makes an interface gatewayd's: a name is recorded
there right before gatewayd creates the interface, and removed when gatewayd
destroys it.  An interface of the configured name that exists without a record
(someone's ``wg0``) is never touched (reconciler.py).  The record carries the
kernel's boot id: no interface survives a reboot, so after one the record is
void, and a ``wg0`` that wg-quick brought up at boot is not mistaken for the
one gatewayd made before.
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

    def created_interfaces(self) -> set[str] | None:
        """The interfaces gatewayd recorded creating since this boot; None when
        there is no record yet (a state directory of a gatewayd before the record
        existed)."""
        try:
            data = json.loads((self.dir / "interfaces.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return set()  # unreadable: own nothing, so touch nothing
        if not isinstance(data, dict) or data.get("boot_id") != _boot_id():
            return set()
        return {str(n) for n in data.get("created", [])}

    def _save_interfaces(self, names: set[str]) -> None:
        data = {"boot_id": _boot_id(), "created": sorted(names)}
        self._write("interfaces.json", json.dumps(data).encode(), 0o644)

    def record_created(self, ifname: str) -> None:
        names = self.created_interfaces() or set()
        if ifname not in names:
            self._save_interfaces(names | {ifname})

    def forget_created(self, ifname: str) -> None:
        names = self.created_interfaces() or set()
        self._save_interfaces(names - {ifname})

    def write_status(self, status: dict[str, Any]) -> None:
        status = dict(status, updated_at=time.time())
        self._write("status.json", json.dumps(status, indent=1, sort_keys=True).encode(), 0o644)

    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
