"""Field masks and etags: what changed between two versions of a resource.

`diff(before, after)` gives the top-level paths that differ, the mask an
Update needs to change exactly those fields; output-only fields and the etag
are never part of it. Presence counts for fields that track it (`optional`
scalars, messages): setting `nat` to its default is a change.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.api import field_behavior_pb2
from google.protobuf import field_mask_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from meshgate.sdk import _descriptors as descriptors

_SKIP = {"etag", "name"}


def behaviors(fd: FieldDescriptor) -> set[int]:
    # googleapis-common-protos' stub types the extension as a plain FieldDescriptor
    return set(fd.GetOptions().Extensions[field_behavior_pb2.field_behavior])  # type: ignore[index]


def mutable(fd: FieldDescriptor) -> bool:
    """Whether an Update may name this field."""
    b = behaviors(fd)
    return fd.name not in _SKIP and not b & {field_behavior_pb2.OUTPUT_ONLY, field_behavior_pb2.IMMUTABLE, field_behavior_pb2.IDENTIFIER}


def of(paths: Iterable[str]) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=sorted(set(paths)))


def diff(before: Message, after: Message) -> field_mask_pb2.FieldMask:
    """The mask of mutable top-level fields whose values differ."""
    if before.DESCRIPTOR is not after.DESCRIPTOR:
        raise TypeError("diff needs two messages of the same type")
    paths = []
    for fd in descriptors.of(after).fields:
        if not mutable(fd):
            continue
        if fd.has_presence and before.HasField(fd.name) != after.HasField(fd.name) or getattr(before, fd.name) != getattr(after, fd.name):
            paths.append(fd.name)
    return of(paths)
