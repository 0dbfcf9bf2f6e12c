"""The first check of every API request: sizes, times and enum values, from the descriptors.

`wrap` puts `check` in front of every unary-request RPC of a servicer, before
its handler runs (inside the access guard, so a refusal is authenticated and
audited like any other). `check` walks the fields the request has set, as the
request's descriptor defines them, so every RPC and every field the API grows
is covered without a list to keep:

- no repeated field or map holds more than `MAX_ENTRIES` entries, no string
  more than `MAX_STRING` characters, no bytes field more than `MAX_BYTES`: no
  later check (parsing, overlap checks, regular expressions, etcd reads per
  item) ever sees more than that, whatever it costs per item. The per-field
  limits in validation.py (256 ranges, 64 labels, ...) are smaller and say
  more; this bounds what reaches them;
- every `google.protobuf.Timestamp` is within 0001-01-01T00:00:00Z to
  9999-12-31T23:59:59.999999999Z with nanos in [0, 1e9), every
  `google.protobuf.Duration` within +-315,576,000,000 s (10,000 years) with
  nanos in (-1e9, 1e9) of the same sign as its seconds: the ranges protobuf
  defines; outside them conversions raise (INTERNAL, before) and JSON cannot
  carry the value;
- every enum field holds a value its enum defines (proto3 accepts any int32
  on the wire: `default_policy = 99` used to be stored as sent).

Field paths are spelled as validation.py spells them (`network.labels['k']`,
`egress_gateway.ranges[2]`). The walk stops looking into a field at its first
size violation and stops after `MAX_VIOLATIONS`, so it costs at most the size
of the request, which gRPC already bounds (4 MiB).

Not covered: the agent's `Sync` stream (client streaming; its messages come
from authenticated agents and are checked where sync.py reads them).
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from meshgate.common.errors import FieldViolation, invalid_argument, shown

MAX_ENTRIES = 1024
MAX_STRING = 16 * 1024
MAX_BYTES = 64 * 1024
MAX_VIOLATIONS = 32

TIMESTAMP_MIN_S = -62135596800  # 0001-01-01T00:00:00Z
TIMESTAMP_MAX_S = 253402300799  # 9999-12-31T23:59:59Z
DURATION_MAX_S = 315576000000  # 10,000 years
NANOS = 1_000_000_000

_STRING, _BYTES, _MESSAGE, _ENUM = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES,
                                    FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_ENUM)


def timestamp_violation(ts) -> str:
    """Why a Timestamp is outside protobuf's range ('' when it is within)."""
    if not 0 <= ts.nanos < NANOS:
        return f"nanos {ts.nanos} is outside [0, 999999999]"
    if not TIMESTAMP_MIN_S <= ts.seconds <= TIMESTAMP_MAX_S:
        return f"seconds {ts.seconds} is outside 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z"
    return ""


def duration_violation(d) -> str:
    """Why a Duration is outside protobuf's range ('' when it is within)."""
    if not -NANOS < d.nanos < NANOS:
        return f"nanos {d.nanos} is outside -999999999 to 999999999"
    if not -DURATION_MAX_S <= d.seconds <= DURATION_MAX_S:
        return f"seconds {d.seconds} is beyond {DURATION_MAX_S} (10,000 years)"
    if (d.seconds > 0 and d.nanos < 0) or (d.seconds < 0 and d.nanos > 0):
        return f"seconds {d.seconds} and nanos {d.nanos} have different signs"
    return ""


def check(msg: Message, prefix: str = "") -> list[FieldViolation]:
    """The violations of `msg` (see the module docstring); [] when it passes."""
    out: list[FieldViolation] = []
    _walk(msg, prefix, out)
    return out[:MAX_VIOLATIONS]


def _walk(msg: Message, prefix: str, out: list[FieldViolation]) -> None:
    full = msg.DESCRIPTOR.full_name
    if full == "google.protobuf.Timestamp":
        why = timestamp_violation(msg)
        if why:
            out.append(FieldViolation(prefix.rstrip("."), f"is not a valid timestamp: {why}"))
        return
    if full == "google.protobuf.Duration":
        why = duration_violation(msg)
        if why:
            out.append(FieldViolation(prefix.rstrip("."), f"is not a valid duration: {why}"))
        return
    for fd, value in msg.ListFields():
        if len(out) >= MAX_VIOLATIONS:
            return
        path = prefix + fd.name
        if fd.is_repeated:
            if len(value) > MAX_ENTRIES:
                out.append(FieldViolation(path, f"has {len(value)} entries; at most {MAX_ENTRIES} are allowed"))
                continue
            entry = fd.message_type
            if fd.type == _MESSAGE and entry is not None and entry.GetOptions().map_entry:
                value_fd = entry.fields_by_name["value"]
                for k, v in value.items():
                    item = f"{path}[{shown(k)}]"
                    _scalar(entry.fields_by_name["key"], k, item, out)
                    if value_fd.type == _MESSAGE:
                        _walk(v, item + ".", out)
                    else:
                        _scalar(value_fd, v, item, out)
                continue
            for i, v in enumerate(value):
                if fd.type == _MESSAGE:
                    _walk(v, f"{path}[{i}].", out)
                else:
                    _scalar(fd, v, f"{path}[{i}]", out)
        elif fd.type == _MESSAGE:
            _walk(value, path + ".", out)
        else:
            _scalar(fd, value, path, out)


def _scalar(fd: FieldDescriptor, value: Any, path: str, out: list[FieldViolation]) -> None:
    if fd.type == _STRING and len(value) > MAX_STRING:
        out.append(FieldViolation(path, f"is {len(value)} characters long; at most {MAX_STRING} are allowed"))
    elif fd.type == _BYTES and len(value) > MAX_BYTES:
        out.append(FieldViolation(path, f"is {len(value)} bytes long; at most {MAX_BYTES} are allowed"))
    elif fd.type == _ENUM and fd.enum_type is not None and fd.enum_type.values_by_number.get(value) is None:
        known = ", ".join(v.name for v in fd.enum_type.values)
        out.append(FieldViolation(path, f"{value} is not a {fd.enum_type.name} value ({known})"))


def require(msg: Message, prefix: str = "") -> None:
    """Raise INVALID_ARGUMENT with the violations of `msg`, if any."""
    violations = check(msg, prefix)
    if violations:
        raise invalid_argument(violations)


def wrap(servicer: Any, service) -> Any:
    """`servicer` with `require(request)` before each unary-request RPC of
    `service` (a ServiceDescriptor). Wrap before the access guard protects
    it, so that the guard's audit record carries the refusal."""
    for md in service.methods:
        if md.client_streaming:
            continue
        fn = getattr(servicer, md.name)
        setattr(servicer, md.name, _stream(fn) if md.server_streaming else _unary(fn))
    return servicer


def _unary(fn):
    @functools.wraps(fn)
    async def checked(request, context):
        require(request)
        return await fn(request, context)

    return checked


def _stream(fn):
    @functools.wraps(fn)
    async def checked(request, context):
        require(request)
        async for item in fn(request, context):
            yield item

    return checked
