"""OpenTelemetry SDK set-up, for entry points only.

Reads the standard variables: `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`
(`otlp`, `console`, `none`), `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`. When `OTEL_TRACES_EXPORTER` is not set, traces go
to OTLP if an endpoint is set and nowhere otherwise, so a process without
configuration costs nothing and never tries the network.

Library code uses only `opentelemetry.trace.get_tracer()`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from opentelemetry import trace

log = logging.getLogger(__name__)


def exporter_choice(environ: Mapping[str, str]) -> str:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    explicit = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if explicit:
        return explicit.split(",")[0]
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return "otlp"
    return "none"


def configure(service_name: str, environ: Mapping[str, str] | None = None):
    """Install a tracer provider for this process; returns it (or None when disabled)."""
    environ = os.environ if environ is None else environ
    choice = exporter_choice(environ)
    if choice == "none":
        log.debug("tracing disabled")
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create({SERVICE_NAME: environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if choice == "console":
        exporter = ConsoleSpanExporter()
    elif choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        print(f"OTEL_TRACES_EXPORTER={choice!r} is not supported (use otlp, console or none)", file=sys.stderr)
        raise SystemExit(2)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing to %s", choice)
    return provider


def shutdown(provider) -> None:
    if provider is not None:
        provider.shutdown()
