"""Validation of an egress gateway's probes (EgressGateway.probes); pure.

What is accepted here is exactly what gatewayd's health.py runs: ICMP echo or
a TCP connection, to one IP address inside the gateway's ranges (for an
internet gateway: any address outside the network's own ranges), out of the
egress interface, every `interval` with a `timeout`, turning unhealthy after
`failure_threshold` consecutive failures and healthy after
`success_threshold` consecutive successes. Anything else is refused with a
field violation naming the exact field, so nothing stored is ignored by the
data plane.
"""

from __future__ import annotations

import ipaddress

from meshgate.api.v1 import egress_pb2, network_pb2
from meshgate.common.errors import FieldViolation

MAX_PROBES = 4
MIN_INTERVAL_NS = 100_000_000  # 100 ms
MAX_INTERVAL_NS = 3600 * 1_000_000_000
MAX_THRESHOLD = 100


def _ns(d) -> int:
    return d.seconds * 1_000_000_000 + d.nanos


def violations(gw: egress_pb2.EgressGateway, ranges: list, network: network_pb2.Network | None,
               prefix: str = "egress_gateway") -> list[FieldViolation]:
    """Field violations of `gw.probes`; `ranges`: its ranges, parsed."""
    out: list[FieldViolation] = []
    if len(gw.probes) > MAX_PROBES:
        out.append(FieldViolation(f"{prefix}.probes", f"at most {MAX_PROBES} probes, got {len(gw.probes)}"))
        return out
    overlay = [ipaddress.ip_network(c, strict=False) for c in
               ((network.ipv4_cidr, network.ipv6_cidr) if network is not None else ()) if c]
    for i, p in enumerate(gw.probes):
        f = f"{prefix}.probes[{i}]"
        if p.protocol not in (egress_pb2.EgressProbe.ICMP, egress_pb2.EgressProbe.TCP):
            out.append(FieldViolation(f"{f}.protocol", "must be ICMP or TCP"))
        try:
            target = ipaddress.ip_address(p.target)
        except ValueError:
            out.append(FieldViolation(f"{f}.target", f"{p.target[:64]!r} is not an IP address"))
            target = None
        if target is not None:
            if gw.internet_gateway:
                inside = not any(target.version == n.version and target in n for n in overlay)
                if not inside:
                    out.append(FieldViolation(f"{f}.target", f"{target} is inside the network's own ranges: a "
                                              "probe checks the way out of the overlay"))
            elif not any(target.version == n.version and target in n for n in ranges):
                out.append(FieldViolation(f"{f}.target", f"{target} is not inside the gateway's ranges "
                                          f"({', '.join(str(n) for n in ranges) or 'none'})"))
            if target.is_unspecified or target.is_multicast or target.is_loopback:
                out.append(FieldViolation(f"{f}.target", f"{target} cannot answer a probe"))
        if p.protocol == egress_pb2.EgressProbe.TCP and not 1 <= p.port <= 65535:
            out.append(FieldViolation(f"{f}.port", "a TCP probe needs a port (1-65535)"))
        if p.protocol == egress_pb2.EgressProbe.ICMP and p.port:
            out.append(FieldViolation(f"{f}.port", "an ICMP probe has no port (must be 0)"))
        interval = _ns(p.interval)
        if not MIN_INTERVAL_NS <= interval <= MAX_INTERVAL_NS:
            out.append(FieldViolation(f"{f}.interval", "must be between 100ms and 1h"))
        timeout = _ns(p.timeout)
        if timeout < 0 or (timeout and timeout < 10_000_000):
            out.append(FieldViolation(f"{f}.timeout", "must be at least 10ms (or unset: the interval, at most 1s)"))
        elif timeout > interval >= MIN_INTERVAL_NS:
            out.append(FieldViolation(f"{f}.timeout", "must not be longer than the interval"))
        for name in ("failure_threshold", "success_threshold"):
            if getattr(p, name) > MAX_THRESHOLD:
                out.append(FieldViolation(f"{f}.{name}", f"at most {MAX_THRESHOLD} (0: the default)"))
    return out
