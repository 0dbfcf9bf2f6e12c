"""Structured logs: JSON lines with bound identity and, inside a span, trace ids.

Each test runs in a copy of the current context, so identity bound by one test
(or by `configure(service=...)`) never leaks into another; the root logger is
restored afterwards.
"""

from __future__ import annotations

import contextvars
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from meshgate.common import logsetup


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield root
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def lines(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def in_fresh_context(fn):
    return contextvars.copy_context().run(fn)


def test_json_lines_carry_bound_identity(root_logger, capsys):
    def body():
        logsetup.configure("debug", json_format=True, service="controlplane")
        log = logging.getLogger("meshgate.test")
        token = logsetup.bind(network="networks/prod", node="networks/prod/nodes/a")
        log.info("applied revision %d", 42)
        logsetup.unbind(token)
        log.warning("after unbind")
        log.debug("with extra", extra={"node": "explicit"})

    in_fresh_context(body)
    recs = lines(capsys.readouterr().err)
    assert len(recs) == 3
    first, second, third = recs
    assert first["message"] == "applied revision 42"
    assert first["level"] == "info"
    assert first["logger"] == "meshgate.test"
    assert first["service"] == "controlplane"
    assert first["network"] == "networks/prod"
    assert first["node"] == "networks/prod/nodes/a"
    assert first["time"].endswith("Z")
    assert "trace_id" not in first
    assert second["service"] == "controlplane"
    assert "network" not in second and "node" not in second
    assert third["node"] == "explicit"  # a record's own field wins over the bound one


def test_bind_ignores_empty_values_and_is_per_context(root_logger, capsys):
    def body():
        logsetup.configure("info", json_format=True)
        logsetup.bind(network="networks/a", node="")
        logging.getLogger("meshgate.test").info("x")

    in_fresh_context(body)
    in_fresh_context(lambda: logging.getLogger("meshgate.test").info("other context"))
    a, b = lines(capsys.readouterr().err)
    assert a["network"] == "networks/a" and "node" not in a
    assert "network" not in b


def test_trace_ids_inside_span(root_logger, capsys):
    tracer = TracerProvider().get_tracer("meshgate.test")  # not installed globally

    def body():
        logsetup.configure("info", json_format=True, service="keyservice")
        log = logging.getLogger("meshgate.test")
        with tracer.start_as_current_span("op") as span:
            log.info("inside")
            ctx = span.get_span_context()
        log.info("outside")
        return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")

    trace_id, span_id = in_fresh_context(body)
    inside, outside = lines(capsys.readouterr().err)
    assert inside["trace_id"] == trace_id
    assert inside["span_id"] == span_id
    assert inside["service"] == "keyservice"
    assert "trace_id" not in outside


def test_exception_is_one_json_line(root_logger, capsys):
    def body():
        logsetup.configure("info", json_format=True)
        try:
            raise ValueError("bad")
        except ValueError:
            logging.getLogger("meshgate.test").exception("failed")

    in_fresh_context(body)
    (rec,) = lines(capsys.readouterr().err)
    assert rec["level"] == "error"
    assert "ValueError: bad" in rec["exception"]


def test_non_scalar_extras_are_stringified(root_logger, capsys):
    def body():
        logsetup.configure("info", json_format=True)
        logging.getLogger("meshgate.test").info("x", extra={"ranges": ["10.0.0.0/8"], "count": 3})

    in_fresh_context(body)
    (rec,) = lines(capsys.readouterr().err)
    assert rec["ranges"] == "['10.0.0.0/8']"
    assert rec["count"] == 3


def test_text_format_shows_identity_and_level_filter(root_logger, capsys):
    def body():
        logsetup.configure("warning", json_format=False, service="gatewayd")
        log = logging.getLogger("meshgate.test")
        log.info("hidden")
        log.warning("shown %s", "here")

    in_fresh_context(body)
    err = capsys.readouterr().err
    assert "hidden" not in err
    (line,) = err.splitlines()
    assert "WARNING" in line and "meshgate.test: shown here" in line
    assert line.endswith("[service=gatewayd]")


def test_configure_twice_keeps_one_handler(root_logger, capsys):
    def body():
        logsetup.configure("info", json_format=True)
        logsetup.configure("info", json_format=True)
        logging.getLogger("meshgate.test").info("once")

    in_fresh_context(body)
    assert len(lines(capsys.readouterr().err)) == 1


def test_redact():
    assert logsetup.redact("wg-private-key-material") == "<redacted 23 chars>"
