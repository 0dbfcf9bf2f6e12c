"""Nodes: create (with address allocation), update and delete.

A create claims its addresses and its public key in the same transaction that
writes the node, each with "create revision is 0", so addresses and keys are
unique per network even across control-plane processes. A delete releases them
in the transaction that removes the node.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

import grpc

from meshgate.api.v1 import egress_pb2, external_client_pb2, node_pb2
from meshgate.common.errors import (
    ApiError,
    FieldViolation,
    already_exists,
    failed_precondition,
    invalid_argument,
    reference_not_found,
)
from meshgate.common.etcd import TxnOp, prefix_end
from meshgate.controlplane import egress, externalclients, handoff, ipam, masks, names, store, validation
from meshgate.controlplane.base import Kind, Resources
from meshgate.controlplane.cache import StateCache
from meshgate.controlplane.keymaterial import KeyMaterial
from meshgate.controlplane.networks import Networks
from meshgate.controlplane.txn import Conflict, retrying

log = logging.getLogger(__name__)

KIND = Kind("meshgate.io/Node", "nodes", node_pb2.Node)
PSK_DELETE_BATCH = 120  # etcd allows 128 operations per transaction
CACHE_WAIT_S = 2.0  # past this the cache is considered stuck and etcd is read directly
MUTABLE = frozenset({"display_name", "tags", "endpoint", "listen_port", "public_key", "labels", "drain", "relay"})
ALL_FIELDS = frozenset(f.name for f in node_pb2.Node.DESCRIPTOR.fields)


def _relay_violations(node: node_pb2.Node, prefix: str) -> list[FieldViolation]:
    """A relay must be reachable: it needs an endpoint (paths.py)."""
    if node.relay and not node.endpoint:
        return [FieldViolation(f"{prefix}.relay", "a relay needs an endpoint the other nodes can reach "
                               f"(set {prefix}.endpoint)")]
    return []


def _in_use(field: str, what: str, holder: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.ALREADY_EXISTS,
        f"{field}: {what} is already used by {holder}",
        "ADDRESS_IN_USE" if "address" in field else "RESOURCE_EXISTS",
        [FieldViolation(field, f"{what} is already used by {holder}")],
    )


class Nodes(Resources[node_pb2.Node]):
    kind = KIND

    def __init__(
        self, etcd, networks: Networks, cache: StateCache | None = None, keys: KeyMaterial | None = None
    ) -> None:
        super().__init__(etcd)
        self.networks = networks
        # Every API path that sets a node's public key has the key service sign
        # it first; a key that reaches etcd any other way stays unsigned.
        self.key_material = keys or KeyMaterial()
        # With a cache, creates read the network, used addresses and key
        # holders from memory and go to etcd once, for the transaction; its
        # compares (network revision, create revision 0 on node, address and
        # key claims) keep it correct when the cache lags, and a failed
        # compare is diagnosed from etcd itself.
        self.cache = cache
        self._last_write = 0  # revision of this process's newest node write
        # Addresses picked by creates of this process whose transaction has
        # not finished yet, per (network, family). Picking around them keeps
        # concurrent creates from all racing for the same lowest free address
        # (each lost race is a full retry); uniqueness still rests on the
        # transaction's "create revision is 0" compare on the ipam key.
        self._claiming: dict[tuple[str, str], set[str]] = {}

    def present(self, msg):
        # The record says PENDING; the API's Get, List and Update replace it
        # with the live state (sync.Fanout.node_states: READY, CONVERGING, OFFLINE).
        if msg.state == node_pb2.Node.STATE_UNSPECIFIED:
            msg.state = node_pb2.Node.PENDING
        return msg

    async def create(self, req: node_pb2.CreateNodeRequest) -> node_pb2.Node:
        net_id = self.parse_parent(req.parent)
        violations = validation.check_id("node_id", req.node_id)
        violations += validation.node(req.node)
        violations += _relay_violations(req.node, "node")
        if violations:
            raise invalid_argument(violations)
        name = names.child_name(net_id, "nodes", req.node_id)

        async def attempt(n: int) -> node_pb2.Node:
            return await self.create_in_txn(net_id, req.node_id, req.node, n, validate_only=req.validate_only)

        return await retrying(attempt, f"create {name}")

    async def create_in_txn(
        self,
        net_id: str,
        node_id: str,
        template: node_pb2.Node,
        attempt: int,
        *,
        validate_only: bool = False,
        compare_extra: Sequence = (),
        ops_extra: Sequence = (),
        endpoint_field: str = "node.endpoint",
    ) -> node_pb2.Node:
        """One attempt at creating node `node_id` from the validated `template`.

        Claims addresses and the public key, and writes the node, in one
        transaction that also carries the caller's compares and operations (so
        enrollment can consume a key use atomically with the create). Raises
        `Conflict` when the transaction lost a race.
        """
        name = names.child_name(net_id, "nodes", node_id)
        key = self.key_of(net_id, node_id)
        # Read-your-writes: the cache must hold at least this process's own
        # last create, or the pick would collide with it (and lose determinism).
        cached = (
            self.cache is not None
            and self.cache.ready.is_set()
            and await self.cache.wait_for_revision(self._last_write, CACHE_WAIT_S)
        )
        cache = self.cache if cached else None
        st = cache.networks.get(net_id) if cache is not None else None
        if st is None:
            cache = None  # not cached (yet): etcd is read below
        if st is not None:
            network, net_rev = st.network, int(st.network.etag)
            if name in st.nodes:
                raise already_exists(KIND.type_name, name)
        else:
            network, net_kv = await self.networks.require(net_id, "parent")
            net_rev = net_kv.mod_revision
            if await self.etcd.get(key) is not None:
                raise already_exists(KIND.type_name, name)
        errs = validation.requested_address("node.ipv4_address", template.ipv4_address, network.ipv4_cidr)
        errs += validation.requested_address("node.ipv6_address", template.ipv6_address, network.ipv6_cidr)
        if errs:
            raise invalid_argument(errs)
        node = node_pb2.Node()
        node.CopyFrom(template)
        node.name = name
        node.state = node_pb2.Node.PENDING
        compare = [self.t.mod(self.keys.network(net_id)) == net_rev, self.t.create(key) == 0, *compare_extra]
        inside = await egress.endpoint_check(self, net_id, template.endpoint, endpoint_field)
        compare += [inside] if inside is not None else []
        claims = []
        picked: list[tuple[set[str], str]] = []
        try:
            for family, field, cidr in (("v4", "ipv4_address", network.ipv4_cidr), ("v6", "ipv6_address", network.ipv6_cidr)):
                if not cidr:
                    continue
                wanted = getattr(template, field)
                addr: str | None
                if wanted:
                    # One spelling per address: FD00:0::1 and fd00::1 are one claim.
                    wanted = str(ipaddress.ip_address(wanted))
                    if st is None:
                        holder = await self.etcd.get(self.keys.ipam(net_id, family, wanted))
                        if holder is not None:
                            raise _in_use(f"node.{field}", wanted, holder.value.decode())
                    addr = wanted
                else:
                    pending = self._claiming.setdefault((net_id, family), set())
                    if cache is not None:
                        used_ints = cache.addresses.get((net_id, family)) or ipam.UsedInts()
                        # The cache is fresh after a lost race (see below), so the
                        # lowest free address is right again; spread out only
                        # when other processes keep winning the same address.
                        spread = attempt if attempt >= 2 else 0
                        addr = ipam.pick_int(cidr, used_ints, spread, also_taken={ipam.as_int(a) for a in pending})
                        used = {a for a in pending if ipam.as_int(a) in used_ints}
                    else:
                        used = await self.used_addresses(net_id, family)
                        addr = ipam.pick(cidr, used | pending, attempt)
                    if addr is None:
                        if pending - used:
                            raise Conflict  # only in-flight claims left: wait for them to settle
                        raise ipam.exhausted(f"node.{field}", cidr)
                    pending.add(addr)
                    picked.append((pending, addr))
                setattr(node, field, addr)
                ikey = self.keys.ipam(net_id, family, addr)
                compare.append(self.t.create(ikey) == 0)
                claims.append(self.t.put(ikey, name.encode()))
            if node.public_key:
                pkey = self.keys.pubkey(net_id, node.public_key)
                holder_name = cache.pubkeys.get((net_id, node.public_key)) if cache is not None else None
                if cache is None or holder_name is not None:
                    # A refusal is confirmed in etcd: the cache may not yet hold
                    # another replica's write that freed the key.  A free key in
                    # the cache needs no read: the create compare below guards it.
                    holder = await self.etcd.get(pkey)
                    holder_name = holder.value.decode() if holder is not None else None
                if holder_name is not None:
                    raise _in_use("node.public_key", "this public key", holder_name)
                compare.append(self.t.create(pkey) == 0)
                claims.append(self.t.put(pkey, name.encode()))
                node.public_key_create_time.CopyFrom(store.now())
            node.uid = store.new_uid()
            node.create_time.CopyFrom(store.now())
            node.update_time.CopyFrom(node.create_time)
            node.etag = ""
            if validate_only:
                return node
            # The signature is recorded by this transaction, with the node: a
            # refused or lost create leaves none behind.
            signed = await self.key_material.register(name, node.public_key) if node.public_key else None
            ok, _, rev = await self.etcd.txn(
                compare,
                [
                    self.t.put(key, store.encode(node)),
                    *self.key_material.signature_op(self.etcd, name, signed),
                    *claims,
                    self.t.put(self.keys.guard(net_id, "nodes"), b""),
                    *ops_extra,
                ],
            )
            if not ok:
                await self._diagnose(net_id, key, name, node, bool(template.ipv4_address), bool(template.ipv6_address))
                if cache is not None:
                    await cache.wait_for_revision(rev, CACHE_WAIT_S)
                raise Conflict
            self._last_write = max(self._last_write, rev)
            node.etag = str(rev)
            return node
        finally:
            for pending, addr in picked:
                pending.discard(addr)

    async def _diagnose(self, net_id: str, key: bytes, name: str, node, wanted_v4: bool, wanted_v6: bool) -> None:
        """After a lost transaction: raise the caller's error if one of its own
        inputs is taken (asked-for node id, address or key); otherwise return
        and let the operation retry."""
        if await self.etcd.get(key) is not None:
            raise already_exists(KIND.type_name, name)
        if await self.etcd.get(self.keys.network(net_id)) is None:
            raise reference_not_found("parent", "meshgate.io/Network", names.network_name(net_id))
        for family, field, wanted in (("v4", "ipv4_address", wanted_v4), ("v6", "ipv6_address", wanted_v6)):
            addr = getattr(node, field)
            if wanted and addr:
                holder = await self.etcd.get(self.keys.ipam(net_id, family, addr))
                if holder is not None:
                    raise _in_use(f"node.{field}", addr, holder.value.decode())
        if node.public_key:
            holder = await self.etcd.get(self.keys.pubkey(net_id, node.public_key))
            if holder is not None:
                raise _in_use("node.public_key", "this public key", holder.value.decode())

    async def update(self, req: node_pb2.UpdateNodeRequest) -> node_pb2.Node:
        name = req.node.name
        net_id, _ = self.parse_name(name, "node.name")
        paths, violations = masks.resolve(list(req.update_mask.paths), MUTABLE, ALL_FIELDS)
        if violations:
            raise invalid_argument(violations)

        async def attempt(_: int) -> node_pb2.Node:
            current, kv = await self.read(name)
            self.check_etag(req.node.etag, kv, name)
            updated = node_pb2.Node()
            updated.CopyFrom(current)
            masks.apply(req.node, updated, paths)
            errs = validation.node(updated)
            errs += _relay_violations(updated, "node")
            if errs:
                raise invalid_argument(errs)
            compare = [self.t.mod(kv.key) == kv.mod_revision]
            ops: list[TxnOp] = []
            if updated.endpoint != current.endpoint:
                # egress ranges may not cover it; their writes compare the nodes' guard
                inside = await egress.endpoint_check(self, net_id, updated.endpoint, "node.endpoint")
                compare += [inside] if inside is not None else []
                ops.append(self.t.put(self.keys.guard(net_id, "nodes"), b""))
            if updated.public_key != current.public_key:
                if current.public_key:
                    ops.append(self.t.delete(self.keys.pubkey(net_id, current.public_key)))
                if updated.public_key:
                    pkey = self.keys.pubkey(net_id, updated.public_key)
                    holder = await self.etcd.get(pkey)
                    if holder is not None:
                        raise _in_use("node.public_key", "this public key", holder.value.decode())
                    if not req.validate_only:
                        # Recorded by the update's own transaction (see create_in_txn).
                        ops += self.key_material.signature_op(
                            self.etcd, name, await self.key_material.register(name, updated.public_key))
                    compare.append(self.t.create(pkey) == 0)
                    ops.append(self.t.put(pkey, name.encode()))
                    updated.public_key_create_time.CopyFrom(store.now())
                else:
                    updated.ClearField("public_key_create_time")
            updated.update_time.CopyFrom(store.now())
            if req.validate_only:
                return self.present(updated)
            if updated.drain != current.drain:
                # the node's gateways keep their drain for routing until the handoff is ready (handoff.py)
                st = self.cache.networks.get(net_id) if self.cache is not None else None
                gws = sorted(g.name for g in st.gateways.values() if g.node == name and not g.drain) if st else []
                held_cmp, held_ops = await handoff.hold_ops(self.etcd, net_id, [(g, current.drain) for g in gws])
                compare += held_cmp
                ops += held_ops
            rev = await self.commit(
                compare, [self.t.put(kv.key, store.encode(updated)), *ops], etag=req.node.etag, kv=kv, name=name
            )
            self._last_write = max(self._last_write, rev)  # a create after it sees the moved key claim
            updated.etag = str(rev)
            return self.present(updated)

        return await retrying(attempt, f"update {name}")

    async def _forget_pairs(self, net_id: str, node_id: str) -> None:
        """Delete the pre-shared keys of a deleted node's pairs (sealed; deleting
        needs no KEK), in batches under etcd's 128 operations per transaction.
        Idempotent; a failure leaves only unused sealed keys behind."""
        prefix = self.etcd.key("keys", "psk", net_id, "")
        try:
            kvs, _, _ = await self.etcd.range(prefix, prefix_end(prefix), keys_only=True)
            mine = [kv.key for kv in kvs if node_id in kv.key[len(prefix):].decode().split(".")]
            for i in range(0, len(mine), PSK_DELETE_BATCH):
                await self.etcd.txn([], [self.t.delete(k) for k in mine[i:i + PSK_DELETE_BATCH]])
        except Exception:  # noqa: BLE001 - the node is gone either way
            log.warning("could not delete the pre-shared keys of deleted node networks/%s/nodes/%s", net_id, node_id)

    async def delete(self, req: node_pb2.DeleteNodeRequest) -> None:
        net_id, node_id = self.parse_name(req.name)

        async def attempt(_: int) -> None:
            current, kv = await self.read(req.name)
            self.check_etag(req.etag, kv, req.name)
            gw_prefix = self.keys.egresses(net_id)
            gw_kvs, _ = await self.etcd.list_prefix(gw_prefix)
            guard = await self.etcd.get(self.keys.guard(net_id, "egress"))
            users = [gkv for gkv in gw_kvs if egress_pb2.EgressGateway.FromString(gkv.value).node == req.name]
            if users and not req.force:
                names_ = ", ".join(egress_pb2.EgressGateway.FromString(u.value).name for u in users)
                raise failed_precondition(
                    f"node {req.name!r} is used by egress gateways ({names_}); delete them first or pass force",
                    "RESOURCE_IN_USE", req.name, KIND.type_name,
                )
            client_guard = await self.etcd.get(externalclients.guard_key(self, net_id))
            client_kvs, _ = await self.etcd.list_prefix(self.etcd.key("externalClients", net_id, ""))
            client_kvs = [ckv for ckv in client_kvs
                          if external_client_pb2.ExternalClient.FromString(ckv.value).gateway_node == req.name]
            clients = [store.decode(external_client_pb2.ExternalClient, ckv) for ckv in client_kvs]
            if clients and not req.force:
                raise failed_precondition(
                    f"node {req.name!r} is the gateway node of external clients "
                    f"({', '.join(c.name for c in clients)}); delete them first or pass force (which deletes them)",
                    "RESOURCE_IN_USE", req.name, KIND.type_name,
                )
            if req.validate_only:
                return None
            if clients:
                # Forced: each client goes in its own transaction (a node may
                # serve many; etcd caps a transaction at 128 operations), then
                # the delete runs again and finds none.
                for c, ckv in zip(clients, client_kvs, strict=True):
                    await self.etcd.txn([self.t.mod(ckv.key) == ckv.mod_revision],
                                        externalclients.delete_ops(self, net_id, c))
                raise Conflict
            ops = [
                self.t.delete(kv.key),
                self.t.put(self.keys.guard(net_id, "nodes"), b""),
                self.t.delete(self.etcd.key("agents", net_id, node_id)),
                self.t.delete(self.etcd.key("status", net_id, node_id)),
                self.t.delete(self.etcd.key("liveness", net_id, node_id)),
                self.t.delete(self.etcd.key("sessions", net_id, node_id)),
                # the key service's signature of its key (public; see below for the rest)
                self.t.delete(self.etcd.key("keys", "nodes", net_id, node_id)),
            ]
            for family, addr in (("v4", current.ipv4_address), ("v6", current.ipv6_address)):
                if addr:
                    ops.append(self.t.delete(self.keys.ipam(net_id, family, addr)))
            if current.public_key:
                ops.append(self.t.delete(self.keys.pubkey(net_id, current.public_key)))
            for u in users:
                ops.append(self.t.delete(u.key))
            if users:
                ops.append(self.t.put(self.keys.guard(net_id, "egress"), b""))
            rev = await self.commit(
                [self.t.mod(kv.key) == kv.mod_revision,
                 self.t.mod(self.keys.guard(net_id, "egress")) == (guard.mod_revision if guard else 0),
                 self.t.mod(externalclients.guard_key(self, net_id)) == (
                     client_guard.mod_revision if client_guard else 0)],
                ops,
                etag=req.etag, kv=kv, name=req.name,
            )
            self._last_write = max(self._last_write, rev)  # a create after it sees its freed claims
            await self._forget_pairs(net_id, node_id)
            return None

        await retrying(attempt, f"delete {req.name}")
