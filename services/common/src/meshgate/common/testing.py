"""Helpers for tests and the dev stack: run meshgate services as real processes.

`ServiceProcess` starts an entry point with `--listen` (a free loopback port by
default) and `--port-file`,
waits until the port file appears and the standard health check answers
SERVING, and stops the process by its PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass
class ServiceProcess:
    entry_point: str  # e.g. "meshgate-controlplane"
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    listen: str = "127.0.0.1:0"
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _workdir: str = field(default="", repr=False)
    _final_log: str | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "ServiceProcess":
        bindir = os.path.dirname(sys.executable)
        exe = os.path.join(bindir, self.entry_point)
        workdir = self._workdir = tempfile.mkdtemp(prefix=f"{self.entry_point}-")
        port_file = os.path.join(workdir, "port")
        self.log_path = self.log_path or os.path.join(workdir, "log")
        env = dict(os.environ)
        env.update(self.env)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [exe, "--listen", self.listen, "--port-file", port_file, *self.args],
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
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.entry_point} did not become healthy in {timeout}s:\n{self.log()}")

    def healthy(self) -> bool:
        with grpc.insecure_channel(self.target) as ch:
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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
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
        self.server = None
        self.port = 0

    async def start(self, unix_path: str = "") -> "OtlpReceiver":
        """Listen on a free loopback port, and on `unix_path` too when given
        (processes in other network namespaces reach it there)."""
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(self, request, context):
                for rs in request.resource_spans:
                    service = next(
                        (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), ""
                    )
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            receiver.spans.append((service, span))
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.unix_path = unix_path
        if unix_path:
            self.server.add_insecure_port(f"unix:{unix_path}")
        await self.server.start()
        return self

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
        if self.server is not None:
            await self.server.stop(0)
