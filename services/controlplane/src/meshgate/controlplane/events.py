"""EventService.Watch: resource change events from an etcd watch.

One etcd watch over the control plane's whole prefix (resources of one network
live under several per-kind prefixes, and a single watch is the only way to
keep etcd's total order across them), filtered here by network and resource
type. Keys that are not resources (ipam, pubkeys, guards) are dropped. Every
event carries the etcd revision of its change; a caller resumes by passing the
last revision it saw as `start_revision` (exclusive) and gets exactly the
events after it, in order.

Hazards:
- All Watch calls of a replica share aetcd's single watch stream. If that
  stream dies (etcd restarts), every Watch call ends with UNAVAILABLE and the
  caller resumes from its last revision; nothing is silently skipped.
- A revision older than etcd's last compaction cannot be replayed: the call
  fails with FAILED_PRECONDITION and the caller must list again. A revision
  beyond etcd's current one is OUT_OF_RANGE (etcd would wait for it, and one
  near 2^63 overflows the watch request).
- A watch whose creation fails (refused, unencodable) fails alone: the shared
  stream stays usable for the next Watch (see `meshgate.common.etcd._Watcher`).
- A forced network delete removes many resources in one revision; resuming
  from that revision skips all of them together, which is the point.
- The etcd watch is cancelled in `finally`, also when the caller goes away,
  so an abandoned stream does not keep a watcher alive in etcd.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aetcd.exceptions
import grpc
from google.protobuf.message import Message

from meshgate.api.v1 import (
    egress_pb2,
    enrollment_pb2,
    events_pb2,
    events_pb2_grpc,
    external_client_pb2,
    network_pb2,
    node_pb2,
    policy_pb2,
)
from meshgate.common.errors import ApiError, FieldViolation, invalid_argument, shown
from meshgate.common.etcd import Etcd, EtcdUnavailable, prefix_end
from meshgate.common.server import ServiceBinding
from meshgate.controlplane import admission, names
from meshgate.controlplane.auth.guard import visible_networks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventKind:
    collection: str  # first key segment and resource-name collection
    type_name: str  # meshgate.io/Node
    message: type[Message]
    field: str  # the WatchEvent oneof field


KINDS = {
    k.collection: k
    for k in (
        EventKind("networks", "meshgate.io/Network", network_pb2.Network, "network"),
        EventKind("nodes", "meshgate.io/Node", node_pb2.Node, "node"),
        EventKind("egressGateways", "meshgate.io/EgressGateway", egress_pb2.EgressGateway, "egress_gateway"),
        EventKind("enrollmentKeys", "meshgate.io/EnrollmentKey", enrollment_pb2.EnrollmentKey, "enrollment_key"),
        EventKind("externalClients", "meshgate.io/ExternalClient", external_client_pb2.ExternalClient, "external_client"),
        EventKind("accessPolicies", "meshgate.io/AccessPolicy", policy_pb2.AccessPolicy, "access_policy"),
    )
}
TYPE_NAMES = {k.type_name for k in KINDS.values()}


@dataclass(frozen=True)
class Filter:
    network: str  # empty for every network
    types: frozenset[str]  # empty for every type
    visible: frozenset[str] | None = None  # the networks the caller may see (None: all)

    def wants(self, kind: EventKind, network: str) -> bool:
        return ((not self.network or self.network == network) and (not self.types or kind.type_name in self.types)
                and (self.visible is None or network in self.visible))


def parse_request(request: events_pb2.WatchRequest) -> Filter:
    violations = []
    network = ""
    if request.parent:
        network = names.parse_network(request.parent) or ""
        if not network:
            violations.append(FieldViolation("parent", f"{shown(request.parent)} is not a network name (networks/{{network}})"))
    if request.start_revision < 0:
        violations.append(FieldViolation("start_revision", "must not be negative"))
    for i, t in enumerate(request.resource_types):
        if t not in TYPE_NAMES:
            violations.append(FieldViolation(f"resource_types[{i}]", f"unknown type {shown(t)}; known: {', '.join(sorted(TYPE_NAMES))}"))
    if violations:
        raise invalid_argument(violations)
    return Filter(network, frozenset(request.resource_types))


def to_event(prefix: bytes, kind_name: str, key: bytes, value: bytes, create_revision: int, mod_revision: int,
             prev_value: bytes | None, prev_mod_revision: int, flt: Filter) -> events_pb2.WatchEvent | None:
    """The WatchEvent for one etcd event, or None if it is not wanted.

    Pure: takes the fields of the etcd event rather than aetcd's types, so it
    is testable without etcd.
    """
    if not key.startswith(prefix + b"/"):
        return None
    parts = key[len(prefix) + 1 :].decode(errors="replace").split("/")
    kind = KINDS.get(parts[0])
    if kind is None:
        return None
    if kind.collection == "networks":
        if len(parts) != 2:
            return None
        network, name = parts[1], names.network_name(parts[1])
    else:
        if len(parts) != 3:
            return None
        network, name = parts[1], names.child_name(parts[1], kind.collection, parts[2])
    if not flt.wants(kind, network):
        return None
    ev = events_pb2.WatchEvent(revision=mod_revision, resource_name=name)
    if kind_name == "DELETE":
        ev.type = events_pb2.WatchEvent.DELETED
        if prev_value is None:
            # The previous value was compacted away: the name alone tells what went.
            return ev
        value, etag = prev_value, prev_mod_revision
    else:
        ev.type = events_pb2.WatchEvent.CREATED if create_revision == mod_revision else events_pb2.WatchEvent.UPDATED
        etag = mod_revision
    resource: Any = kind.message.FromString(value)  # every resource message has an etag
    resource.etag = str(etag)
    getattr(ev, kind.field).CopyFrom(resource)
    return ev


class EventService(events_pb2_grpc.EventServiceServicer):
    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    async def Watch(self, request, context) -> AsyncIterator[events_pb2.WatchEvent]:
        flt = dataclasses.replace(parse_request(request), visible=visible_networks("events.watch"))
        prefix = self.etcd.prefix
        current = await self.etcd.revision()
        if request.start_revision > current:
            raise _beyond(request.start_revision, current)
        start = (request.start_revision or current) + 1
        watch = await self._open(prefix + b"/", prefix_end(prefix + b"/"), start)
        log.debug("watch from revision %d (network %r, types %s)", start, flt.network, sorted(flt.types))
        try:
            # Headers go out once etcd has accepted the watch, so a caller can
            # tell when changes it makes from now on are sure to be seen.
            await context.send_initial_metadata((("meshgate-watch-start-revision", str(start)),))
            try:
                async for e in watch:
                    prev = e.prev_kv
                    ev = to_event(
                        prefix, e.kind, e.kv.key, e.kv.value, e.kv.create_revision, e.kv.mod_revision,
                        prev.value if prev is not None and prev.mod_revision else None,
                        prev.mod_revision if prev is not None else 0, flt,
                    )
                    if ev is not None:
                        yield ev
            except aetcd.exceptions.RevisionCompactedError as e:
                raise self._compacted(request.start_revision, e.compacted_revision) from e
            except (aetcd.exceptions.ClientError, grpc.aio.AioRpcError) as e:
                raise EtcdUnavailable(f"etcd watch failed: {e}") from e
            # The shared etcd watch stream ended without an error (shutdown).
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "event stream ended; resume from the last revision received")
        finally:
            try:
                await watch.cancel()
            except Exception:  # noqa: BLE001 - the stream may already be gone
                log.debug("cancelling etcd watch failed", exc_info=True)

    async def _open(self, key: bytes, end: bytes, start: int):
        try:
            return await self.etcd.client.watch(key, range_end=end, start_revision=start, prev_kv=True)
        except aetcd.exceptions.RevisionCompactedError as e:
            raise self._compacted(start - 1, e.compacted_revision) from e
        except (aetcd.exceptions.ClientError, grpc.aio.AioRpcError) as e:
            raise EtcdUnavailable(f"etcd watch failed: {e}") from e

    @staticmethod
    def _compacted(start_revision: int, compacted: int) -> ApiError:
        return ApiError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"revision {start_revision} is compacted; list again and watch from revision {compacted} or later",
            violations=[FieldViolation("start_revision", f"older than the compacted revision {compacted}")],
            metadata={"compact_revision": str(compacted)},
        )


def _beyond(start_revision: int, current: int) -> ApiError:
    """A start revision etcd has not reached: no caller can have seen it (every
    revision a caller saw came from this etcd), and etcd would wait for it
    silently, or fail to encode it near 2^63."""
    return ApiError(
        grpc.StatusCode.OUT_OF_RANGE,
        f"start_revision {start_revision} is beyond the current revision {current}; "
        "pass the last revision you received, or 0 to start now",
        "INVALID_FIELD",
        [FieldViolation("start_revision", f"is beyond the store's current revision {current}")],
        metadata={"current_revision": str(current)},
    )


def binding(etcd: Etcd, protect) -> ServiceBinding:
    """The EventService binding, its RPCs passed through `protect` (the access guard)."""
    service = events_pb2.DESCRIPTOR.services_by_name["EventService"]
    servicer = protect(admission.wrap(EventService(etcd), service), service)
    return ServiceBinding.of(events_pb2, events_pb2_grpc, "EventService", servicer)
