"""Principals, roles and permissions: what an authenticated caller may do.

A permission is `{collection}.{verb}` as the access rules in the protos name
them (`nodes.update`), plus `secrets.read` for calls that return secret
material. A role is a named set of permissions; a binding gives a role (or an
explicit list of permissions) for some networks or for all of them. A
principal holds its bindings; `allows(permission, network)` is the one check
the access guard makes.

Pure: no I/O, no clock (expiry is checked where the credential is).

Hazard: the set of every permission comes from the protos' access rules
(`rules.all_permissions()`), so a role defined by exclusion (network-admin:
everything but ...) grows when an RPC is added. That is deliberate for the
resources inside a network, and why everything outside them (tokens, creating
and deleting networks) is excluded by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property

SECRETS = "secrets.read"

ROLES = ("admin", "network-admin", "network-editor", "viewer", "enroller")

# Permissions that act outside any one network: only `admin` has them.
_OUTSIDE = ("networks.create", "networks.delete", "tokens.")


@cache
def role_permissions(role: str) -> frozenset[str]:
    """The permissions of a predefined role (empty for an unknown one)."""
    from meshgate.controlplane.auth.rules import all_permissions

    every = all_permissions() | {SECRETS}
    if role == "admin":
        return frozenset(every)
    if role == "network-admin":
        return frozenset(p for p in every if not p.startswith(_OUTSIDE))
    if role == "network-editor":
        return role_permissions("network-admin") - {SECRETS}
    if role == "viewer":
        return frozenset(
            p for p in every
            if p.endswith((".get", ".list", ".getStatus")) and not p.startswith(("tokens.", "audit."))
        ) | {"events.watch"}
    if role == "enroller":
        return frozenset({
            "networks.get", "nodes.get", "nodes.list", "enrollmentKeys.create", "enrollmentKeys.get",
            "enrollmentKeys.list", "enrollmentKeys.revoke", SECRETS,
        })
    return frozenset()


@dataclass(frozen=True)
class Binding:
    """A role (or explicit permissions) for some networks (ids; empty: all)."""

    role: str = ""
    permissions: frozenset[str] = frozenset()
    networks: frozenset[str] = frozenset()

    @cached_property
    def granted(self) -> frozenset[str]:
        return role_permissions(self.role) | self.permissions if self.role else self.permissions

    def covers(self, network: str | None) -> bool:
        """Whether the binding applies to `network` (None: to every network)."""
        if not self.networks:
            return True
        return network is not None and network in self.networks


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str  # tokens/{id} or oidc:{issuer}#{subject}
    authentication: str  # token | oidc
    bindings: tuple[Binding, ...] = ()
    expire_time: float | None = None  # seconds since the epoch
    token_id: str = ""  # for API tokens: whose last use to record

    def allows(self, permission: str, network: str | None) -> bool:
        """Whether the principal holds `permission` for `network` (None: for
        every network, which only unscoped bindings give)."""
        return any(permission in b.granted and b.covers(network) for b in self.bindings)

    def networks_for(self, permission: str) -> frozenset[str] | None:
        """The networks where `permission` is held: None for all of them."""
        out: set[str] = set()
        for b in self.bindings:
            if permission in b.granted:
                if not b.networks:
                    return None
                out |= b.networks
        return frozenset(out)


ANONYMOUS = Principal("anonymous", "none")


def make_binding(role: str, permissions: list[str] | tuple[str, ...], networks: list[str] | tuple[str, ...]) -> Binding:
    """A binding from its parts as the API and config files give them
    (networks as `networks/{id}`); ValueError says what is wrong."""
    from meshgate.controlplane.auth.rules import all_permissions, network_of

    if bool(role) == bool(permissions):
        raise ValueError("give either a role or a list of permissions")
    if role and role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    known = all_permissions() | {SECRETS}
    bad = [p for p in permissions if p not in known]
    if bad:
        raise ValueError(f"unknown permission {bad[0]!r}")
    ids = []
    for n in networks:
        net = network_of(n)
        if net is None or n != f"networks/{net}":
            raise ValueError(f"{n!r} is not a network name (networks/{{network}})")
        ids.append(net)
    if role == "admin" and ids:
        raise ValueError("the admin role is never scoped to networks")
    if ids and any(p.startswith(_OUTSIDE) for p in (role_permissions(role) if role else permissions)):
        raise ValueError("permissions outside networks (tokens, creating or deleting networks) cannot be scoped")
    return Binding(role, frozenset(permissions), frozenset(ids))


def grantable(creator: Principal, binding: Binding) -> bool:
    """Whether `creator` holds every permission `binding` would give, for
    every network it would give it in: a token never grants more than its
    creator holds."""
    for perm in binding.granted:
        if binding.networks:
            if not all(creator.allows(perm, n) for n in binding.networks):
                return False
        elif not creator.allows(perm, None):
            return False
    return True
