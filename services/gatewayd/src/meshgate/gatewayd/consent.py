"""What the node's operator lets a desired state install: default routes, and
which other routes.

The control plane decides what a node *may* route; the node's operator can
narrow it, never the other way round (Tailscale's ``--accept-routes`` and
``--exit-node``):

- **Default routes** send all of a node's traffic into the tunnel, so they need
  the operator's consent: ``gatewayd join/run --accept-default-route``;
  ``--no-default-route`` (also spelled ``--no-accept-default-route``) declines
  them, and so does the absence of consent.
- **Other routes** (egress ranges, another site's LAN) are accepted unless the
  operator gave an allow-list: ``gatewayd join/run --accept-routes
  10.0.0.0/8,198.51.100.0/24`` accepts a route only when it lies within one of
  those ranges (``--accept-routes none`` accepts none, ``all`` every one, the
  default). A route that only overlaps a range is refused whole, never split.

A route that is not accepted is *declined*: left out before validation and
planning, together with its allowed IPs (the entry of its peer's
``allowed_ips`` that is exactly the declined range, unless a route that is kept
needs it), so the range is neither routed into the tunnel nor accepted from it;
the peer itself stays. The rest of the state applies, the agent logs it once
per change, keeps it in its status (``declined_routes``) and says so in the ack
of that revision: an OK status whose message and ``google.rpc.ErrorInfo``s name
what was left out, one per kind (reason ``DEFAULT_ROUTE_DECLINED`` or
``ROUTE_NOT_ACCEPTED``, metadata ``routes`` and ``reason``). The node applied
everything it will apply, so it is not an apply failure; the control plane
shows it in the network status.

What counts as a default route, so that a control plane cannot widen what the
node consented to by spelling it differently:

- ``default_route_via_peer`` (gatewayd's ``0.0.0.0/0`` / ``::/0`` route plus the
  ``suppress_prefixlength 0`` rule);
- every entry of ``routes`` with a prefix of length 0 or 1: ``0.0.0.0/0``, and the
  split default routes ``0.0.0.0/1`` + ``128.0.0.0/1`` (``::/1`` + ``8000::/1``)
  that wg-quick and OpenVPN use to override a default route without replacing it.
  These follow the default-route consent only; ``--accept-routes`` does not
  apply to them.

A node that is itself an internet gateway (an ``egress`` entry with
``internet_gateway``) never installs a default route through a peer, consent or
not: its internet traffic must leave by its own uplink, not loop into the tunnel.

Hazard: declining strips allowed IPs from peers, so a peers-only delta must be
narrowed the same way (``narrow_delta``) or it would bring them back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshgate.api.v1 import desired_state_pb2 as pb

NOT_ACCEPTED = "default routes need this node's consent (gatewayd join/run --accept-default-route)"
NO_DEFAULT_ROUTE = "this node's operator declines default routes (gatewayd --no-default-route)"
IS_GATEWAY = "this node is the internet gateway itself"
ERROR_REASON = "DEFAULT_ROUTE_DECLINED"
"""ErrorInfo reason of declined default routes."""
ROUTE_REASON = "ROUTE_NOT_ACCEPTED"
"""ErrorInfo reason of routes outside the operator's ``--accept-routes``."""
DEFAULT_ROUTE = "default route"
"""``Declined.route`` of ``default_route_via_peer``."""

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Declined:
    route: str
    """``default route`` or the route's destination."""
    via_peer: str
    reason: str
    code: str = ERROR_REASON
    """``DEFAULT_ROUTE_DECLINED`` or ``ROUTE_NOT_ACCEPTED``."""

    def __str__(self) -> str:
        return f"{self.route} via {self.via_peer}: {self.reason}"


@dataclass(frozen=True)
class Consent:
    """What this node's operator accepts (saved by ``join``, overridden by ``run``)."""

    accept_default_route: bool = False
    explicit: bool = False
    """The operator said ``--no-default-route`` (rather than not consenting)."""
    accept_routes: tuple[str, ...] | None = None
    """The allow-list of ranges; None accepts every route that is not a default route."""


def parse_accept_routes(text: str) -> tuple[str, ...] | None:
    """``--accept-routes``: ``all`` (None), ``none`` (empty) or comma-separated
    CIDRs, normalized (host bits cleared); raises ValueError naming a bad one."""
    text = text.strip()
    if text.lower() == "all":
        return None
    if text.lower() in ("none", ""):
        return ()
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise ValueError(f"--accept-routes: {part!r} is not a CIDR (use CIDRs, 'all' or 'none')") from None
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


def describe_accept_routes(accept_routes: Sequence[str] | None) -> str:
    if accept_routes is None:
        return "all"
    return ",".join(accept_routes) or "none"


def _net(text: str) -> Net | None:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None


def is_default(destination: str) -> bool:
    """True for a route of prefix length 0 or 1 (a default or split default route).
    A malformed destination is not: validation rejects it."""
    net = _net(destination)
    return net is not None and net.prefixlen <= 1


def _within(net: Net, allowed: Iterable[Net]) -> bool:
    return any(net.version == a.version and net.subnet_of(a) for a in allowed)  # type: ignore[arg-type]


