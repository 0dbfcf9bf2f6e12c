"""Building request messages from keyword arguments.

Every generated method takes an optional request message (or dict) plus one
keyword per request field; `build` merges them. Friendlier forms are accepted
where a field's protobuf type is awkward by hand: a dict for any message, an
enum value's name in any case for an enum (`tcp`), a list of paths for a
FieldMask, seconds or a duration as a person writes it (`500ms`, `2s`,
`1m30s`) for a Duration. `friendly` applies the same forms to a dict in
protobuf JSON form anywhere inside it (the CLI's YAML and JSON input goes
through it too). A Duration that is none of these forms, or out of a
Duration's range, is refused here (DurationError, naming the field's path
and the forms); anything else it does not recognise is left for
json_format, which refuses it with the field's name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import duration_pb2, json_format, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from meshgate.sdk import _descriptors as descriptors

Metadata = Sequence[tuple[str, str]]


def build(cls: type[Message], request: Message | Mapping[str, Any] | None, **fields: Any) -> Message:
    if request is None:
        msg = cls()
    elif isinstance(request, Message):
        if not isinstance(request, cls):
            raise TypeError(f"request must be a {cls.DESCRIPTOR.full_name}, not {type(request).DESCRIPTOR.full_name}")
        msg = cls()
        msg.CopyFrom(request)
    else:
        msg = json_format.ParseDict(friendly(cls.DESCRIPTOR, dict(request)), cls())
    for name, value in fields.items():
        if value is not None:
            set_field(msg, descriptors.of(msg).fields_by_name[name], value)
    return msg


class DurationError(ValueError):
    """A Duration field's value is not a duration in any accepted form, or
    is out of a Duration's range. The message starts with the field's path."""


def set_field(msg: Message, fd: FieldDescriptor, value: Any) -> None:
    """Assign `value` to field `fd` of `msg`, accepting the friendly forms."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        m = getattr(msg, fd.name)
        m.clear()
        for k, v in dict(value).items():
            vfd = fd.message_type.fields_by_name["value"]
            if vfd.message_type is not None:
                m[k].CopyFrom(_message(GetMessageClass(vfd.message_type), v, f"{fd.name}[{k!r}]"))
            else:
                m[k] = v
        return
    if fd.is_repeated:
        target = getattr(msg, fd.name)
        del target[:]
        for i, v in enumerate(value):
            if fd.message_type is not None:
                target.add().CopyFrom(_message(GetMessageClass(fd.message_type), v, f"{fd.name}[{i}]"))
            else:
                target.append(_scalar(fd, v))
        return
    if fd.message_type is not None:
        getattr(msg, fd.name).CopyFrom(_message(GetMessageClass(fd.message_type), value, fd.name))
        return
    setattr(msg, fd.name, _scalar(fd, value))


def _scalar(fd: FieldDescriptor, value: Any) -> Any:
    if fd.enum_type is not None and isinstance(value, str):
        ev = fd.enum_type.values_by_name.get(enum_name(fd, value))
        if ev is None:
            choices = ", ".join(v.name for v in fd.enum_type.values)
            raise ValueError(f"{fd.name}: {value!r} is not one of {choices}")
        return ev.number
    return value


def _message(cls: type[Message], value: Any, path: str) -> Message:
    # path: the field's, for errors (`interval`, `probes[0]`)
    if isinstance(value, Message):
        return value
    name = cls.DESCRIPTOR.full_name
    if name == "google.protobuf.FieldMask" and not isinstance(value, Mapping):
        return cls(paths=list(value))
    if name == "google.protobuf.Duration":
        d = duration_pb2.Duration()
        d.FromJsonString(duration_json(value, path))
        return d
    if name == "google.protobuf.Timestamp" and isinstance(value, str):
        ts = timestamp_pb2.Timestamp()
        ts.FromJsonString(value)
        return ts
    return json_format.ParseDict(friendly(cls.DESCRIPTOR, dict(value), f"{path}."), cls())


