"""Pure validation of API resources: each function returns field violations.

Field paths are dotted from the request (`network.ipv4_cidr`,
`egress_gateway.ranges[2]`), so a caller can point at the exact input that was
wrong. Nothing here reads etcd; checks that need other resources (overlaps,
references) take them as arguments.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import ipaddress
import re
from collections.abc import Iterable, Sequence

from meshgate.common.errors import FieldViolation as V
from meshgate.common.errors import shown
from meshgate.controlplane import domains, names

MAX_DISPLAY_NAME = 128
MAX_DESCRIPTION = 1024
MAX_LABELS = 64
MAX_LABEL_LEN = 63
MAX_TAGS = 32
MAX_RANGES = 256
MAX_PRIORITY = 1000
MAX_KEEPALIVE_S = 3600
MIN_ROTATION_S = 3600
LABEL_KEY_RE = re.compile(r"^[a-z](?:[a-z0-9_.-]{0,61}[a-z0-9])?$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_id(field: str, value: str) -> list[V]:
    if not value:
        return [V(field, "is required")]
    if not names.valid_id(value):
        return [V(field, f"{shown(value)} {names.ID_RULE}")]
    return []


def check_text(field: str, value: str, limit: int) -> list[V]:
    if len(value) > limit:
        return [V(field, f"is {len(value)} characters long; at most {limit} are allowed")]
    if any(ord(c) < 32 and c not in "\t\n" for c in value):
        return [V(field, "contains control characters")]
    return []


def check_labels(field: str, labels: dict[str, str]) -> list[V]:
    if len(labels) > MAX_LABELS:
        return [V(field, f"has {len(labels)} entries; at most {MAX_LABELS} are allowed")]
    out = []
    for k, v in sorted(labels.items()):
        if not LABEL_KEY_RE.match(k):
            out.append(V(f"{field}[{shown(k)}]", "key must be 1-63 lowercase letters, digits, '_', '.' or '-', starting with a letter"))
        if len(v) > MAX_LABEL_LEN:
            out.append(V(f"{field}[{shown(k)}]", f"value is longer than {MAX_LABEL_LEN} characters"))
    return out


def check_tags(field: str, tags: Sequence[str]) -> list[V]:
    if len(tags) > MAX_TAGS:
        return [V(field, f"has {len(tags)} tags; at most {MAX_TAGS} are allowed")]
    out = []
    seen = set()
    for i, t in enumerate(tags):
        if not names.valid_id(t):
            out.append(V(f"{field}[{i}]", f"{shown(t)} {names.ID_RULE}"))
        elif t in seen:
            out.append(V(f"{field}[{i}]", f"tag {shown(t)} is repeated"))
        seen.add(t)
    return out


def parse_cidr(field: str, value: str, version: int | None = None) -> tuple[Net | None, list[V]]:
    """A strict CIDR (no host bits set, no scope id). Accepted forms that are
    not canonical (a zero-padded prefix length `/024`, IPv6 in upper case or
    uncompressed) parse to the same network; callers store `str(net)`."""
    if not value:
        return None, [V(field, "is required")]
    if "/" not in value:
        return None, [V(field, f"{shown(value)} is not in CIDR notation (address/prefix)")]
    if "%" in value:
        return None, [V(field, f"{shown(value)} has a scope id (%...); a range has none: give it without")]
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        msg = str(e)
        if "has host bits set" in msg:
            return None, [V(field, f"{shown(value)} has host bits set; did you mean {ipaddress.ip_network(value, strict=False)}?")]
        if re.fullmatch(r"[0-9.]+/[0-9]+", value) and re.search(r"(^|\.)0[0-9]", value.split("/")[0]):
            return None, [V(field, f"{shown(value)} has a leading zero in an address part (decimal or octal?); "
                                   "write it without")]
        return None, [V(field, f"{shown(value)} is not a valid CIDR")]
    if version and net.version != version:
        return None, [V(field, f"{shown(value)} is not an IPv{version} range")]
    return net, []


# Address space nothing can be routed to through a tunnel: (range, what it is).
# A loopback range before the unspecified address, so that ::/120 is named for it.
SPECIAL: list[tuple[Net, str]] = [
    (ipaddress.ip_network(c), what) for c, what in (
        ("0.0.0.0/8", "'this network' (0.0.0.0/8), not an address a packet can be sent to"),
        ("127.0.0.0/8", "loopback space: traffic to it never leaves the host"),
        ("169.254.0.0/16", "link-local space: never routed beyond one link"),
        ("224.0.0.0/4", "multicast space: a WireGuard tunnel carries unicast only"),
        ("240.0.0.0/4", "reserved space (240.0.0.0/4, with the broadcast address): hosts do not route it"),
        ("::1/128", "the loopback address: traffic to it never leaves the host"),
        ("::/128", "the unspecified address"),
        ("::ffff:0:0/96", "IPv4-mapped space (::ffff:0:0/96): it stands for IPv4 addresses, not IPv6 ones"),
        ("fe80::/10", "link-local space: never routed beyond one link"),
        ("ff00::/8", "multicast space: a WireGuard tunnel carries unicast only"),
    )
]


def overlay_space(field: str, net: Net) -> list[V]:
    """An overlay range may not touch special address space at all."""
    for special, what in SPECIAL:
        if special.version == net.version and net.overlaps(special):
            if net == special:
                where = what
            else:
                where = f"{'inside' if net.subnet_of(special) else 'overlapping'} {special}, {what}"  # type: ignore[arg-type]
            return [V(field, f"{net} is {where}; choose a private range such as 100.64.0.0/10 or fd00::/8")]
    return []


def egress_space(field: str, net: Net) -> list[V]:
    """An egress range may not lie inside special address space (one that
    merely contains some, like 0.0.0.0/1, routes the rest and is allowed)."""
    for special, what in SPECIAL:
        if special.version == net.version and net.subnet_of(special):  # type: ignore[arg-type]
            where = what if net == special else f"inside {special}, {what}"
            return [V(field, f"{net} is {where}; it cannot be routed through a gateway")]
    return []


def check_port(field: str, port: int, allow_zero: bool = True) -> list[V]:
    if port == 0 and allow_zero:
        return []
    if not 1 <= port <= 65535:
        return [V(field, f"{port} is not a port number (1-65535)")]
    return []


def check_endpoint(field: str, value: str) -> list[V]:
    """`host:port`, `[v6]:port`; host an IP address or a DNS name."""
    if not value:
        return []
    if len(value) > 261:
        return [V(field, "is too long")]
    # fullmatch: `$` would also match before a trailing newline.
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})", value) or re.fullmatch(r"([^:\[\]]+):(\d{1,5})", value)
    if not m:
        return [V(field, f"{shown(value)} is not host:port or [ipv6]:port")]
    host, port = m.group(1), int(m.group(2))
    bad = check_port(field, port, allow_zero=False)
    if bad:
        return bad
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if value.startswith("[") or not HOSTNAME_RE.fullmatch(host) or host.replace(".", "").isdigit():
            return [V(field, f"{shown(host)} is not an IP address or host name")]
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            return [V(field, f"{host} is a loopback name: other nodes would reach themselves; give an address "
                             "they can reach")]
        return []
    if addr.is_unspecified:
        return [V(field, f"{addr} is the unspecified address: no peer can send to it; give the address other "
                         "nodes reach this one at")]
    if addr.is_loopback:
        return [V(field, f"{addr} is a loopback address: other nodes would reach themselves; give an address "
                         "they can reach")]
    if addr.is_multicast:
        return [V(field, f"{addr} is a multicast address: a WireGuard endpoint is one unicast address")]
    return []


def check_public_key(field: str, value: str) -> list[V]:
    if not value:
        return []
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return [V(field, "is not base64")]
    if len(raw) != 32:
        return [V(field, f"decodes to {len(raw)} bytes; a WireGuard key is 32")]
    return []


def check_interface(field: str, value: str) -> list[V]:
    if value and (not IFNAME_RE.match(value) or value in (".", "..")):
        return [V(field, f"{shown(value)} is not a valid interface name (1-15 characters, no '/' or spaces)")]
    return []


# --- networks -------------------------------------------------------------


def network(net, prefix: str = "network") -> list[V]:
    """Fields of a Network on their own (not against other networks)."""
    out: list[V] = []
    out += check_text(f"{prefix}.display_name", net.display_name, MAX_DISPLAY_NAME)
    out += check_text(f"{prefix}.description", net.description, MAX_DESCRIPTION)
    v4, errs = parse_cidr(f"{prefix}.ipv4_cidr", net.ipv4_cidr, 4)
    out += errs
    if v4 is not None and not 8 <= v4.prefixlen <= 30:
        out.append(V(f"{prefix}.ipv4_cidr", f"prefix length /{v4.prefixlen} is outside /8 to /30"))
    elif v4 is not None:
        out += overlay_space(f"{prefix}.ipv4_cidr", v4)
    if net.ipv6_cidr:
        v6, errs = parse_cidr(f"{prefix}.ipv6_cidr", net.ipv6_cidr, 6)
        out += errs
        if v6 is not None and not 48 <= v6.prefixlen <= 120:
            out.append(V(f"{prefix}.ipv6_cidr", f"prefix length /{v6.prefixlen} is outside /48 to /120"))
        elif v6 is not None:
            out += overlay_space(f"{prefix}.ipv6_cidr", v6)
    out += check_port(f"{prefix}.listen_port", net.listen_port)
    if net.mtu and not 1280 <= net.mtu <= 9000:
        out.append(V(f"{prefix}.mtu", f"{net.mtu} is outside 1280-9000"))
    out += network_durations(net, prefix)
    out += check_labels(f"{prefix}.labels", dict(net.labels))
    return out


def canonical_cidr(value: str) -> str:
    """The canonical text of a range `parse_cidr` accepted (`100.70.0.0/024`
    is stored as `100.70.0.0/24`, `FD00:0064::/64` as `fd00:64::/64`)."""
    return str(ipaddress.ip_network(value, strict=True)) if value else value


def network_durations(net, prefix: str = "network") -> list[V]:
    """The network's durations: 0 (or unset) turns each off; otherwise the
    keepalive is whole seconds up to an hour (WireGuard counts it in seconds: a
    fraction would be cut, 0.5 s to off), and rotation periods are at least an
    hour (a rotation re-keys every node or pair of the network: a 1 ns period
    would rotate on every scheduler pass)."""
    out: list[V] = []
    for fname in ("persistent_keepalive", "max_node_key_age", "preshared_key_rotation_period"):
        if not net.HasField(fname):
            continue
        d = getattr(net, fname)
        field = f"{prefix}.{fname}"
        if d.seconds < 0 or d.nanos < 0:
            out.append(V(field, "may not be negative"))
        elif fname == "persistent_keepalive":
            if d.nanos:
                out.append(V(field, f"{d.seconds}.{d.nanos:09d}s is not a whole number of seconds"))
            elif d.seconds > MAX_KEEPALIVE_S:
                out.append(V(field, f"{d.seconds}s is longer than {MAX_KEEPALIVE_S}s"))
        elif (d.seconds or d.nanos) and d.seconds < MIN_ROTATION_S:
            out.append(V(field, f"{d.seconds}.{d.nanos:09d}s is shorter than {MIN_ROTATION_S}s (one hour); "
                                "0 rotates only on demand"))
    return out


def network_overlaps(net, others: Iterable, prefix: str = "network") -> list[V]:
    """The network's ranges against other networks'. `others` excludes itself."""
    out = []
    mine = [("ipv4_cidr", net.ipv4_cidr), ("ipv6_cidr", net.ipv6_cidr)]
    for other in others:
        for fname, cidr in mine:
            theirs = getattr(other, fname)
            if cidr and theirs and ipaddress.ip_network(cidr).overlaps(ipaddress.ip_network(theirs)):
                out.append(V(f"{prefix}.{fname}", f"{cidr} overlaps {theirs} of {other.name}"))
    return out


# --- nodes ----------------------------------------------------------------


def node(n, prefix: str = "node") -> list[V]:
    out: list[V] = []
    out += check_text(f"{prefix}.display_name", n.display_name, MAX_DISPLAY_NAME)
    out += check_tags(f"{prefix}.tags", list(n.tags))
    out += check_endpoint(f"{prefix}.endpoint", n.endpoint)
    out += check_port(f"{prefix}.listen_port", n.listen_port)
    out += check_public_key(f"{prefix}.public_key", n.public_key)
    out += check_labels(f"{prefix}.labels", dict(n.labels))
    return out


def requested_address(field: str, value: str, cidr: str) -> list[V]:
    """An address asked for on create: inside the range, not reserved."""
    if not value:
        return []
    if not cidr:
        return [V(field, "the network has no range of this family")]
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return [V(field, f"{shown(value)} is not an IP address")]
    net = ipaddress.ip_network(cidr)
    if addr.version != net.version or addr not in net:
        return [V(field, f"{value} is outside the network's range {cidr}")]
    if addr in (net.network_address, net.broadcast_address):
        return [V(field, f"{value} is the network's {'network' if addr == net.network_address else 'broadcast'} address")]
    return []


# --- egress gateways ------------------------------------------------------


def egress(gw, prefix: str = "egress_gateway") -> tuple[list[Net], list[V]]:
    """Fields of an EgressGateway on their own; returns its parsed ranges.

    The number of ranges is checked before any range is parsed: a request
    with too many is refused for that alone.
    """
    if len(gw.ranges) > MAX_RANGES:
        return [], [V(f"{prefix}.ranges", f"has {len(gw.ranges)} ranges; at most {MAX_RANGES} are allowed")]
    out: list[V] = []
    if not gw.node:
        out.append(V(f"{prefix}.node", "is required"))
    elif names.parse_child(gw.node, "nodes") is None:
        out.append(V(f"{prefix}.node", f"{shown(gw.node)} is not a node name (networks/{{network}}/nodes/{{node}})"))
    if not gw.ranges and not gw.internet_gateway and not gw.domains:
        out.append(V(f"{prefix}.ranges", "is empty; give at least one range or domain, or set internet_gateway"))
    out += egress_domains(gw, prefix)
    parsed: list[tuple[int, Net]] = []
    for i, r in enumerate(gw.ranges):
        net, errs = parse_cidr(f"{prefix}.ranges[{i}]", r)
        out += errs
        if net is None:
            continue
        if net.prefixlen == 0:
            out.append(V(f"{prefix}.ranges[{i}]", f"{r} is the whole address space; set internet_gateway instead"))
            continue
        special = egress_space(f"{prefix}.ranges[{i}]", net)
        if special:
            out += special
            continue
        parsed.append((i, net))
    for i, j in overlapping_pairs(parsed):
        out.append(V(f"{prefix}.ranges[{i}]", f"{gw.ranges[i]} overlaps {gw.ranges[j]} (ranges[{j}])"))
    if gw.priority > MAX_PRIORITY:
        out.append(V(f"{prefix}.priority", f"{gw.priority} is above {MAX_PRIORITY}"))
    out += check_interface(f"{prefix}.egress_interface", gw.egress_interface)
    out += check_text(f"{prefix}.display_name", gw.display_name, MAX_DISPLAY_NAME)
    out += check_labels(f"{prefix}.labels", dict(gw.labels))
    return [net for _, net in parsed], out


def egress_domains(gw, prefix: str = "egress_gateway") -> list[V]:
    """A gateway's `domains` (domains.problem for each; no duplicates); they
    must already be canonical (`canonical_domains`)."""
    if len(gw.domains) > domains.MAX_DOMAINS:
        return [V(f"{prefix}.domains", f"has {len(gw.domains)} domains; at most {domains.MAX_DOMAINS} are allowed")]
    out: list[V] = []
    seen: dict[str, int] = {}
    for i, d in enumerate(gw.domains):
        why = domains.problem(domains.canonical(d))
        if why is not None:
            out.append(V(f"{prefix}.domains[{i}]", why))
        elif domains.canonical(d) in seen:
            out.append(V(f"{prefix}.domains[{i}]", f"{d!r} is listed twice (domains[{seen[domains.canonical(d)]}])"))
        seen.setdefault(domains.canonical(d), i)
    return out


def _span(net: Net) -> tuple[int, int, int]:
    return net.version, int(net.network_address), int(net.broadcast_address)


def overlapping_pairs(nets: list[tuple[int, Net]]) -> list[tuple[int, int]]:
    """(i, j) for each range whose field index i is after that of a range j it
    overlaps (j the earliest), sorted by i; `nets` are (field index, range).

    O(n log n + overlaps) instead of comparing every pair: two CIDRs overlap
    only when one contains the other, so after sorting by (start, prefix
    length) the ranges overlapping one are exactly those on the stack of
    ranges containing its start.
    """
    flagged: dict[int, int] = {}
    stack: list[tuple[int, int, int]] = []  # (version, end, field index) of the ranges containing the position
    for i, net in sorted(nets, key=lambda e: (e[1].version, int(e[1].network_address), e[1].prefixlen)):
        version, start, end = net.version, int(net.network_address), int(net.broadcast_address)
        while stack and (stack[-1][0] != version or stack[-1][1] < start):
            stack.pop()
        for _, _, j in stack:
            later, earlier = max(i, j), min(i, j)
            flagged[later] = min(flagged.get(later, earlier), earlier)
        stack.append((version, end, i))
    return sorted(flagged.items())


class RangeIndex:
    """Ranges held by named owners, to find those a range overlaps without
    comparing it to each: O(distinct prefix lengths + log n + matches).

    Two CIDRs overlap only when one contains the other: the ranges containing
    `net` are its supernets (one lookup per prefix length the index holds),
    the ranges inside it are those starting within it (a bisection of the
    sorted starts)."""

    def __init__(self, entries: Iterable[tuple[str, Net]]) -> None:
        self._exact: dict[tuple[int, int, int], list[tuple[str, Net]]] = {}
        self._lengths: dict[int, set[int]] = {4: set(), 6: set()}
        starts: dict[int, list[tuple[int, int, str, Net]]] = {4: [], 6: []}
        for owner, net in entries:
            self._exact.setdefault((net.version, int(net.network_address), net.prefixlen), []).append((owner, net))
            self._lengths[net.version].add(net.prefixlen)
            starts[net.version].append((int(net.network_address), net.prefixlen, owner, net))
        for v in starts:
            starts[v].sort(key=lambda e: (e[0], e[1]))
        self._starts = starts
        self._keys = {v: [e[0] for e in starts[v]] for v in starts}

    def overlapping(self, net: Net, limit: int = 8) -> list[tuple[str, Net]]:
        """Up to `limit` (owner, range) overlapping `net`, equal ranges included."""
        out: list[tuple[str, Net]] = []
        bits = net.max_prefixlen
        start = int(net.network_address)
        for p in sorted(self._lengths[net.version]):
            if p >= net.prefixlen:
                break
            masked = start & (((1 << p) - 1) << (bits - p)) if p else 0
            out += self._exact.get((net.version, masked, p), [])
            if len(out) >= limit:
                return out[:limit]
        keys, entries = self._keys[net.version], self._starts[net.version]
        k = bisect.bisect_left(keys, start)
        end = int(net.broadcast_address)
        while k < len(entries) and entries[k][0] <= end and len(out) < limit:
            if entries[k][1] >= net.prefixlen:
                out.append((entries[k][2], entries[k][3]))
            k += 1
        return out


def egress_overlaps(gw, ranges: list[Net], network, others: Iterable, prefix: str = "egress_gateway") -> list[V]:
    """Ranges against the network's own ranges and other gateways' ranges.

    Equal ranges on several gateways are allowed: that is how HA is expressed.
    """
    out = []
    own = [ipaddress.ip_network(c) for c in (network.ipv4_cidr, network.ipv6_cidr) if c]
    for i, net in enumerate(ranges):
        if net.version == 6 and not network.ipv6_cidr:
            out.append(V(f"{prefix}.ranges[{i}]", f"{net} is an IPv6 range, and the network has no IPv6 range: its "
                                                  "nodes have no IPv6 overlay address to send to it from (a "
                                                  "network's ipv6_cidr is set when it is created); leave the range out"))
    if out:
        return out
    index = RangeIndex((o.name, ipaddress.ip_network(r, strict=False)) for o in others for r in o.ranges)
    for i, net in enumerate(ranges):
        for o in own:
            if net.version == o.version and net.overlaps(o):
                out.append(V(f"{prefix}.ranges[{i}]", f"{net} overlaps the network's own range {o}"))
        for oname, onet in index.overlapping(net, limit=16):
            if onet != net:
                out.append(V(f"{prefix}.ranges[{i}]", f"{net} overlaps {onet} of {oname} (only identical ranges may be shared, for HA)"))
                break
    return out


# --- external clients ---------------------------------------------------

MAX_DNS_SERVERS = 8


def external_client(c, prefix: str = "external_client") -> list[V]:
    """Fields of an ExternalClient on their own (its gateway node and network
    are checked against etcd by the caller)."""
    out: list[V] = []
    if not c.gateway_node:
        out.append(V(f"{prefix}.gateway_node", "is required"))
    elif names.parse_child(c.gateway_node, "nodes") is None:
        out.append(V(f"{prefix}.gateway_node",
                     f"{shown(c.gateway_node)} is not a node name (networks/{{network}}/nodes/{{node}})"))
    if len(c.allowed_ranges) > MAX_RANGES:
        return [V(f"{prefix}.allowed_ranges", f"has {len(c.allowed_ranges)} ranges; at most {MAX_RANGES} are allowed")]
    if len(c.dns_servers) > MAX_DNS_SERVERS:
        return [V(f"{prefix}.dns_servers", f"has {len(c.dns_servers)} servers; at most {MAX_DNS_SERVERS} are allowed")]
    seen: set[Net] = set()
    for i, r in enumerate(c.allowed_ranges):
        net, errs = parse_cidr(f"{prefix}.allowed_ranges[{i}]", r)
        out += errs
        if net is None:
            continue
        if net in seen:
            out.append(V(f"{prefix}.allowed_ranges[{i}]", f"{r} is listed twice"))
        seen.add(net)
    for i, d in enumerate(c.dns_servers):
        try:
            ipaddress.ip_address(d)
            # A scope id (fe80::1%eth0) would carry free text into the configuration.
            ok = "%" not in d
        except ValueError:
            ok = False
        if not ok:
            out.append(V(f"{prefix}.dns_servers[{i}]", f"{shown(d)} is not an IP address (without a scope id)"))
    out += check_text(f"{prefix}.display_name", c.display_name, MAX_DISPLAY_NAME)
    out += check_labels(f"{prefix}.labels", dict(c.labels))
    return out


def page_size(field: str, value: int) -> tuple[int, list[V]]:
    if value < 0:
        return 0, [V(field, "may not be negative")]
    return min(value or 50, 1000), []


def valid_timestamp(ts) -> bool:
    """Whether a google.protobuf.Timestamp is within its own range (0001 to
    9999, nanos in [0, 1e9)); outside it its conversions raise."""
    return -62135596800 <= ts.seconds <= 253402300799 and 0 <= ts.nanos < 1_000_000_000
