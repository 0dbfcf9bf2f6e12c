"""External clients: remote-access devices without an agent (laptops, phones).

A client connects to one node of the network, its *gateway node*, with a plain
WireGuard configuration. Creating one:

1. validates the request and reads the network and the gateway node, which
   must have a public key and an endpoint (the client dials it);
2. picks overlay addresses from the network's ranges, the same claims as
   nodes' (`ipam/{net}/{family}/{address}`), so clients and nodes never share
   an address;
3. has the key service generate the client's key pair (it keeps the private
   key only sealed and records its signature of the public key for the
   client's name at `keys/clientKeys/{net}/{client}`) and, unless the network
   turned them off, the pre-shared key of the pair (gateway node, client);
4. writes the client, its address claims and a claim on its public key in one
   transaction comparing the network, the gateway node and every claim;
5. returns the client with `config`, a wg-quick configuration including the
   private key and the pre-shared key. Nothing returns them again.

The compiler then makes the client a peer of its gateway node (see
compiler.py). Deleting a client removes, in one transaction, the record, its
claims and the key service's records of it (its sealed key pair, signature and
pre-shared keys): the sealed values need no key-encryption key to delete.

A create that fails after step 3 removes the key material it issued. One that
crashed there leaves it; the key service then refuses a second pair for the
name, and a later create treats material older than `STALE_ISSUE_S` with no
client record as abandoned, removes it and issues anew. Both removals compare
"no client record" and the signature record's revision, and a create commits
only while the signature record still holds its own key: two creates racing
over abandoned material cannot leave a client whose key the gateway refuses.
The age is judged by the key service's `sign_time` against this host's clock,
so the two must agree within seconds (as for TLS).

Every client create and delete bumps `guards/{net}/clients`, which node deletes
compare: a client cannot appear on a node being deleted.

Without a key service (development) the control plane generates the pair
itself, stores no private key and signs nothing.

Hazard: `config` holds secrets. It is set only on the object returned by
create and is never stored, logged or put into an error.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Sequence
from typing import Literal

import grpc

from meshgate.api.v1 import external_client_pb2, keys_pb2, network_pb2, node_pb2
from meshgate.common.errors import (
    ApiError,
    FieldViolation,
    already_exists,
    etag_mismatch,
    failed_precondition,
    invalid_argument,
    reference_not_found,
)
from meshgate.controlplane import compiler, ipam, masks, names, store, validation
from meshgate.controlplane.base import Kind, Resources
from meshgate.controlplane.cache import StateCache
from meshgate.controlplane.keymaterial import ClientKeyPair, KeyMaterial, pair_id
from meshgate.controlplane.networks import Networks
from meshgate.controlplane.txn import Conflict, retrying

log = logging.getLogger(__name__)

KIND = Kind("meshgate.io/ExternalClient", "externalClients", external_client_pb2.ExternalClient)
# The ranges and DNS servers are written into the configuration handed out
# once; changing them in the record would change nothing on the device.
MUTABLE = frozenset({"disabled", "display_name", "labels"})
ALL_FIELDS = frozenset(f.name for f in external_client_pb2.ExternalClient.DESCRIPTOR.fields)
OUTPUT_ONLY: tuple[Literal["ipv4_address", "ipv6_address", "public_key", "config", "uid", "create_time",
                           "update_time", "etag"], ...] = ("ipv4_address", "ipv6_address", "public_key", "config", "uid", "create_time", "update_time", "etag")
DEFAULT_KEEPALIVE_S = 25  # clients usually sit behind NAT
STALE_ISSUE_S = 60  # key material of a client with no record, older than this, was abandoned
IN_FLIGHT_RETRIES = 5  # attempts that wait for a concurrent create of the same name


def wg_quick_config(
    network: network_pb2.Network,
    gateway: node_pb2.Node,
    client: external_client_pb2.ExternalClient,
    allowed: Sequence[str],
    private_key: str,
    preshared_key: str,
) -> str:
    """The client's wg-quick configuration (secret: holds its private key)."""
    addresses = [f"{a}/{32 if ipaddress.ip_address(a).version == 4 else 128}"
                 for a in (client.ipv4_address, client.ipv6_address) if a]
    lines = [f"# meshgate external client {client.name} (via {gateway.name})", "[Interface]",
             f"PrivateKey = {private_key}", f"Address = {', '.join(addresses)}"]
    # By default the gateway node's overlay DNS server (gatewayd's dnsserver.py):
    # it answers the overlay's names and forwards the rest.
    dns = list(client.dns_servers) or [a for a in (gateway.ipv4_address, gateway.ipv6_address) if a]
    if dns:
        lines.append(f"DNS = {', '.join(dns)}")
    if network.mtu:
        lines.append(f"MTU = {network.mtu}")
    lines += ["", "[Peer]", f"PublicKey = {gateway.public_key}"]
    if preshared_key:
        lines.append(f"PresharedKey = {preshared_key}")
    lines += [
        f"Endpoint = {gateway.endpoint}",
        f"AllowedIPs = {', '.join(allowed)}",
        f"PersistentKeepalive = {network.persistent_keepalive.seconds or DEFAULT_KEEPALIVE_S}",
    ]
    return "\n".join(lines) + "\n"


