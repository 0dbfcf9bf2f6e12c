"""Helpers for tests and the dev stack: run meshgate services as real processes.

`ServiceProcess` starts an entry point with `--listen` (a free loopback port by
default) and `--port-file`,
waits until the port file appears and the standard health check answers
SERVING, and stops the process by its PID (SIGTERM, then SIGKILL).
`OtlpReceiver` receives the spans processes export. The last section has the
parts of the "never in the open" guard (secrets searched in logs and spans):
`forms`, `find_leaks`, `SpanCapture` (spans made in the test process).
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate.common.etcdproc import terminate


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def eventually(pred, what: str, timeout: float = 60, every: float = 0.2):
    """Poll `pred` until it returns something true (returned); fail with
    `what` when it never does within `timeout` seconds (a generous bound on an
    outcome, not a speed target: those are benchmark figures)."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"never within {timeout:.0f} s: {what}")
        time.sleep(every)


def require_binaries(*names: str, packages: str) -> None:
    """Fail the test under CI=true, skip it elsewhere (saying why and what to
    install), when a program it runs is not on PATH."""
    import pytest

    missing = [b for b in names if shutil.which(b) is None]
    if missing:
        msg = f"{' and '.join(missing)} not installed: run `make install` (Debian packages {packages})"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)


@dataclass
class ServiceProcess:
    entry_point: str  # e.g. "meshgate-controlplane"
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    listen: str = "127.0.0.1:0"
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    # For a server started with TLS: the health check's channel credentials.
    credentials: grpc.ChannelCredentials | None = field(default=None, repr=False)
    _workdir: str = field(default="", repr=False)
    _final_log: str | None = field(default=None, repr=False)
    _admin_token: str = field(default="", repr=False)
    _token_file: str = field(default="", repr=False)

    @property
    def admin_token(self) -> str:
        """A control plane's bootstrap admin token ('' when this process did
        not make it: another one on the same prefix did first)."""
        if not self._admin_token and self._token_file and os.path.exists(self._token_file):
            with open(self._token_file) as f:
                self._admin_token = f.read().strip()
        return self._admin_token

    @property
    def auth_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.admin_token}"),)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> ServiceProcess:
        bindir = os.path.dirname(sys.executable)
        exe = os.path.join(bindir, self.entry_point)
        workdir = self._workdir = tempfile.mkdtemp(prefix=f"{self.entry_point}-")
        port_file = os.path.join(workdir, "port")
        self.log_path = self.log_path or os.path.join(workdir, "log")
        env = dict(os.environ)
        env.update(self.env)
        extra = []
        if self.entry_point == "meshgate-controlplane" and not any(
                a.startswith("--bootstrap-token-file") for a in self.args):
            # The control plane's API needs a token: a fresh prefix gets the
            # bootstrap admin token, which the test reads from here.
            self._token_file = os.path.join(workdir, "admin-token")
            extra = ["--bootstrap-token-file", self._token_file]
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [exe, "--listen", self.listen, "--port-file", port_file, *extra, *self.args],
            stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.entry_point} exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(port_file):
                self.port = int(open(port_file).read())
                if self.healthy():
                    _ = self.admin_token  # read it before stop() removes the work directory
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.entry_point} did not become healthy in {timeout}s:\n{self.log()}")

    def healthy(self) -> bool:
        ch = (grpc.secure_channel(self.target, self.credentials) if self.credentials is not None
              else grpc.insecure_channel(self.target))
        with ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
            return r.status == health_pb2.HealthCheckResponse.SERVING

    def log(self, tail: int = 4000) -> str:
        """The process's output (its last `tail` characters; 0 for all)."""
        text = self._final_log
        if text is None:
            try:
                with open(self.log_path, errors="replace") as f:
                    text = f.read()
            except OSError:
                text = ""
        return text[-tail:] if tail else text

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15) -> int | None:
        """Stop the process by PID; remove its work directory (port file, and
        the log unless the caller chose where the log goes)."""
        if self.proc is None:
            return None
        terminate(self.proc, timeout)
        if self._workdir:
            if self.log_path.startswith(self._workdir):
                self._final_log = self.log(tail=0)  # still readable after the directory is gone
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = ""
        return self.proc.returncode


