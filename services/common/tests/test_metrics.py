"""meshgate.common.metrics at the entry points: `--metrics-listen` values (a bare
port is loopback; bad ones are a clear exit 2, before anything starts), and
`OTEL_METRICS_EXPORTER=otlp` pushing the service's metrics to a real OTLP/gRPC
receiver (the collector's MetricsService from opentelemetry-proto)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent import futures

import grpc
import pytest

from meshgate.common import metrics
from meshgate.common.testing import ServiceProcess


@pytest.mark.parametrize("value,expected", [
    ("", None),
    ("9464", ("127.0.0.1", 9464)),
    ("0", ("127.0.0.1", 0)),
    ("0.0.0.0:9464", ("0.0.0.0", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    (":9464", ("0.0.0.0", 9464)),
])
def test_parse_listen(value, expected):
    assert metrics.parse_listen(value) == expected


@pytest.mark.parametrize("value", ["nope", "unix:/tmp/x", "127.0.0.1:", "127.0.0.1:99999"])
def test_parse_listen_refuses(value):
    with pytest.raises(ValueError):
        metrics.parse_listen(value)


def entry(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def test_bad_metrics_listen_is_a_clear_exit_before_anything_starts():
    out = subprocess.run([entry("meshgate-keyservice"), "--metrics-listen", "nope", "--insecure"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--metrics-listen: 'nope' is not host:port or a port" in out.stderr, out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([entry("meshgate-controlplane"), "--metrics-listen", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"--metrics-listen {port}: cannot listen" in out.stderr, out.stderr
    out = subprocess.run([entry("meshgate-controlplane"), "--metrics-listen", "0"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "OTEL_METRICS_EXPORTER": "statsd"})
    assert out.returncode == 2 and "OTEL_METRICS_EXPORTER='statsd' is not supported" in out.stderr, out.stderr


class MetricsReceiver:
    """An OTLP/gRPC metrics receiver on a free loopback port: the names of every metric it got, by service."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

        self.names: dict[str, set[str]] = {}
        receiver = self

        class Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                for rm in request.resource_metrics:
                    service = next((a.value.string_value for a in rm.resource.attributes
                                    if a.key == "service.name"), "")
                    for sm in rm.scope_metrics:
                        receiver.names.setdefault(service, set()).update(m.name for m in sm.metrics)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)


def test_otlp_exporter_pushes_the_services_metrics(etcd_server, etcd_prefix):
    rx = MetricsReceiver()
    env = {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{rx.port}",
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_METRIC_EXPORT_INTERVAL": "300", "OTEL_TRACES_EXPORTER": "none"}
    ks = ServiceProcess("meshgate-controlplane", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix",
                                                  etcd_prefix], env=env)
    try:
        ks.start()  # its health checks are gRPC calls: rpc.server.duration has points
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = rx.names.get("meshgate-controlplane", set())
            if {"rpc.server.duration", "meshgate.etcd.operation.duration"} <= got:
                break
            time.sleep(0.1)
        got = rx.names.get("meshgate-controlplane", set())
        assert {"rpc.server.duration", "meshgate.etcd.operation.duration"} <= got, (rx.names, ks.log())
        assert "metrics served at" not in ks.log(tail=0)  # no --metrics-listen: no Prometheus endpoint
    finally:
        ks.stop()
        rx.close()
