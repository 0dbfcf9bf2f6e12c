"""The userspace backend: gatewayd starts and supervises ``wireguard-go`` for its
interface and configures it over the UAPI socket.

wireguard-go runs in the foreground (``-f``) in a session of its own, so it survives
gatewayd being stopped or killed: the data plane outlives the agent.  Its PID is
recorded in the state directory; a restarted gatewayd adopts the running process
(the socket answers) instead of starting a second one, and stops only the PID it
recorded, after checking that PID still is wireguard-go for that interface.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from meshgate.gatewayd.errors import ApplyError
from meshgate.gatewayd.keys import Secret, public_key_of_raw
from meshgate.gatewayd.model import ObservedDevice, PeerSpec
from meshgate.gatewayd.planner import DeviceChange, PeerOp
from meshgate.gatewayd.wireguard import PeerStats
from meshgate.gatewayd.wireguard.uapi import UapiClient, UapiDevice, b64_to_hex, socket_path

log = logging.getLogger(__name__)
ZERO_HEX = "0" * 64


def device_to_observed(dev: UapiDevice) -> tuple[ObservedDevice, dict[str, PeerStats]]:
    pub = None
    if dev.private_key_hex and dev.private_key_hex != ZERO_HEX:
        pub = public_key_of_raw(bytes.fromhex(dev.private_key_hex))
    peers: dict[str, PeerSpec] = {}
    stats: dict[str, PeerStats] = {}
    for p in dev.peers:
        psk = None
        if p.preshared_key_hex and p.preshared_key_hex != ZERO_HEX:
            psk = Secret(base64.b64encode(bytes.fromhex(p.preshared_key_hex)).decode())
        peers[p.public_key] = PeerSpec(
            public_key=p.public_key,
            allowed_ips=frozenset(p.allowed_ips),
            preshared_key=psk,
            endpoint=p.endpoint,
            keepalive=p.keepalive,
        )
        stats[p.public_key] = PeerStats(p.endpoint, p.last_handshake_sec,
                                        p.last_handshake_nsec, p.rx_bytes, p.tx_bytes)
    return ObservedDevice(pub, dev.listen_port, dev.fwmark, peers), stats


def uapi_lines(private_key: Secret | None, device: DeviceChange | None,
               ops: Sequence[PeerOp]) -> list[str]:
    lines: list[str] = []
    if device is not None:
        if device.set_private_key:
            if private_key is None:
                raise ApplyError("wireguard", "private key change planned but no key given")
            lines.append("private_key=" + b64_to_hex(private_key.reveal()))
        if device.listen_port is not None:
            lines.append(f"listen_port={device.listen_port}")
        if device.fwmark is not None:
            lines.append(f"fwmark={device.fwmark}")
    for op in ops:
        lines.append("public_key=" + b64_to_hex(op.public_key))
        if op.kind == "remove":
            lines.append("remove=true")
            continue
        if op.kind == "update":
            lines.append("update_only=true")
        if op.preshared_key is not None:
            lines.append("preshared_key=" + b64_to_hex(op.preshared_key.reveal()))
        elif op.clear_preshared_key:
            lines.append("preshared_key=" + ZERO_HEX)
        if op.endpoint is not None:
            lines.append("endpoint=" + op.endpoint)
        if op.keepalive is not None and (op.keepalive or op.kind == "update"):
            lines.append(f"persistent_keepalive_interval={op.keepalive}")
        if op.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines.extend("allowed_ip=" + a for a in sorted(op.allowed_ips))
    return lines


def kick_lines(peers: Mapping[str, int]) -> list[str]:
    """Make wireguard-go send each peer a keepalive now (and so start a handshake when
    it has no session): persistent keepalive is turned off, on (turning it on sends one
    at once) and back to its configured value, in one transaction."""
    lines: list[str] = []
    for key, keepalive in sorted(peers.items()):
        h = "public_key=" + b64_to_hex(key)
        for value in (0, 1, keepalive):
            lines += [h, "update_only=true", f"persistent_keepalive_interval={value}"]
    return lines


class UserspaceBackend:
    name = "userspace"

    def __init__(self, state_dir: Path, binary: str = "wireguard-go", log_level: str = "error",
                 start_timeout: float = 10.0):
        self.state_dir = state_dir
        self.binary = binary
        self.log_level = log_level
        self.start_timeout = start_timeout
        self._children: dict[str, subprocess.Popen] = {}

    # -- process bookkeeping

    def pid_file(self, ifname: str) -> Path:
        return self.state_dir / f"wireguard-go.{ifname}.pid"

    def recorded_pid(self, ifname: str) -> int | None:
        try:
            pid = int(self.pid_file(ifname).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_wireguard_go(pid, ifname) else None

    def _client(self, ifname: str) -> UapiClient:
        return UapiClient(socket_path(ifname))

    # -- Backend

    def observe(self, ifname: str) -> tuple[ObservedDevice, dict[str, PeerStats]] | None:
        if not socket_path(ifname).exists():
            return None
        try:
            dev = self._client(ifname).get()
        except ApplyError:
            return None  # stale socket: the process is gone
        return device_to_observed(dev)

    def create(self, ifname: str) -> None:
        if self.observe(ifname) is not None:
            return  # a live wireguard-go already serves this interface: adopt it
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        logf = open(self.state_dir / f"wireguard-go.{ifname}.log", "ab")
        env = dict(os.environ, LOG_LEVEL=self.log_level, WG_PROCESS_FOREGROUND="1")
        try:
            proc = subprocess.Popen(
                [self.binary, "-f", ifname], stdin=subprocess.DEVNULL, stdout=logf,
                stderr=logf, env=env, start_new_session=True, close_fds=True,
            )
        except OSError as e:
            raise ApplyError("wireguard", f"cannot start {self.binary}: {e}") from None
        finally:
            logf.close()
        self._children[ifname] = proc
        tmp = self.pid_file(ifname).with_suffix(".tmp")
        tmp.write_text(f"{proc.pid}\n")
        os.replace(tmp, self.pid_file(ifname))
        deadline = time.monotonic() + self.start_timeout
        client = self._client(ifname)
        while True:
            if proc.poll() is not None:
                raise ApplyError("wireguard", f"{self.binary} {ifname} exited with {proc.returncode}; "
                                 f"see {self.state_dir}/wireguard-go.{ifname}.log")
            if socket_path(ifname).exists():
                try:
                    client.get()
                    break
                except ApplyError:
                    pass
            if time.monotonic() > deadline:
                raise ApplyError("wireguard", f"{self.binary} {ifname} did not open its UAPI socket")
            time.sleep(0.01)
        log.info("started wireguard-go for %s (pid %d)", ifname, proc.pid)

    def configure(self, ifname: str, private_key: Secret | None, device: DeviceChange | None,
                  ops: Sequence[PeerOp]) -> None:
        self._client(ifname).set(uapi_lines(private_key, device, ops))

    def kick(self, ifname: str, peers: Mapping[str, int]) -> None:
        self._client(ifname).set(kick_lines(peers))

    def destroy(self, ifname: str) -> None:
        pid = self.recorded_pid(ifname)
        child = self._children.pop(ifname, None)
        if pid is not None:
            _terminate(pid, child)
        self.pid_file(ifname).unlink(missing_ok=True)

    def alive(self, ifname: str) -> bool:
        child = self._children.get(ifname)
        if child is not None:
            if child.poll() is None:
                return True
            log.warning("wireguard-go for %s exited with %s", ifname, child.returncode)
            del self._children[ifname]
            return False
        if self.recorded_pid(ifname) is not None:  # adopted from an earlier gatewayd
            return True
        return self.observe(ifname) is not None  # started by someone else: ask it


def _is_wireguard_go(pid: int, ifname: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"wireguard-go") for a in argv[:1]) and ifname.encode() in argv


def _terminate(pid: int, child: subprocess.Popen | None, timeout: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None:
            if child.poll() is not None:
                return
        elif not Path(f"/proc/{pid}").exists() or _zombie(pid):
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if child is not None:
        child.wait(timeout)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
