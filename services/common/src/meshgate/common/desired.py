"""Applying a `DesiredStateDelta` to a `DesiredState`: the one definition the
control plane (its tests and property checks) and gatewayd both use.

Peers are matched by public key and kept in canonical order (by resource name,
then key), the order the control plane compiles them in, so that applying
`diff(old, new)` to `old` gives exactly `new`.
"""

from __future__ import annotations

from meshgate.api.v1 import desired_state_pb2 as ds


def apply_delta(state: ds.DesiredState, delta: ds.DesiredStateDelta, revision: int | None = None) -> ds.DesiredState:
    """`state` with `delta` applied; its revision becomes `revision` when given."""
    out = ds.DesiredState()
    out.CopyFrom(state)
    if revision is not None:
        out.revision = revision
    if delta.upserted_peers or delta.removed_peers:
        peers = {p.public_key: p for p in out.peers}
        for pk in delta.removed_peers:
            peers.pop(pk, None)
        for p in delta.upserted_peers:
            peers[p.public_key] = p
        del out.peers[:]
        out.peers.extend(sorted(peers.values(), key=lambda p: (p.resource, p.public_key)))
    if delta.HasField("interface"):
        out.interface.CopyFrom(delta.interface)
    if delta.routes_changed:
        del out.routes[:]
        out.routes.extend(delta.routes)
    if delta.egress_changed:
        del out.egress[:]
        out.egress.extend(delta.egress)
    if delta.filter_rules_changed:
        del out.filter_rules[:]
        out.filter_rules.extend(delta.filter_rules)
    if delta.default_route_changed:
        out.default_route_via_peer = delta.default_route_via_peer
    if delta.relayed_ranges_changed:
        del out.relayed_ranges[:]
        out.relayed_ranges.extend(delta.relayed_ranges)
    if delta.HasField("dns"):
        out.dns.CopyFrom(delta.dns)
    return out
