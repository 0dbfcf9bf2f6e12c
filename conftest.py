"""Fixtures shared by every test in the repository.

- `etcd_server` (session): a real etcd (Debian's etcd-server binary) on free
  loopback ports with a temporary data directory, stopped by PID at the end.
- `etcd`: an adapter bound to a prefix unique to the test, so tests never see
  each other's keys and can snapshot "their" keyspace.
- `cp`: a control plane served in-process on a free port against that prefix,
  with stubs for its services on a real gRPC channel.
- `secret_guard`: the "never in the open" check for key tests (the key
  service's tests use it for every test; see `SecretGuard`).

This process installs its one global OpenTelemetry tracer provider before any
test (`meshgate.common.testing.span_capture`): a no-op except while a
`secret_guard` captures spans.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field

import grpc
import pytest

from meshgate.api.v1 import (
    agent_pb2_grpc,
    egress_pb2_grpc,
    enrollment_pb2_grpc,
    network_pb2_grpc,
    node_pb2_grpc,
    policy_pb2_grpc,
)
from meshgate.common.config import ServerConfig
from meshgate.common.etcd import Etcd
from meshgate.common.etcdproc import EtcdProcess
from meshgate.common.server import GrpcServer
from meshgate.common.testing import (
    Haystack,
    OtlpReceiver,
    SpanCapture,
    find_leaks,
    in_ci,
    otlp_haystacks,
    record_text,
    span_capture,
    token_secrets,
)


def pytest_configure(config):
    # Installed once, before any test, so that every test runs with the same
    # global tracer provider whatever the order (a no-op outside a capture).
    span_capture()


def pytest_collection_modifyitems(config, items):
    # The tests marked root (network namespaces, real WireGuard and traffic) are
    # the long ones: run first, so that `make test`'s workers (pytest-xdist,
    # --dist loadfile, files handed out in this order) do not end on one long
    # file while the others sit idle. A stable sort: each file keeps its order.
    items.sort(key=lambda item: "root" not in item.keywords)
    if in_ci():
        return
    # Outside CI, tests marked root skip (with the reason) on machines without
    # root; under CI=true they run and fail loudly instead.
    import os

    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root and network namespaces (runs in CI)")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def etcd_server():
    if shutil.which("etcd") is None:
        msg = "etcd not installed: run `make install` (Debian package etcd-server)"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    data = tempfile.mkdtemp(prefix="meshgate-test-etcd-")
    proc = EtcdProcess(data).start()
    yield proc
    proc.stop()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def etcd_prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def etcd(etcd_server, etcd_prefix):
    client = Etcd(etcd_server.endpoint, etcd_prefix)
    await client.connect()
    yield client
    await client.close()


@dataclass
class ControlPlane:
    server: GrpcServer
    channel: grpc.aio.Channel
    networks: network_pb2_grpc.NetworkServiceStub
    nodes: node_pb2_grpc.NodeServiceStub
    egress: egress_pb2_grpc.EgressGatewayServiceStub
    etcd: Etcd
    app: object
    keys: enrollment_pb2_grpc.EnrollmentKeyServiceStub
    policies: policy_pb2_grpc.AccessPolicyServiceStub
    agents: agent_pb2_grpc.AgentServiceStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture
async def cp(etcd):
    from meshgate.controlplane.api import ControlPlane as App

    app = App(etcd)
    await app.start()
    cfg = ServerConfig(listen="127.0.0.1:0", shutdown_grace=1)
    server = GrpcServer(cfg, app.bindings)
    port = await server.start()
    from cptest import authed_channel, mint_token

    token = await mint_token(app)
    channel = authed_channel(f"127.0.0.1:{port}", token)
    yield ControlPlane(
        server,
        channel,
        network_pb2_grpc.NetworkServiceStub(channel),
        node_pb2_grpc.NodeServiceStub(channel),
        egress_pb2_grpc.EgressGatewayServiceStub(channel),
        etcd,
        app,
        enrollment_pb2_grpc.EnrollmentKeyServiceStub(channel),
        policy_pb2_grpc.AccessPolicyServiceStub(channel),
        agent_pb2_grpc.AgentServiceStub(channel),
    )
    await channel.close()
    await server.stop(0)
    await app.stop()


# ---------------------------------------------------------------- never in the open


def open_all(raw: dict[bytes, bytes], prefix: bytes, keks: dict[str, bytes]) -> list[bytes]:
    """Every secret sealed in `raw` (an etcd dump) that one of `keks` opens:
    pre-shared keys, external clients' private keys, the key authority's
    signing key, the CA key."""
    from meshgate.keyservice.sealing import Keyring, SealError, split
    from meshgate.keyservice.vault import CHECK_PLAINTEXT

    rings = [Keyring([(i, k)]) for i, k in keks.items()]
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


@dataclass
class SecretGuard:
    """What a key test was handed, and every place a secret must never be.

    Tests (and their fixtures) register secrets: `secrets` (or `add`,
    `add_token`), KEKs in `keks` (also used to open every envelope under the
    test's etcd prefix, so every stored secret is searched for too), and the
    logs of processes they ran in `process_logs`. At the end the guard
    searches, for each secret raw, hex, base64 and urlsafe base64: every log
    record at DEBUG, those process logs, every raw etcd value under the
    prefix, and every span: those made in the test process (`capture`) and
    those processes exported to `receiver` (every service process the test
    started exports there: the guard sets OTEL_EXPORTER_OTLP_ENDPOINT for the
    test). A test that needs spans to have been made says which
    (`expect_span`); the guard checks that at the end, once the processes it
    ran have stopped and flushed theirs.
    """

    capture: SpanCapture
    receiver: OtlpReceiver
    secrets: list[bytes] = field(default_factory=list)
    keks: dict[str, bytes] = field(default_factory=dict)
    process_logs: list[str] = field(default_factory=list)
    expected: list[tuple[str, str, int]] = field(default_factory=list)
    stored: list[bytes] = field(default_factory=list)

    def add(self, *values: bytes | str) -> None:
        self.secrets += [v.encode() if isinstance(v, str) else v for v in values]

    def add_token(self, token: str) -> None:
        self.secrets += token_secrets(token)

    def everything(self) -> list[bytes]:
        return list(dict.fromkeys([*self.stored, *self.secrets, *self.keks.values()]))

    def haystacks(self) -> list[Haystack]:
        return self.capture.haystacks() + otlp_haystacks(list(self.receiver.resource_spans), "exported")

    def spans(self) -> list[tuple[str, str]]:
        """(service, span name) of every span captured so far."""
        out = [("in-process", s.name) for s in self.capture.finished()]
        return out + list((svc, s.name) for svc, s in self.receiver.spans)

    def expect_span(self, name: str, service: str = "", at_least: int = 1) -> None:
        """At the end, at least `at_least` spans called `name` (from `service`:
        "in-process" or a process's service name) must have been captured."""
        self.expected.append((name, service, at_least))

    def missing(self) -> list[str]:
        spans = self.spans()
        out = []
        for name, service, n in self.expected:
            got = sum(1 for svc, nm in spans if nm == name and (not service or svc == service))
            if got < n:
                out.append(f"{n} span(s) {name!r} from {service or 'anywhere'} expected, {got} captured")
        return out

    def leaks(self, secrets=None, values=(), texts=()) -> list[str]:
        """Where the secrets (by default every one registered) show up in
        `values`, `texts` and every span captured so far."""
        return find_leaks(self.everything() if secrets is None else secrets, values, texts, self.haystacks())


@pytest.fixture
async def secret_guard(request, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    uses_etcd = "etcd_prefix" in request.fixturenames and "etcd_server" in request.fixturenames
    # Requested here so that they are torn down after this fixture's check.
    server = request.getfixturevalue("etcd_server") if uses_etcd else None
    prefix = request.getfixturevalue("etcd_prefix") if uses_etcd else ""
    sockdir = tempfile.mkdtemp(prefix="mg-otlp-")
    receiver = OtlpReceiver().start_threaded(unix_path=os.path.join(sockdir, "otlp.sock"))
    # Every process the test starts exports its spans to the receiver (by the
    # unix socket, which processes in other network namespaces reach too).
    for var in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"unix://{receiver.unix_path}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    guard = SecretGuard(span_capture(), receiver)
    guard.capture.start()
    try:
        yield guard
    finally:
        guard.capture.stop()
        receiver.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    raw: dict[bytes, bytes] = {}
    if server is not None:
        client = Etcd(server.endpoint, prefix)
        await client.connect()
        try:
            raw = await client.dump()
        finally:
            await client.close()
        guard.stored = open_all(raw, client.prefix, guard.keks)
    texts = [record_text(r) for r in caplog.records] + guard.process_logs
    leaks = guard.leaks(None, list(raw.values()), texts)
    assert not leaks, leaks
    missing = guard.missing()
    assert not missing, missing
    request.node.user_properties += [("secrets_checked", len(guard.everything())), ("spans_checked", len(guard.spans()))]
