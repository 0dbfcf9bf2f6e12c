"""The API as data: services, methods and resources, read from the descriptors.

Both the clients (stubs, retry policy) and the CLI (commands, options, help)
are driven by this registry, so neither can fall behind the protos: a new RPC
appears here, and therefore in the SDK's service config and the CLI, as soon
as the generated code has it.
"""

from __future__ import annotations

import importlib
import re
import types
from dataclasses import dataclass, field
from functools import cache

from google.api import resource_pb2
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor

from meshgate.api.v1 import (
    agent_pb2,
    auth_pb2,
    egress_pb2,
    enrollment_pb2,
    events_pb2,
    external_client_pb2,
    keys_pb2,
    network_pb2,
    node_pb2,
    policy_pb2,
)
from meshgate.sdk._comments import COMMENTS

PACKAGE = "meshgate.api.v1"
# Every module that defines services; a new .proto with a service is added here
# (the enumeration test fails until it is).
SERVICE_MODULES = (network_pb2, node_pb2, egress_pb2, enrollment_pb2, external_client_pb2, policy_pb2,
                   events_pb2, auth_pb2, agent_pb2, keys_pb2)
KEY_SERVICE = f"{PACKAGE}.KeyService"
# CLI groups named otherwise than after their resource (`meshgate audit list`).
COMMAND_NAMES = {"AuditRecordService": "audit"}


def kebab(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def snake(name: str) -> str:
    return kebab(name).replace("-", "_")


def camel_words(name: str) -> list[str]:
    return re.findall(r"[A-Z][a-z0-9]*", name)


@dataclass(frozen=True)
class Method:
    service: Service
    descriptor: MethodDescriptor

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def full_name(self) -> str:
        return f"{self.service.full_name}.{self.name}"

    @property
    def python_name(self) -> str:
        return snake(self.name)

    @property
    def input(self) -> Descriptor:
        return self.descriptor.input_type

    @property
    def output(self) -> Descriptor:
        return self.descriptor.output_type

    @property
    def client_streaming(self) -> bool:
        return self.descriptor.client_streaming

    @property
    def server_streaming(self) -> bool:
        return self.descriptor.server_streaming

    @property
    def idempotent(self) -> bool:
        """Safe to send again after UNAVAILABLE: reads, watches, and updates and deletes (same outcome twice)."""
        return not self.client_streaming and self.name.startswith(("Get", "List", "Watch", "Update", "Delete"))

    @property
    def verb(self) -> str:
        """The CLI verb: the method name without the service's resource (`GetNetworkStatus` -> `get-status`)."""
        words = camel_words(self.name)
        if not self.service.has_resource:
            return "-".join(w.lower() for w in words)
        res = camel_words(self.service.resource)
        for cand in (res, _plural(res)):
            n = len(cand)
            if len(words) > n and words[1 : 1 + n] == cand:
                words = [words[0], *words[1 + n :]]
                break
        return "-".join(w.lower() for w in words)

    @property
    def help(self) -> str:
        c = COMMENTS.get(self.full_name)
        if c:
            return c
        # Not every RPC has a comment in the protos; say what it does from its name.
        return f"{' '.join(camel_words(self.name)).capitalize()} ({self.service.name}.{self.name})."


def _plural(words: list[str]) -> list[str]:
    last = words[-1]
    last = last[:-1] + "ies" if last.endswith("y") and last[-2:-1] not in "aeiou" else last + "s"
    return [*words[:-1], last]


@dataclass(frozen=True)
class Service:
    descriptor: ServiceDescriptor
    module: types.ModuleType
    methods: list[Method] = field(default_factory=list, compare=False)

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def full_name(self) -> str:
        return self.descriptor.full_name

    @property
    def resource(self) -> str:
        """`EgressGateway` for `EgressGatewayService`."""
        return self.name[: -len("Service")] if self.name.endswith("Service") else self.name

    @property
    def has_resource(self) -> bool:
        """Whether the service manages a resource message named like it (`NodeService`: `Node`)."""
        md = self.module.DESCRIPTOR.message_types_by_name.get(self.resource)
        return md is not None and md.GetOptions().HasExtension(resource_pb2.resource)

    @property
    def command(self) -> str:
        return COMMAND_NAMES.get(self.name, kebab(self.resource))

    @property
    def help(self) -> str:
        return COMMENTS.get(self.full_name) or f"The {self.name} API."

    def stub(self, channel):
        grpc_mod = importlib.import_module(self.module.__name__ + "_grpc")
        return getattr(grpc_mod, f"{self.name}Stub")(channel)


@cache
def services() -> tuple[Service, ...]:
    out = []
    for mod in SERVICE_MODULES:
        for sd in mod.DESCRIPTOR.services_by_name.values():
            s = Service(sd, mod)
            s.methods.extend(Method(s, md) for md in sd.methods)
            out.append(s)
    return tuple(out)


def method(full_name: str) -> Method:
    for s in services():
        for m in s.methods:
            if m.full_name == full_name:
                return m
    raise KeyError(full_name)


@dataclass(frozen=True)
class Resource:
    """A resource kind and the standard methods that serve it."""

    type_name: str  # meshgate.io/Node
    message: Descriptor
    pattern: str  # networks/{network}/nodes/{node}
    collection: str  # nodes
    get: Method | None
    update: Method | None
    update_field: str  # the resource's field in the Update request


@cache
def resources() -> tuple[Resource, ...]:
    out = []
    for s in services():
        by_name = {m.name: m for m in s.methods}
        for mod in (s.module,):
            for md in mod.DESCRIPTOR.message_types_by_name.values():
                opts = md.GetOptions()
                if not opts.HasExtension(resource_pb2.resource):
                    continue
                res = opts.Extensions[resource_pb2.resource]
                upd = by_name.get(f"Update{md.name}")
                upd_field = ""
                if upd is not None:
                    upd_field = next(f.name for f in upd.input.fields if f.message_type is md)
                out.append(Resource(res.type, md, res.pattern[0], res.pattern[0].split("/")[-2],
                                    by_name.get(f"Get{md.name}"), upd, upd_field))
    return tuple(out)


def resource_of_name(name: str) -> Resource:
    """The resource kind of a resource name like `networks/a/nodes/b`."""
    parts = name.split("/")
    for r in resources():
        pat = r.pattern.split("/")
        if len(pat) == len(parts) and all(p == q for p, q in zip(pat[::2], parts[::2], strict=True)):
            return r
    raise ValueError(f"{name!r} is not the name of a known resource")
