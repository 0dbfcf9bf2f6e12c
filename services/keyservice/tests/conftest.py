"""Fixtures for the key service's tests, and the "never in the open" guard.

- `keks`: makes KEKs (`keks.new("k1") -> (id, bytes)`) and keyrings; every
  KEK made is registered as a secret.
- `core`: a started `KeyServiceCore` (scheduler off) on the test's etcd prefix.
- `ks`: that core served in-process over real gRPC, with a stub.
- `put_network(net, **fields)`: writes a Network where the control plane would.
- `kek_env(*ids, path=None)`: environment giving a key-service process KEKs.
- `secrets`: a list tests append every secret they were handed to (PSKs,
  client private keys, ...).
- `never_in_open` (autouse): the root conftest's `secret_guard` around every
  test. It captures every log record at DEBUG during the test (and the logs
  of processes the test put in `process_logs`) and every span (made in this
  process, or exported by the processes the test started); at the end it
  collects every secret the test's etcd prefix holds (by opening each
  envelope with every KEK the test made) plus `secrets` and the KEKs
  themselves, and fails if any of them appears, raw or as hex, base64 or
  urlsafe base64 (padded or not), in any raw etcd value under the prefix, in
  any log record (message, arguments, exception text) or in any span
  (attributes, events and exception stack traces, status, resource).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest

from meshgate.api.v1 import keys_pb2_grpc, network_pb2
from meshgate.common.config import ServerConfig
from meshgate.common.etcd import Etcd
from meshgate.common.server import GrpcServer
from meshgate.common.testing import find_leaks, kek_line, write_kek_file
from meshgate.keyservice.api import bindings
from meshgate.keyservice.core import KeyServiceCore
from meshgate.keyservice.sealing import Keyring, generate_kek


class Keks:
    def __init__(self, made: dict[str, bytes] | None = None) -> None:
        self.made: dict[str, bytes] = {} if made is None else made

    def new(self, kek_id: str) -> tuple[str, bytes]:
        self.made[kek_id] = generate_kek()
        return kek_id, self.made[kek_id]

    def ring(self, *ids: str) -> Keyring:
        return Keyring([(i, self.made[i]) for i in ids])

    def line(self, kek_id: str) -> str:
        return kek_line(kek_id, self.made[kek_id])


@pytest.fixture(autouse=True)
def never_in_open(secret_guard):
    """Every test here runs under the root conftest's `secret_guard`."""
    return secret_guard


@pytest.fixture
def keks(secret_guard) -> Keks:
    return Keks(secret_guard.keks)


@pytest.fixture
def secrets(secret_guard) -> list[bytes]:
    return secret_guard.secrets


@pytest.fixture
def process_logs(secret_guard) -> list[str]:
    """Logs of key-service processes a test ran; the guard scans them too."""
    return secret_guard.process_logs


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
    # The key service signs keys only of nodes of networks that exist: the
    # networks the tests' nodes live in.
    for net in ("prod", "n"):
        await write_network(etcd, net)
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
    server = GrpcServer(ServerConfig(listen="127.0.0.1:0", shutdown_grace=1), bindings(core, insecure=True))
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield KS(core, keys_pb2_grpc.KeyServiceStub(channel), etcd, f"127.0.0.1:{port}")
    await channel.close()
    await server.stop(0)


def _kek_env(keks: Keks, *ids: str, path: str | None = None) -> dict[str, str]:
    """Environment for a key-service process: KEKs in a 0600 file when `path` is given, else inline."""
    if path:
        write_kek_file(path, {i: keks.made[i] for i in ids})
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
    """`find_leaks(secrets, raw values, texts, spans=()) -> [what leaked where]`, for tests that check more places."""
    return find_leaks
