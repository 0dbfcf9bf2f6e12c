"""The desired and observed state of a node, as gatewayd's planner sees them.

``compile_desired`` turns the API's ``DesiredState`` message into a ``Desired``: every
field validated (bad input is rejected whole, with one ``FieldViolation`` per problem,
before anything touches the kernel), normalised (CIDRs in canonical form, so they
compare equal to what the kernel reports) and expanded into the kernel objects it
implies (routes, policy rules, the nftables table, sysctls).  ``Observed`` is the same
shape read back from the kernel.  Both are plain frozen values: no I/O happens here.

Hazards: pre-shared keys are ``Secret``s and never appear in messages; the overlap
check must stay O(n log n) (it runs on every snapshot of up to thousands of peers).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.common.desired import apply_delta
from meshgate.gatewayd import nftrules as nftables
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.errors import FieldViolation, InvalidDesiredState
from meshgate.gatewayd.keys import Secret, is_valid_key

MAIN_TABLE = 254
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
ZERO_KEY = "A" * 43 + "="



@dataclass(frozen=True, slots=True)
class PeerSpec:
    """A WireGuard peer as configured (desired) or as the device reports it (observed)."""

    public_key: str
    allowed_ips: frozenset[str] = frozenset()
    preshared_key: Secret | None = None
    endpoint: str | None = None
    """``ip:port`` / ``[v6]:port``; None in a desired peer means "not managed"."""
    keepalive: int = 0
    ranges: tuple[tuple[int, int, int], ...] = field(default=(), compare=False, repr=False)
    """(ip version, first, last) of each allowed IP, for the overlap check."""
    rtt_address: str = field(default="", compare=False, repr=False)
    """The overlay address to measure the round-trip time to (a relay); not configured."""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A route in gatewayd's own table, always ``dev <interface> proto <ours>``."""

    dst: str
    metric: int = 0

    @property
    def family(self) -> int:
        return 6 if ":" in self.dst else 4


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A policy-routing rule stamped with gatewayd's protocol id."""

    family: int
    priority: int
    table: int
    fwmark: int = 0
    invert: bool = False
    suppress_prefixlength: int | None = None
    dst: str = ""
    """``to <dst>`` (a CIDR): only packets to it."""
    oif: str = ""
    """``oif <link>``: only lookups for packets leaving through it."""


@dataclass(frozen=True)
class HandoffSpec:
    """The late-reply link (handoff.py)."""

    device: str
    local: str
    """This node's overlay IPv4 address (the VXLAN's source)."""
    peers: frozenset[str]
    """Overlay IPv4 addresses of the other gateway nodes sharing a range."""
    mtu: int
    copies: tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...] = ()
    """(ranges, overlay sources, address): replies from the ranges to the
    sources that are copied to that gateway node (``EgressConfig.handoffs``)."""


@dataclass(frozen=True)
class Desired:
    node: str
    revision: int
    interface: str
    public_key: str
    """The node's own public key (its private key stays with the key store)."""
    addresses: frozenset[str]
    listen_port: int | None
    mtu: int
    fwmark: int
    peers: Mapping[str, PeerSpec]
    routes: frozenset[RouteSpec]
    rules: frozenset[RuleSpec]
    nft: nftables.Table
    sysctls: Mapping[str, str]
    egress_interfaces: frozenset[str] = frozenset()
    relayed_ranges: tuple[str, ...] = ()
    """Canonical, sorted: the overlay ranges this node relays for (in ``nft``'s
    ``relay4``/``relay6`` sets and the forwarding ``sysctls``)."""
    nft_inputs: tuple[tuple[nftables.Egress, ...], tuple[Cidr, ...]] = field(
        default=((), ()), compare=False, repr=False)
    handoff: HandoffSpec | None = None
    """What ``nft`` was rendered from besides the filters (egress, relayed ranges),
    so a delta of filter rules alone renders the table again without the rest."""


