"""Access policies compiled to one node's packet filter rules (`DesiredState.filter_rules`).

Pure, like the rest of the compiler. The meaning being compiled:

- A policy matches a packet when its source address is in a source selector's
  addresses, its destination in a destination selector's, its protocol is the
  policy's (unspecified: any) and, for TCP/UDP with ports, its destination port is
  in one of the ranges. A bidirectional policy also matches with sources and
  destinations swapped. Selector addresses: `*` any; `node:`/`tag:` the nodes'
  overlay host addresses; `client:` the external client's; `egress:` the
  gateway's ranges, and for an internet gateway every address outside the
  overlay and the other gateways' ranges (`Resolver.internet`); `domain:` (a
  destination) the addresses gateways learned for the name (domains.py), so
  its rules follow DNS like its routes.
- Enabled policies are taken by (priority, name); the first that matches decides
  (ACCEPT or DROP); no match means the network's default.
- A node enforces this for the packets it delivers out of the overlay: to itself,
  to its egress ranges (and its LAN), and to the external clients it relays for.
  gatewayd enters the rules only for those packets, after letting replies of
  allowed connections pass (see gatewayd/nftables.py).

Per node, the rules are reduced without changing any verdict for a packet the
node can receive: destinations are cut to what the node delivers (a policy whose
destinations the node does not deliver vanishes), sources to what the node's
peers may send (WireGuard drops any other source before filtering), rules after
the last one whose verdict differs from the default are dropped, and under DENY a
final rule that matches everything drops. So a node carries only the policies
about it, and a change to a policy reaches only the nodes whose rules change.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from typing import TypeVar

from meshgate.api.v1 import desired_state_pb2 as ds
from meshgate.api.v1 import external_client_pb2, network_pb2, node_pb2, policy_pb2
from meshgate.controlplane import domains

PROTOCOLS = {
    policy_pb2.PROTOCOL_UNSPECIFIED: "",
    policy_pb2.TCP: "tcp",
    policy_pb2.UDP: "udp",
    policy_pb2.ICMP: "icmp",
    policy_pb2.ICMPV6: "icmpv6",
}
ANY = None  # a selector side that matches every address
_N = TypeVar("_N", ipaddress.IPv4Network, ipaddress.IPv6Network)


@functools.lru_cache(maxsize=1 << 16)
def _net(cidr: str) -> tuple[int, int, int]:
    """(version, first address as int, prefix length)."""
    n = ipaddress.ip_network(cidr, strict=False)
    return n.version, int(n.network_address), n.prefixlen


def _bits(version: int) -> int:
    return 32 if version == 4 else 128


def _mask(version: int, value: int, plen: int) -> int:
    bits = _bits(version)
    return value >> (bits - plen) << (bits - plen) if plen else 0


def _within_any(nets: Iterable[tuple[int, int, int]], index: dict[tuple[int, int], set[int]]) -> list[tuple[int, int, int]]:
    out = []
    for v, a, plen in nets:
        for (iv, ip), starts in index.items():
            if iv == v and ip <= plen and _mask(v, a, ip) in starts:
                out.append((v, a, plen))
                break
    return out


def _index(nets: Iterable[tuple[int, int, int]]) -> dict[tuple[int, int], set[int]]:
    index: dict[tuple[int, int], set[int]] = {}
    for v, a, plen in nets:
        index.setdefault((v, plen), set()).add(a)
    return index


def _text(v: int, a: int, plen: int) -> str:
    addr = ipaddress.IPv4Address(a) if v == 4 else ipaddress.IPv6Address(a)
    return f"{addr}/{plen}"


def collapse(nets: Iterable[tuple[int, int, int]]) -> list[str]:
    """The smallest sorted list of CIDRs covering `nets` (no element inside another)."""
    by_version: dict[int, list] = {4: [], 6: []}
    for v, a, plen in set(nets):
        cls = ipaddress.IPv4Network if v == 4 else ipaddress.IPv6Network
        by_version[v].append(cls((a, plen)))
    out = []
    for v in (4, 6):
        out += [str(n) for n in ipaddress.collapse_addresses(by_version[v])]
    return out


def intersect(a: Sequence[str] | None, b: Sequence[str] | None) -> list[str] | None:
    """The addresses in both CIDR lists (`ANY` is every address), collapsed.

    Two CIDRs overlap only when one holds the other, so the intersection is the
    members of each list that lie within a member of the other; found through an
    index by prefix length, in O((|a| + |b|) x distinct prefix lengths)."""
    if a is ANY:
        return None if b is ANY else collapse(_net(c) for c in b)
    if b is ANY:
        return collapse(_net(c) for c in a)
    na, nb = [_net(c) for c in a], [_net(c) for c in b]
    return collapse(_within_any(na, _index(nb)) + _within_any(nb, _index(na)))


def complement(cidrs: Iterable[str]) -> list[str]:
    """Every address (IPv4 and IPv6) outside `cidrs`, as the fewest CIDRs."""
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return ([str(n) for n in _outside(ipaddress.IPv4Network("0.0.0.0/0"), v4)]
            + [str(n) for n in _outside(ipaddress.IPv6Network("::/0"), v6)])


def _outside(everything: _N, holes: list[_N]) -> list[_N]:
    rest = [everything]
    for hole in ipaddress.collapse_addresses(holes):
        nxt: list[_N] = []
        for r in rest:
            if hole.subnet_of(r):
                nxt += list(r.address_exclude(hole))
            elif not r.subnet_of(hole):
                nxt.append(r)
        rest = nxt
    return list(ipaddress.collapse_addresses(rest))


def _ports(p: policy_pb2.AccessPolicy) -> list[str]:
    out = []
    for r in p.ports:
        last = r.last or r.first
        out.append(str(r.first) if last == r.first else f"{r.first}-{last}")
    return out


class Resolver:
    """The addresses of selectors in one network state, each worked out once."""

    def __init__(self, state) -> None:
        self._state = state
        self._cache: dict[str, list[str] | None] = {}
        self._internet: list[str] | None = None

    def addresses(self, selectors: Sequence[str]) -> list[str] | None:
        out: list[str] = []
        for s in selectors:
            if s not in self._cache:
                self._cache[s] = self._resolve(s)
            got = self._cache[s]
            if got is None:
                return ANY
            out += got
        return out

    def _resolve(self, selector: str) -> list[str] | None:
        st = self._state
        if selector == "*":
            return ANY
        kind, _, value = selector.partition(":")
        if kind == "tag":
            # By name, from the state's tag index when it keeps one (a few
            # hubs among 10,000 nodes cost the few, issue 18).
            return [h for name in sorted(st.tagged({value})) for h in host_routes(st.nodes[name])]
        if kind == "node":
            n = st.nodes.get(f"{st.network.name}/nodes/{value}")
            return host_routes(n) if n is not None else []
        if kind == "client":
            c = st.external_clients.get(f"{st.network.name}/externalClients/{value}")
            return host_routes(c) if c is not None else []
        if kind == "egress":
            gw = st.gateways.get(f"{st.network.name}/egressGateways/{value}")
            if gw is None:
                return []
            return [*gw.ranges, *(self.internet() if gw.internet_gateway else [])]
        if kind == "domain":  # the addresses the gateways' agents learned for it
            return domains.addresses_of(value, st.gateways.values(), st.learned,
                                        [c for c in (st.network.ipv4_cidr, st.network.ipv6_cidr) if c], st.down)
        return []

    def internet(self) -> list[str]:
        """What an internet gateway's `egress:` selector stands for besides its
        ranges: every address outside the network's overlay ranges and outside the
        ranges of the network's other gateways (those are reached through them, not
        through the internet), so a policy about the internet never names a node."""
        if self._internet is None:
            st = self._state
            inside = [c for c in (st.network.ipv4_cidr, st.network.ipv6_cidr) if c]
            inside += [r for g in st.gateways.values() for r in g.ranges]
            self._internet = complement(inside)
        return self._internet


def host_routes(n: node_pb2.Node | external_client_pb2.ExternalClient) -> list[str]:
    """A node's or external client's overlay host routes (/32, /128)."""
    out = []
    if n.ipv4_address:
        out.append(f"{n.ipv4_address}/32")
    if n.ipv6_address:
        out.append(f"{n.ipv6_address}/128")
    return out


def ordered(state) -> list[policy_pb2.AccessPolicy]:
    """The enabled policies in evaluation order."""
    return sorted((p for p in state.policies.values() if not p.disabled), key=lambda p: (p.priority, p.name))


def compile_rules(state, delivers: Sequence[str], admits: Sequence[str],
                  resolver: Resolver | None = None) -> list[ds.FilterRule]:
    """The filter rules of a node that delivers `delivers` (CIDRs: its own
    addresses, egress ranges, relayed clients) and whose peers may send from
    `admits` (the union of its peers' allowed IPs)."""
    deny = state.network.default_policy == network_pb2.DENY
    resolver = resolver or Resolver(state)
    if any(c in ("0.0.0.0/0", "::/0") for c in admits):
        # through an internet gateway come the internet's addresses, not the overlay's
        # (and so no rule depends on a node this one does not peer with)
        admits = [c for c in admits if c not in ("0.0.0.0/0", "::/0")] + resolver.internet()
    rules: list[ds.FilterRule] = []
    last_decisive = -1  # index of the last rule whose verdict differs from the default
    for p in ordered(state):
        accept = p.action != policy_pb2.DROP
        src_all = resolver.addresses(p.sources)
        dst_all = resolver.addresses(p.destinations)
        directions = [(src_all, dst_all)]
        if p.bidirectional:
            directions.append((dst_all, src_all))
        for src, dst in directions:
            # `*` stays "any": the chain only sees what the node delivers, from its peers
            dst_here = ANY if dst is ANY else intersect(dst, delivers)
            if dst_here == []:
                continue  # names nothing this node delivers
            src_here = ANY if src is ANY else intersect(src, admits)
            if src_here == []:
                continue  # names no address this node's peers may send from
            rules.append(ds.FilterRule(
                sources=src_here or [], destinations=dst_here or [], protocol=PROTOCOLS.get(p.protocol, ""),
                ports=_ports(p), accept=accept, policy=p.name,
            ))
            if accept == deny:
                last_decisive = len(rules) - 1
    del rules[last_decisive + 1:]
    if deny:
        rules.append(ds.FilterRule(accept=False))
    return rules
