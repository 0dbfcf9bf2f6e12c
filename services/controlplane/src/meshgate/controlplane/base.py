"""What every resource kind shares: get, list with page tokens, etag checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message

from meshgate.common.errors import FieldViolation, etag_mismatch, invalid_argument, not_found, shown
from meshgate.common.etcd import KV, Etcd, prefix_end
from meshgate.controlplane import names, store, validation
from meshgate.controlplane.txn import Conflict, decode_page_token, encode_page_token

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Kind(Generic[M]):
    type_name: str  # meshgate.io/Node
    collection: str  # nodes (in resource names and etcd keys)
    message: type[M]


class Resources(Generic[M]):
    """Base for the per-kind operations on resources of message type M; holds the etcd adapter."""

    kind: Kind[M]

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.keys = store.Keys(etcd)
        self.t = etcd.txn_ops

    # names ---------------------------------------------------------------

    def parse_name(self, name: str, field: str = "name") -> tuple[str, str]:
        parsed = names.parse_child(name, self.kind.collection)
        if parsed is None:
            raise invalid_argument(
                [FieldViolation(field, f"{shown(name)} is not a name of the form networks/{{network}}/{self.kind.collection}/{{id}}")]
            )
        return parsed

    def parse_parent(self, parent: str, field: str = "parent") -> str:
        net = names.parse_network(parent)
        if net is None:
            raise invalid_argument([FieldViolation(field, f"{shown(parent)} is not a network name (networks/{{network}})")])
        return net

    def key_of(self, net: str, rid: str) -> bytes:
        return self.etcd.key(self.kind.collection, net, rid)

    def prefix_of(self, net: str) -> bytes:
        return self.etcd.key(self.kind.collection, net, "")

    # reads ---------------------------------------------------------------

    async def read(self, name: str) -> tuple[M, KV]:
        net, rid = self.parse_name(name)
        kv = await self.etcd.get(self.key_of(net, rid))
        if kv is None:
            raise not_found(self.kind.type_name, name)
        return store.decode(self.kind.message, kv), kv

    async def get(self, name: str) -> M:
        msg, _ = await self.read(name)
        return self.present(msg)

    def present(self, msg: M) -> M:
        """The resource as callers see it (computed output fields filled)."""
        return msg

    async def list_children(self, parent: str, page_size: int, page_token: str):
        net = self.parse_parent(parent)
        size, errs = validation.page_size("page_size", page_size)
        if errs:
            raise invalid_argument(errs)
        after = decode_page_token(page_token, parent)
        prefix = self.prefix_of(net)
        start, end = store.range_after(prefix, after)
        kvs, more, _ = await self.etcd.range(start, end, limit=size)
        items = [self.present(store.decode(self.kind.message, kv)) for kv in kvs]
        token = ""
        if more and kvs:
            token = encode_page_token(parent, kvs[-1].key[len(prefix):].decode())
        return items, token

    async def used_addresses(self, net_id: str, family: str) -> set[str]:
        """Addresses of network `net_id` claimed by nodes and external clients, from etcd."""
        prefix = self.etcd.key("ipam", net_id, family, "")
        kvs, _, _ = await self.etcd.range(prefix, prefix_end(prefix), keys_only=True)
        n = len(prefix)
        return {kv.key[n:].decode() for kv in kvs}

    async def commit(self, compare, ops, *, etag: str = "", kv: KV | None = None, name: str = "") -> int:
        """One write transaction, returning its revision. A lost compare raises
        `Conflict` (the operation runs again), or ABORTED when the caller sent
        an etag and the resource `kv` changed since it was read."""
        ok, _, rev = await self.etcd.txn(compare, ops)
        if ok:
            return rev
        if etag and kv is not None:
            now = await self.etcd.get(kv.key)
            if now is None or now.mod_revision != kv.mod_revision:
                raise etag_mismatch(self.kind.type_name, name)
        raise Conflict

    def check_etag(self, etag: str, kv: KV, name: str) -> None:
        if etag and etag != store.etag_of(kv):
            raise etag_mismatch(self.kind.type_name, name)
