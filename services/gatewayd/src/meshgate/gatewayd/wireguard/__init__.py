"""WireGuard, two backends behind one interface.

``kernel`` talks generic netlink to the kernel module (through pyroute2);
``userspace`` supervises a ``wireguard-go`` process and speaks its UAPI socket
protocol.  Both take the planner's per-peer operations as they are: a peer is added,
updated in place (``update_only``) or removed, never rebuilt, and the device's peer
list is never replaced wholesale, so other peers' sessions are untouched.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meshgate.gatewayd.keys import Secret
from meshgate.gatewayd.model import ObservedDevice
from meshgate.gatewayd.planner import DeviceChange, PeerOp


@dataclass(frozen=True)
class PeerStats:
    endpoint: str | None
    last_handshake_sec: int
    last_handshake_nsec: int
    rx_bytes: int
    tx_bytes: int


class Backend(Protocol):
    name: str

    def observe(self, ifname: str) -> tuple[ObservedDevice, dict[str, PeerStats]] | None:
        """The device's configuration and per-peer counters; None if it does not exist."""

    def create(self, ifname: str) -> None:
        """Make the interface exist (empty, down)."""

    def configure(
        self, ifname: str, private_key: Secret | None, device: DeviceChange | None,
        ops: Sequence[PeerOp],
    ) -> None:
        """Apply device settings and peer operations, in that order."""

    def kick(self, ifname: str, peers: Mapping[str, int]) -> None:
        """Send every peer (public key -> its persistent keepalive) a keepalive now, so a
        handshake starts at once after a private-key change."""

    def destroy(self, ifname: str) -> None:
        """Remove the interface (and stop its process, if any)."""

    def alive(self, ifname: str) -> bool:
        """False when the data plane is gone (e.g. wireguard-go died)."""


def kernel_module_available() -> bool:
    """Whether this host can create a ``wireguard`` link (a throwaway probe)."""
    probe = "mgprobe0"
    r = subprocess.run(["ip", "link", "add", probe, "type", "wireguard"],
                       capture_output=True, text=True, check=False)
    if r.returncode == 0:
        subprocess.run(["ip", "link", "del", probe], capture_output=True, check=False)
        return True
    return False


def choose_backend(name: str, state_dir: Path, wireguard_go: str = "wireguard-go",
                   log_level: str = "error") -> Backend:
    if name == "auto":
        name = "kernel" if kernel_module_available() else "userspace"
    if name == "kernel":
        from meshgate.gatewayd.wireguard.kernel import KernelBackend

        return KernelBackend()
    from meshgate.gatewayd.wireguard.userspace import UserspaceBackend

    return UserspaceBackend(state_dir, binary=wireguard_go, log_level=log_level)
