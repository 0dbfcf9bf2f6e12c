"""Building request messages from keyword arguments.

Every generated method takes an optional request message (or dict) plus one
keyword per request field; `build` merges them. Friendlier forms are accepted
where a field's protobuf type is awkward by hand: a dict for any message, an
enum value's name for an enum, a list of paths for a FieldMask, seconds for a
Duration.
"""

from __future__ import annotations

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
        msg = json_format.ParseDict(dict(request), cls())
    for name, value in fields.items():
        if value is not None:
            set_field(msg, descriptors.of(msg).fields_by_name[name], value)
    return msg


def set_field(msg: Message, fd: FieldDescriptor, value: Any) -> None:
    """Assign `value` to field `fd` of `msg`, accepting the friendly forms."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        m = getattr(msg, fd.name)
        m.clear()
        for k, v in dict(value).items():
            vfd = fd.message_type.fields_by_name["value"]
            if vfd.message_type is not None:
                m[k].CopyFrom(_message(GetMessageClass(vfd.message_type), v))
            else:
                m[k] = v
        return
    if fd.is_repeated:
        target = getattr(msg, fd.name)
        del target[:]
        for v in value:
            if fd.message_type is not None:
                target.add().CopyFrom(_message(GetMessageClass(fd.message_type), v))
            else:
                target.append(_scalar(fd, v))
        return
    if fd.message_type is not None:
        getattr(msg, fd.name).CopyFrom(_message(GetMessageClass(fd.message_type), value))
        return
    setattr(msg, fd.name, _scalar(fd, value))


def _scalar(fd: FieldDescriptor, value: Any) -> Any:
    if fd.enum_type is not None and isinstance(value, str):
        ev = fd.enum_type.values_by_name.get(value)
        if ev is None:
            choices = ", ".join(v.name for v in fd.enum_type.values)
            raise ValueError(f"{fd.name}: {value!r} is not one of {choices}")
        return ev.number
    return value


def _message(cls: type[Message], value: Any) -> Message:
    if isinstance(value, Message):
        return value
    name = cls.DESCRIPTOR.full_name
    if name == "google.protobuf.FieldMask" and not isinstance(value, Mapping):
        return cls(paths=list(value))
    if name == "google.protobuf.Duration" and isinstance(value, (int, float)):
        d = duration_pb2.Duration()
        d.FromNanoseconds(int(value * 1e9))
        return d
    if name in ("google.protobuf.Duration", "google.protobuf.Timestamp") and isinstance(value, str):
        wkt = duration_pb2.Duration() if name == "google.protobuf.Duration" else timestamp_pb2.Timestamp()
        wkt.FromJsonString(value)
        return wkt
    return json_format.ParseDict(dict(value), cls())