@dataclass(frozen=True)
class ObservedDevice:
    public_key: str | None
    listen_port: int
    fwmark: int
    peers: Mapping[str, PeerSpec]


@dataclass(frozen=True)
class ObservedLink:
    mtu: int
    up: bool
    addresses: frozenset[str]


@dataclass(frozen=True)
class Observed:
    device: ObservedDevice | None
    """None when the WireGuard interface does not exist."""
    link: ObservedLink | None
    routes: frozenset[RouteSpec]
    rules: frozenset[RuleSpec]
    nft_digest: str | None
    """Digest of the ``inet meshgate`` table when its content is verified to be exactly
    what gatewayd loaded for that digest; None when absent or not verifiable."""
    sysctls: Mapping[str, str]
    handoff: HandoffSpec | None = None


def expected_observed(d: Desired) -> Observed:
    """What the kernel looks like once ``d`` is applied (the delta path plans against it)."""
    return Observed(
        device=ObservedDevice(
            public_key=d.public_key,
            listen_port=d.listen_port or 0,
            fwmark=d.fwmark,
            peers=d.peers,
        ),
        link=ObservedLink(mtu=d.mtu, up=True, addresses=d.addresses),
        routes=d.routes,
        rules=d.rules,
        nft_digest=d.nft.digest,
        sysctls=dict(d.sysctls),
        handoff=d.handoff,
    )


# ---------------------------------------------------------------- parsing helpers


class Cidr(NamedTuple):
    """A parsed, canonical CIDR: what ``ipaddress.ip_network`` gives, at a fraction of
    the cost (a snapshot holds thousands of them)."""

    version: int
    lo: int
    hi: int
    text: str

    def __str__(self) -> str:
        return self.text


_V4_ALL = (1 << 32) - 1
_V6_ALL = (1 << 128) - 1


@functools.lru_cache(maxsize=1 << 16)
def parse_cidr(text: str) -> Cidr:
    """Strictly parse ``addr/len`` (host bits must be zero); raises ValueError.

    Cached: a state with 1,000 policies repeats the same host addresses in thousands
    of places, and every compile of a new state (a delta included) parses them all."""
    text = text.strip()
    addr, sep, plen_s = text.partition("/")
    if not sep:
        raise ValueError("missing /prefix length")
    if not plen_s.isdigit():
        raise ValueError(f"bad prefix length {plen_s!r}")
    plen = int(plen_s)
    if "%" in addr:
        raise ValueError(f"{addr!r} has a zone index")
    try:
        ip = ipaddress.ip_address(addr)  # strict: no leading zeros, no shorthand
    except ValueError:
        raise ValueError(f"{addr!r} is not an {'IPv6' if ':' in addr else 'IPv4'} address") from None
    bits, full = (32, _V4_ALL) if ip.version == 4 else (128, _V6_ALL)
    if plen > bits:
        raise ValueError(f"prefix length above {bits}")
    lo = int(ip)
    host = full >> plen
    if lo & host:
        raise ValueError(f"{text} has host bits set")
    return Cidr(ip.version, lo, lo | host, f"{ip}/{plen}")


ANY4 = parse_cidr("0.0.0.0/0")
ANY6 = parse_cidr("::/0")


def _net(text: str, where: str, v: list[FieldViolation]) -> Cidr | None:
    try:
        return parse_cidr(text)
    except ValueError as e:
        v.append(FieldViolation(where, f"not a valid CIDR ({e})"))
        return None


def _nets(texts: Iterable[str], where: str, v: list[FieldViolation]) -> list[Cidr]:
    out = []
    for i, t in enumerate(texts):
        n = _net(t, f"{where}[{i}]", v)
        if n is not None:
            out.append(n)
    return out


def _range(n: Cidr) -> tuple[int, int, int]:
    return (n.version, n.lo, n.hi)


