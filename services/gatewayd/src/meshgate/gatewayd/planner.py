"""``plan(desired, observed) -> Plan``: the pure heart of the reconciler.

The planner compares what the node should look like with what the kernel holds and
returns the smallest set of changes that closes the gap, per subsystem.  It does no
I/O, so it is tested exhaustively without a kernel; the appliers carry a plan out.

Rules it keeps, because the data plane depends on them:
- a peer is changed in place (``update_only`` with only the fields that differ) and
  never removed and re-added, so its session and counters survive;
- the device's private key, listen port and fwmark are only set when they differ
  (setting a key resets every session);
- an endpoint left empty in the desired state is not managed (roaming peers keep the
  endpoint WireGuard learnt).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from meshgate.gatewayd.keys import Secret
from meshgate.gatewayd.model import Desired, HandoffSpec, Observed, PeerSpec, RouteSpec, RuleSpec
from meshgate.gatewayd.nftrules import Table


@dataclass(frozen=True)
class PeerOp:
    kind: Literal["add", "update", "remove"]
    public_key: str
    endpoint: str | None = None
    preshared_key: Secret | None = None
    clear_preshared_key: bool = False
    keepalive: int | None = None
    allowed_ips: frozenset[str] | None = None
    """When set, replaces the peer's allowed IPs (``replace_allowed_ips``)."""


@dataclass(frozen=True)
class DeviceChange:
    set_private_key: bool = False
    listen_port: int | None = None
    fwmark: int | None = None
    # The interface had another key: its sessions are gone and peers should
    # handshake at once (a first key on a fresh interface has none to lose).
    replaces_key: bool = False


@dataclass(frozen=True)
class Plan:
    interface: str
    create_interface: bool = False
    device: DeviceChange | None = None
    peers: tuple[PeerOp, ...] = ()
    mtu: int | None = None
    set_up: bool = False
    addr_add: tuple[str, ...] = ()
    addr_del: tuple[str, ...] = ()
    route_add: tuple[RouteSpec, ...] = ()
    route_del: tuple[RouteSpec, ...] = ()
    rule_add: tuple[RuleSpec, ...] = ()
    rule_del: tuple[RuleSpec, ...] = ()
    nft: Table | None = None
    sysctls: tuple[tuple[str, str], ...] = field(default=())
    handoff: HandoffSpec | None = None
    """The late-reply link to make (handoff.py), when ``handoff_change``."""
    handoff_change: bool = False
    retired_interface: str | None = None
    """Set by the reconciler (not the planner) when it removed a renamed-away interface."""

    @property
    def empty(self) -> bool:
        return not self.changes()

    def touches_links(self) -> bool:
        return bool(self.mtu or self.set_up or self.addr_add or self.addr_del
                    or self.route_add or self.route_del or self.rule_add or self.rule_del)

    def changes(self) -> list[str]:
        """One human-readable line per change; never includes key material."""
        out = []
        if self.create_interface:
            out.append(f"create interface {self.interface}")
        if self.device:
            d = self.device
            if d.set_private_key:
                out.append("set private key")
            if d.listen_port is not None:
                out.append(f"set listen port {d.listen_port}")
            if d.fwmark is not None:
                out.append(f"set fwmark {d.fwmark:#x}")
        for p in self.peers:
            what = []
            if p.endpoint is not None:
                what.append(f"endpoint {p.endpoint}")
            if p.allowed_ips is not None:
                what.append(f"allowed_ips {','.join(sorted(p.allowed_ips)) or '-'}")
            if p.keepalive is not None:
                what.append(f"keepalive {p.keepalive}")
            if p.preshared_key is not None or p.clear_preshared_key:
                what.append("preshared key")
            out.append(f"{p.kind} peer {p.public_key[:8]}… {' '.join(what)}".rstrip())
        if self.mtu:
            out.append(f"set mtu {self.mtu}")
        if self.set_up:
            out.append(f"set {self.interface} up")
        out += [f"del address {a}" for a in self.addr_del]
        out += [f"add address {a}" for a in self.addr_add]
        out += [f"del route {r.dst} metric {r.metric}" for r in self.route_del]
        out += [f"add route {r.dst} metric {r.metric}" for r in self.route_add]
        out += [f"del rule {_rule(r)}" for r in self.rule_del]
        out += [f"add rule {_rule(r)}" for r in self.rule_add]
        if self.handoff_change:
            h = self.handoff
            out.append(f"late-reply link {h.device} to {','.join(sorted(h.peers))}" if h is not None
                       else "remove late-reply link")
        if self.nft is not None:
            out.append(f"replace table inet meshgate ({self.nft.digest})")
        out += [f"sysctl {k}={v}" for k, v in self.sysctls]
        if self.retired_interface:
            out.append(f"remove interface {self.retired_interface}")
        return out