def material_ops(res: Resources, net_id: str, client_name: str, gateway_node: str) -> list:
    """Operations deleting the key service's records of a client: its sealed
    key pair, its signature and the pre-shared key of its one pair."""
    cid = client_name.rsplit("/", 1)[1]
    return [
        res.t.delete(res.etcd.key("keys", "clients", net_id, cid)),
        res.t.delete(res.etcd.key("keys", "clientKeys", net_id, cid)),
        res.t.delete(res.etcd.key("keys", "psk", net_id, pair_id(gateway_node, client_name))),
    ]


def guard_key(res: Resources, net_id: str) -> bytes:
    """`guards/{net}/clients`, bumped by every client create and delete: a node
    delete compares it, so no client can appear on a node being deleted."""
    return res.keys.guard(net_id, "clients")


def delete_ops(res: Resources, net_id: str, client: external_client_pb2.ExternalClient) -> list:
    """Operations removing `client`, its claims, its side records and its key material (at most 10)."""
    cid = client.name.rsplit("/", 1)[1]
    ops = [res.t.delete(res.etcd.key(KIND.collection, net_id, cid)), res.t.put(guard_key(res, net_id), b""),
           res.t.delete(res.etcd.key("clientHealth", net_id, cid)),
           res.t.delete(res.etcd.key("clientIssued", net_id, cid))]
    for family, addr in (("v4", client.ipv4_address), ("v6", client.ipv6_address)):
        if addr:
            ops.append(res.t.delete(res.keys.ipam(net_id, family, addr)))
    if client.public_key:
        ops.append(res.t.delete(res.keys.pubkey(net_id, client.public_key)))
    return ops + material_ops(res, net_id, client.name, client.gateway_node)


