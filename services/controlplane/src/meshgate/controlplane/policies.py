"""Access policies: which nodes may reach which when the network's default is DENY.

Selectors are `*`, `tag:{tag}`, `node:{node id}`, `egress:{gateway id}` and
`client:{external client id}` (see selectors.py): a `node:`, `egress:` or `client:`
selector must name an object of the network, while a policy may name a tag no
node carries yet. How policies become packet filters: compiler.py.
"""

from __future__ import annotations

from meshgate.api.v1 import policy_pb2
from meshgate.common.errors import FieldViolation, already_exists, invalid_argument
from meshgate.controlplane import masks, names, selectors, store, validation
from meshgate.controlplane.base import Kind, Resources
from meshgate.controlplane.networks import Networks
from meshgate.controlplane.txn import retrying

KIND = Kind("meshgate.io/AccessPolicy", "accessPolicies", policy_pb2.AccessPolicy)
MUTABLE = frozenset(
    {"sources", "destinations", "protocol", "ports", "action", "priority", "bidirectional", "disabled", "description"}
)
ALL_FIELDS = frozenset(f.name for f in policy_pb2.AccessPolicy.DESCRIPTOR.fields)
SELECTOR_KINDS = ("tag", "node", "egress", "client")
# A destination may also name an egress domain (`domain:db.example.com`): the
# addresses the gateways declaring it learned.
DESTINATION_KINDS = (*SELECTOR_KINDS, "domain")


def _selectors(field: str, values, kinds=SELECTOR_KINDS) -> list[FieldViolation]:
    return selectors.syntax(field, list(values), kinds)


def validate(p, prefix: str = "access_policy") -> list[FieldViolation]:
    out = _selectors(f"{prefix}.sources", list(p.sources)) + _selectors(
        f"{prefix}.destinations", list(p.destinations), DESTINATION_KINDS)
    for i, r in enumerate(p.ports):
        if not 1 <= r.first <= 65535:
            out.append(FieldViolation(f"{prefix}.ports[{i}].first", f"{r.first} is not a port number"))
        elif r.last and not r.first <= r.last <= 65535:
            out.append(FieldViolation(f"{prefix}.ports[{i}].last", f"{r.last} is not a port at or after {r.first}"))
    if p.ports and p.protocol not in (policy_pb2.TCP, policy_pb2.UDP):
        out.append(FieldViolation(f"{prefix}.ports", "ports need protocol TCP or UDP"))
    if p.priority > validation.MAX_PRIORITY:
        out.append(FieldViolation(f"{prefix}.priority", f"{p.priority} is above {validation.MAX_PRIORITY}"))
    out += validation.check_text(f"{prefix}.description", p.description, validation.MAX_DESCRIPTION)
    return out


async def _require_named(etcd, net_id: str, p, prefix: str):
    return await selectors.require_existing(
        etcd, net_id, [(f"{prefix}.sources", p.sources), (f"{prefix}.destinations", p.destinations)])


class AccessPolicies(Resources[policy_pb2.AccessPolicy]):
    kind = KIND

    def __init__(self, etcd, networks: Networks) -> None:
        super().__init__(etcd)
        self.networks = networks

    async def create(self, req: policy_pb2.CreateAccessPolicyRequest) -> policy_pb2.AccessPolicy:
        net_id = self.parse_parent(req.parent)
        errs = validation.check_id("access_policy_id", req.access_policy_id) + validate(req.access_policy)
        if errs:
            raise invalid_argument(errs)
        name = names.child_name(net_id, KIND.collection, req.access_policy_id)
        key = self.key_of(net_id, req.access_policy_id)

        async def attempt(_: int):
            _net, net_kv = await self.networks.require(net_id, "parent")
            if await self.etcd.get(key) is not None:
                raise already_exists(KIND.type_name, name)
            named = await _require_named(self.etcd, net_id, req.access_policy, "access_policy")
            p = policy_pb2.AccessPolicy()
            p.CopyFrom(req.access_policy)
            p.name = name
            if p.action == policy_pb2.POLICY_ACTION_UNSPECIFIED:
                p.action = policy_pb2.ACCEPT
            p.uid = store.new_uid()
            p.create_time.CopyFrom(store.now())
            p.update_time.CopyFrom(p.create_time)
            p.etag = ""
            if req.validate_only:
                return p
            rev = await self.commit(
                [self.t.mod(net_kv.key) == net_kv.mod_revision, self.t.create(key) == 0, *named],
                [self.t.put(key, store.encode(p))],
            )
            p.etag = str(rev)
            return p

        return await retrying(attempt, f"create {name}")

    async def update(self, req: policy_pb2.UpdateAccessPolicyRequest) -> policy_pb2.AccessPolicy:
        name = req.access_policy.name
        net_id, _ = self.parse_name(name, "access_policy.name")
        paths, violations = masks.resolve(list(req.update_mask.paths), MUTABLE, ALL_FIELDS)
        if violations:
            raise invalid_argument(violations)

        async def attempt(_: int):
            current, kv = await self.read(name)
            self.check_etag(req.access_policy.etag, kv, name)
            assert isinstance(current, policy_pb2.AccessPolicy)
            updated = policy_pb2.AccessPolicy()
            updated.CopyFrom(current)
            masks.apply(req.access_policy, updated, paths)
            if updated.action == policy_pb2.POLICY_ACTION_UNSPECIFIED:
                updated.action = policy_pb2.ACCEPT  # as on create: what unspecified means
            errs = validate(updated)
            if errs:
                raise invalid_argument(errs)
            # only the selectors being written must exist: one the policy already held
            # may name a node deleted since, and an update of another field keeps it
            named = await selectors.require_existing(self.etcd, net_id, [
                (f"access_policy.{f}", getattr(updated, f)) for f in ("sources", "destinations") if f in paths])
            updated.update_time.CopyFrom(store.now())
            if req.validate_only:
                return updated
            rev = await self.commit(
                [self.t.mod(kv.key) == kv.mod_revision, *named], [self.t.put(kv.key, store.encode(updated))],
                etag=req.access_policy.etag, kv=kv, name=name,
            )
            updated.etag = str(rev)
            return updated

        return await retrying(attempt, f"update {name}")

    async def delete(self, req: policy_pb2.DeleteAccessPolicyRequest) -> None:
        async def attempt(_: int) -> None:
            _p, kv = await self.read(req.name)
            self.check_etag(req.etag, kv, req.name)
            await self.commit(
                [self.t.mod(kv.key) == kv.mod_revision], [self.t.delete(kv.key)], etag=req.etag, kv=kv, name=req.name
            )

        await retrying(attempt, f"delete {req.name}")
