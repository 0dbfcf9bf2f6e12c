"""Access rules of RPCs, read from the protos' method options.

Each RPC declares `option (meshgate.api.v1.access) = {...}` next to its
definition (auth.proto's AccessRule); this module turns those into `Rule`s
for every service that enforces them: the control plane (token roles,
controlplane/auth) and the key service (caller certificates,
keyservice/access.py). It also says, for a request, which network it is about
and which resource it names (for the audit log).

Hazard: a method with no rule has no `Rule`; `rules_for()` raises for it, and
the server refuses to start (deny by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from meshgate.api.v1 import auth_pb2


class MissingRule(Exception):
    """An RPC has no access rule: the server must not serve it."""


@dataclass(frozen=True)
class Rule:
    method: str  # /meshgate.api.v1.NodeService/UpdateNode
    permission: str
    scope_field: tuple[str, ...]
    returns_secret: bool
    mutation: bool
    agent: bool
    collection: str
    id_field: str
    per_item: bool
    callers: frozenset[str] = frozenset()

    def scope_value(self, request: Message) -> str:
        """The value of the scope field in `request` ('' when unset)."""
        msg = request
        for part in self.scope_field[:-1]:
            msg = getattr(msg, part)
        return getattr(msg, self.scope_field[-1]) if self.scope_field else ""

    def resource(self, request: Message) -> str:
        """The resource the request is about, as well as it can be told."""
        if self.id_field:
            new_id = getattr(request, self.id_field, "")
            parent = self.scope_value(request) if self.scope_field == ("parent",) else ""
            return f"{parent}/{self.collection}/{new_id}" if parent else f"{self.collection}/{new_id}"
        if self.scope_field:
            return self.scope_value(request)
        name = getattr(request, "name", "")
        return name if isinstance(name, str) else ""


def method_path(service: ServiceDescriptor, method: MethodDescriptor) -> str:
    return f"/{service.full_name}/{method.name}"


def rule_of(service: ServiceDescriptor, method: MethodDescriptor) -> Rule | None:
    opts = method.GetOptions()
    if not opts.HasExtension(auth_pb2.access):
        return None
    r = opts.Extensions[auth_pb2.access]
    return Rule(
        method=method_path(service, method), permission=r.permission,
        scope_field=tuple(r.scope_field.split(".")) if r.scope_field else (),
        returns_secret=r.returns_secret, mutation=r.mutation, agent=r.agent,
        collection=r.collection, id_field=r.id_field, per_item=r.per_item, callers=frozenset(r.callers),
    )


def rules_for(service: ServiceDescriptor) -> dict[str, Rule]:
    """Method name -> rule for every method of `service`; raises MissingRule
    naming the first method without one."""
    out = {}
    for m in service.methods:
        rule = rule_of(service, m)
        if rule is None:
            raise MissingRule(f"{service.full_name}.{m.name} declares no access rule "
                              "(option (meshgate.api.v1.access)); refusing to serve it")
        out[m.name] = rule
    return out


def network_of(name: str) -> str | None:
    """The network id a resource name lies in (`networks/{id}/...`), or None."""
    parts = name.split("/")
    if len(parts) >= 2 and parts[0] == "networks" and parts[1]:
        return parts[1]
    return None