def declined_routes(msg: pb.DesiredState, accept_default_route: bool,
                    accept_routes: Sequence[str] | None = None, explicit: bool = False) -> list[Declined]:
    """The routes of ``msg`` this node does not install: its default routes
    without consent (``explicit``: the operator said ``--no-default-route``),
    and, with an allow-list ``accept_routes``, every other route outside it."""
    if any(e.internet_gateway for e in msg.egress):
        reason: str | None = IS_GATEWAY
    elif not accept_default_route:
        reason = NO_DEFAULT_ROUTE if explicit else NOT_ACCEPTED
    else:
        reason = None
    allowed = None if accept_routes is None else [n for n in map(_net, accept_routes) if n is not None]
    refused = (f"not within the ranges this node accepts (gatewayd --accept-routes "
               f"{describe_accept_routes(accept_routes)})")
    out = []
    if reason and msg.default_route_via_peer:
        out.append(Declined(DEFAULT_ROUTE, msg.default_route_via_peer, reason))
    for r in msg.routes:
        net = _net(r.destination)
        if net is None:
            continue  # validation rejects it
        if net.prefixlen <= 1:
            if reason:
                out.append(Declined(r.destination, r.via_peer, reason))
        elif allowed is not None and not _within(net, allowed):
            out.append(Declined(r.destination, r.via_peer, refused, ROUTE_REASON))
    return out


def _dropped_allowed_ips(msg: pb.DesiredState, declined: Sequence[Declined]) -> dict[str, set[Net]]:
    """Per peer, the allowed IPs to take out: exactly the declined ranges, unless
    a route that is kept lies within one and no other entry of its peer covers it."""
    drop: dict[str, set[Net]] = {}
    for d in declined:
        if d.route == DEFAULT_ROUTE:
            nets = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        else:
            net = _net(d.route)
            nets = [net] if net is not None else []
        drop.setdefault(d.via_peer, set()).update(nets)
    gone = {(d.route, d.via_peer) for d in declined}
    entries = {p.public_key: [n for n in map(_net, p.allowed_ips) if n is not None]
               for p in msg.peers if p.public_key in drop}
    for r in msg.routes:
        if (r.destination, r.via_peer) in gone or r.via_peer not in drop:
            continue
        net = _net(r.destination)
        if net is None:
            continue
        covering = {n for n in entries.get(r.via_peer, ()) if n.version == net.version and net.subnet_of(n)}  # type: ignore[arg-type]
        if covering and covering <= drop[r.via_peer]:
            drop[r.via_peer] -= covering  # the kept route still needs them
    return drop


def _strip(peers, drop: dict[str, set[Net]]) -> None:
    for p in peers:
        nets = drop.get(p.public_key)
        if not nets:
            continue
        kept = [a for a in p.allowed_ips if _net(a) not in nets]
        if len(kept) != len(p.allowed_ips):
            del p.allowed_ips[:]
            p.allowed_ips.extend(kept)


def without_declined(msg: pb.DesiredState, declined: Sequence[Declined]) -> pb.DesiredState:
    """``msg`` without the declined routes and their allowed IPs (``msg`` itself
    when nothing is declined)."""
    if not declined:
        return msg
    out = pb.DesiredState()
    out.CopyFrom(msg)
    if any(d.route == DEFAULT_ROUTE for d in declined):
        out.default_route_via_peer = ""
    gone = {(d.route, d.via_peer) for d in declined}
    kept = [r for r in msg.routes if (r.destination, r.via_peer) not in gone]
    del out.routes[:]
    out.routes.extend(kept)
    _strip(out.peers, _dropped_allowed_ips(msg, declined))
    return out


def narrow_delta(delta: pb.DesiredStateDelta, merged: pb.DesiredState,
                 declined: Sequence[Declined]) -> pb.DesiredStateDelta:
    """A peers-only ``delta`` whose upserted peers lose the allowed IPs of the
    routes still declined (``merged``: the state with the delta applied, whose
    routes are those of the current target)."""
    if not declined or not delta.upserted_peers:
        return delta
    out = pb.DesiredStateDelta()
    out.CopyFrom(delta)
    _strip(out.upserted_peers, _dropped_allowed_ips(merged, declined))
    return out


def summary(declined: Sequence[Declined]) -> str:
    """``declined 2 default routes (<reason>): default route via <key>, 0.0.0.0/1 via <key>``,
    and ``declined 1 route (<reason>): 10.1.0.0/16 via <key>`` for the other kind."""
    parts = []
    for code, kind in ((ERROR_REASON, "default route"), (ROUTE_REASON, "route")):
        these = [d for d in declined if d.code == code]
        if not these:
            continue
        n = len(these)
        reasons = "; ".join(dict.fromkeys(d.reason for d in these))
        parts.append(f"declined {n} {kind}{'s' if n != 1 else ''} ({reasons}): "
                     + ", ".join(f"{d.route} via {d.via_peer}" for d in these))
    return "; ".join(parts)


def by_code(declined: Sequence[Declined]) -> dict[str, list[Declined]]:
    """The declined routes per ErrorInfo reason, default routes first."""
    out: dict[str, list[Declined]] = {}
    for code in (ERROR_REASON, ROUTE_REASON):
        these = [d for d in declined if d.code == code]
        if these:
            out[code] = these
    return out
