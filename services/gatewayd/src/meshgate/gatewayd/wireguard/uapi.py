"""A client of the WireGuard cross-platform UAPI (wireguard-go's control socket).

The protocol (https://www.wireguard.com/xplatform/) is line based over a unix socket
``/var/run/wireguard/<ifname>.sock``: a request is ``get=1`` or ``set=1`` followed by
``key=value`` lines and an empty line; the answer ends with ``errno=N`` and an empty
line.  Keys are lowercase hex, not base64.  In a ``set``, lines after a
``public_key=`` apply to that peer until the next one.

Hazards: ``get`` returns the private key and pre-shared keys; they are wrapped in
``Secret`` straight away and the raw text is never logged or put in an exception.
The socket directory is global (not per network namespace), so interface names must
be unique on the host.
"""

from __future__ import annotations

import base64
import socket
from dataclasses import dataclass, field
from pathlib import Path

from meshgate.gatewayd.errors import ApplyError

SOCKET_DIR = Path("/var/run/wireguard")


def socket_path(ifname: str) -> Path:
    return SOCKET_DIR / f"{ifname}.sock"


def b64_to_hex(key: str) -> str:
    return base64.b64decode(key).hex()


def hex_to_b64(key: str) -> str:
    return base64.b64encode(bytes.fromhex(key)).decode()


@dataclass
class UapiPeer:
    public_key: str  # base64
    preshared_key_hex: str = ""
    endpoint: str | None = None
    keepalive: int = 0
    allowed_ips: list[str] = field(default_factory=list)
    last_handshake_sec: int = 0
    last_handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0

    def __repr__(self) -> str:
        return f"UapiPeer({self.public_key[:8]}…, endpoint={self.endpoint})"


@dataclass
class UapiDevice:
    private_key_hex: str = ""
    listen_port: int = 0
    fwmark: int = 0
    peers: list[UapiPeer] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"UapiDevice(listen_port={self.listen_port}, {len(self.peers)} peers)"


class UapiError(ApplyError):
    def __init__(self, message: str, errno: int | None = None):
        self.errno = errno
        super().__init__("wireguard", message)


class UapiClient:
    def __init__(self, path: Path, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout

    def _exchange(self, request: bytes) -> str:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(str(self.path))
            except OSError as e:
                raise UapiError(f"cannot connect to {self.path}: {e.strerror or e}") from None
            s.sendall(request)
            chunks: list[bytes] = []
            tail = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                tail = (tail + chunk)[-2:]
                if tail == b"\n\n":
                    break
        except TimeoutError:
            raise UapiError(f"timeout talking to {self.path}") from None
        finally:
            s.close()
        return b"".join(chunks).decode()

    @staticmethod
    def _errno(text: str) -> int:
        for line in reversed(text.splitlines()):
            if line.startswith("errno="):
                return int(line[6:])
        raise UapiError("malformed UAPI answer (no errno line)")

    def get(self) -> UapiDevice:
        text = self._exchange(b"get=1\n\n")
        err = self._errno(text)
        if err:
            raise UapiError(f"get failed: errno={err}", err)
        return parse_get(text)

    def set(self, lines: list[str]) -> None:
        if not lines:
            return
        request = "set=1\n" + "\n".join(lines) + "\n\n"
        text = self._exchange(request.encode())
        err = self._errno(text)
        if err:
            # the request holds keys; report only the errno
            raise UapiError(f"set failed: errno={err}", err)


def parse_get(text: str) -> UapiDevice:
    dev = UapiDevice()
    peer: UapiPeer | None = None
    for line in text.splitlines():
        if not line or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if key == "public_key":
            peer = UapiPeer(public_key=hex_to_b64(value))
            dev.peers.append(peer)
        elif peer is None:
            if key == "private_key":
                dev.private_key_hex = value
            elif key == "listen_port":
                dev.listen_port = int(value)
            elif key == "fwmark":
                dev.fwmark = int(value)
        elif key == "preshared_key":
            peer.preshared_key_hex = value
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "persistent_keepalive_interval":
            peer.keepalive = int(value)
        elif key == "allowed_ip":
            peer.allowed_ips.append(value)
        elif key == "last_handshake_time_sec":
            peer.last_handshake_sec = int(value)
        elif key == "last_handshake_time_nsec":
            peer.last_handshake_nsec = int(value)
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
    return dev
