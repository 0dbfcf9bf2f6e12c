"""The desired-state compiler: from a network's state to one node's desired state.

Pure and deterministic: the same `NetworkState` always gives byte-identical
output, so replicas agree and unchanged nodes can be recognised by comparing
messages.

Rules:
- Two nodes peer when policy lets traffic flow between them in either
  direction: always under the ALLOW default, and under DENY only where an
  enabled ACCEPT access policy matches one as source and the other as
  destination. A node without a public key is nobody's peer (it has not
  enrolled a key yet), but still gets its own desired state.
- Each egress range is carried by one gateway: among the gateways declaring it
  (HA), those whose node is up come first (a node is down once its agent has
  been disconnected for the failover delay, see liveness.py), then the highest
  priority wins, ties broken by name. When every candidate is down the best of
  them keeps the range (routes never vanish because agents are unreachable).
  Nodes reach the range through that gateway's node; the gateway's own node,
  and a node that runs another healthy gateway for the range (a standby, a
  drained gateway), do not route it into the tunnel: they use their own
  egress, so nothing they receive during a move goes round through the tunnel.
- An internet gateway adds 0.0.0.0/0 (and ::/0 with IPv6) to the chosen
  gateway's peer, and names that peer as the default route. This is the one
  permitted overlap of allowed IPs: WireGuard routes by longest prefix, so more
  specific peers still win.
- Gateway nodes get an `EgressConfig` per gateway they run, HA standbys
  included, so a failover only moves routes.
- An external client (a plain WireGuard device) peers only with its gateway
  node, and only while it is enabled and has a key. The gateway node gets it as
  a peer (allowed IPs: its host addresses) and relays for its addresses
  (`relayed_ranges`); every node that peers with the gateway node routes the
  client's host addresses to it, so the client reaches the network and the
  network answers. Under a DENY default, the client is subject to the policies
  that let its gateway node reach a node: it borrows the gateway's peerings.

- Access policies become each node's `filter_rules` (filters.py): the node
  enforces them for what it delivers out of the overlay. A `client:` selector
  makes its gateway node peer with the other side.
- Who routes through a gateway: the nodes its `used_by` selectors match; by
  default every node, except for an internet gateway, which nodes running an
  egress gateway do not use (they keep their own default route).
- Site-to-site: a gateway forwards to its ranges from the overlay and from the
  ranges other gateways carry for it (its `source_ranges`), so hosts behind two
  gateways reach each other, NAT permitting.

Hazard: `peers_of` is also what decides which agents a change reaches (see
`affected_by_node`); if peering rules change, both must agree.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshgate.api.v1 import agent_pb2, egress_pb2, external_client_pb2, keys_pb2, network_pb2, node_pb2, policy_pb2
from meshgate.api.v1 import desired_state_pb2 as ds
from meshgate.common.desired import apply_delta  # noqa: F401 - re-exported: diff's inverse
from meshgate.controlplane import domains, filters, paths


@dataclass
class NetworkState:
    """Everything of one network the compiler looks at, keyed by resource name."""

    network: network_pb2.Network
    nodes: dict[str, node_pb2.Node] = field(default_factory=dict)
    gateways: dict[str, egress_pb2.EgressGateway] = field(default_factory=dict)
    policies: dict[str, policy_pb2.AccessPolicy] = field(default_factory=dict)
    # The key service's signatures of node keys (keys/nodes/...) and of
    # external clients' keys (keys/clientKeys/...): resource name -> public key
    # -> signature. The previous key's signature is kept beside the current
    # one: during a rotation the new key is signed before the node record names
    # it, and the old key must stay signed until then.
    signatures: dict[str, dict[str, keys_pb2.SignedNodeKey]] = field(default_factory=dict)
    external_clients: dict[str, external_client_pb2.ExternalClient] = field(default_factory=dict)
    # Names of nodes marked down (`liveness/{net}/{node}`): their gateways
    # yield their ranges to gateways on nodes that are up.
    down: set[str] = field(default_factory=set)
    # What gateway nodes' agents learned of their egress domains
    # (`learned/{net}/{node}`): node name -> its last report.
    learned: dict[str, agent_pb2.SyncRequest.Domains] = field(default_factory=dict)
    # Gateways whose agent reported their egress path broken
    # (`egressHealth/{net}/{gw}`, egresshealth.py): name -> reason. They yield
    # their ranges like gateways on nodes marked down.
    unhealthy: dict[str, str] = field(default_factory=dict)
    # Relay decisions (`pathRoutes/{net}/{a}~{b}`: pair id -> relay node id, ''
    # for direct) and learned endpoints (`learnedEndpoints/{net}/{node}`:
    # node name -> host:port); paths.py.
    relay_marks: dict[str, str] = field(default_factory=dict)
    learned_endpoints: dict[str, str] = field(default_factory=dict)
    # Gateways whose drain or undrain waits for its handoff
    # (`egressDrain/{net}/{gw}`, written with the flag, deleted by handoff.py):
    # name -> (the drain routing keeps meanwhile, the mark's revision). Other
    # nodes move their routes only once the gateways that must copy late
    # replies have applied the copying (`handoffs`).
    drain_held: dict[str, tuple[bool, int]] = field(default_factory=dict)
    # tag -> names of the nodes carrying it, kept by whoever owns the state
    # through `put_node`/`drop_node` (the state cache); None: `tagged` scans.
    by_tag: dict[str, set[str]] | None = None

    def index_tags(self) -> None:
        """Build `by_tag` from the nodes; from then on change nodes only
        through `put_node` and `drop_node`."""
        self.by_tag = {}
        for n in self.nodes.values():
            for t in n.tags:
                self.by_tag.setdefault(t, set()).add(n.name)

    def put_node(self, node: node_pb2.Node) -> None:
        old = self.nodes.get(node.name)
        self.nodes[node.name] = node
        if self.by_tag is not None and (old is None or old.tags != node.tags):
            for t in old.tags if old is not None else ():
                self.by_tag.get(t, set()).discard(node.name)
            for t in node.tags:
                self.by_tag.setdefault(t, set()).add(node.name)

    def drop_node(self, name: str) -> None:
        old = self.nodes.pop(name, None)
        if old is not None and self.by_tag is not None:
            for t in old.tags:
                self.by_tag.get(t, set()).discard(name)

    def tagged(self, tags: set[str]) -> set[str]:
        """Names of the nodes carrying any of `tags`: from `by_tag` when
        kept, at the cost of the answer rather than a pass over the nodes
        (a join's peers at 10,000 nodes, issue 18)."""
        if self.by_tag is None:
            return {n for n, x in self.nodes.items() if not tags.isdisjoint(x.tags)}
        out: set[str] = set()
        for t in tags:
            out |= self.by_tag.get(t, set())
        return out

    def copy(self) -> NetworkState:
        """A copy whose collections can change without touching this one's."""
        return NetworkState(
            self.network, dict(self.nodes), dict(self.gateways), dict(self.policies),
            {n: dict(v) for n, v in self.signatures.items()}, dict(self.external_clients), set(self.down),
            dict(self.learned), dict(self.unhealthy),
            relay_marks=dict(self.relay_marks), learned_endpoints=dict(self.learned_endpoints),
            drain_held=dict(self.drain_held),
        )


def add_signature(sigs: dict[str, keys_pb2.SignedNodeKey], sig: keys_pb2.SignedNodeKey, keep: int = 2) -> None:
    """Record `sig` among a node's signatures, keeping the `keep` newest."""
    sigs.pop(sig.public_key, None)
    sigs[sig.public_key] = sig
    while len(sigs) > keep:
        del sigs[next(iter(sigs))]


# psk(a, b): the pre-shared key of the pair of nodes a and b, "" for none.
PskLookup = Callable[[str, str], str]


def _id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _matches(selector: str, node: node_pb2.Node, state: NetworkState) -> bool:
    if selector == "*":
        return True
    kind, _, value = selector.partition(":")
    if kind == "tag":
        return value in node.tags
    if kind == "node":
        return _id(node.name) == value
    if kind == "egress":
        gw = state.gateways.get(f"{state.network.name}/egressGateways/{value}")
        return gw is not None and node.name in ha_nodes(state, gw)
    if kind == "client":
        c = state.external_clients.get(f"{state.network.name}/externalClients/{value}")
        return c is not None and not c.disabled and bool(c.public_key) and c.gateway_node == node.name
    if kind == "domain":
        return node.name in domain_nodes(state, value)
    return False


def domain_nodes(state: NetworkState, selector: str) -> set[str]:
    """The nodes of the gateways whose domains a `domain:` selector names (the
    name itself, a wildcard covering it, or names under the selector's wildcard):
    traffic to the domain goes to them, so they are its side in peering."""
    want = domains.canonical(selector)
    return {g.node for g in state.gateways.values()
            for d in g.domains if d == want or domains.matches(d, want) or domains.matches(want, d.removeprefix("*."))}


def ha_nodes(state: NetworkState, gw: egress_pb2.EgressGateway) -> set[str]:
    """The nodes of `gw` and of the gateways that stand in for it (HA: they declare
    one of its ranges; the API allows only equal ranges to overlap). An `egress:`
    selector names them all, so a policy about a gateway survives its failover."""
    ranges, names = set(gw.ranges), set(gw.domains)
    return {gw.node} | {g.node for g in state.gateways.values() if ranges & set(g.ranges) or names & set(g.domains)}


def uses(state: NetworkState, gw: egress_pb2.EgressGateway, name: str) -> bool:
    """Whether node `name` routes through gateway `gw` (its `used_by`)."""
    node = state.nodes.get(name)
    if node is None:
        return False
    if gw.used_by:
        return any(_matches(s, node, state) for s in gw.used_by)
    if gw.internet_gateway:
        return not any(g.node == name for g in state.gateways.values())
    return True


def _policy_allows(state: NetworkState, a: node_pb2.Node, b: node_pb2.Node) -> bool:
    """The peering rule for one pair, by definition (`PeerIndex` must agree)."""
    if state.network.default_policy != network_pb2.DENY:
        return True
    for p in state.policies.values():
        if p.disabled or p.action == policy_pb2.DROP:  # unspecified is ACCEPT
            continue
        src_a = any(_matches(s, a, state) for s in p.sources)
        dst_b = any(_matches(d, b, state) for d in p.destinations)
        src_b = any(_matches(s, b, state) for s in p.sources)
        dst_a = any(_matches(d, a, state) for d in p.destinations)
        if (src_a and dst_b) or (src_b and dst_a):
            return True
    return False


class PeerIndex:
    """Who peers with whom in one `NetworkState`, worked out once.

    Built in O(nodes x policy selectors): per enabled ACCEPT policy, the set of
    keyed nodes matching a source and the set matching a destination. A node's
    peers are then the union of the opposite sets of the policies it matches,
    so compiling every node of a network costs the size of the result, not
    nodes x nodes policy evaluations. Valid only while the state is unchanged:
    build one per change (the fan-out) or per call (`peers_of`). It also keeps
    what every compile of the state would otherwise work out again: the active
    gateways and the order of their ranges.
    """

    def __init__(self, state: NetworkState) -> None:
        self._state = state
        self._active: tuple[dict[str, egress_pb2.EgressGateway], egress_pb2.EgressGateway | None, list[str]] | None = None
        self._clients: dict[str, list[external_client_pb2.ExternalClient]] | None = None
        self.resolver = filters.Resolver(state)
        self.keyed = sorted(n for n, node in state.nodes.items() if node.public_key)
        self._keyed_set = set(self.keyed)
        self.allow_all = state.network.default_policy != network_pb2.DENY
        self.pairs: list[tuple[set[str], set[str]]] = []
        if self.allow_all:
            return
        selected: dict[str, frozenset[str]] = {}  # selector -> keyed nodes it matches, each worked out once

        def matching(selectors) -> set[str]:
            out: set[str] = set()
            for sel in selectors:
                got = selected.get(sel)
                if got is None:
                    got = selected[sel] = self._select(state, sel)
                out |= got
            return out

        for p in state.policies.values():
            if p.disabled or p.action == policy_pb2.DROP:  # unspecified is ACCEPT
                continue
            src = matching(p.sources)
            dst = matching(p.destinations)
            if src and dst:
                self.pairs.append((src, dst))

    def _select(self, state: NetworkState, selector: str) -> frozenset[str]:
        """The keyed nodes `selector` matches: `_matches`, over all of them at once."""
        if selector == "*":
            return frozenset(self.keyed)
        kind, _, value = selector.partition(":")
        if kind == "tag":
            return frozenset(self._keyed_set & state.tagged({value}))
        if kind == "node":
            return frozenset(n for n in self.keyed if _id(state.nodes[n].name) == value)
        if kind == "egress":
            gw = state.gateways.get(f"{state.network.name}/egressGateways/{value}")
            if gw is None:
                return frozenset()
            return frozenset(ha_nodes(state, gw) & self._keyed_set)
        if kind == "client":  # a client is reached through its gateway node
            c = state.external_clients.get(f"{state.network.name}/externalClients/{value}")
            if c is None or c.disabled or not c.public_key or c.gateway_node not in self._keyed_set:
                return frozenset()
            return frozenset({c.gateway_node})
        if kind == "domain":
            return frozenset(domain_nodes(state, value) & self._keyed_set)
        return frozenset()

    def peers_of(self, name: str) -> list[str]:
        """Names of the nodes `name` peers with, sorted."""
        if self.allow_all:
            if name not in self._keyed_set:
                return []
            return [n for n in self.keyed if n != name]
        out: set[str] = set()
        for src, dst in self.pairs:
            if name in src:
                out |= dst
            if name in dst:
                out |= src
        out.discard(name)
        return sorted(out)

    def clients_by_gateway(self) -> dict[str, list[external_client_pb2.ExternalClient]]:
        """`clients_by_gateway(state)`, worked out once."""
        if self._clients is None:
            self._clients = clients_by_gateway(self._state)
        return self._clients

    def active_gateways(self) -> tuple[dict[str, egress_pb2.EgressGateway], egress_pb2.EgressGateway | None, list[str]]:
        """`active_gateways(state)`, plus its ranges in route order; worked out once."""
        if self._active is None:
            by_range, internet = active_gateways(self._state)
            self._active = (by_range, internet, sorted(by_range, key=lambda c: _cidr_key(c)[3]))
        return self._active


def peers_of(state: NetworkState, name: str, index: PeerIndex | None = None) -> list[str]:
    """Names of the nodes `name` peers with, sorted (see `PeerIndex`).
    Without an index, worked out for this one node (`node_peers`)."""
    if name not in state.nodes:
        return []
    return index.peers_of(name) if index is not None else node_peers(state, name)


def node_peers(state: NetworkState, name: str) -> list[str]:
    """`PeerIndex(state).peers_of(name)` without building the index: the
    policies `name` matches on one side give the selectors of the other, and
    the state's tag index (`NetworkState.tagged`) finds the nodes their `tag:`
    selectors match, at the cost of the answer. The state cache asks this
    for every node that changes (every join), where building an index over the
    whole network cost most of a join at 10,000 nodes (issue 18)."""
    node = state.nodes.get(name)
    if node is None or not node.public_key:
        return []
    if state.network.default_policy != network_pb2.DENY:
        return sorted(n for n, x in state.nodes.items() if x.public_key and n != name)
    wanted: set[str] = set()
    for p in state.policies.values():
        if p.disabled or p.action == policy_pb2.DROP:  # unspecified is ACCEPT
            continue
        if any(_matches(s, node, state) for s in p.sources):
            wanted.update(p.destinations)
        if any(_matches(s, node, state) for s in p.destinations):
            wanted.update(p.sources)
    if not wanted:
        return []
    if "*" in wanted:
        return sorted(n for n, x in state.nodes.items() if x.public_key and n != name)
    tags: set[str] = set()
    out: set[str] = set()
    for sel in wanted:
        kind, _, value = sel.partition(":")
        if kind == "tag":
            tags.add(value)
        elif kind == "node":
            out.add(f"{state.network.name}/nodes/{value}")
        else:  # egress:, client:, domain: name a few nodes
            out |= _named_nodes(state, kind, value)
    if tags:  # the state's tag index, or one pass over the nodes without one
        out |= state.tagged(tags)
    out.discard(name)
    return sorted(n for n in out if n in state.nodes and state.nodes[n].public_key)


def _named_nodes(state: NetworkState, kind: str, value: str) -> set[str]:
    """The nodes an `egress:`, `client:` or `domain:` selector matches (as `_matches`)."""
    if kind == "egress":
        gw = state.gateways.get(f"{state.network.name}/egressGateways/{value}")
        return ha_nodes(state, gw) if gw is not None else set()
    if kind == "client":
        c = state.external_clients.get(f"{state.network.name}/externalClients/{value}")
        return {c.gateway_node} if c is not None and not c.disabled and c.public_key else set()
    if kind == "domain":
        return domain_nodes(state, value)
    return set()


def overlay_ranges(state: NetworkState) -> list[str]:
    return [c for c in (state.network.ipv4_cidr, state.network.ipv6_cidr) if c]


def healthy(state: NetworkState, gw: egress_pb2.EgressGateway) -> bool:
    """Neither its node marked down nor its egress path reported broken."""
    return gw.node not in state.down and gw.name not in state.unhealthy


def drain_requested(state: NetworkState, gw: egress_pb2.EgressGateway) -> bool:
    """The operator drained the gateway or its node (`drain`)."""
    node = state.nodes.get(gw.node)
    return gw.drain or (node is not None and node.drain)


def drained(state: NetworkState, gw: egress_pb2.EgressGateway) -> bool:
    """The gateway is drained for routing: it yields its ranges to any healthy
    standby, but a healthy drained gateway still beats an unhealthy one. It
    follows `drain_requested` except while a change of it waits for its
    handoff (handoff.py)."""
    held = state.drain_held.get(gw.name)
    return drain_requested(state, gw) if held is None else held[0]


def drain_pending(state: NetworkState) -> bool:
    """A drain or an undrain waits for its handoff somewhere in the network."""
    return any(name in state.gateways and held != drain_requested(state, state.gateways[name])
               for name, (held, _) in state.drain_held.items())


def gateway_handoffs(state: NetworkState, gw: egress_pb2.EgressGateway) -> list[ds.Handoff]:
    """`EgressConfig.handoffs` of gateway `gw` (see `_handoffs`)."""
    by_range, _ = active_gateways(state)
    target = active_gateways(state, target=True)[0] if drain_pending(state) else by_range
    return _handoffs(state, gw, [*gw.ranges, *learned_ranges(state, gw)], by_range, target)


def active_gateways(state: NetworkState, target: bool = False
                    ) -> tuple[dict[str, egress_pb2.EgressGateway], egress_pb2.EgressGateway | None]:
    """The gateway carrying each egress range, and the internet gateway, if any.
    With `target`, the gateways that will carry them once every pending drain
    and undrain has taken effect (`drain_requested` instead of `drained`).

    The addresses learned for egress domains are ranges too (host routes), each
    carried by its domain's active gateway (domains.routed_addresses); a
    declared range equal to one wins."""
    def usable(gw):
        node = state.nodes.get(gw.node)
        return node is not None and bool(node.public_key)

    is_drained = drain_requested if target else drained

    def rank(g):  # also the ranking of domains (domains.routed_addresses)
        return (not healthy(state, g), is_drained(state, g), -g.priority, g.name)

    ranked = sorted((g for g in state.gateways.values() if usable(g)), key=rank)
    by_range: dict[str, egress_pb2.EgressGateway] = {}
    internet = None
    for gw in ranked:
        for r in gw.ranges:
            by_range.setdefault(r, gw)
        if gw.internet_gateway and internet is None:
            internet = gw
    if state.learned:
        for r, gw in domains.routed_addresses(state.gateways.values(), rank, usable, state.learned,
                                              overlay_ranges(state), state.down).items():
            by_range.setdefault(r, gw)
    return by_range, internet


def learned_ranges(state: NetworkState, gw: egress_pb2.EgressGateway) -> list[str]:
    """The host routes learned for `gw`'s domains by the nodes serving them
    (domains.reporting), which its node forwards and NATs like its ranges, HA
    standbys included: what other nodes route to it, whichever node's
    resolver gave the address."""
    if not gw.domains or not state.learned:
        return []
    overlay = overlay_ranges(state)
    out: dict[str, None] = {}
    for d in sorted(gw.domains):
        serving = {g.node for g in state.gateways.values() if d in g.domains}
        out.update(dict.fromkeys(domains.domain_addresses(d, serving, state.learned, overlay, state.down)))
    return list(out)


@functools.lru_cache(maxsize=1 << 16)
def _cidr_key(cidr: str) -> tuple[int, int, int, str]:
    """(version, network address, prefix length, canonical spelling) of a CIDR.

    Cached: parsing with `ipaddress` was most of the cost of compiling a hub
    with a thousand peers, and the same host routes recur in every compile.
    """
    n = ipaddress.ip_network(cidr)
    return n.version, int(n.network_address), n.prefixlen, str(n)


def _sort_cidrs(cidrs: Sequence[str]) -> list[str]:
    if len(cidrs) == 1:  # most peers' allowed IPs: one host route
        return [_cidr_key(cidrs[0])[3]]
    return [k[3] for k in sorted({_cidr_key(c) for c in cidrs})]


def clients_by_gateway(state: NetworkState) -> dict[str, list[external_client_pb2.ExternalClient]]:
    """The enabled external clients with a key, by gateway node, each list by name."""
    out: dict[str, list[external_client_pb2.ExternalClient]] = {}
    for _, c in sorted(state.external_clients.items()):
        if c.public_key and not c.disabled:
            out.setdefault(c.gateway_node, []).append(c)
    return out



def client_allowed_ranges(state: NetworkState, client: external_client_pb2.ExternalClient) -> list[str]:
    """What the client routes into the tunnel: its own `allowed_ranges`, or by
    default the network's ranges plus every egress range its gateway node
    reaches (carried by itself or by a gateway node it peers with)."""
    if client.allowed_ranges:
        return _sort_cidrs(client.allowed_ranges)
    net = state.network
    out = [c for c in (net.ipv4_cidr, net.ipv6_cidr) if c]
    gw_node = client.gateway_node
    if gw_node in state.nodes:
        reachable = set(peers_of(state, gw_node)) | {gw_node}
        by_range, _ = active_gateways(state)
        # Declared ranges only: addresses learned for egress domains change with
        # DNS, and a configuration handed out once cannot follow them.
        out += [r for r, gw in by_range.items() if r in gw.ranges
                and (gw.node == gw_node or (gw.node in reachable and uses(state, gw, gw_node)))]
    return _sort_cidrs(out)


def compile_node(
    state: NetworkState, name: str, revision: int = 0, index: PeerIndex | None = None, psk: PskLookup | None = None
) -> ds.DesiredState:
    """The desired state of node `name` (which must exist in `state`).

    Pass a `PeerIndex` of `state` when compiling many nodes of one state.
    """
    net = state.network
    me = state.nodes[name]
    out = ds.DesiredState(node=name, revision=revision)
    iface = out.interface
    for addr, cidr in ((me.ipv4_address, net.ipv4_cidr), (me.ipv6_address, net.ipv6_cidr)):
        if addr and cidr:
            iface.addresses.append(f"{addr}/{_cidr_key(cidr)[2]}")
    iface.listen_port = me.listen_port or net.listen_port
    iface.mtu = net.mtu
    iface.public_key = me.public_key  # the agent switches keys when this names its new one

    peer_names = peers_of(state, name, index)
    allowed: dict[str, list[str]] = {p: filters.host_routes(state.nodes[p]) for p in peer_names}
    # Relays (paths.py): a relayed peer's host routes go to its relay's entry;
    # its own entry stays, empty, to probe the direct path.
    relay_peers = paths.peer_view(index if index is not None else PeerIndex(state))
    via_relay = paths.relayed_peers(state, name, peer_names, relay_peers, index)
    for p, r in list(via_relay.items()):
        if r in allowed:
            allowed[r] += allowed[p]
            allowed[p] = []
        else:
            del via_relay[p]
    by_gateway = ((index.clients_by_gateway() if index is not None else clients_by_gateway(state))
                  if state.external_clients else {})
    for gw_node, served in by_gateway.items():
        if gw_node in allowed:  # clients are reached through their gateway node (or its relay)
            for c in served:
                allowed[via_relay.get(gw_node, gw_node)] += filters.host_routes(c)
    if index is not None:
        by_range, internet, range_order = index.active_gateways()
    else:
        by_range, internet = active_gateways(state)
        range_order = sorted(by_range, key=lambda c: _cidr_key(c)[3])
    # A node that runs a healthy gateway for a range reaches it through its own
    # egress, even while another gateway carries the range for everyone else
    # (a standby, or a drained gateway): what still reaches it during a move
    # (in flight, or from a node that has not applied the move yet) leaves
    # there too, instead of going round through the tunnel to the other one,
    # whose reply the sender would no longer accept from that peer.
    own = {r for g in state.gateways.values() if g.node == name and healthy(state, g) for r in g.ranges}
    routes = []
    # A gateway node reached through a relay: its ranges go to the relay's
    # entry too (the relay carries them on, see `_relay_egress`).
    for r in range_order:
        gw = by_range[r]
        if gw.node == name or r in own or gw.node not in allowed or not uses(state, gw, name):
            continue
        via = via_relay.get(gw.node, gw.node)
        allowed[via].append(r)
        routes.append(ds.Route(destination=r, via_peer=state.nodes[via].public_key))
    if internet is not None and internet.node != name and internet.node in allowed and uses(state, internet, name):
        via = via_relay.get(internet.node, internet.node)
        if via != internet.node and not uses(state, internet, via):
            via = internet.node  # the relay has no default route through the gateway to forward it on
        allowed[via].append("0.0.0.0/0")
        if net.ipv6_cidr:
            allowed[via].append("::/0")
        out.default_route_via_peer = state.nodes[via].public_key
    target: dict[str, egress_pb2.EgressGateway] | None = None  # the ranges' gateways after pending drains
    carried: list[str] = []
    relayed_for = paths.relayed_through(state, name, relay_peers) if me.relay else set()
    if relayed_for and by_range:
        carried = _relay_egress(state, name, allowed, routes, by_range, range_order, own, relay_peers, relayed_for)
    for gw_node, served in by_gateway.items() if relayed_for else ():
        # the external clients of a node this relay relays for: forwarded (under the policies) too
        if gw_node != name and gw_node in allowed and gw_node in relayed_for:
            carried += [r for c in served for r in filters.host_routes(c)]

    keepalive = net.persistent_keepalive.seconds
    use_psk = psk is not None and not net.disable_preshared_keys
    add_peer = out.peers.add  # built in place: appending a Peer would copy it
    nodes, signatures = state.nodes, state.signatures
    for p in peer_names:
        peer = nodes[p]
        sig = signatures.get(p, {}).get(peer.public_key)
        add_peer(
            public_key=peer.public_key,
            # Only a signature of exactly this key counts; a key that reached
            # etcd without the key service has none, and agents refuse it.
            public_key_signature=sig.signature if sig is not None else b"",
            preshared_key=psk(name, p) if psk is not None and use_psk else "",
            endpoint=peer.endpoint or state.learned_endpoints.get(p, ""),
            allowed_ips=_sort_cidrs(allowed[p]) if allowed[p] else [],
            persistent_keepalive_seconds=keepalive,
            resource=p,
            # a relay's round-trip time, measured by the agent, ranks relays (paths.choose_relay)
            rtt_address=(peer.ipv4_address or peer.ipv6_address) if peer.relay and peer.endpoint else "",
        )
    clients = by_gateway.get(name, [])
    for c in clients:
        sig = state.signatures.get(c.name, {}).get(c.public_key)
        out.peers.append(
            ds.Peer(
                public_key=c.public_key,
                public_key_signature=sig.signature if sig is not None else b"",
                preshared_key=psk(name, c.name) if psk is not None and use_psk else "",
                allowed_ips=_sort_cidrs(filters.host_routes(c)),
                resource=c.name,
            )
        )
        out.relayed_ranges.extend(filters.host_routes(c))
    if clients:
        # Canonical peer order (meshgate.common.desired): by resource, then key.
        ordered = sorted(out.peers, key=lambda p: (p.resource, p.public_key))
        del out.peers[:]
        out.peers.extend(ordered)
        relayed = _sort_cidrs(out.relayed_ranges)
        del out.relayed_ranges[:]
        out.relayed_ranges.extend(relayed)
    if relayed_for:
        relayed = _sort_cidrs([*out.relayed_ranges, *carried,
                               *(c for n in relayed_for for c in filters.host_routes(state.nodes[n]))])
        del out.relayed_ranges[:]
        out.relayed_ranges.extend(relayed)
    out.routes.extend(routes)

    # From the overlay, and (site-to-site) from the ranges other gateways carry for this node.
    sources = _sort_cidrs([c for c in (net.ipv4_cidr, net.ipv6_cidr) if c] + [r.destination for r in routes])
    delivers = filters.host_routes(me) + list(out.relayed_ranges)
    for gw_name in sorted(state.gateways):
        gw = state.gateways[gw_name]
        if gw.node != name:
            continue
        learned = learned_ranges(state, gw)
        delivers += list(gw.ranges) + learned + (["0.0.0.0/0", "::/0"] if gw.internet_gateway else [])
        if target is None and len(state.gateways) > 1:
            target = active_gateways(state, target=True)[0] if drain_pending(state) else by_range
        out.egress.append(
            ds.EgressConfig(
                ranges=_sort_cidrs([*gw.ranges, *learned]),
                source_ranges=sources,
                nat=gw.nat if gw.HasField("nat") else True,
                egress_interface=gw.egress_interface,
                internet_gateway=gw.internet_gateway,
                domains=sorted(gw.domains),
                gateway=gw.name,
                probes=gw.probes,
                handoffs=_handoffs(state, gw, [*gw.ranges, *learned], by_range, target) if target else (),
                handoff_peers=_handoff_peers(state, gw) if len(state.gateways) > 1 else (),
            )
        )
    _dns(state, out, me, peer_names, by_gateway)
    if state.policies or net.default_policy == network_pb2.DENY:
        admits = [c for p in out.peers for c in p.allowed_ips]
        rules = filters.compile_rules(state, delivers, admits, index.resolver if index is not None else None)
        if rules:
            out.filter_rules.extend(_client_dns(me, by_gateway.get(name, [])) + rules)
    return out


def _handoffs(state: NetworkState, gw: egress_pb2.EgressGateway, ranges: list[str],
              by_range: dict[str, egress_pb2.EgressGateway],
              target: dict[str, egress_pb2.EgressGateway]) -> list[ds.Handoff]:
    """Where gateway `gw` copies the replies it forwards from each of its ranges
    (EgressConfig.handoffs): to the gateway that carries the range for the
    other nodes when that is not `gw`, or else to the one that will once a
    pending drain or undrain takes effect. A node that moved to that gateway
    refuses `gw`'s reply and takes the copy (docs/gatewayd.md, "Late replies")."""
    if not healthy(state, gw) or gw.internet_gateway:
        return []  # an internet gateway's ranges: not copied (gatewayd forwards no copies for it)
    by_addr: dict[str, list[str]] = {}
    for r in ranges:
        other = by_range.get(r)
        if other is None or other.name == gw.name:
            other = target.get(r)
        if other is None or other.name == gw.name or other.node == gw.node or not healthy(state, other):
            continue
        node = state.nodes.get(other.node)
        if node is None or not node.ipv4_address or ":" in r:
            continue  # IPv4 only: the copies travel in VXLAN to the node's overlay IPv4 address
        by_addr.setdefault(node.ipv4_address, []).append(r)
    return [ds.Handoff(ranges=_sort_cidrs(rs), address=a) for a, rs in sorted(by_addr.items())]


def _handoff_peers(state: NetworkState, gw: egress_pb2.EgressGateway) -> list[str]:
    """The overlay IPv4 addresses of the other gateway nodes sharing one of
    `gw`'s ranges or domains (EgressConfig.handoff_peers)."""
    if gw.internet_gateway:
        return []
    mine, names = set(gw.ranges), set(gw.domains)
    out = set()
    for g in state.gateways.values():
        if g.node == gw.node or g.internet_gateway or not (mine.intersection(g.ranges) or names.intersection(g.domains)):
            continue
        node = state.nodes.get(g.node)
        if node is not None and node.ipv4_address and node.public_key:
            out.add(node.ipv4_address)
    return sorted(out)


def _relay_egress(state: NetworkState, name: str, allowed: dict[str, list[str]], routes: list[ds.Route],
                  by_range: dict[str, egress_pb2.EgressGateway], range_order: list[str], own: set[str],
                  relay_peers: Callable[[str], Any], relayed_for: set[str]) -> list[str]:
    """On relay `name`: the egress ranges it carries for the pairs it relays
    between a gateway's node and a node that routes through that gateway. Each
    goes to the gateway node's entry (`allowed`, in place) and, unless the
    relay already routes it or runs a healthy gateway for it itself (then it
    leaves through its own egress), gets a route to that entry (`routes`, in
    place). Returns them, for `relayed_ranges`: the relay forwards them under
    the access policies, as it does the relayed nodes' own addresses. The
    internet gateway's default route is not carried here: a client routes it to
    the relay only when the relay itself routes its default through that
    gateway (compile_node)."""
    routed = {r.destination for r in routes}
    gw_nodes = {gw.node for gw in by_range.values() if gw.node in allowed and gw.node in relayed_for}
    partners = {g: paths.relayed_partners(state, name, g, relay_peers) for g in sorted(gw_nodes)}
    out = []
    for r in range_order:
        gw = by_range[r]
        users = partners.get(gw.node)
        if not users or not any(uses(state, gw, x) and not _runs_healthy(state, x, r) for x in users):
            continue
        out.append(r)
        if r not in allowed[gw.node]:
            allowed[gw.node].append(r)
        if r not in routed and r not in own:
            routes.append(ds.Route(destination=r, via_peer=state.nodes[gw.node].public_key))
    routes.sort(key=lambda x: _cidr_key(x.destination)[3])
    return out


def _runs_healthy(state: NetworkState, node: str, r: str) -> bool:
    return any(g.node == node and healthy(state, g) and r in g.ranges for g in state.gateways.values())


def _client_dns(me: node_pb2.Node, clients: list[external_client_pb2.ExternalClient]) -> list[ds.FilterRule]:
    """The external clients a node serves resolve through it (their
    configuration's `DNS =` is the node, unless created with `dns_servers`):
    where the node filters, their DNS queries to its overlay addresses (UDP and
    TCP 53) pass ahead of the policies, or the default configuration would
    leave a laptop in a DENY network without any DNS."""
    sources = sorted(h for c in clients if not c.dns_servers for h in filters.host_routes(c))
    mine = filters.host_routes(me)
    if not sources or not mine:
        return []
    return [ds.FilterRule(sources=sources, destinations=mine, protocol=proto, ports=["53"], accept=True)
            for proto in ("udp", "tcp")]


def _dns(state: NetworkState, out: ds.DesiredState, me: node_pb2.Node, peer_names: list[str],
         by_gateway: dict[str, list[external_client_pb2.ExternalClient]]) -> None:
    """The overlay zone the node answers: itself, its peers, and the external
    clients they (or it) serve, the names it can reach (so a change reaches
    exactly the nodes peering already reaches). A node id wins over an external
    client's of the same name."""
    out.dns.zone = domains.zone(_id(state.network.name))
    records: dict[str, list[str]] = {}
    for n in (me.name, *peer_names):
        node = state.nodes[n]
        records[_id(n)] = [a for a in (node.ipv4_address, node.ipv6_address) if a]
    for gw_node in (me.name, *peer_names):
        for c in by_gateway.get(gw_node, ()):
            records.setdefault(_id(c.name), [a for a in (c.ipv4_address, c.ipv6_address) if a])
    for label in sorted(records):
        out.dns.records.add(name=label, addresses=records[label])


# The fields of a node that other nodes' desired states are computed from (in
# compile_node, PeerIndex and active_gateways). Hazard: a field the compiler
# starts reading from peers must be added here.
PEER_VISIBLE_FIELDS = ("name", "public_key", "endpoint", "ipv4_address", "ipv6_address", "tags", "drain", "relay")


def affected_by_learned(state: NetworkState | None, name: str) -> set[str]:
    """Nodes whose desired state may change when node `name` reports new
    addresses for egress domains: every node, if it runs a gateway with
    domains (the routes and the gateway's sets move); otherwise none."""
    if state is None or not any(g.node == name and g.domains for g in state.gateways.values()):
        return set()
    return set(state.nodes)


def affected_by_health(state: NetworkState | None, gateway: str) -> set[str]:
    """Nodes whose desired state may change when gateway `gateway` turns
    unhealthy or healthy: every node (its ranges may move)."""
    if state is None or gateway not in state.gateways:
        return set()
    return set(state.nodes)


def affected_by_liveness(state: NetworkState | None, name: str) -> set[str]:
    """Nodes whose desired state may change when node `name` goes down or
    comes back: every node, if it runs a gateway (its ranges may move);
    otherwise none (liveness decides nothing else)."""
    if state is None or not any(g.node == name for g in state.gateways.values()):
        return set()
    return set(state.nodes)


def affected_by_client(before: NetworkState | None, after: NetworkState | None, name: str) -> set[str]:
    """Nodes whose desired state may change when external client `name`
    changes: its gateway node (before and after) and the nodes that peer with
    it (they route the client's addresses to it)."""
    out: set[str] = set()
    for st in (before, after):
        if st is None:
            continue
        c = st.external_clients.get(name)
        if c is not None and c.gateway_node in st.nodes:
            out.add(c.gateway_node)
            out.update(peers_of(st, c.gateway_node))
    return out


def affected_by_node(before: NetworkState | None, after: NetworkState | None, name: str) -> set[str]:
    """Nodes whose desired state may change when node `name` changes: itself
    and its peers before and after, plus everyone if it runs a gateway; only
    itself when none of its `PEER_VISIBLE_FIELDS` changed (say its listen
    port)."""
    out = {name}
    old = before.nodes.get(name) if before is not None else None
    new = after.nodes.get(name) if after is not None else None
    if old is not None and new is not None and all(getattr(old, f) == getattr(new, f) for f in PEER_VISIBLE_FIELDS):
        return out
    for st in (before, after):
        if st is not None:
            out |= node_reach(st, name)
    return out


def node_reach(st: NetworkState, name: str) -> set[str]:
    """The nodes whose desired state depends on node `name` in `st`: its
    peers, or every node when it runs a gateway or is a relay (a relay may
    carry any pair, paths.py). The state cache asks this just before and just
    after each change to the node, rather than comparing copies of the
    network (issue 18)."""
    node = st.nodes.get(name)
    if node is None:
        return set()
    if node.relay or any(g.node == name for g in st.gateways.values()):
        return set(st.nodes)
    return set(peers_of(st, name))


def diff(old: ds.DesiredState, new: ds.DesiredState, differ: bool = False) -> ds.DesiredStateDelta | None:
    """The delta taking `old` to `new`, or None when they are equal. `differ`:
    the caller already knows they are not (it compared `body()`s)."""
    if not differ and body(old) == body(new):
        return None
    d = ds.DesiredStateDelta(base_revision=old.revision, revision=new.revision)
    if old.peers != new.peers:
        old_peers = {p.public_key: p for p in old.peers}
        new_peers = {p.public_key: p for p in new.peers}
        for pk, p in new_peers.items():
            if old_peers.get(pk) != p:
                d.upserted_peers.append(p)
        d.removed_peers.extend(pk for pk in old_peers if pk not in new_peers)
    if old.interface != new.interface:
        d.interface.CopyFrom(new.interface)
    if old.routes != new.routes:
        d.routes_changed = True
        d.routes.extend(new.routes)
    if old.egress != new.egress:
        d.egress_changed = True
        d.egress.extend(new.egress)
    if old.filter_rules != new.filter_rules:
        d.filter_rules_changed = True
        d.filter_rules.extend(new.filter_rules)
    if old.default_route_via_peer != new.default_route_via_peer:
        d.default_route_changed = True
        d.default_route_via_peer = new.default_route_via_peer
    if old.relayed_ranges != new.relayed_ranges:
        d.relayed_ranges_changed = True
        d.relayed_ranges.extend(new.relayed_ranges)
    if old.dns != new.dns:
        d.dns.CopyFrom(new.dns)
        d.dns.SetInParent()
    return d


def body(s: ds.DesiredState) -> bytes:
    """The deterministic serialization of `s` without its revision: equal
    bodies are equal states (what the fan-out digests and compares)."""
    rev = s.revision
    if not rev:
        return s.SerializeToString(deterministic=True)
    s.revision = 0  # cheaper than serializing a copy; restored at once
    try:
        return s.SerializeToString(deterministic=True)
    finally:
        s.revision = rev