def normalize_endpoint(text: str) -> str:
    """``host:port`` with host an IP literal, in the form wireguard reports it."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].rpartition("]:")
        if not sep:
            raise ValueError("expected [v6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
    p = int(port)
    if not 0 < p < 65536:
        raise ValueError("port out of range")
    ip = ipaddress.ip_address(host)
    return f"[{ip}]:{p}" if ip.version == 6 else f"{ip}:{p}"


def _peer(p: pb.Peer, where: str, own_key: str, v: list[FieldViolation]) -> PeerSpec | None:
    n0 = len(v)
    if not is_valid_key(p.public_key):
        v.append(FieldViolation(f"{where}.public_key", "not a 32-byte base64 WireGuard key"))
    elif p.public_key == own_key:
        v.append(FieldViolation(f"{where}.public_key", "is this node's own key"))
    psk = None
    if p.preshared_key:
        if not is_valid_key(p.preshared_key):
            # never echo the value: it is a secret
            v.append(FieldViolation(f"{where}.preshared_key", "not a 32-byte base64 key"))
        else:
            psk = Secret(p.preshared_key)
    endpoint = None
    if p.endpoint:
        try:
            endpoint = normalize_endpoint(p.endpoint)
        except ValueError as e:
            v.append(FieldViolation(f"{where}.endpoint", f"{p.endpoint!r} is not ip:port ({e})"))
    if p.persistent_keepalive_seconds > 65535:
        v.append(FieldViolation(f"{where}.persistent_keepalive_seconds", "must be <= 65535"))
    nets = _nets(p.allowed_ips, f"{where}.allowed_ips", v)
    if len(v) != n0:
        return None
    return PeerSpec(
        public_key=p.public_key,
        allowed_ips=frozenset(str(n) for n in nets),
        preshared_key=psk,
        endpoint=endpoint,
        keepalive=p.persistent_keepalive_seconds,
        ranges=tuple(_range(n) for n in nets),
        rtt_address=p.rtt_address,
    )


def _check_overlaps(
    peers: Mapping[str, PeerSpec], names: Mapping[str, str], v: list[FieldViolation]
) -> None:
    """Allowed IPs of two peers may not be equal or nested, except under a /0.

    A /0 is the internet gateway: WireGuard's longest-prefix match lets every more
    specific peer win over it, which is what a default route means.  Anything else
    nested is ambiguous routing and a control-plane bug.
    """
    items = []
    for key, p in peers.items():
        for fam, lo, hi in p.ranges:
            if lo == 0 and hi == (_V4_ALL if fam == 4 else _V6_ALL):
                continue
            items.append((fam, lo, -hi, key))
    items.sort()
    # sorted by start, widest first: a range overlaps the open range with the largest
    # end seen so far iff it starts before that end
    cur_fam, cur_hi, cur_key = None, -1, ""
    reported: set[tuple[str, str]] = set()
    for fam, lo, neg_hi, key in items:
        hi = -neg_hi
        if fam == cur_fam and lo <= cur_hi and key != cur_key:
            pair = tuple(sorted((key, cur_key)))
            if pair not in reported:
                reported.add(pair)  # type: ignore[arg-type]
                v.append(
                    FieldViolation(
                        f"{names[key]}.allowed_ips",
                        f"overlaps the allowed IPs of {names[cur_key]}",
                    )
                )
        if fam != cur_fam or hi > cur_hi:
            cur_fam, cur_hi, cur_key = fam, hi, key


def _covered(dst: Cidr, peer: PeerSpec) -> bool:
    fam, lo, hi = _range(dst)
    return any(f == fam and a <= lo and hi <= b for f, a, b in peer.ranges)


# ---------------------------------------------------------------- compile


def compile_desired(
    msg: pb.DesiredState,
    *,
    settings: Settings,
    public_key: str,
    host_links: Collection[str] | None = None,
) -> Desired:
    """Validate ``msg`` and expand it; raises ``InvalidDesiredState`` listing every problem.

    ``host_links`` are the host's interface names, for checking ``egress_interface``;
    None skips that check (pure unit tests).
    """
    v: list[FieldViolation] = []
    iface = msg.interface.name or settings.default_interface
    if not IFNAME_RE.match(iface):
        v.append(FieldViolation("interface.name", f"{iface!r} is not a valid interface name"))
    addresses = []
    for i, a in enumerate(msg.interface.addresses):
        try:
            addresses.append(str(ipaddress.ip_interface(a.strip())))
        except ValueError as e:
            v.append(FieldViolation(f"interface.addresses[{i}]", f"not an address/prefix ({e})"))
    if msg.interface.listen_port > 65535:
        v.append(FieldViolation("interface.listen_port", "must be <= 65535"))
    mtu = msg.interface.mtu or 1420
    if not 576 <= mtu <= 65535:
        v.append(FieldViolation("interface.mtu", "must be within 576..65535"))
    if msg.interface.fwmark >= 2**32:
        v.append(FieldViolation("interface.fwmark", "must fit 32 bits"))

    peers: dict[str, PeerSpec] = {}
    names: dict[str, str] = {}
    for i, p in enumerate(msg.peers):
        where = f"peers[{i}]"
        spec = _peer(p, where, public_key, v)
        if spec is None:
            continue
        if spec.public_key in peers:
            v.append(FieldViolation(f"{where}.public_key", f"duplicates {names[spec.public_key]}"))
            continue
        peers[spec.public_key] = spec
        names[spec.public_key] = where
    _check_overlaps(peers, names, v)

    routes: set[RouteSpec] = set()
    for i, r in enumerate(msg.routes):
        where = f"routes[{i}]"
        dst = _net(r.destination, f"{where}.destination", v)
        via = peers.get(r.via_peer)
        if via is None:
            v.append(FieldViolation(f"{where}.via_peer", "is not one of this node's peers"))
        elif dst is not None and not _covered(dst, via):
            v.append(FieldViolation(
                f"{where}.destination", f"is not within the allowed IPs of {names[r.via_peer]}"))
        if dst is not None:
            routes.add(RouteSpec(dst.text, _metric(dst.version, r.metric)))
    if msg.default_route_via_peer:
        via = peers.get(msg.default_route_via_peer)
        if via is None:
            v.append(FieldViolation("default_route_via_peer", "is not one of this node's peers"))
        else:
            fams = [any_.version for any_ in (ANY4, ANY6) if _covered(any_, via)]
            if not fams:
                v.append(FieldViolation(
                    "default_route_via_peer",
                    f"{names[msg.default_route_via_peer]} has neither 0.0.0.0/0 nor ::/0 in its allowed IPs"))
            for fam in fams:
                routes.add(RouteSpec("0.0.0.0/0" if fam == 4 else "::/0", _metric(fam, 0)))

    egress: list[nftables.Egress] = []
    egress_ifaces: set[str] = set()
    own_nets = sorted({str(ipaddress.ip_interface(a).network) for a in addresses})
    for i, eg in enumerate(msg.egress):
        where = f"egress[{i}]"
        ranges = _nets(eg.ranges, f"{where}.ranges", v)
        sources = _nets(eg.source_ranges, f"{where}.source_ranges", v)
        if not sources:
            sources = [parse_cidr(n) for n in own_nets]
        if eg.egress_interface:
            if not IFNAME_RE.match(eg.egress_interface):
                v.append(FieldViolation(f"{where}.egress_interface", "is not a valid interface name"))
            elif eg.egress_interface == iface:
                v.append(FieldViolation(f"{where}.egress_interface", "is the WireGuard interface itself"))
            elif host_links is not None and eg.egress_interface not in host_links:
                v.append(FieldViolation(
                    f"{where}.egress_interface", f"unknown interface {eg.egress_interface!r} on this host"))
            egress_ifaces.add(eg.egress_interface)
        if not ranges and not eg.internet_gateway and not eg.domains:
            # (a gateway of domains only has no ranges until their addresses are learned)
            v.append(FieldViolation(f"{where}.ranges", "empty (and internet_gateway is off)"))
        in_order: list[Cidr] = sorted(ranges, key=_range)
        sources_in_order: list[Cidr] = sorted(sources, key=_range)
        handoffs, handoff_peers = _handoffs(eg, where, {n.text for n in ranges}, v)
        egress.append(nftables.Egress(
            ranges=tuple(in_order),
            sources=tuple(sources_in_order),
            nat=eg.nat,
            egress_interface=eg.egress_interface or None,
            internet_gateway=eg.internet_gateway,
            handoffs=handoffs,
            handoff_peers=handoff_peers,
        ))

    filters = _filters(msg.filter_rules, v)

    relayed = _relayed(msg.relayed_ranges, v)

    if v:
        raise InvalidDesiredState(v)

    fwmark = msg.interface.fwmark or (settings.fwmark if routes else 0)
    rules: set[RuleSpec] = set()
    for fam in {r.family for r in routes}:
        rules.add(RuleSpec(fam, settings.rule_table_priority, settings.route_table, fwmark, invert=True))
    for route in routes:
        if route.dst.endswith("/0"):
            rules.add(RuleSpec(route.family, settings.rule_priority, MAIN_TABLE, suppress_prefixlength=0))
            # the control plane is never reached through the tunnel: a default route
            # through a peer would otherwise carry the agent's own stream
            for addr in settings.bypass:
                fam = 6 if ":" in addr else 4
                if fam == route.family:
                    rules.add(RuleSpec(fam, settings.rule_priority - 10, MAIN_TABLE,
                                       dst=f"{addr}/{32 if fam == 4 else 128}"))
    sysctls: dict[str, str] = {}
    for egress_spec in egress:
        for fam, key in ((4, "net.ipv4.ip_forward"), (6, "net.ipv6.conf.all.forwarding")):
            if any(n.version == fam for n in egress_spec.sources) and (
                    egress_spec.internet_gateway or any(n.version == fam for n in egress_spec.ranges)):
                sysctls[key] = "1"
    for fam, key in ((4, "net.ipv4.ip_forward"), (6, "net.ipv6.conf.all.forwarding")):
        if any(n.version == fam for n in relayed):
            sysctls[key] = "1"
    if any(r.dst == "0.0.0.0/0" for r in routes):
        sysctls["net.ipv4.conf.all.src_valid_mark"] = "1"
    handoff = None
    ho_peers = frozenset(a for e in egress for a in (*e.handoff_peers, *(h[1] for h in e.handoffs)))
    own4 = [str(ipaddress.ip_interface(a).ip) for a in sorted(addresses) if ":" not in a]
    if ho_peers and own4:
        copies = tuple((tuple(str(n) for n in nets), tuple(str(n) for n in e.sources if n.version == 4), addr)
                       for e in egress for nets, addr in e.handoffs)
        handoff = HandoffSpec(nftables.handoff_device(iface), own4[0], ho_peers, mtu, copies)
        rules.add(RuleSpec(4, settings.rule_priority - 20, settings.handoff_table, oif=handoff.device))

    return Desired(
        node=msg.node,
        revision=msg.revision,
        interface=iface,
        public_key=public_key,
        addresses=frozenset(addresses),
        listen_port=msg.interface.listen_port or None,
        mtu=mtu,
        fwmark=fwmark,
        peers=peers,
        routes=frozenset(routes),
        rules=frozenset(rules),
        nft=nftables.render(iface, egress, filters, relayed),
        sysctls=sysctls,
        egress_interfaces=frozenset(egress_ifaces),
        relayed_ranges=tuple(n.text for n in relayed),
        nft_inputs=(tuple(egress), tuple(relayed)),
        handoff=handoff,
    )


_FilterKey = tuple[tuple[str, ...], tuple[str, ...], str, tuple[str, ...], bool, str]


def _filters(rules: Iterable[pb.FilterRule], v: list[FieldViolation]) -> list[nftables.Filter]:
    """``filter_rules``, validated (violations go to `v`). A valid rule is parsed once
    (`_filter_of`): a delta that changes one policy of 1,000 re-parses only that one."""
    filters: list[nftables.Filter] = []
    for i, f in enumerate(rules):
        key = (tuple(f.sources), tuple(f.destinations), f.protocol, tuple(f.ports), f.accept, f.policy)
        got = _filter_of(key)
        if got is None:
            _filter(key, f"filter_rules[{i}]", v)
        else:
            filters.append(got)
    return filters


@functools.lru_cache(maxsize=1 << 14)
def _filter_of(key: _FilterKey) -> nftables.Filter | None:
    v: list[FieldViolation] = []
    out = _filter(key, "", v)
    return None if v else out


def _filter(key: _FilterKey, where: str, v: list[FieldViolation]) -> nftables.Filter:
    sources, destinations, protocol, raw_ports, accept, policy = key
    proto = protocol.lower().strip()
    if proto not in ("", "any", "tcp", "udp", "icmp", "icmpv6"):
        v.append(FieldViolation(f"{where}.protocol", f"unsupported protocol {protocol!r}"))
    ports: list[str] = []
    for j, port in enumerate(raw_ports):
        m = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", port.strip())
        if not m or int(m.group(1)) > 65535 or (m.group(2) and not int(m.group(1)) <= int(m.group(2)) <= 65535):
            v.append(FieldViolation(f"{where}.ports[{j}]", f"{port!r} is not a port or port range"))
        else:
            ports.append(port.strip())
    if ports and proto not in ("tcp", "udp"):
        v.append(FieldViolation(f"{where}.ports", "ports need protocol tcp or udp"))
    return nftables.Filter(
        sources=tuple(_nets(sources, f"{where}.sources", v)),
        destinations=tuple(_nets(destinations, f"{where}.destinations", v)),
        protocol="" if proto == "any" else proto,
        ports=tuple(ports),
        accept=accept,
        policy=_policy_label(policy),
    )


def _policy_label(name: str) -> str:
    """The policy's id, as a comment on its nftables rule (only id characters)."""
    return re.sub(r"[^A-Za-z0-9._-]", "", name.rsplit("/", 1)[-1])[:63]


