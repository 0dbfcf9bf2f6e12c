"""Path health and relay routing, pure: what the agents report, what it means,
and which pairs of nodes go through a relay.

Reports. Every agent tells its control plane, per peer, when it last
completed a handshake, where WireGuard last heard the peer from (its
endpoint), since when the traffic it sends the peer has gone unanswered, and
when it configured the peer (gatewayd's pathwatch.py: on change, batched). The
replica holding the stream keeps them per node in `pathHealth/{net}/{node}`
(JSON: peer node id -> `PeerSeen` fields; relays.py), which every replica
follows.

States. A pair's direct path, from what both sides say (`direct_state`):
- `PATH_NEVER_CONNECTED`: configured on both sides (both agents reported it)
  for longer than the path delay (at least 6 s: a side that learns of the
  other late waits for WireGuard's next handshake retry, 5 s) and no
  handshake yet;
- `PATH_STALE`: connected once, then traffic unanswered for longer than the
  delay on either side (with keepalives on, a dead session always shows so;
  the age of the last handshake is not judged: agents report the first
  handshake, not every rekey);
- `PATH_UP`: otherwise, once there was a handshake.
Nothing is said about a pair before the delay has passed (a node that just
joined is not unhealthy yet).

Routes. A pair whose mark says so (`pathRoutes/{net}/{a}~{b}`, written by
relays.py when the direct path stays unhealthy for the delay, or comes back for
the recovery delay) goes through the relay it names; a pair without a mark
goes through the default relay (the first by name that both peer with) when
neither side has an endpoint configured, and directly otherwise. A relay
is a node with `relay` set, an endpoint and a key, that both sides peer with.
On each side the other's host routes move to the relay's peer entry, and the
other's own entry stays, without allowed IPs, so that its handshakes and
keepalives keep probing the direct path; the relay forwards between the two
(`relayed_ranges`), under the same access policies as direct traffic.

Learned endpoints (`learnedEndpoints/{net}/{node}`): where a node with an endpoint of
its own (a relay, a gateway) hears a node without one from, its NAT's mapping.
The compiler gives it to the node's peers as its endpoint, so two nodes behind
NATs that keep one mapping for every destination (endpoint-independent) reach
each other directly; with a NAT that maps per destination their handshakes
never meet and the pair stays relayed.

Hazard: the relay choice is part of every affected node's desired state, so it
must be a function of the `NetworkState` only (marks and learned endpoints are
in it); the health records themselves never reach the compiler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshgate.api.v1 import network_pb2

FIRST_HANDSHAKE_S = 6.0
"""The least time a pair is given for its first handshake: one side may learn of
the other up to a retry later (WireGuard's REKEY_TIMEOUT, 5 s) than the other."""
DEFAULT_DELAY_S = 5.0
DEFAULT_RECOVER_S = 30.0


def pair_id(a: str, b: str) -> str:
    """The id of the pair of nodes `a` and `b` (names or ids): `{x}~{y}`, x < y."""
    x, y = sorted((a.rsplit("/", 1)[-1], b.rsplit("/", 1)[-1]))
    return f"{x}~{y}"


def pair_nodes(net_id: str, pid: str) -> tuple[str, str]:
    x, _, y = pid.partition("~")
    return f"networks/{net_id}/nodes/{x}", f"networks/{net_id}/nodes/{y}"


@dataclass(frozen=True)
class PeerSeen:
    """What one node's agent last said about one peer (nanoseconds, 0: none)."""

    handshake_ns: int = 0
    endpoint: str = ""
    unanswered_ns: int = 0
    configure_ns: int = 0
    rtt_us: int = 0  # the round-trip time this node measured to the peer (a relay), 0: none

    @classmethod
    def of(cls, rec: Mapping[str, Any] | None) -> PeerSeen | None:
        if not rec:
            return None
        return cls(int(rec.get("handshake_ns", 0)), str(rec.get("endpoint", "")),
                   int(rec.get("unanswered_ns", 0)), int(rec.get("configure_ns", 0)), int(rec.get("rtt_us", 0)))


@dataclass(frozen=True)
class Direct:
    """The state of a pair's direct path (`state` a `network_pb2.PathState`)."""

    state: int
    since_ns: int = 0
    reason: str = ""

    @property
    def up(self) -> bool:
        return self.state == network_pb2.PATH_UP

    @property
    def unhealthy(self) -> bool:
        return self.state in (network_pb2.PATH_NEVER_CONNECTED, network_pb2.PATH_STALE)


UNKNOWN = Direct(network_pb2.PATH_STATE_UNSPECIFIED)


def _secs(ns: int) -> str:
    return f"{max(ns, 0) / 1e9:.0f} s"


def direct_state(a: PeerSeen | None, b: PeerSeen | None, now_ns: int, delay_s: float = DEFAULT_DELAY_S) -> Direct:
    """The direct path between two nodes, from what each side's agent says of
    the other (`a`, `b`; None: it has said nothing); see the module docstring."""
    views = [v for v in (a, b) if v is not None]
    if not views:
        return UNKNOWN
    delay_ns = int(delay_s * 1e9)
    handshake = max(v.handshake_ns for v in views)
    unanswered = [v.unanswered_ns for v in views if v.unanswered_ns]
    if unanswered and handshake:
        since = min(unanswered)
        if now_ns - since >= delay_ns:
            return Direct(network_pb2.PATH_STALE, since, f"traffic unanswered for {_secs(now_ns - since)}")
    if not handshake:
        # Both sides must have it configured (an agent that has not reported
        # yet may not even have the peer): then no handshake for the delay.
        configured = max(v.configure_ns for v in views)
        if len(views) == 2 and configured and now_ns - configured >= max(delay_ns, int(FIRST_HANDSHAKE_S * 1e9)):
            return Direct(network_pb2.PATH_NEVER_CONNECTED, configured,
                          f"no handshake in the {_secs(now_ns - configured)} since it was configured")
        return UNKNOWN
    # The age of the handshake is not judged: agents report the first one, not
    # every rekey, and a dead session with keepalives on shows as unanswered.
    return Direct(network_pb2.PATH_UP, handshake)


# ----------------------------------------------------------------- choosing a relay

SWITCH_RATIO = 0.7
"""A relayed pair moves to another relay only if that one's round trip (both
sides' summed) is under this share of the current one's ..."""
SWITCH_MIN_US = 10_000
"""... and shorter by at least this much (10 ms): a small change never moves pairs."""


@dataclass(frozen=True)
class Candidate:
    """A relay as seen for one pair: how many of the two sides reach it (0-2),
    the sum of the round-trip times both measured to it (None: a side has
    not), and how many pairs it relays already."""

    relay: str
    up: int
    rtt_us: int | None
    load: int


def choose_relay(candidates: Iterable[Candidate], current: str = "") -> str:
    """The relay for a pair: the healthiest (both sides reach it), then the
    closest (least summed round trip; measured before unmeasured), then the
    least loaded, then by name. With a `current` relay that is still among the
    healthiest, the pair stays unless the best is clearly closer
    (`SWITCH_RATIO` and `SWITCH_MIN_US`): hysteresis, so that a small change
    of a round trip, or of load, never moves a pair."""
    ranked = sorted(candidates, key=lambda c: (-c.up, c.rtt_us is None, c.rtt_us or 0, c.load, c.relay))
    if not ranked:
        return ""
    best = ranked[0]
    cur = next((c for c in ranked if c.relay == current), None)
    if cur is None or cur.up < best.up:
        return best.relay
    if best.rtt_us is not None and cur.rtt_us is not None and best.rtt_us < cur.rtt_us * SWITCH_RATIO \
            and cur.rtt_us - best.rtt_us >= SWITCH_MIN_US:
        return best.relay
    return current


# ----------------------------------------------------------------- routing (compiler)


def has_endpoint(state, name: str) -> bool:
    """A configured endpoint: a learned one does not make a pair direct by
    default (it has to prove itself first, through the recovery delay)."""
    node = state.nodes.get(name)
    return node is not None and bool(node.endpoint)


def endpoint_of(state, name: str) -> str:
    """A node's endpoint as its peers get it: its own, else the one learned."""
    node = state.nodes[name]
    return node.endpoint or state.learned_endpoints.get(name, "")


def relays(state) -> list[str]:
    """The nodes that can relay, by name: `relay` set, an endpoint and a key."""
    return sorted(n for n, node in state.nodes.items() if node.relay and node.endpoint and node.public_key)


def route(state, a: str, b: str, candidates: Iterable[str] | None = None,
          peers_of: Callable[[str], Any] | None = None) -> str:
    """The relay pair (`a`, `b`)'s traffic goes through, '' for direct.
    `peers_of(n)`: the nodes n peers with (a relay must peer with both sides)."""
    if a == b:
        return ""
    mark = state.relay_marks.get(pair_id(a, b)) if state.relay_marks else None
    if mark is not None:
        if not mark:
            return ""
        name = f"{state.network.name}/nodes/{mark}"
        return name if _usable(state, name, a, b, peers_of) else ""
    if has_endpoint(state, a) or has_endpoint(state, b):
        return ""
    for r in (relays(state) if candidates is None else candidates):
        if _usable(state, r, a, b, peers_of):
            return r
    return ""


def _usable(state, r: str, a: str, b: str, peers_of: Callable[[str], Any] | None) -> bool:
    node = state.nodes.get(r)
    if node is None or r in (a, b) or not (node.relay and node.endpoint and node.public_key):
        return False
    if peers_of is None:
        return True
    return r in peers_of(a) and r in peers_of(b)


class _AllKeyed:
    """The peers of one node under an ALLOW default: every other keyed node."""

    def __init__(self, keyed: list[str], keyed_set: set[str], me: str) -> None:
        self.keyed, self.keyed_set, self.me = keyed, keyed_set, me

    def __contains__(self, n: object) -> bool:
        return n != self.me and n in self.keyed_set

    def __iter__(self):
        return (n for n in self.keyed if n != self.me)


def peer_view(index: Any) -> Callable[[str], Any]:
    """`peers_of` for `route` and friends over a `compiler.PeerIndex`: a
    container per node, worked out once per index (under ALLOW, without
    building a set per node)."""
    memo = getattr(index, "_peer_view", None)
    if memo is not None:
        return memo
    sets: dict[str, frozenset[str]] = {}

    def view(n: str):
        if index.allow_all:
            return _AllKeyed(index.keyed, index._keyed_set, n) if n in index._keyed_set else frozenset()
        got = sets.get(n)
        if got is None:
            got = sets[n] = frozenset(index.peers_of(n))
        return got

    index._peer_view = view
    return view


def relays_of(state, index: Any = None) -> list[str]:
    """`relays(state)`, worked out once per `PeerIndex` when one is given."""
    if index is None:
        return relays(state)
    found = getattr(index, "_relays", None)
    if found is None:
        found = relays(state)
        index._relays = found
    return found


def relayed_peers(state, name: str, peer_names: Iterable[str],
                  peers_of: Callable[[str], Any], index: Any = None) -> dict[str, str]:
    """The peers of `name` it reaches through a relay: peer -> relay."""
    candidates = relays_of(state, index)
    if not state.relay_marks and (not candidates or has_endpoint(state, name)):
        return {}  # the common case, at no cost per peer: nothing marked, and direct by default
    out = {}
    for p in peer_names:
        r = route(state, name, p, candidates, peers_of)
        if r:
            out[p] = r
    return out


def relayed_through(state, relay: str, peers_of: Callable[[str], Any]) -> set[str]:
    """The nodes `relay` forwards for: both sides of every pair it relays."""
    me = state.nodes.get(relay)
    if me is None or not me.relay:
        return set()
    net = state.network.name
    out: set[str] = set()
    rid = relay.rsplit("/", 1)[-1]
    for pid, mark in state.relay_marks.items():
        if mark == rid:
            a, b = (f"{net}/nodes/{x}" for x in pid.split("~", 1))
            if route(state, a, b, None, peers_of) == relay:
                out |= {a, b}
    # pairs without a mark and without endpoints, among the relay's peers
    candidates = relays(state)
    bare = [p for p in peers_of(relay) if not has_endpoint(state, p)]
    for i, a in enumerate(bare):
        for b in bare[i + 1:]:
            if (a in out and b in out) or pair_id(a, b) in state.relay_marks:
                continue
            if route(state, a, b, candidates, peers_of) == relay:
                out |= {a, b}
    return out


def relayed_partners(state, relay: str, node: str, peers_of: Callable[[str], Any]) -> list[str]:
    """The nodes whose pair with `node` goes through `relay` (the relay's peers,
    in its peer order): a relay carries a gateway node's egress ranges for these."""
    candidates = relays(state)
    return [x for x in peers_of(relay) if x != node and route(state, node, x, candidates, peers_of) == relay]
