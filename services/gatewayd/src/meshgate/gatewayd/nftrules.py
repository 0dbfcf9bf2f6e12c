"""gatewayd's nftables table, ``inet meshgate``, as text: rendering and patching (pure).

The table is the only nftables object gatewayd owns. ``render`` gives the whole table
as ``nft -f`` input, ``patch_script`` the transaction that turns one rendered table
into another when they differ only inside policy chains; nftables.py loads them.
Ranges live in interval sets, not one rule per range, so 1,000 egress ranges cost one
set load.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

FAMILY = "inet"
TABLE = "meshgate"
HANDOFF_VNI = 0x6D67  # the late-reply link (handoff.py): VXLAN id "mg"
HANDOFF_PORT = 51899  # its UDP port, over the overlay only


def handoff_device(iface: str) -> str:
    """The late-reply link of WireGuard interface `iface` (handoff.py): its name
    and ``h``, or for a name of the full 15 characters its last one replaced by
    ``h`` (``g`` where that is already ``h``)."""
    if len(iface) < 15:
        return iface + "h"
    return iface[:14] + ("g" if iface[14] == "h" else "h")

class Net(Protocol):
    """A network: ``model.Cidr`` or an ``ipaddress`` network (``str()`` is canonical)."""

    @property
    def version(self) -> int: ...


@dataclass(frozen=True)
class Egress:
    ranges: tuple[Net, ...]
    sources: tuple[Net, ...]
    nat: bool
    egress_interface: str | None
    internet_gateway: bool
    # Late replies (handoff.py): (ranges, overlay IPv4 address) to copy replies
    # from those ranges to (its own table, ``ip meshgate_handoff``); and the
    # other gateway nodes sharing a range, whose copies of replies from this
    # gateway's ranges this table accepts and forwards.
    handoffs: tuple[tuple[tuple[Net, ...], str], ...] = ()
    handoff_peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Filter:
    """One rule of the policy chains (``DesiredState.filter_rules``): empty sources or
    destinations match any address; the first rule that matches decides."""

    sources: tuple[Net, ...]
    destinations: tuple[Net, ...]
    protocol: str
    ports: tuple[str, ...]
    accept: bool
    policy: str = ""


@dataclass(frozen=True)
class PolicyChain:
    """One ``pol_<i>`` chain: the rules of one policy (or of the default) in order,
    with its named sets as (name, type, elements)."""

    name: str
    sets: tuple[tuple[str, str, str], ...]
    rules: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    text: str
    digest: str
    # The text with every policy chain's body and every policy set left out: two
    # tables with the same skeleton differ only inside their policy chains, which
    # `patch_script` changes in place.
    skeleton: str = ""
    chains: tuple[PolicyChain, ...] = ()

    def __repr__(self) -> str:
        return f"Table(digest={self.digest!r}, {len(self.text)} chars)"


def _q(name: str) -> str:
    return '"' + name + '"'


def _typ(name: str) -> str:
    return "ipv4_addr" if name.endswith("4") else "ipv6_addr"


def _set(name: str, nets: Sequence[Net] | str) -> list[str]:
    elems = nets if isinstance(nets, str) else ", ".join(str(n) for n in nets)
    return [
        f"\tset {name} {{",
        f"\t\ttype {_typ(name)}",
        "\t\tflags interval",
        "\t\tauto-merge",
        f"\t\telements = {{ {elems} }}",
        "\t}",
    ]


def render(iface: str, egress: list[Egress], filters: list[Filter],
           relayed: Sequence[Net] = ()) -> Table:
    """The whole ``inet meshgate`` table for this node, as ``nft -f`` input.

    ``relayed`` are the overlay ranges this node relays for (its external clients):
    traffic from or to them that enters and leaves the WireGuard interface is
    accepted (sets ``relay4``/``relay6``), ahead of the drops of overlay traffic.
    The caller passes them sorted and deduplicated: the text, hence the digest,
    depends on their order.

    ``filters`` (access policies, compiled by the control plane) decide what this
    node delivers from the overlay: the traffic the egress rules admit (to its
    ranges, the LAN, the internet), the traffic to its relayed clients, and
    (``input``) the traffic to the node itself goes to the chain ``overlay_policy``
    instead of being accepted, once replies of allowed connections have passed
    (``ct state established,related``). ``overlay_policy`` jumps, in order, to one
    chain per policy (``pol_<i>``, consecutive rules of one policy; the first rule
    that matches accepts or drops) and accepts what none of them decides (the
    control plane ends a DENY network's list with a rule that drops everything).
    Sides with more than one address are named interval sets (``pol_<i>_<j>_s4``,
    ...), so a rule costs one lookup whatever its size. One chain per policy lets a
    change to some policies be loaded by replacing just their chains
    (``patch_script``).
    """
    sets: list[str] = []
    forward: list[str] = []
    nat: list[str] = []
    wg = _q(iface)
    site: list[Net] = []
    admit = "jump overlay_policy" if filters else "accept"
    ho = _q(handoff_device(iface))
    handoff_in: list[str] = []  # late replies received (handoff.py; their copying is its own table)
    peers: set[str] = set()
    for i, e in enumerate(egress):
        src4 = [n for n in e.sources if n.version == 4]
        dst4 = [n for n in e.ranges if n.version == 4]
        if not src4 or not dst4 or e.internet_gateway:
            continue
        if e.handoff_peers:
            peers.update(e.handoff_peers)
            sets += _set(f"e{i}_hsrc4", src4) + _set(f"e{i}_hdst4", dst4)
            handoff_in.append(f"\t\tiifname {ho} oifname {wg} ip saddr @e{i}_hdst4 ip daddr @e{i}_hsrc4 accept")
    if peers:
        ordered = sorted(peers, key=lambda a: tuple(int(x) for x in a.split(".")))
        sets += _set("handoff_peers4", ", ".join(ordered))
    for i, e in enumerate(egress):
        if not e.internet_gateway:
            site += list(e.ranges)
        for fam, kw in ((4, "ip"), (6, "ip6")):
            src = [n for n in e.sources if n.version == fam]
            dst = [n for n in e.ranges if n.version == fam]
            if not src or not (dst or e.internet_gateway):
                continue
            sname, dname = f"e{i}_src{fam}", f"e{i}_dst{fam}"
            sets += _set(sname, src)
            match = f"iifname {wg} {kw} saddr @{sname}"
            if e.internet_gateway:
                match += f" oifname != {wg}"
            else:
                sets += _set(dname, dst)
                match += f" {kw} daddr @{dname}"
            if e.egress_interface:
                match += f" oifname {_q(e.egress_interface)}"
            forward.append(f"\t\t{match} {admit}")
            if e.nat:
                nat.append(f"\t\t{match} masquerade")
    chains = _policy_chains(filters)
    enter: list[str] = []
    if filters:
        enter = [f"\t\tiifname {wg} ct state established,related accept"]
    for fam, kw in ((4, "ip"), (6, "ip6")):
        nets = [n for n in relayed if n.version == fam]
        if not nets:
            continue
        sets += _set(f"relay{fam}", nets)
        forward += [f"\t\tiifname {wg} oifname {wg} {kw} daddr @relay{fam} {admit}",
                    f"\t\tiifname {wg} oifname {wg} {kw} saddr @relay{fam} accept"]
    lan: list[str] = []
    for fam, kw in ((4, "ip"), (6, "ip6")):
        nets = [n for n in site if n.version == fam]
        if nets:
            sets += _set(f"site{fam}", nets)
            lan.append(f"\t\toifname {wg} {kw} saddr @site{fam} accept")
    lines = [f"table {FAMILY} {TABLE} {{", "\tcomment \"meshgate\""]
    lines += sets
    lines += ["\tchain digest {", "\t\tcounter comment \"meshgate:@DIGEST@\"", "\t}"]
    if filters:
        lines += ["@POLICY@", "\tchain overlay_policy {",
                  *[f"\t\tjump {c.name}" for c in chains], "\t\taccept", "\t}"]
    if peers:
        # The link's UDP socket listens on every address: VXLAN is taken only
        # through the tunnel and only from a late-reply peer, and nothing that
        # comes out of the link is delivered to this node itself.
        lines += [
            "\tchain handoff_raw {",
            "\t\ttype filter hook prerouting priority raw; policy accept;",
            f"\t\tudp dport {HANDOFF_PORT} iifname != {wg} drop",
            f"\t\tiifname {wg} udp dport {HANDOFF_PORT} ip saddr != @handoff_peers4 drop",
            f"\t\tiifname {ho} fib daddr type local drop",
            f"\t\tiifname {ho} notrack",
            "\t}",
        ]
        handoff_in.append(f"\t\tiifname {ho} drop")
    lines += [
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        *handoff_in,
        *enter,
        *forward,
        f"\t\tiifname {wg} drop",
        *lan,
        f"\t\toifname {wg} ct state established,related accept",
        f"\t\toifname {wg} drop",
        "\t}",
    ]
    if nat:
        lines += [
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            *nat,
            "\t}",
        ]
    if filters:
        lines += [
            "\tchain input {",
            "\t\ttype filter hook input priority filter; policy accept;",
            f"\t\tiifname {wg} ct state established,related accept",
            *([f"\t\tiifname {wg} ip saddr @handoff_peers4 udp dport {HANDOFF_PORT} accept"] if peers else []),
            f"\t\tiifname {wg} jump overlay_policy",
            "\t}",
        ]
    lines.append("}")
    skeleton = "\n".join(lines) + "\n" + "\n".join(c.name for c in chains)
    policy_text: list[str] = []
    for c in chains:
        for name, _, elems in c.sets:
            policy_text += _set(name, elems)
        policy_text += [f"\tchain {c.name} {{", *[f"\t\t{r}" for r in c.rules], "\t}"]
    body = "\n".join(lines).replace("@POLICY@", "\n".join(policy_text)) + "\n"
    if not policy_text:
        body = body.replace("@POLICY@\n", "")
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    return Table(text=body.replace("@DIGEST@", digest), digest=digest,
                 skeleton=skeleton, chains=tuple(chains))


def _policy_chains(filters: list[Filter]) -> list[PolicyChain]:
    """The filters grouped into chains: consecutive rules of one policy share one."""
    groups: list[list[Filter]] = []
    for f in filters:
        if groups and groups[-1][0].policy == f.policy and f.policy:
            groups[-1].append(f)
        else:
            groups.append([f])
    return [_chain(i, tuple(group)) for i, group in enumerate(groups)]


@functools.lru_cache(maxsize=1 << 14)
def _chain(i: int, group: tuple[Filter, ...]) -> PolicyChain:
    """Chain ``pol_<i>`` of one group of rules (cached: a delta re-renders only the
    chains that changed)."""
    name = f"pol_{i}"
    sets: list[tuple[str, str, str]] = []
    rules: list[str] = []
    for j, f in enumerate(group):
        verdict = "accept" if f.accept else "drop"
        comment = f" comment {_q(f.policy)}" if f.policy else ""
        rules += [f"{m}{verdict}{comment}" for m in _filter_matches(f, f"{name}_{j}", sets)]
    return PolicyChain(name, tuple(sets), tuple(rules))


def patch_script(base: Table, new: Table, limit: int = 64) -> str | None:
    """An ``nft -f`` script turning the live `base` table into `new` by replacing
    only the policy chains that differ, in one transaction (each changed chain is
    flushed, its old sets deleted, its new sets and rules added; the digest rule is
    replaced last). None when the tables differ elsewhere, or in more than `limit`
    chains: then the whole table is replaced."""
    if not base.chains or base.skeleton != new.skeleton:
        return None
    changed = [(a, b) for a, b in zip(base.chains, new.chains, strict=True) if a != b]
    if len(changed) > limit:
        return None
    t = f"{FAMILY} {TABLE}"
    out = []
    for old, cur in changed:
        out.append(f"flush chain {t} {cur.name}")
        out += [f"delete set {t} {name}" for name, _, _ in old.sets]
        out += [f"add set {t} {name} {{ type {typ}; flags interval; auto-merge; elements = {{ {elems} }}; }}"
                for name, typ, elems in cur.sets]
        out += [f"add rule {t} {cur.name} {r}" for r in cur.rules]
    out += [f"flush chain {t} digest", f'add rule {t} digest counter comment "meshgate:{new.digest}"']
    return "\n".join(out) + "\n"


_L4 = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmpv6": "ipv6-icmp"}


def _side(kw: str, d: str, nets: list[Net], name: str, sets: list[tuple[str, str, str]]) -> str:
    """``ip saddr 100.64.0.2`` for one address, else a named interval set (added to
    `sets` as (name, type, elements))."""
    if len(nets) == 1:
        return f"{kw} {d}addr {nets[0]} "
    sets.append((name, _typ(name), ", ".join(str(n) for n in nets)))
    return f"{kw} {d}addr @{name} "


def _filter_matches(f: Filter, prefix: str, sets: list[tuple[str, str, str]]) -> list[str]:
    """The match parts of rule `f`, one per address family it can match (each
    ending in a space, ready for its verdict); named sets go to `sets`."""
    l4 = ""
    if f.protocol:
        l4 = f"meta l4proto {_L4.get(f.protocol, f.protocol)} "
        if f.ports and f.protocol in ("tcp", "udp"):
            l4 += f"th dport {{ {', '.join(f.ports)} }} "
    if not f.sources and not f.destinations:
        return [l4]
    out = []
    for fam, kw in ((4, "ip"), (6, "ip6")):
        src = [n for n in f.sources if n.version == fam]
        dst = [n for n in f.destinations if n.version == fam]
        if (f.sources and not src) or (f.destinations and not dst):
            continue  # this family cannot match both sides
        if (fam == 4 and f.protocol == "icmpv6") or (fam == 6 and f.protocol == "icmp"):
            continue
        match = ""
        if src:
            match += _side(kw, "s", src, f"{prefix}_s{fam}", sets)
        if dst:
            match += _side(kw, "d", dst, f"{prefix}_d{fam}", sets)
        out.append(match + l4)
    return out



# The digest in the rule of chain `digest`, as `nft list` prints it.
DIGEST_RE = re.compile(r'comment "meshgate:([0-9a-f]{16})"')