def _handoffs(eg: Any, where: str, ranges: set[str], v: list[FieldViolation]
              ) -> tuple[tuple[tuple[tuple[Cidr, ...], str], ...], tuple[str, ...]]:
    """``EgressConfig.handoffs`` and ``handoff_peers``, checked: overlay IPv4
    addresses, and ranges of this gateway's own."""
    def address(text: str, field_: str) -> bool:
        try:
            ok = ipaddress.ip_address(text).version == 4
        except ValueError:
            ok = False
        if not ok:
            v.append(FieldViolation(field_, f"{text!r} is not an IPv4 address"))
        return ok

    peers = tuple(sorted({a for k, a in enumerate(eg.handoff_peers)
                          if address(a, f"{where}.handoff_peers[{k}]")}))
    out = []
    for k, h in enumerate(eg.handoffs):
        nets = _nets(h.ranges, f"{where}.handoffs[{k}].ranges", v)
        foreign = [n.text for n in nets if n.text not in ranges or n.version != 4]
        if foreign:
            v.append(FieldViolation(f"{where}.handoffs[{k}].ranges",
                                    f"{', '.join(foreign)}: not IPv4 ranges of this gateway"))
        elif nets and address(h.address, f"{where}.handoffs[{k}].address"):
            out.append((tuple(sorted(nets, key=_range)), h.address))
    return tuple(out), peers