def _rule(r: RuleSpec) -> str:
    s = f"ipv{r.family} pref {r.priority}"
    if r.fwmark:
        s += f" {'not ' if r.invert else ''}fwmark {r.fwmark:#x}"
    if r.suppress_prefixlength is not None:
        s += f" suppress_prefixlength {r.suppress_prefixlength}"
    if r.oif:
        s += f" oif {r.oif}"
    return s + f" table {r.table}"


def _peer_ops(desired: Mapping[str, PeerSpec], observed: Mapping[str, PeerSpec]) -> list[PeerOp]:
    ops: list[PeerOp] = []
    for key, want in desired.items():
        have = observed.get(key)
        if have is None:
            ops.append(PeerOp(
                "add", key,
                endpoint=want.endpoint,
                preshared_key=want.preshared_key,
                keepalive=want.keepalive,
                allowed_ips=want.allowed_ips,
            ))
            continue
        if have == want:
            continue
        endpoint = want.endpoint if want.endpoint is not None and want.endpoint != have.endpoint else None
        psk, clear = None, False
        if want.preshared_key != have.preshared_key:
            if want.preshared_key is None:
                clear = True
            else:
                psk = want.preshared_key
        keepalive = want.keepalive if want.keepalive != have.keepalive else None
        allowed = want.allowed_ips if want.allowed_ips != have.allowed_ips else None
        if endpoint is None and psk is None and not clear and keepalive is None and allowed is None:
            continue  # differs only in an unmanaged endpoint
        ops.append(PeerOp("update", key, endpoint=endpoint, preshared_key=psk,
                          clear_preshared_key=clear, keepalive=keepalive, allowed_ips=allowed))
    for key in observed:
        if key not in desired:
            ops.append(PeerOp("remove", key))
    return ops


def plan(desired: Desired, observed: Observed) -> Plan:
    """The changes that turn ``observed`` into ``desired``; empty when they agree."""
    dev = observed.device
    create = dev is None
    device: DeviceChange | None
    if dev is None:
        device = DeviceChange(set_private_key=True, listen_port=desired.listen_port, fwmark=desired.fwmark or None)
        peer_ops = _peer_ops(desired.peers, {})
    else:
        device = DeviceChange(
            set_private_key=dev.public_key != desired.public_key,
            replaces_key=bool(dev.public_key) and dev.public_key != desired.public_key,
            listen_port=desired.listen_port
            if desired.listen_port is not None and desired.listen_port != dev.listen_port
            else None,
            fwmark=desired.fwmark if desired.fwmark != dev.fwmark else None,
        )
        peer_ops = _peer_ops(desired.peers, dev.peers)
    if device == DeviceChange():
        device = None

    link = None if create else observed.link
    mtu: int | None
    have_addrs: frozenset[str]
    if link is None:
        mtu, up, have_addrs = desired.mtu, True, frozenset()
    else:
        mtu = desired.mtu if link.mtu != desired.mtu else None
        up = not link.up
        have_addrs = link.addresses
    # routes and rules vanish with the interface: recreate them all
    have_routes = frozenset() if create else observed.routes
    sysctls = tuple(sorted((k, v) for k, v in desired.sysctls.items()
                           if observed.sysctls.get(k) != v))
    return Plan(
        interface=desired.interface,
        create_interface=create,
        device=device,
        peers=tuple(peer_ops),
        mtu=mtu,
        set_up=up,
        addr_add=tuple(sorted(desired.addresses - have_addrs)),
        addr_del=tuple(sorted(have_addrs - desired.addresses)),
        route_add=tuple(sorted(desired.routes - have_routes, key=_route_key)),
        route_del=tuple(sorted(have_routes - desired.routes, key=_route_key)),
        rule_add=tuple(sorted(desired.rules - observed.rules, key=_rule_key)),
        rule_del=tuple(sorted(observed.rules - desired.rules, key=_rule_key)),
        nft=desired.nft if observed.nft_digest != desired.nft.digest else None,
        sysctls=sysctls,
        handoff=desired.handoff,
        handoff_change=desired.handoff != observed.handoff,
    )


def _route_key(r: RouteSpec) -> tuple:
    return (r.family, r.dst, r.metric)


def _rule_key(r: RuleSpec) -> tuple:
    return (r.family, r.priority, r.table, r.fwmark, r.invert, r.suppress_prefixlength or -1, r.dst, r.oif)
