"""Egress gateways: create, update and delete, with range overlap rules.

Rules: a gateway's ranges may not overlap its network's own ranges, nor each
other, nor another gateway's ranges in the network unless exactly equal (that
is how HA is declared). The check reads every gateway of the network and the
write compares `guards/{net}/egress`, so concurrent writers cannot sneak an
overlap in; it also compares the gateway's node, so a gateway never points at
a node deleted meanwhile.

Nor may a range cover an underlay address (`underlay_violations`): a node's
endpoint host in the network, or the control plane's own address (its listen
and agent addresses that are IP literals): the nodes that route the range
through the gateway would send traffic for it into the tunnel, and an agent
could lose the control plane that would fix it. The write compares
`guards/{net}/nodes`, which node writes that set or change an endpoint bump.
Endpoints given as host names are not resolved, so not checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from meshgate.api.v1 import agent_pb2, egress_pb2, node_pb2
from meshgate.common.errors import (
    FieldViolation,
    already_exists,
    invalid_argument,
    reference_not_found,
)
from meshgate.controlplane import domains, handoff, masks, names, probes, selectors, store, validation
from meshgate.controlplane.base import Kind, Resources
from meshgate.controlplane.networks import Networks
from meshgate.controlplane.txn import retrying

KIND = Kind("meshgate.io/EgressGateway", "egressGateways", egress_pb2.EgressGateway)
MUTABLE = frozenset(
    {"node", "ranges", "nat", "egress_interface", "priority", "internet_gateway", "display_name", "labels",
     "used_by", "domains"}
)
MUTABLE = MUTABLE | {"probes", "drain"}  # issue 17: egress health and drain (probes.py)
ALL_FIELDS = frozenset(f.name for f in egress_pb2.EgressGateway.DESCRIPTOR.fields)


def endpoint_ip(endpoint: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The host of `host:port` / `[v6]:port` when it is an IP literal, else None."""
    host = endpoint.rsplit(":", 1)[0].strip("[]") if ":" in endpoint else endpoint
    if endpoint.startswith("unix:"):
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def control_plane_ips(addresses: Iterable[str]) -> tuple[str, ...]:
    """The IP literals among the control plane's listen/agent addresses
    (`host:port`, comma-separated lists allowed), without the unspecified ones
    (0.0.0.0, ::) and Unix sockets."""
    out: list[str] = []
    for text in addresses:
        for a in (text or "").split(","):
            ip = endpoint_ip(a.strip())
            if ip is not None and not ip.is_unspecified and str(ip) not in out:
                out.append(str(ip))
    return tuple(out)


def underlay_violations(ranges: list, nodes: Iterable[node_pb2.Node], control_plane: Iterable[str],
                        prefix: str = "egress_gateway") -> list[FieldViolation]:
    """Ranges (parsed, in field order) that cover a node's endpoint host or the
    control plane's address: for each, the first such host. Each host is looked
    up in an index of the ranges (validation.RangeIndex), so the cost grows
    with nodes plus ranges, not their product (10,000 nodes against 256
    ranges held the event loop for most of a second)."""
    hosts = [(ip, f"the endpoint (underlay address) of node {n.name!r}")
             for n in nodes for ip in [endpoint_ip(n.endpoint)] if ip is not None]
    hosts += [(ipaddress.ip_address(a), "the control plane's address") for a in control_plane]
    index = validation.RangeIndex((str(i), net) for i, net in enumerate(ranges))
    first: dict[int, tuple] = {}
    for ip, what in hosts:
        for owner, _ in index.overlapping(ipaddress.ip_network(ip), limit=len(ranges)):
            first.setdefault(int(owner), (ip, what))
    out = []
    for i in sorted(first):
        ip, what = first[i]
        out.append(FieldViolation(
            f"{prefix}.ranges[{i}]",
            f"{ranges[i]} covers {ip}, {what}: traffic to it must not be routed through the gateway"))
    return out


async def endpoint_check(res: Resources, net_id: str, endpoint: str, field: str):
    """For a node write that sets `endpoint`: refuse an endpoint host inside an
    egress range of network `net_id` (the same rule as `underlay_violations`,
    from the node's side); returns the compare that keeps it so until the write
    (which must also bump `guards/{net}/nodes`), or None for no IP literal."""
    ip = endpoint_ip(endpoint)
    if ip is None:
        return None
    guard = await res.etcd.get(res.keys.guard(net_id, "egress"))
    kvs, _ = await res.etcd.list_prefix(res.keys.egresses(net_id))
    for kv in kvs:
        gw = store.decode(egress_pb2.EgressGateway, kv)
        for r in gw.ranges:
            net = ipaddress.ip_network(r, strict=False)
            if net.version == ip.version and ip in net:
                err = invalid_argument([FieldViolation(
                    field, f"{ip} is inside {r}, an egress range of {gw.name}: the nodes that route it through "
                           "the gateway would send this node's underlay traffic into the tunnel; change the "
                           "gateway's ranges first")])
                err.reason = "RANGE_COVERS_UNDERLAY"
                raise err
    return res.t.mod(res.keys.guard(net_id, "egress")) == (guard.mod_revision if guard else 0)


