"""Fixtures for the key service's tests, and the "never in the open" guard.

- `keks`: makes KEKs (`keks.new("k1") -> (id, bytes)`) and keyrings; every
  KEK made is registered as a secret.
- `core`: a started `KeyServiceCore` (scheduler off) on the test's etcd prefix.
- `ks`: that core served in-process over real gRPC, with a stub.
- `put_network(net, **fields)`: writes a Network where the control plane would.
- `kek_env(*ids, path=None)`: environment giving a key-service process KEKs.
- `secrets`: a list tests append every secret they were handed to (PSKs,
  client private keys, ...).
- `never_in_open` (autouse): captures every log record at DEBUG during the
  test (and the logs of processes the test put in `process_logs`); at the end, collects every secret the test's etcd prefix holds (by
  opening each envelope with every KEK the test made) plus `secrets` and
  the KEKs themselves, and fails if any of them appears, raw or as hex,
  base64 or urlsafe base64 (padded or not), in any raw etcd value under the
  prefix or in any log record (message, arguments, exception text).
"""

from __future__ import annotations

import base64
import logging
import os
from dataclasses import dataclass

import grpc
import pytest

from meshgate.api.v1 import keys_pb2_grpc, network_pb2
from meshgate.common.config import ServerConfig
from meshgate.common.etcd import Etcd
from meshgate.common.server import GrpcServer
from meshgate.keyservice.api import bindings
from meshgate.keyservice.core import KeyServiceCore
from meshgate.keyservice.sealing import Keyring, SealError, generate_kek, split
from meshgate.keyservice.vault import CHECK_PLAINTEXT


class Keks:
    def __init__(self) -> None:
        self.made: dict[str, bytes] = {}

    def new(self, kek_id: str) -> tuple[str, bytes]:
        self.made[kek_id] = generate_kek()
        return kek_id, self.made[kek_id]

    def ring(self, *ids: str) -> Keyring:
        return Keyring([(i, self.made[i]) for i in ids])

    def line(self, kek_id: str) -> str:
        return f"{kek_id}:{base64.b64encode(self.made[kek_id]).decode()}"


@pytest.fixture
def keks() -> Keks:
    return Keks()


@pytest.fixture
def secrets() -> list[bytes]:
    return []


def forms(secret: bytes) -> list[bytes]:
    out = {secret, secret.hex().encode(), base64.b64encode(secret), base64.urlsafe_b64encode(secret)}
    out |= {f.rstrip(b"=") for f in list(out)}
    return [f for f in out if len(f) >= 8]


def record_text(rec: logging.LogRecord) -> str:
    parts = [str(rec.msg), repr(rec.args)]
    try:
        parts.append(rec.getMessage())
    except Exception:  # noqa: BLE001
        pass
    if rec.exc_info:
        parts.append(logging.Formatter().formatException(rec.exc_info))
    if rec.exc_text:
        parts.append(rec.exc_text)
    parts.append(repr({k: v for k, v in rec.__dict__.items() if k not in ("msg", "args", "exc_info")}))
    return "\n".join(parts)


def find_leaks(secrets: list[bytes], values: list[bytes], texts: list[str]) -> list[str]:
    leaks = []
    for i, s in enumerate(secrets):
        for f in forms(s):
            if any(f in v for v in values):
                leaks.append(f"secret #{i} found in a raw etcd value")
            if any(f.decode("latin-1") in t for t in texts):
                leaks.append(f"secret #{i} found in a log record")
    return leaks


def open_all(raw: dict[bytes, bytes], prefix: bytes, keks: Keks) -> list[bytes]:
    """Every secret sealed in `raw` that one of the test's KEKs opens."""
    rings = [Keyring([(i, k)]) for i, k in keks.made.items()]
    out = []
    for key, value in raw.items():
        try:
            split(value)
        except SealError:
            continue
        path = key[len(prefix) + 1 :].decode()
        for ring in rings:
            try:
                _, plain = ring.open(path, value)
            except Exception:  # noqa: BLE001 - wrong KEK for this record
                continue
            if plain != CHECK_PLAINTEXT:
                out.append(plain)
    return out


@pytest.fixture
def process_logs() -> list[str]:
    """Logs of key-service processes a test ran; the guard scans them too."""
    return []


@pytest.fixture(autouse=True)
async def never_in_open(request, caplog, keks, secrets, process_logs):
    caplog.set_level(logging.DEBUG)
    uses_etcd = "etcd_prefix" in request.fixturenames and "etcd_server" in request.fixturenames
    # Requested here so that they are torn down after this fixture's check.
    server = request.getfixturevalue("etcd_server") if uses_etcd else None
    prefix = request.getfixturevalue("etcd_prefix") if uses_etcd else ""
    yield
    if server is None:
        return
    client = Etcd(server.endpoint, prefix)
    await client.connect()
    try:
        raw = await client.dump()
    finally:
        await client.close()
    stored = open_all(raw, client.prefix, keks)
    everything = [*stored, *secrets, *keks.made.values()]
    texts = [record_text(r) for r in caplog.records] + process_logs
    leaks = find_leaks(everything, list(raw.values()), texts)
    assert not leaks, leaks
    request.node.user_properties.append(("secrets_checked", len(everything)))


async def write_network(etcd: Etcd, net: str, **fields) -> network_pb2.Network:
    """Write a Network as the control plane would (the key service only reads it)."""
    n = network_pb2.Network(name=f"networks/{net}", ipv4_cidr="100.64.0.0/16", **fields)
    if not n.HasField("create_time"):
        n.create_time.GetCurrentTime()
    await etcd.put(etcd.key("networks", net), n.SerializeToString())
    return n


@pytest.fixture
async def core(etcd, keks):
    keks.new("k1")
    c = KeyServiceCore(etcd, keks.ring("k1"), scheduler=False)
    await c.start()
    yield c
    await c.stop()


@dataclass
class KS:
    core: KeyServiceCore
    stub: keys_pb2_grpc.KeyServiceStub
    etcd: Etcd
    target: str


@pytest.fixture
async def ks(core, etcd):
    server = GrpcServer(ServerConfig(listen="127.0.0.1:0", shutdown_grace=1), bindings(core))
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield KS(core, keys_pb2_grpc.KeyServiceStub(channel), etcd, f"127.0.0.1:{port}")
    await channel.close()
    await server.stop(0)


def _kek_env(keks: Keks, *ids: str, path: str | None = None) -> dict[str, str]:
    """Environment for a key-service process: KEKs in a 0600 file when `path` is given, else inline."""
    text = "\n".join(keks.line(i) for i in ids) + "\n"
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return {"MESHGATE_KEYSERVICE_KEK_FILE": path}
    return {"MESHGATE_KEYSERVICE_KEK": ",".join(keks.line(i) for i in ids)}


@pytest.fixture
def put_network(etcd):
    async def put(net: str, **fields) -> network_pb2.Network:
        return await write_network(etcd, net, **fields)

    return put


@pytest.fixture
def kek_env(keks):
    def env(*ids: str, path: str | None = None) -> dict[str, str]:
        return _kek_env(keks, *ids, path=path)

    return env


@pytest.fixture
def leaks():
    """`find_leaks(secrets, raw values, texts) -> [what leaked where]`, for tests that check more places."""
    return find_leaks
