"""Logging set-up: plain text or one JSON object per line, with identity.

Every record carries the fields bound with `bind()` (service, network, node),
so a log line can always be traced to what it is about. Records that are
emitted inside a span also carry its trace id.

Hazard: the JSON formatter serialises `record.args` into the message; callers
must never pass secrets as log arguments. `redact()` is there for values that
might be one.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from opentelemetry import trace

# Read-only default: with_context() copies before it adds, so nothing mutates it.
_NO_FIELDS: Mapping[str, str] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("meshgate_log_context", default=_NO_FIELDS)


def bind(**fields: str) -> contextvars.Token:
    """Add identity fields to every record logged in this context."""
    merged = dict(_context.get())
    merged.update({k: v for k, v in fields.items() if v})
    return _context.set(merged)


def unbind(token: contextvars.Token) -> None:
    _context.reset(token)


def redact(value: str) -> str:
    """What to log instead of a secret: its length only."""
    return f"<redacted {len(value)} chars>"


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in _context.get().items():
            if not hasattr(record, k):
                setattr(record, k, v)
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record.trace_id = format(span.trace_id, "032x")
            record.span_id = format(span.span_id, "016x")
        return True


_STD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, sort_keys=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = [f"{k}={v}" for k, v in _context.get().items()]
        return f"{base} [{' '.join(extras)}]" if extras else base


def configure(level: str = "info", json_format: bool = False, service: str = "") -> None:
    """Configure the root logger; call once from an entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if service:
        bind(service=service)