class EgressGateways(Resources[egress_pb2.EgressGateway]):
    kind = KIND

    def __init__(self, etcd, networks: Networks) -> None:
        super().__init__(etcd)
        self.networks = networks
        self.control_plane_addresses: tuple[str, ...] = ()
        """IP literals the control plane serves on (agents reach it there); set by main."""

    async def _underlay(self, net_id: str, ranges: list, prefix: str):
        """Refuse ranges that cover an underlay address; the compare that keeps it so."""
        guard = await self.etcd.get(self.keys.guard(net_id, "nodes"))
        kvs, _ = await self.etcd.list_prefix(self.keys.nodes(net_id))
        bad = underlay_violations(ranges, (store.decode(node_pb2.Node, kv) for kv in kvs),
                                  self.control_plane_addresses, prefix)
        if bad:
            err = invalid_argument(bad)
            err.reason = "RANGE_COVERS_UNDERLAY"
            raise err
        return self.t.mod(self.keys.guard(net_id, "nodes")) == (guard.mod_revision if guard else 0)

    def present(self, msg):
        if not msg.HasField("nat"):
            msg.nat = True
        return msg

    async def get(self, name: str) -> egress_pb2.EgressGateway:
        msg = await super().get(name)
        await self._domain_status([msg])
        return msg

    async def list_children(self, parent: str, page_size: int, page_token: str):
        items, token = await super().list_children(parent, page_size, page_token)
        await self._domain_status(items)
        return items, token

    async def _domain_status(self, gws: list[egress_pb2.EgressGateway]) -> None:
        """Fill `domain_status` from what the gateways' agents reported
        (`learned/{net}/{node}`, written by sync.py): for each declared domain,
        the entries of the names under it, by node."""
        reports: dict[str, agent_pb2.SyncRequest.Domains | None] = {}
        for gw in gws:
            if not gw.domains:
                continue
            if gw.node not in reports:
                parsed = names.parse_child(gw.node, "nodes")
                kv = await self.etcd.get(self.etcd.key("learned", *parsed)) if parsed is not None else None
                reports[gw.node] = agent_pb2.SyncRequest.Domains.FromString(kv.value) if kv is not None else None
            rep = reports[gw.node]
            if rep is None:
                continue
            for st in rep.domains:
                if any(st.domain == d or domains.matches(d, st.domain) for d in gw.domains):
                    gw.domain_status.add().CopyFrom(st)

    async def _check(self, gw, net_id: str, own_name: str, prefix: str):
        """Validate `gw` against its network, node and sibling gateways.

        Returns the compares that keep those facts true until the write.
        """
        ranges, errs = validation.egress(gw, prefix)
        errs += selectors.syntax(f"{prefix}.used_by", list(gw.used_by), ("tag", "node"), required=False)
        if errs:
            raise invalid_argument(errs)
        # Stored in canonical form (`203.0.113.0/024` as `203.0.113.0/24`, `DB.example.com.` as `db.example.com`).
        gw.ranges[:] = [str(n) for n in ranges]
        gw.domains[:] = [domains.canonical(d) for d in gw.domains]
        del gw.domain_status[:]  # output only: what the agents learned, never stored
        used_by = await selectors.require_existing(self.etcd, net_id, [(f"{prefix}.used_by", gw.used_by)])
        parsed = names.parse_child(gw.node, "nodes")
        assert parsed is not None  # validated above
        node_net, node_id = parsed
        if node_net != net_id:
            raise invalid_argument(
                [FieldViolation(f"{prefix}.node", f"{gw.node!r} is not in network {names.network_name(net_id)!r}")]
            )
        network, net_kv = await self.networks.require(net_id, "parent")
        bad_probes = probes.violations(gw, ranges, network, prefix)
        if bad_probes:
            raise invalid_argument(bad_probes)
        node_kv = await self.etcd.get(self.keys.node(net_id, node_id))
        if node_kv is None:
            raise reference_not_found(f"{prefix}.node", "meshgate.io/Node", gw.node)
        kvs, _ = await self.etcd.list_prefix(self.keys.egresses(net_id))
        guard = await self.etcd.get(self.keys.guard(net_id, "egress"))
        others = [store.decode(egress_pb2.EgressGateway, kv) for kv in kvs]
        others = [o for o in others if o.name != own_name]
        overlaps = validation.egress_overlaps(gw, ranges, network, others, prefix)
        if overlaps:
            err = invalid_argument(overlaps)
            err.reason = "CIDR_OVERLAP"
            raise err
        return [
            *used_by,
            await self._underlay(net_id, ranges, prefix),
            self.t.mod(net_kv.key) == net_kv.mod_revision,
            self.t.mod(node_kv.key) == node_kv.mod_revision,
            self.t.mod(self.keys.guard(net_id, "egress")) == (guard.mod_revision if guard else 0),
        ]

    async def create(self, req: egress_pb2.CreateEgressGatewayRequest) -> egress_pb2.EgressGateway:
        net_id = self.parse_parent(req.parent)
        errs = validation.check_id("egress_gateway_id", req.egress_gateway_id)
        _, more = validation.egress(req.egress_gateway)
        if errs or more:
            raise invalid_argument(errs + more)
        name = names.child_name(net_id, "egressGateways", req.egress_gateway_id)
        key = self.key_of(net_id, req.egress_gateway_id)

        async def attempt(_: int) -> egress_pb2.EgressGateway:
            gw = egress_pb2.EgressGateway()
            gw.CopyFrom(req.egress_gateway)
            gw.name = name
            compare = await self._check(gw, net_id, name, "egress_gateway")
            if await self.etcd.get(key) is not None:
                raise already_exists(KIND.type_name, name)
            if not gw.HasField("nat"):
                gw.nat = True
            gw.uid = store.new_uid()
            gw.create_time.CopyFrom(store.now())
            gw.update_time.CopyFrom(gw.create_time)
            gw.etag = ""
            if req.validate_only:
                return gw
            rev = await self.commit(
                [*compare, self.t.create(key) == 0],
                [self.t.put(key, store.encode(gw)), self.t.put(self.keys.guard(net_id, "egress"), b"")],
            )
            gw.etag = str(rev)
            return gw

        return await retrying(attempt, f"create {name}")

    async def update(self, req: egress_pb2.UpdateEgressGatewayRequest) -> egress_pb2.EgressGateway:
        name = req.egress_gateway.name
        net_id, _ = self.parse_name(name, "egress_gateway.name")
        paths, violations = masks.resolve(list(req.update_mask.paths), MUTABLE, ALL_FIELDS)
        if violations:
            raise invalid_argument(violations)

        async def attempt(_: int) -> egress_pb2.EgressGateway:
            current, kv = await self.read(name)
            self.check_etag(req.egress_gateway.etag, kv, name)
            updated = egress_pb2.EgressGateway()
            updated.CopyFrom(current)
            masks.apply(req.egress_gateway, updated, paths)
            compare = await self._check(updated, net_id, name, "egress_gateway")
            if not updated.HasField("nat"):
                updated.nat = True
            updated.update_time.CopyFrom(store.now())
            if req.validate_only:
                return updated
            held: tuple[list, list] = ([], [])
            if updated.drain != current.drain and not await self._node_drained(current.node):
                # routing keeps the drain from before until the handoff is ready (handoff.py)
                held = await handoff.hold_ops(self.etcd, net_id, [(name, current.drain)])
            rev = await self.commit(
                [*compare, self.t.mod(kv.key) == kv.mod_revision, *held[0]],
                [self.t.put(kv.key, store.encode(updated)), self.t.put(self.keys.guard(net_id, "egress"), b""),
                 *held[1]],
                etag=req.egress_gateway.etag, kv=kv, name=name,
            )
            updated.etag = str(rev)
            return updated

        return await retrying(attempt, f"update {name}")

    async def _node_drained(self, node_name: str) -> bool:
        net_id, node_id = node_name.split("/")[1], node_name.rsplit("/", 1)[1]
        kv = await self.etcd.get(self.etcd.key("nodes", net_id, node_id))
        return kv is not None and node_pb2.Node.FromString(kv.value).drain

    async def delete(self, req: egress_pb2.DeleteEgressGatewayRequest) -> None:
        net_id, _ = self.parse_name(req.name)

        async def attempt(_: int) -> None:
            _current, kv = await self.read(req.name)
            self.check_etag(req.etag, kv, req.name)
            if req.validate_only:
                return None
            await self.commit(
                [self.t.mod(kv.key) == kv.mod_revision],
                # ... and its health mark (egresshealth.py), so a gateway made anew under
                # the name starts healthy
                [self.t.delete(kv.key), self.t.put(self.keys.guard(net_id, "egress"), b""),
                 self.t.delete(self.etcd.key("egressHealth", net_id, req.name.rsplit("/", 1)[1])),
                 self.t.delete(self.etcd.key("egressDrain", net_id, req.name.rsplit("/", 1)[1]))],
                etag=req.etag, kv=kv, name=req.name,
            )
            return None

        await retrying(attempt, f"delete {req.name}")