_DURATION_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
                   "m": 60_000_000_000, "h": 3_600_000_000_000}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


DURATION_FORMS = ("seconds as a number (2, 0.5), or numbers with units as Go writes them "
                  "(500ms, 2s, 1m30s, 1.5h; units ns, us, ms, s, m, h, in lower case), with an optional sign")


def duration_json(value: Any, path: str) -> str:
    """A duration as a person writes it, in protobuf JSON form (`"0.500s"`):
    seconds as a number (`2`, `0.5`), or numbers with units as Go writes
    them (`500ms`, `2s`, `1m30s`, `1.5h`; units ns, us, ms, s, m, h), with an
    optional sign. Anything else (`True` included, and a number that is not
    finite) raises DurationError naming `path`, the field's, and these
    forms; a duration longer than a Duration holds (about 10,000 years)
    raises it saying "out of range"."""
    ns: int | None = None
    if isinstance(value, bool):
        pass  # True is not one second
    elif isinstance(value, (int, float)):
        if math.isfinite(value):  # .inf, .nan, 1e400: no duration
            ns = round(value * 1_000_000_000)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1 if text.startswith("-") else 1
        body = text[1:] if text[:1] in "+-" else text
        if re.fullmatch(r"\d+(\.\d*)?|\.\d+", body):
            parts = [(body, "s")]
        else:
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                parts = []
        # a 400-digit number is a float too big for one
        if parts and all(math.isfinite(float(n)) for n, _ in parts):
            ns = sign * sum(round(float(n) * _DURATION_UNITS[u]) for n, u in parts)
    if ns is None:
        raise DurationError(f"{path}: {value!r} is not a duration: use {DURATION_FORMS}")
    d = duration_pb2.Duration()
    try:
        d.FromNanoseconds(ns)
        return d.ToJsonString()
    except (ValueError, OverflowError):
        raise DurationError(f"{path}: {value!r} is out of range: a duration is at most "
                            "315,576,000,000 s (about 10,000 years) either way") from None


def enum_name(fd: FieldDescriptor, value: str) -> str:
    """`value` as the name of one of `fd`'s enum values, matched without
    regard to case (`tcp` -> `TCP`); unchanged when none matches."""
    assert fd.enum_type is not None
    if value in fd.enum_type.values_by_name:
        return value
    folded = {v.name.casefold(): v.name for v in fd.enum_type.values}
    return folded.get(value.strip().casefold(), value)


def friendly(desc: Any, data: Any, prefix: str = "") -> Any:
    """`data` (a dict in protobuf JSON form for message type `desc`, keys in
    proto or JSON spelling) with the friendly forms above turned into
    protobuf JSON: durations, and enum names in any case, at any depth.
    `prefix` begins the field paths named in errors (`egress_gateway.`)."""
    if not isinstance(data, Mapping):
        return data
    out = dict(data)
    for key, value in data.items():
        fd = desc.fields_by_name.get(key) or next((f for f in desc.fields if f.json_name == key), None)
        if fd is None or value is None:
            continue
        path = prefix + fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            vfd = fd.message_type.fields_by_name["value"]
            if isinstance(value, Mapping):
                out[key] = {k: _friendly_value(vfd, v, f"{path}[{k!r}]") for k, v in value.items()}
        elif fd.is_repeated and isinstance(value, (list, tuple)):
            out[key] = [_friendly_value(fd, v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            out[key] = _friendly_value(fd, value, path)
    return out


def _friendly_value(fd: FieldDescriptor, value: Any, path: str) -> Any:
    if fd.enum_type is not None and isinstance(value, str):
        return enum_name(fd, value)
    if fd.message_type is None:
        return value
    if fd.message_type.full_name == "google.protobuf.Duration":
        return duration_json(value, path)
    if fd.message_type.full_name.startswith("google.protobuf."):
        return value
    return friendly(fd.message_type, value, f"{path}.")
