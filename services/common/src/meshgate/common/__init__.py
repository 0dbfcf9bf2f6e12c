"""Code that every meshgate service shares.

Library modules here depend only on `opentelemetry-api`; `telemetry.configure`
is the one place that touches the OpenTelemetry SDK and is called only from
entry points.
"""