class ExternalClients(Resources[external_client_pb2.ExternalClient]):
    kind = KIND

    def __init__(self, etcd, networks: Networks, cache: StateCache | None = None,
                 keys: KeyMaterial | None = None) -> None:
        super().__init__(etcd)
        self.networks = networks
        self.cache = cache
        self.key_material = keys or KeyMaterial()

    def present(self, msg):
        msg.config = ""  # never stored; belt and braces
        return msg

    async def _records(self, collection: str, net_id: str, items: list) -> dict[str, dict]:
        """JSON side records of `items` (one get, or one range for a page)."""
        if len(items) == 1:
            kv = await self.etcd.get(self.etcd.key(collection, net_id, items[0].name.rsplit("/", 1)[1]))
            kvs = [kv] if kv is not None else []
        else:
            kvs, _ = await self.etcd.list_prefix(self.etcd.key(collection, net_id, ""))
        return {kv.key.rsplit(b"/", 1)[1].decode(): json.loads(kv.value) for kv in kvs}

    async def _with_status(self, items: list) -> list:
        """Fill the output fields that are not stored on the client: the tunnel
        as its gateway node reported it (`clientHealth/...`, written by the
        fan-out, when about the client's current key and gateway node), and
        whether its configuration went stale (against `clientIssued/...`, what
        the configuration was made with)."""
        if not items:
            return items
        net_id, _ = self.parse_name(items[0].name)
        reports = await self._records("clientHealth", net_id, items)
        issued = await self._records("clientIssued", net_id, items)
        network, nodes = await self._network_view(net_id, {c.gateway_node for c in items})
        psk_now = self.key_material.enabled and network is not None and not network.disable_preshared_keys
        for c in items:
            made = issued.get(c.name.rsplit("/", 1)[1])
            gateway = nodes.get(c.gateway_node)
            if made is not None and made.get("public_key") == c.public_key and gateway is not None:
                why = []
                if gateway.public_key != made["gateway_public_key"]:
                    why.append("the gateway node's key changed")
                if gateway.endpoint != made["gateway_endpoint"]:
                    why.append("the gateway node's endpoint changed")
                if psk_now != made["psk"]:
                    why.append("pre-shared keys were turned " + ("on" if psk_now else "off"))
                c.config_stale_reason = "; ".join(why)
            r = reports.get(c.name.rsplit("/", 1)[1])
            if r is None or r.get("public_key") != c.public_key or r.get("gateway_node") != c.gateway_node:
                continue
            if r["handshake_ns"]:
                c.last_handshake_time.FromNanoseconds(r["handshake_ns"])
            c.rx_bytes, c.tx_bytes = r["rx_bytes"], r["tx_bytes"]
            c.report_time.FromNanoseconds(r["report_ns"])
        return items

    async def _network_view(self, net_id: str, gateway_nodes: set[str]):
        """The network and the named nodes, from the cache when it has them."""
        st = self.cache.networks.get(net_id) if self.cache is not None and self.cache.ready.is_set() else None
        if st is not None:
            return st.network, {n: st.nodes[n] for n in gateway_nodes if n in st.nodes}
        kv = await self.etcd.get(self.keys.network(net_id))
        network = store.decode(network_pb2.Network, kv) if kv is not None else None
        nodes = {}
        for n in gateway_nodes:
            nkv = await self.etcd.get(self.keys.node(net_id, n.rsplit("/", 1)[1]))
            if nkv is not None:
                nodes[n] = store.decode(node_pb2.Node, nkv)
        return network, nodes

    def _issued_op(self, net_id: str, client, gateway, psk: bool):
        """What a configuration is made with, kept to tell when it goes stale."""
        record = {"public_key": client.public_key, "gateway_public_key": gateway.public_key,
                  "gateway_endpoint": gateway.endpoint, "psk": psk}
        return self.t.put(self.etcd.key("clientIssued", net_id, client.name.rsplit("/", 1)[1]),
                          json.dumps(record, sort_keys=True).encode())

    async def get(self, name: str):
        return (await self._with_status([await super().get(name)]))[0]

    async def list_children(self, parent: str, page_size: int, page_token: str):
        items, token = await super().list_children(parent, page_size, page_token)
        return await self._with_status(items), token

    # create ----------------------------------------------------------------

    async def create(self, req: external_client_pb2.CreateExternalClientRequest) -> external_client_pb2.ExternalClient:
        net_id = self.parse_parent(req.parent)
        errs = validation.check_id("external_client_id", req.external_client_id)
        errs += validation.external_client(req.external_client)
        if errs:
            raise invalid_argument(errs)
        parsed = names.parse_child(req.external_client.gateway_node, "nodes")
        assert parsed is not None  # validation.external_client checked the name
        gw_net, gw_id = parsed
        if gw_net != net_id:
            raise invalid_argument([FieldViolation(
                "external_client.gateway_node",
                f"{req.external_client.gateway_node!r} is not in network {names.network_name(net_id)!r}")])
        name = names.child_name(net_id, KIND.collection, req.external_client_id)
        key = self.key_of(net_id, req.external_client_id)
        issued: dict[str, object] = {}  # the key pair and PSK, issued once for all attempts

        async def attempt(n: int) -> external_client_pb2.ExternalClient:
            network, net_kv = await self.networks.require(net_id, "parent")
            if await self.etcd.get(key) is not None:
                raise already_exists(KIND.type_name, name)
            node_kv = await self.etcd.get(self.keys.node(net_id, gw_id))
            if node_kv is None:
                raise reference_not_found("external_client.gateway_node", "meshgate.io/Node",
                                          req.external_client.gateway_node)
            gateway = store.decode(node_pb2.Node, node_kv)
            missing = [what for what, ok in (("a public key (it has not enrolled)", gateway.public_key),
                                             ("an endpoint", gateway.endpoint)) if not ok]
            if missing:
                raise failed_precondition(
                    f"gateway node {gateway.name!r} has no {' and no '.join(missing)}; "
                    "external clients dial their gateway node", "GATEWAY_NODE_NOT_READY",
                    gateway.name, "meshgate.io/Node")
            client = external_client_pb2.ExternalClient()
            client.CopyFrom(req.external_client)
            for f in OUTPUT_ONLY:
                client.ClearField(f)
            client.name = name
            compare = [self.t.mod(net_kv.key) == net_kv.mod_revision, self.t.create(key) == 0,
                       self.t.mod(node_kv.key) == node_kv.mod_revision]
            ops = []
            for family, field, cidr in (("v4", "ipv4_address", network.ipv4_cidr),
                                        ("v6", "ipv6_address", network.ipv6_cidr)):
                if not cidr:
                    continue
                addr = ipam.pick(cidr, await self.used_addresses(net_id, family), n)
                if addr is None:
                    raise ipam.exhausted(f"external_client.{field}", cidr)
                setattr(client, field, addr)
                ikey = self.keys.ipam(net_id, family, addr)
                compare.append(self.t.create(ikey) == 0)
                ops.append(self.t.put(ikey, name.encode()))
            client.uid = store.new_uid()
            client.create_time.CopyFrom(store.now())
            client.update_time.CopyFrom(client.create_time)
            if req.validate_only:
                return client
            if "pair" not in issued:
                issued["pair"] = await self._issue(name, net_id, req.external_client_id,
                                                   req.external_client.gateway_node, n)
            pair: ClientKeyPair = issued["pair"]  # type: ignore[assignment]
            if self.key_material.enabled:
                # Commit only while the key service's record still holds this
                # pair (a concurrent create could have cleared it as abandoned).
                sig_key = self.etcd.key("keys", "clientKeys", net_id, req.external_client_id)
                sig_kv = await self.etcd.get(sig_key)
                if sig_kv is None or keys_pb2.SignedNodeKey.FromString(sig_kv.value).public_key != pair.public_key:
                    issued.clear()
                    raise Conflict
                compare.append(self.t.mod(sig_key) == sig_kv.mod_revision)
            use_psk = self.key_material.enabled and not network.disable_preshared_keys
            if use_psk and "psk" not in issued:
                # Never a key remembered from an earlier client of this name.
                self.key_material.forget(net_id, pair_id(gateway.name, name))
                issued["psk"] = await self.key_material.pair_psk(net_id, gateway.name, name)
            client.public_key = pair.public_key
            pkey = self.keys.pubkey(net_id, pair.public_key)
            compare.append(self.t.create(pkey) == 0)
            ops += [self.t.put(pkey, name.encode()), self.t.put(guard_key(self, net_id), b""),
                    self._issued_op(net_id, client, gateway, use_psk)]
            ok, _, rev = await self.etcd.txn(compare, [self.t.put(key, store.encode(client)), *ops])
            if not ok:
                if await self.etcd.get(key) is not None:
                    raise already_exists(KIND.type_name, name)
                raise Conflict
            client.etag = str(rev)
            log.info("created %s via %s", name, gateway.name)
            return self._with_config(net_id, network, gateway, client, pair.private_key, str(issued.get("psk", "")))

        try:
            return await retrying(attempt, f"create {name}")
        except BaseException:
            if "pair" in issued:
                await self._discard(net_id, req.external_client_id, req.external_client.gateway_node,
                                    issued["pair"])  # type: ignore[arg-type]
            raise

    def _with_config(self, net_id: str, network, gateway, client, private_key: str, psk: str):
        """A copy of `client` carrying its wg-quick configuration (secret)."""
        state = self.cache.networks.get(net_id) if self.cache is not None else None
        if state is None or gateway.name not in state.nodes:
            state = compiler.NetworkState(network, {gateway.name: gateway})
        out = external_client_pb2.ExternalClient()
        out.CopyFrom(client)
        out.config = wg_quick_config(network, gateway, client, compiler.client_allowed_ranges(state, client),
                                     private_key, psk)
        return out

    async def rotate_key(self, req: external_client_pb2.RotateExternalClientKeyRequest):
        """A new key pair and pre-shared key for a client, and its new
        configuration, once. The key service replaces the pair first; the
        record then names the new key (the gateway node applies it, the old
        configuration stops working). A record write that keeps losing to
        concurrent updates is retried with the same new pair, never a third."""
        net_id, _ = self.parse_name(req.name)
        current, kv = await self.read(req.name)
        self.check_etag(req.etag, kv, req.name)
        pair = await self.key_material.issue_client(req.name, replace=True)
        assert pair is not None  # replace never reports an existing pair
        network, _ = await self.networks.require(net_id, "name")
        psk = ""
        if self.key_material.enabled and not network.disable_preshared_keys:
            psk = await self.key_material.rotate_pair(net_id, current.gateway_node, req.name)

        sig_key = self.etcd.key("keys", "clientKeys", net_id, req.name.rsplit("/", 1)[1])

        async def attempt(_: int):
            client, ckv = await self.read(req.name)
            if req.etag and ckv.mod_revision != kv.mod_revision:
                raise etag_mismatch(KIND.type_name, req.name)
            sig_kv = await self.etcd.get(sig_key) if self.key_material.enabled else None
            if self.key_material.enabled and (
                    sig_kv is None or keys_pb2.SignedNodeKey.FromString(sig_kv.value).public_key != pair.public_key):
                raise ApiError(grpc.StatusCode.ABORTED, f"a concurrent rotation of {req.name} replaced this one's key "
                               "pair; its result stands (call again for another)", "CONCURRENT_MODIFICATION")
            node_kv = await self.etcd.get(self.keys.node(net_id, client.gateway_node.rsplit("/", 1)[1]))
            if node_kv is None:
                raise failed_precondition(f"the gateway node {client.gateway_node!r} no longer exists",
                                          "GATEWAY_NODE_NOT_READY", client.gateway_node, "meshgate.io/Node")
            gateway = store.decode(node_pb2.Node, node_kv)
            old_key, client.public_key = client.public_key, pair.public_key
            client.update_time.CopyFrom(store.now())
            ops = [self.t.put(ckv.key, store.encode(client)),
                   self.t.put(self.keys.pubkey(net_id, pair.public_key), req.name.encode()),
                   self._issued_op(net_id, client, gateway, bool(psk))]
            if old_key:
                ops.append(self.t.delete(self.keys.pubkey(net_id, old_key)))
            cmp = [self.t.mod(ckv.key) == ckv.mod_revision,
                   self.t.create(self.keys.pubkey(net_id, pair.public_key)) == 0]
            if sig_kv is not None:  # with a key service; checked above
                cmp.append(self.t.mod(sig_key) == sig_kv.mod_revision)
            rev = await self.commit(cmp, ops)
            client.etag = str(rev)
            return self.present(client), gateway

        try:
            client, gateway = await retrying(attempt, f"rotate the key of {req.name}")
        except ApiError as e:
            if e.reason == "CONCURRENT_MODIFICATION" and "concurrent rotation" in e.message:
                raise
            # The key service already holds the new pair: the old configuration
            # no longer matches it. Say so; another call completes a rotation.
            raise ApiError(e.code, f"{e.message}; the rotation of {req.name} did not complete and its old "
                           "configuration may no longer work: call RotateExternalClientKey again",
                           e.reason) from None
        log.info("rotated the key of %s", req.name)
        return self._with_config(net_id, network, gateway, client, pair.private_key, psk)

    async def _issue(self, name: str, net_id: str, cid: str, gateway_node: str, attempt: int) -> ClientKeyPair:
        """A fresh key pair for the client, clearing material an abandoned
        create left behind (see the module docstring)."""
        pair = await self.key_material.issue_client(name)
        if pair is not None:
            return pair
        # The key service holds a pair for this name but there is no client.
        sig_key = self.etcd.key("keys", "clientKeys", net_id, cid)
        sig_kv = await self.etcd.get(sig_key)
        signed = keys_pb2.SignedNodeKey.FromString(sig_kv.value) if sig_kv is not None else None
        age = time.time() - signed.sign_time.seconds if signed is not None else STALE_ISSUE_S + 1
        if age <= STALE_ISSUE_S:
            if attempt < IN_FLIGHT_RETRIES:
                raise Conflict  # another create of this name may be in flight: it will have finished
            raise ApiError(
                grpc.StatusCode.ABORTED,
                f"a key pair for {name} was issued {age:.0f}s ago by a create that did not finish; "
                f"retry after {STALE_ISSUE_S}s, when it counts as abandoned", "CONCURRENT_MODIFICATION")
        log.warning("removing the key material of %s left by an abandoned create", name)
        # Only if it is still that material and still no client holds it.
        fence = [self.t.create(self.key_of(net_id, cid)) == 0,
                 self.t.mod(sig_key) == (sig_kv.mod_revision if sig_kv is not None else 0)]
        await self.etcd.txn(fence, material_ops(self, net_id, name, gateway_node))
        self.key_material.forget(net_id, pair_id(gateway_node, name))
        pair = await self.key_material.issue_client(name)
        if pair is None:
            raise Conflict
        return pair

    async def _discard(self, net_id: str, cid: str, gateway_node: str, pair: ClientKeyPair) -> None:
        """Remove key material this create issued, unless a client now holds it."""
        key = self.key_of(net_id, cid)
        sig_key = self.etcd.key("keys", "clientKeys", net_id, cid)
        try:
            current = await self.etcd.get(key)
            if current is not None and external_client_pb2.ExternalClient.FromString(current.value).public_key \
                    == pair.public_key:
                return
            sig_kv = await self.etcd.get(sig_key)
            if sig_kv is None or keys_pb2.SignedNodeKey.FromString(sig_kv.value).public_key != pair.public_key:
                return
            name = names.child_name(net_id, KIND.collection, cid)
            await self.etcd.txn([self.t.create(key) == 0, self.t.mod(sig_key) == sig_kv.mod_revision],
                                material_ops(self, net_id, name, gateway_node))
            self.key_material.forget(net_id, pair_id(gateway_node, name))
        except Exception:  # noqa: BLE001 - best effort; a later create clears it as stale
            log.warning("could not remove the key material of a failed create of %s/%s", net_id, cid)

    # update and delete -----------------------------------------------------

    async def update(self, req: external_client_pb2.UpdateExternalClientRequest) -> external_client_pb2.ExternalClient:
        name = req.external_client.name
        self.parse_name(name, "external_client.name")
        paths, violations = masks.resolve(list(req.update_mask.paths), MUTABLE, ALL_FIELDS)
        if violations:
            raise invalid_argument(violations)

        async def attempt(_: int) -> external_client_pb2.ExternalClient:
            current, kv = await self.read(name)
            self.check_etag(req.external_client.etag, kv, name)
            updated = external_client_pb2.ExternalClient()
            updated.CopyFrom(current)
            masks.apply(req.external_client, updated, paths)
            errs = validation.external_client(updated)
            if errs:
                raise invalid_argument(errs)
            updated.update_time.CopyFrom(store.now())
            if req.validate_only:
                return self.present(updated)
            rev = await self.commit([self.t.mod(kv.key) == kv.mod_revision], [self.t.put(kv.key, store.encode(updated))],
                                    etag=req.external_client.etag, kv=kv, name=name)
            updated.etag = str(rev)
            return self.present(updated)

        return await retrying(attempt, f"update {name}")

    async def delete(self, req: external_client_pb2.DeleteExternalClientRequest) -> None:
        net_id, _ = self.parse_name(req.name)

        async def attempt(_: int) -> None:
            current, kv = await self.read(req.name)
            self.check_etag(req.etag, kv, req.name)
            ops = delete_ops(self, net_id, current)
            await self.commit([self.t.mod(kv.key) == kv.mod_revision], ops, etag=req.etag, kv=kv, name=req.name)
            if self.key_material.enabled:
                self.key_material.forget(net_id, pair_id(current.gateway_node, req.name))
            return None

        await retrying(attempt, f"delete {req.name}")
