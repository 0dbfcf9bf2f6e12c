"""Which trace exporter the OTEL_* environment selects, and the SDK set-up.

`configure()` installs a global tracer provider, which can happen once per
process, so anything beyond `exporter_choice` runs in a child process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshgate.common.telemetry import configure, exporter_choice

EP = "http://127.0.0.1:4317"


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, "none"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": EP}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": EP}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, "none"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": " Console "}, "console"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": EP}, "none"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_ENDPOINT": EP}, "console"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, "otlp"),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, "none"),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": EP}, "none"),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "console"}, "console"),
    ],
)
def test_exporter_choice(env, want):
    assert exporter_choice(env) == want


def test_configure_disabled_installs_nothing():
    assert configure("meshgate-test", {}) is None
    assert configure("meshgate-test", {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}) is None


CHILD = """
import sys
from opentelemetry import trace
from meshgate.common import telemetry
env = {"OTEL_TRACES_EXPORTER": sys.argv[1], "OTEL_SERVICE_NAME": "svc-from-env"}
provider = telemetry.configure("meshgate-test", env)
with trace.get_tracer("t").start_as_current_span("child-span"):
    pass
telemetry.shutdown(provider)
"""


def run_child(exporter: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, exporter], capture_output=True, text=True, timeout=60
    )


def test_console_exporter_writes_spans_with_service_name():
    r = run_child("console")
    assert r.returncode == 0, r.stderr
    assert '"name": "child-span"' in r.stdout
    assert '"service.name": "svc-from-env"' in r.stdout


def test_unsupported_exporter_is_refused():
    r = run_child("jaeger")
    assert r.returncode != 0
    assert "not supported" in r.stderr and "jaeger" in r.stderr
