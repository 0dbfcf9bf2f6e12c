"""Egress domains and the overlay's DNS zone: syntax, matching, and the addresses agents learned.

Pure. An egress gateway's `domains` are exact names (`db.example.com`) or
wildcards (`*.example.com`: any name below `example.com`, not the name
itself); they are stored lower-case without a trailing dot. What the gateway
agents learned arrives as `learned/{net}/{node}` (a SyncRequest.Domains per
node, see sync.py: one entry per name resolved or seen in an answer, a
wildcard's names each on their own) and becomes host routes here (`routed_addresses`).

Hazards: an address learned from DNS is only as trustworthy as the resolver
the gateway uses; an answer pointing into the overlay (or at 0.0.0.0/8,
loopback, link-local, multicast) would steer other nodes' traffic for it into
the gateway, so such addresses are dropped here as well as by the agent.
Names under the overlay's own zone (`*.{network}.{DNS_SUFFIX}`) are refused
at the API: they resolve into the overlay by construction.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from meshgate.api.v1 import agent_pb2, egress_pb2

# The overlay's zone is `{network}.{DNS_SUFFIX}`; nodes are `{node}.{network}.{DNS_SUFFIX}`.
DNS_SUFFIX = "meshgate.internal"
MAX_DOMAINS = 64
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


def canonical(name: str) -> str:
    """`Db.Example.com.` -> `db.example.com`."""
    return name.strip().rstrip(".").lower()


def zone(network_id: str) -> str:
    """The overlay DNS zone of a network."""
    return f"{network_id}.{DNS_SUFFIX}"


def problem(name: str) -> str | None:
    """Why `name` is not a valid egress domain, or None. Expects `canonical` form."""
    if not name:
        return "is empty"
    shown = name if len(name) <= 80 else name[:80] + "..."
    if len(name) > 253:
        return f"{shown!r} is longer than 253 characters"
    labels = name.split(".")
    wildcard = labels[0] == "*"
    if "*" in name and not (wildcard and "*" not in ".".join(labels[1:])):
        return f"{shown!r} has a wildcard in the wrong place: only a whole first label may be '*' (*.example.com)"
    rest = labels[1:] if wildcard else labels
    if len(rest) < 2:
        return (f"{shown!r} is a wildcard over a top-level domain" if wildcard
                else f"{shown!r} is not a fully qualified name (give at least two labels, e.g. db.example.com)")
    for label in rest:
        if not _LABEL.match(label):
            return f"{shown!r} has an invalid label {label[:63]!r} (letters, digits, '-' and '_', 1-63 characters)"
    if rest[-1].isdigit():
        return f"{shown!r} looks like an IP address; put addresses in ranges"
    base = ".".join(rest)
    if base == DNS_SUFFIX or base.endswith("." + DNS_SUFFIX):
        return f"{shown!r} is in the overlay's own zone ({DNS_SUFFIX}): it resolves into the overlay"
    if base == "localhost" or base.endswith(".localhost"):
        return f"{shown!r} resolves to the loopback address"
    return None


def matches(domain: str, name: str) -> bool:
    """Whether the queried `name` (canonical) falls under declared `domain`."""
    if domain.startswith("*."):
        return name.endswith(domain[1:]) and len(name) > len(domain) - 1
    return name == domain


def covering(domains: Iterable[str], name: str) -> list[str]:
    """The declared domains `name` falls under."""
    return [d for d in domains if matches(d, name)]


def refused_address(addr: str, overlay: Sequence[str]) -> str | None:
    """Why a learned address must not be routed, or None."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return "not an IP address"
    for cidr in overlay:
        if cidr:
            net = ipaddress.ip_network(cidr, strict=False)
            if net.version == ip.version and ip in net:
                return f"in the overlay ({cidr})"
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        return "not a routable unicast address"
    if ip.version == 4 and ip in ipaddress.ip_network("0.0.0.0/8"):
        return "not a routable unicast address"
    return None


def host_route(addr: str) -> str:
    ip = ipaddress.ip_address(addr)
    return f"{ip}/{ip.max_prefixlen}"