def _relayed(texts: Iterable[str], v: list[FieldViolation]) -> list[Cidr]:
    """``relayed_ranges``: strict CIDRs, sorted and deduplicated (a set: neither order
    nor repetition changes the table).  A /0 is refused: it would make the node relay
    everything between all its peers, which is not "its external clients"."""
    out: dict[str, Cidr] = {}
    for i, t in enumerate(texts):
        n = _net(t, f"relayed_ranges[{i}]", v)
        if n is None:
            continue
        if n.lo == 0 and n.hi == (_V4_ALL if n.version == 4 else _V6_ALL):
            v.append(FieldViolation(
                f"relayed_ranges[{i}]",
                f"{n.text} would relay all traffic between peers; list the external clients' addresses"))
            continue
        out.setdefault(n.text, n)
    return sorted(out.values(), key=_range)


def _metric(version: int, metric: int) -> int:
    # the kernel reports an IPv6 route added with metric 0 as 1024
    return metric or (1024 if version == 6 else 0)


# ---------------------------------------------------------------- deltas


def merge_delta(state: pb.DesiredState, delta: pb.DesiredStateDelta) -> pb.DesiredState:
    """The snapshot that results from applying ``delta`` on top of ``state``."""
    return apply_delta(state, delta)

def peers_only(delta: pb.DesiredStateDelta) -> bool:
    """A delta of peers and filter rules only (what `compile_peer_delta` takes)."""
    return not (
        delta.HasField("interface") or delta.routes_changed or delta.egress_changed
        or delta.default_route_changed or delta.relayed_ranges_changed
    )


