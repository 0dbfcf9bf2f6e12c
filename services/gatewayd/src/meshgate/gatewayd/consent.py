"""What the node's operator lets a desired state install: default routes.

A default route sends all of a node's traffic into the tunnel, so it needs the
consent of the node's operator (``gatewayd join/run --accept-default-route``),
not only the control plane's word.  Without that consent every default route of
a desired state is *declined*: left out before validation and planning, the rest
of the state applies, the agent logs it once per change, keeps it in its status
(``declined_routes``) and says so in the ack of that revision (an OK status whose
message and ``google.rpc.ErrorInfo``, reason ``DEFAULT_ROUTE_DECLINED``, name
what was left out: the node applied everything it will apply, so it is not an
apply failure).

What counts as a default route, so that a control plane cannot widen what the
node consented to by spelling it differently:

- ``default_route_via_peer`` (gatewayd's ``0.0.0.0/0`` / ``::/0`` route plus the
  ``suppress_prefixlength 0`` rule);
- every entry of ``routes`` with a prefix of length 0 or 1: ``0.0.0.0/0``, and the
  split default routes ``0.0.0.0/1`` + ``128.0.0.0/1`` (``::/1`` + ``8000::/1``)
  that wg-quick and OpenVPN use to override a default route without replacing it.

A node that is itself an internet gateway (an ``egress`` entry with
``internet_gateway``) never installs a default route through a peer, consent or
not: its internet traffic must leave by its own uplink, not loop into the tunnel.

Hazard: this narrows only default routes.  Other routes (egress ranges) are the
control plane's to give; an operator allow-list of ranges would be another
filter here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Sequence

from meshgate.api.v1 import desired_state_pb2 as pb

NOT_ACCEPTED = "default routes need this node's consent (gatewayd join/run --accept-default-route)"
IS_GATEWAY = "this node is the internet gateway itself"
ERROR_REASON = "DEFAULT_ROUTE_DECLINED"


@dataclass(frozen=True)
class Declined:
    route: str
    """``default route`` or the route's destination."""
    via_peer: str
    reason: str

    def __str__(self) -> str:
        return f"{self.route} via {self.via_peer}: {self.reason}"


def is_default(destination: str) -> bool:
    """True for a route of prefix length 0 or 1 (a default or split default route).
    A malformed destination is not: validation rejects it."""
    try:
        return ipaddress.ip_network(destination.strip(), strict=False).prefixlen <= 1
    except ValueError:
        return False


def declined_routes(msg: pb.DesiredState, accept_default_route: bool) -> list[Declined]:
    """The default routes of ``msg`` this node does not install."""
    if any(e.internet_gateway for e in msg.egress):
        reason = IS_GATEWAY
    elif not accept_default_route:
        reason = NOT_ACCEPTED
    else:
        return []
    out = []
    if msg.default_route_via_peer:
        out.append(Declined("default route", msg.default_route_via_peer, reason))
    out += [Declined(r.destination, r.via_peer, reason) for r in msg.routes if is_default(r.destination)]
    return out


def without_declined(msg: pb.DesiredState, declined: Sequence[Declined]) -> pb.DesiredState:
    """``msg`` without the declined routes (``msg`` itself when nothing is declined)."""
    if not declined:
        return msg
    out = pb.DesiredState()
    out.CopyFrom(msg)
    out.default_route_via_peer = ""
    kept = [r for r in msg.routes if not is_default(r.destination)]
    del out.routes[:]
    out.routes.extend(kept)
    return out


def summary(declined: Sequence[Declined]) -> str:
    """``declined 2 default routes (<reason>): default route via <key>, 0.0.0.0/1 via <key>``."""
    n = len(declined)
    reasons = "; ".join(dict.fromkeys(d.reason for d in declined))
    return (f"declined {n} default route{'s' if n != 1 else ''} ({reasons}): "
            + ", ".join(f"{d.route} via {d.via_peer}" for d in declined))
