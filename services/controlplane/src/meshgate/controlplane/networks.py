"""Networks: create, update and delete, with CIDR overlap checks across networks.

Overlap checks read every network and compare the `guards/networks` key in the
write transaction, so two concurrent creates with overlapping ranges cannot
both succeed. A forced delete removes the network and every key under its
per-network prefixes in one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import duration_pb2

from meshgate.api.v1 import network_pb2
from meshgate.common.errors import (
    FieldViolation,
    already_exists,
    failed_precondition,
    invalid_argument,
    reference_not_found,
    shown,
)
from meshgate.common.etcd import TxnOp
from meshgate.controlplane import masks, names, store, validation
from meshgate.controlplane.base import Kind, Resources
from meshgate.controlplane.txn import decode_page_token, encode_page_token, retrying

KIND = Kind("meshgate.io/Network", "networks", network_pb2.Network)
MUTABLE = frozenset(
    {
        "display_name", "description", "listen_port", "mtu", "persistent_keepalive", "default_policy",
        "disable_preshared_keys", "max_node_key_age", "preshared_key_rotation_period", "labels",
    }
)
ALL_FIELDS = frozenset(f.name for f in network_pb2.Network.DESCRIPTOR.fields)

DEFAULT_LISTEN_PORT = 51820
DEFAULT_MTU = 1420
DEFAULT_KEEPALIVE_S = 25


def apply_defaults(net: network_pb2.Network) -> None:
    if not net.listen_port:
        net.listen_port = DEFAULT_LISTEN_PORT
    if not net.mtu:
        net.mtu = DEFAULT_MTU
    if not net.HasField("persistent_keepalive"):
        net.persistent_keepalive.CopyFrom(duration_pb2.Duration(seconds=DEFAULT_KEEPALIVE_S))
    if net.default_policy == network_pb2.DEFAULT_POLICY_UNSPECIFIED:
        net.default_policy = network_pb2.ALLOW


class Networks(Resources[network_pb2.Network]):
    kind = KIND

    def parse_name(self, name: str, field: str = "name") -> tuple[str, str]:
        net = names.parse_network(name)
        if net is None:
            raise invalid_argument([FieldViolation(field, f"{shown(name)} is not a network name (networks/{{network}})")])
        return net, net

    def key_of(self, net: str, rid: str) -> bytes:
        return self.keys.network(rid)

    async def _all(self) -> tuple[list[network_pb2.Network], int]:
        kvs, _ = await self.etcd.list_prefix(self.keys.networks())
        guard = await self.etcd.get(self.keys.guard_networks())
        return [store.decode(network_pb2.Network, kv) for kv in kvs], guard.mod_revision if guard else 0

    async def create(self, req: network_pb2.CreateNetworkRequest) -> network_pb2.Network:
        violations = validation.check_id("network_id", req.network_id)
        violations += validation.network(req.network)
        if violations:
            raise invalid_argument(violations)
        name = names.network_name(req.network_id)

        async def attempt(_: int) -> network_pb2.Network:
            others, guard_rev = await self._all()
            if any(o.name == name for o in others):
                raise already_exists(KIND.type_name, name)
            net = network_pb2.Network()
            net.CopyFrom(req.network)
            net.name = name
            net.ipv4_cidr = validation.canonical_cidr(net.ipv4_cidr)
            net.ipv6_cidr = validation.canonical_cidr(net.ipv6_cidr)
            overlaps = validation.network_overlaps(net, others)
            if overlaps:
                raise _overlap(overlaps)
            apply_defaults(net)
            net.uid = store.new_uid()
            net.create_time.CopyFrom(store.now())
            net.update_time.CopyFrom(net.create_time)
            net.etag = ""
            if req.validate_only:
                return net
            key = self.keys.network(req.network_id)
            rev = await self.commit(
                [self.t.create(key) == 0, self.t.mod(self.keys.guard_networks()) == guard_rev],
                [self.t.put(key, store.encode(net)), self.t.put(self.keys.guard_networks(), b"")],
            )
            net.etag = str(rev)
            return net

        return await retrying(attempt, f"create {name}")

    async def list(self, page_size: int, page_token: str):
        size, errs = validation.page_size("page_size", page_size)
        if errs:
            raise invalid_argument(errs)
        after = decode_page_token(page_token, "")
        prefix = self.keys.networks()
        start, end = store.range_after(prefix, after)
        kvs, more, _ = await self.etcd.range(start, end, limit=size)
        items = [store.decode(network_pb2.Network, kv) for kv in kvs]
        token = encode_page_token("", kvs[-1].key[len(prefix):].decode()) if more and kvs else ""
        return items, token

    async def list_among(self, ids: Sequence[str], page_size: int, page_token: str):
        """Like `list`, over the networks `ids` (sorted) only: a caller scoped to
        them pages without page tokens naming any other network."""
        size, errs = validation.page_size("page_size", page_size)
        if errs:
            raise invalid_argument(errs)
        after = decode_page_token(page_token, "scoped")
        items = []
        rest = [i for i in ids if i > after]
        for i, net_id in enumerate(rest):
            kv = await self.etcd.get(self.keys.network(net_id))
            if kv is not None:
                items.append(store.decode(network_pb2.Network, kv))
            if len(items) == size:
                more = i + 1 < len(rest)
                return items, encode_page_token("scoped", net_id) if more else ""
        return items, ""

    async def update(self, req: network_pb2.UpdateNetworkRequest) -> network_pb2.Network:
        name = req.network.name
        self.parse_name(name, "network.name")
        paths, violations = masks.resolve(list(req.update_mask.paths), MUTABLE, ALL_FIELDS)
        if violations:
            raise invalid_argument(violations)

        async def attempt(_: int) -> network_pb2.Network:
            current, kv = await self.read(name)
            self.check_etag(req.network.etag, kv, name)
            updated = network_pb2.Network()
            updated.CopyFrom(current)
            masks.apply(req.network, updated, paths)
            errs = validation.network(updated)
            if errs:
                raise invalid_argument(errs)
            apply_defaults(updated)
            updated.update_time.CopyFrom(store.now())
            if req.validate_only:
                return updated
            rev = await self.commit(
                [self.t.mod(kv.key) == kv.mod_revision], [self.t.put(kv.key, store.encode(updated))],
                etag=req.network.etag, kv=kv, name=name,
            )
            updated.etag = str(rev)
            return updated

        return await retrying(attempt, f"update {name}")

    async def delete(self, req: network_pb2.DeleteNetworkRequest) -> None:
        net_id, _ = self.parse_name(req.name)

        async def attempt(_: int) -> None:
            current, kv = await self.read(req.name)
            self.check_etag(req.etag, kv, req.name)
            nodes, _, _ = await self.etcd.range(
                self.keys.nodes(net_id), store.range_after(self.keys.nodes(net_id), "")[1], limit=1, keys_only=True
            )
            guard = await self.etcd.get(self.keys.guard(net_id, "nodes"))
            if nodes and not req.force:
                raise failed_precondition(
                    f"network {shown(req.name)} still has nodes; delete them first or pass force",
                    "RESOURCE_IN_USE", req.name, KIND.type_name,
                )
            if req.validate_only:
                return None
            ops: list[TxnOp] = [self.t.delete(kv.key)]
            for p in self.keys.network_prefixes(net_id):
                ops.append(self.t.delete(p, store.range_after(p, "")[1]))
            ops.extend(self.t.delete(k) for k in self.keys.network_singles(net_id))
            ops.append(self.t.put(self.keys.guard_networks(), b""))
            compare = [self.t.mod(kv.key) == kv.mod_revision]
            if not req.force:
                compare.append(self.t.mod(self.keys.guard(net_id, "nodes")) == (guard.mod_revision if guard else 0))
            await self.commit(compare, ops, etag=req.etag, kv=kv, name=req.name)
            return None

        await retrying(attempt, f"delete {req.name}")

    async def require(self, net_id: str, field: str):
        """The network `net_id` and its KV, or NOT_FOUND naming `field`."""
        kv = await self.etcd.get(self.keys.network(net_id))
        if kv is None:
            raise reference_not_found(field, KIND.type_name, names.network_name(net_id))
        return store.decode(network_pb2.Network, kv), kv


def _overlap(violations):
    err = invalid_argument(violations)
    err.reason = "CIDR_OVERLAP"
    return err