def compile_peer_delta(prev: Desired, delta: pb.DesiredStateDelta, revision: int) -> Desired:
    """The fast path for a delta that only touches peers and filter rules: validates
    only what changed (new filter rules render the nftables table again from them and
    the previous egress and relayed ranges; a change inside policies then loads as a
    patch of their chains, see nftables.patch_script).

    The overlap check compares each upserted peer with every other (integer compares,
    no parsing), and routes that name a removed or changed peer are re-checked.
    """
    v: list[FieldViolation] = []
    peers = dict(prev.peers)
    for key in delta.removed_peers:
        peers.pop(key, None)
    new: dict[str, PeerSpec] = {}
    names: dict[str, str] = {}
    for i, p in enumerate(delta.upserted_peers):
        where = f"upserted_peers[{i}]"
        spec = _peer(p, where, prev.public_key, v)
        if spec is not None:
            if spec.public_key in new:
                v.append(FieldViolation(f"{where}.public_key", f"duplicates {names[spec.public_key]}"))
            new[spec.public_key] = spec
            names[spec.public_key] = where
    for key, spec in new.items():
        peers[key] = spec
    for key, spec in new.items():
        for fam, lo, hi in spec.ranges:
            if lo == 0 and hi == (_V4_ALL if fam == 4 else _V6_ALL):
                continue
            for other_key, other in peers.items():
                if other_key == key:
                    continue
                for f2, lo2, hi2 in other.ranges:
                    if f2 == fam and lo <= hi2 and lo2 <= hi and not (
                        lo2 == 0 and hi2 == (_V4_ALL if fam == 4 else _V6_ALL)
                    ):
                        v.append(FieldViolation(
                            f"{names[key]}.allowed_ips",
                            "overlaps the allowed IPs of another peer"))
                        break
    touched = set(delta.removed_peers) | set(new)
    if touched and prev.routes:
        # routes are validated against their peer; a cheap conservative re-check:
        # every route must still be covered by some peer's allowed IPs.
        for r in prev.routes:
            n = parse_cidr(r.dst)
            if not any(_covered(n, p) for p in peers.values()):
                v.append(FieldViolation("removed_peers", f"route {r.dst} would lose its peer"))
    nft = prev.nft
    if delta.filter_rules_changed:
        filters = _filters(delta.filter_rules, v)
        egress, relayed = prev.nft_inputs
        nft = nftables.render(prev.interface, list(egress), filters, relayed)
    if v:
        raise InvalidDesiredState(v)
    return replace(prev, peers=peers, revision=revision, nft=nft)