def active_by_domain(gateways: Iterable[egress_pb2.EgressGateway], rank: Callable[[egress_pb2.EgressGateway], Any],
                     usable) -> dict[str, egress_pb2.EgressGateway]:
    """The gateway carrying each domain: the first by `rank`, the compiler's
    ranking of gateways for ranges (nodes that are up first, then priority,
    then name), so domains fail over as ranges do."""
    ranked = sorted((g for g in gateways if g.domains and usable(g)), key=rank)
    out: dict[str, egress_pb2.EgressGateway] = {}
    for gw in ranked:
        for d in gw.domains:
            out.setdefault(d, gw)
    return out


def reporting(nodes: Iterable[str], learned: Mapping[str, agent_pb2.SyncRequest.Domains],
              down: Collection[str]) -> list[str]:
    """Whose reports count among `nodes` (serving a domain): those marked up
    that reported, or, when none of them is up, all that reported (their last
    word, as a gateway's ranges stay routed when every candidate is down). A
    node that went down stops resolving: its last report never changes, and
    its addresses must not outlive the grace period on the standby that took
    over and resolves on its own."""
    have = sorted(n for n in set(nodes) if n in learned)
    up = [n for n in have if n not in down]
    return up or have


def routed_addresses(gateways: Iterable[egress_pb2.EgressGateway], rank: Callable[[egress_pb2.EgressGateway], Any],
                     usable,
                     learned: Mapping[str, agent_pb2.SyncRequest.Domains],
                     overlay: Sequence[str], down: Collection[str] = ()) -> dict[str, egress_pb2.EgressGateway]:
    """Host route (`/32`, `/128`) -> the gateway that carries it.

    A domain's addresses are those the nodes serving it reported (HA standbys
    resolve too, so a failover only moves routes; see `reporting` for nodes
    marked `down`); they go to the domain's active gateway. An address two
    domains share goes to the first domain in name order; addresses in the
    overlay are dropped.
    """
    gateways = list(gateways)
    active = active_by_domain(gateways, rank, usable)
    serving: dict[str, set[str]] = {}  # domain -> nodes of gateways declaring it
    for g in gateways:
        for d in g.domains:
            serving.setdefault(d, set()).add(g.node)
    out: dict[str, egress_pb2.EgressGateway] = {}
    for d in sorted(active):
        for r in domain_addresses(d, serving.get(d, ()), learned, overlay, down):
            out.setdefault(r, active[d])
    return out


def domain_addresses(domain: str, serving: Iterable[str], learned: Mapping[str, agent_pb2.SyncRequest.Domains],
                     overlay: Sequence[str], down: Collection[str] = ()) -> list[str]:
    """Host routes for a declared `domain` from the reports of the nodes
    `serving` it (see `reporting`), in report order, overlay addresses dropped."""
    out: dict[str, None] = {}
    for node in reporting(serving, learned, down):
        for st in learned[node].domains:
            if st.domain == domain or matches(domain, st.domain):
                out.update((host_route(a), None) for a in st.addresses if refused_address(a, overlay) is None)
    return list(out)


def addresses_of(selector: str, gateways: Iterable[egress_pb2.EgressGateway],
                 learned: Mapping[str, agent_pb2.SyncRequest.Domains], overlay: Sequence[str],
                 down: Collection[str] = ()) -> list[str]:
    """Host routes learned for a policy's `domain:` selector value: a name, or a
    wildcard covering names. Agents report one entry per name they resolved or
    saw (a wildcard's names each on their own), so `domain:db.example.com`
    means that name's addresses even when the gateway declares `*.example.com`.
    The reports that count are those of `reporting` among the nodes serving a
    domain the selector falls under."""
    want = canonical(selector)
    nodes = {g.node for g in gateways if any(d == want or matches(d, want) or matches(want, d) for d in g.domains)}
    out: set[str] = set()
    for node in reporting(nodes, learned, down):
        for st in learned[node].domains:
            if st.domain == want or matches(want, st.domain):
                out.update(host_route(a) for a in st.addresses if refused_address(a, overlay) is None)
    return sorted(out)