class OtlpReceiver:
    """A real OTLP/gRPC trace receiver (the collector's TraceService from
    opentelemetry-proto) on a free loopback port, keeping every span it gets.

    Point a process at it with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:<port>.
    """

    def __init__(self) -> None:
        self.spans: list = []  # (service name, opentelemetry.proto.trace.v1.Span)
        self.resource_spans: list = []  # every ResourceSpans received, whole (resource and scopes too)
        self.server: grpc.Server | grpc.aio.Server | None = None
        self.port = 0
        self.unix_path = ""

    def _record(self, request) -> None:
        for rs in request.resource_spans:
            self.resource_spans.append(rs)
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans.append((service, span))

    async def start(self, unix_path: str = "") -> OtlpReceiver:
        """Listen on a free loopback port, and on `unix_path` too when given
        (processes in other network namespaces reach it there)."""
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(self, request, context):
                receiver._record(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        server = self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        self.unix_path = unix_path
        if unix_path:
            server.add_insecure_port(f"unix:{unix_path}")
        await server.start()
        return self

    def start_threaded(self, unix_path: str = "") -> OtlpReceiver:
        """`start()` for callers without an event loop (or with one that comes
        and goes, like a test's): a synchronous gRPC server on its own threads.
        Stop it with `close()`."""
        from concurrent.futures import ThreadPoolExecutor

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                receiver._record(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        server = self.server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-receiver"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        self.unix_path = unix_path
        if unix_path:
            server.add_insecure_port(f"unix:{unix_path}")
        server.start()
        return self

    def close(self) -> None:
        """Stop a receiver started with `start_threaded()`."""
        if isinstance(self.server, grpc.Server):
            self.server.stop(0).wait(10)
            self.server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, service: str, via_unix: bool = False) -> dict[str, str]:
        """Environment that makes a meshgate process export its spans here, fast."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"unix://{self.unix_path}" if via_unix else self.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_SERVICE_NAME": service,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    def trace(self, trace_id: bytes) -> list:
        return [(svc, s) for svc, s in self.spans if s.trace_id == trace_id]

    async def stop(self) -> None:
        """Stop a receiver started with `start()`."""
        if isinstance(self.server, grpc.aio.Server):
            await self.server.stop(0)


# ---------------------------------------------------------------- secrets never in the open
#
# The "never in the open" guard (the root conftest's `secret_guard`) searches
# log records, raw etcd values and spans for every secret a test was handed.
# These are its parts that need no pytest and no key service.


def forms(secret: bytes) -> list[bytes]:
    """How a secret may show up: raw, hex, base64 and urlsafe base64, padded or not."""
    out = {secret, secret.hex().encode(), base64.b64encode(secret), base64.urlsafe_b64encode(secret)}
    out |= {f.rstrip(b"=") for f in list(out)}
    return [f for f in out if len(f) >= 8]


def token_secrets(token: str) -> list[bytes]:
    """A meshgate token (`mgek_{net}.{id}.{random}`, `mgat_...`, `mgtk_{id}.{random}`)
    as secrets: the whole token and its random part's bytes (so their other
    encodings are searched too). An enrollment secret's trailing
    `.ka_{fingerprint}` pins are public and skipped to find the random part."""
    out = [token.encode()]
    parts = token.split(".")
    while len(parts) > 1 and parts[-1].startswith("ka_"):
        parts.pop()
    tail = parts[-1]
    try:
        out.append(base64.urlsafe_b64decode(tail + "=" * (-len(tail) % 4)))
    except ValueError:
        pass
    return out


def record_text(rec: logging.LogRecord) -> str:
    """Everything a log record carries, as text: message, arguments, exception, extra fields."""
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


@dataclass
class Haystack:
    """One place to search (a span, with its resource and scope): its
    serialised bytes and every string and bytes field in it."""

    where: str
    blobs: list[bytes]
    texts: list[str]


def _strings(msg, texts: list[str], blobs: list[bytes]) -> None:
    from google.protobuf.descriptor import FieldDescriptor

    for fd, value in msg.ListFields():
        values = value if fd.is_repeated else [value]
        for v in values:
            if fd.type == FieldDescriptor.TYPE_STRING:
                texts.append(v)
            elif fd.type == FieldDescriptor.TYPE_BYTES:
                blobs.append(v)
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                _strings(v, texts, blobs)


def otlp_haystacks(resource_spans, origin: str) -> list[Haystack]:
    """One haystack per span of OTLP `ResourceSpans`: the span's name,
    attributes, events (exception messages and stack traces included), links
    and status message, with its resource's and scope's attributes."""
    out = []
    for rs in resource_spans:
        service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
        r_texts: list[str] = []
        r_blobs: list[bytes] = [rs.resource.SerializeToString()]
        _strings(rs.resource, r_texts, r_blobs)
        for ss in rs.scope_spans:
            s_texts: list[str] = []
            s_blobs: list[bytes] = [ss.scope.SerializeToString()]
            _strings(ss.scope, s_texts, s_blobs)
            for span in ss.spans:
                texts, blobs = [*r_texts, *s_texts], [*r_blobs, *s_blobs, span.SerializeToString()]
                _strings(span, texts, blobs)
                out.append(Haystack(f"{origin} span {span.name!r} of {service or '?'}", blobs, texts))
    return out


def find_leaks(
    secrets: Sequence[bytes], values: Sequence[bytes], texts: Sequence[str], spans: Sequence[Haystack] = ()
) -> list[str]:
    """Where each secret shows up (in any of its `forms`): raw etcd `values`,
    log `texts`, `spans`. Empty when nowhere."""
    leaks = []
    joined_blobs = b"\0".join(b for h in spans for b in h.blobs)
    joined_texts = "\0".join(t for h in spans for t in h.texts)
    for i, s in enumerate(secrets):
        for f in forms(s):
            text = f.decode("latin-1")
            if any(f in v for v in values):
                leaks.append(f"secret #{i} found in a raw etcd value")
            if any(text in t for t in texts):
                leaks.append(f"secret #{i} found in a log record")
            if f in joined_blobs or text in joined_texts:
                leaks += [
                    f"secret #{i} found in {h.where}"
                    for h in spans
                    if any(f in b for b in h.blobs) or any(text in t for t in h.texts)
                ]
    return sorted(set(leaks))


class SpanCapture:
    """Spans made in this process, for tests, while `active`.

    The OpenTelemetry API lets a process install its global tracer provider
    once. `span_capture()` installs one for the whole test process, at start:
    while no capture is active its tracers are the API's no-op tracer (exactly
    what a process without a provider gets, so other tests see no change);
    while active they are an SDK provider's, which keeps every finished span
    in memory (`finished()`).
    """

    def __init__(self) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        self.sdk = TracerProvider(resource=Resource.create({"service.name": "pytest-in-process"}))
        self.sdk.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.active = False

    def start(self) -> None:
        self.exporter.clear()
        self.active = True

    def stop(self) -> None:
        self.active = False

    def finished(self) -> list:
        """Spans finished since `start()` (SDK `ReadableSpan`s)."""
        return list(self.exporter.get_finished_spans())

    def haystacks(self) -> list[Haystack]:
        """The finished spans as the OTLP exporter would send them, to search."""
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        spans = self.finished()
        return otlp_haystacks(encode_spans(spans).resource_spans, "in-process") if spans else []


def _switching_provider(capture: SpanCapture):
    from opentelemetry import trace

    class Tracer(trace.ProxyTracer):
        # ProxyTracer delegates start_span and start_as_current_span (sync,
        # async and decorator uses) to `_tracer`; only the choice differs.
        @property
        def _tracer(self):
            if not capture.active:
                return self._noop_tracer
            if self._real_tracer is None:
                self._real_tracer = capture.sdk.get_tracer(
                    self._instrumenting_module_name, self._instrumenting_library_version,
                    self._schema_url, self._attributes,
                )
            return self._real_tracer

    class Provider(trace.TracerProvider):
        capture: SpanCapture

        def get_tracer(self, instrumenting_module_name, instrumenting_library_version=None,
                       schema_url=None, attributes=None):
            return Tracer(instrumenting_module_name, instrumenting_library_version, schema_url, attributes)

    provider = Provider()
    provider.capture = capture
    return provider


_capture: SpanCapture | None = None


def span_capture() -> SpanCapture:
    """This process's `SpanCapture`; the first call installs the global tracer
    provider (fails if something else already installed one)."""
    global _capture
    if _capture is not None:
        return _capture
    from opentelemetry import trace

    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        raise RuntimeError(f"a global tracer provider is already installed ({current!r}): spans cannot be captured")
    capture = SpanCapture()
    trace.set_tracer_provider(_switching_provider(capture))
    if getattr(trace.get_tracer_provider(), "capture", None) is not capture:
        raise RuntimeError("could not install the span-capturing tracer provider")
    _capture = capture
    return capture


def write_test_pki(directory) -> dict[str, str]:
    """A throwaway CA with a server certificate (for 127.0.0.1 and localhost)
    and a client certificate, as PEM files in `directory` (made by the test):
    paths by name, `ca.pem`, `srv.pem`, `srv.key`, `cli.pem`, `cli.key`."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer_key, *, ca=False, san=None, usage=None):
        now = datetime.datetime.now(datetime.UTC)
        b = (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name("meshgate test CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def pem(obj) -> bytes:
        if isinstance(obj, x509.Certificate):
            return obj.public_bytes(serialization.Encoding.PEM)
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    d = Path(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("meshgate test CA", ca_key, ca_key, ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = cert("server", srv_key, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH,
               san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    cli_key = ec.generate_private_key(ec.SECP256R1())
    cli = cert("client", cli_key, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {}
    for fname, obj in [("ca.pem", ca), ("srv.pem", srv), ("srv.key", srv_key), ("cli.pem", cli), ("cli.key", cli_key)]:
        (d / fname).write_bytes(pem(obj))
        files[fname] = str(d / fname)
    return files


def kek_line(kek_id: str, kek: bytes) -> str:
    """One key-encryption key as the key service reads it: `id:base64`."""
    return f"{kek_id}:{base64.b64encode(kek).decode()}"


def write_kek_file(path, keks: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """A 0600 KEK file for a key-service process (`--kek-file`), one line per
    KEK; with no `keys`, one fresh KEK `k1`. Returns the KEKs written."""
    keks = keks if keks is not None else {"k1": os.urandom(32)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(kek_line(i, k) + "\n" for i, k in keks.items()))
    return keks


@dataclass
class KeyServicePki:
    """Certificates for a key service with mTLS, made by the real offline
    command (`meshgate-keyservice-certs`) against the key service's etcd and KEK."""

    directory: str

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def server_args(self) -> list[str]:
        """The key service's TLS flags (client certificates required)."""
        return ["--tls-cert", self.path("keyservice.pem"), "--tls-key", self.path("keyservice.key"),
                "--tls-client-ca", self.path("ca.pem")]

    @property
    def controlplane_args(self) -> list[str]:
        """The control plane's flags for its link to the key service."""
        return ["--keyservice-ca", self.path("ca.pem"), "--keyservice-cert", self.path("controlplane.pem"),
                "--keyservice-key", self.path("controlplane.key")]

    def agent_args(self, listen: str) -> list[str]:
        """The control plane's flags for an mTLS agent endpoint on `listen`
        (agents get certificates from the key service's CA and stream there)."""
        return ["--agent-listen", listen, "--agent-client-ca", self.path("ca.pem"),
                "--agent-tls-cert", self.path("controlplane.pem"), "--agent-tls-key", self.path("controlplane.key")]

    def credentials(self, who: str = "operator") -> grpc.ChannelCredentials:
        def read(name: str) -> bytes:
            with open(self.path(name), "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(read("ca.pem"), read(f"{who}.key"), read(f"{who}.pem"))


def keyservice_pki(directory: str, etcd_endpoint: str, etcd_prefix: str, kek_file: str) -> KeyServicePki:
    exe = os.path.join(os.path.dirname(sys.executable), "meshgate-keyservice-certs")
    subprocess.run([exe, "--etcd-endpoints", etcd_endpoint, "--etcd-prefix", etcd_prefix, "--kek-file", kek_file,
                    "--out-dir", directory], check=True, capture_output=True, text=True)
    return KeyServicePki(directory)


# ---------------------------------------------------------------- etcd with TLS and authentication


def write_etcd_pki(directory, client_cn: str = "meshgate-client") -> dict[str, str]:
    """A throwaway CA for an etcd with TLS, as PEM files in `directory` (made
    by the test): `ca.pem`; `etcd.pem`/`etcd.key`, etcd's certificate for
    127.0.0.1 and localhost, for server and client authentication (etcd's
    gateway and `EtcdProcess`'s probe present it as a client); and
    `client.pem`/`client.key`, a client certificate with CN `client_cn`
    (etcd takes the CN as the user when no token is sent). Keys are 0600."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshgate test etcd CA")])

    def issue(cn: str, key, *, ca=False, san=None, usages=()):
        b = (
            x509.CertificateBuilder()
            .subject_name(ca_name if ca else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usages:
            b = b.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    etcd_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    both = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    items = [
        ("ca.pem", issue("", ca_key, ca=True)),
        ("etcd.pem", issue("etcd", etcd_key, usages=both,
                           san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])),
        ("etcd.key", etcd_key),
        ("client.pem", issue(client_cn, client_key, usages=(ExtendedKeyUsageOID.CLIENT_AUTH,))),
        ("client.key", client_key),
    ]
    d = Path(directory)
    files = {}
    for fname, obj in items:
        if isinstance(obj, x509.Certificate):
            data, mode = obj.public_bytes(serialization.Encoding.PEM), 0o644
        else:
            data, mode = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600
        fd = os.open(d / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        files[fname] = str(d / fname)
    return files


def enable_etcd_auth(etcd, user: str, password: str, prefix: str, root_password: str) -> None:
    """Turn etcd's authentication on (an `EtcdProcess`, through etcdctl):
    users `root` and `user`, a role named `user` with readwrite on
    `prefix/`, granted to `user`. Passwords go through etcdctl's stdin."""
    prefix = prefix.rstrip("/") + "/"
    etcd.etcdctl("user", "add", "root", "--interactive=false", stdin=root_password + "\n")
    etcd.etcdctl("role", "add", "root")
    etcd.etcdctl("user", "grant-role", "root", "root")
    etcd.etcdctl("user", "add", user, "--interactive=false", stdin=password + "\n")
    etcd.etcdctl("role", "add", user)
    etcd.etcdctl("role", "grant-permission", user, "--prefix=true", "readwrite", prefix)
    etcd.etcdctl("user", "grant-role", user, user)
    etcd.etcdctl("auth", "enable")


def write_password_file(path, password: str) -> str:
    """A 0600 file holding `password` (for `--etcd-password-file`)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return str(path)
