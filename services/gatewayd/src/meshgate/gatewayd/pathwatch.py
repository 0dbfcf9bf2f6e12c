"""Path health as the agent sees it: per-peer samples in, reports of changes out.

Pure: `PathWatch.observe(stats, now_ns)` takes the interface's per-peer counters
(public key -> `wireguard.PeerStats`) and the time, and returns the peers to
report, or nothing. The agent samples every `path_check_interval` (1 s) and
sends what this returns as one `Health` message, so the control plane hears of
a change within about a second and otherwise of nothing:

- a peer is reported when it first appears (its configure time), on its
  first handshake (not on every rekey, every two minutes: in a large mesh
  that would be a report per node per second), when its endpoint changes
  (where WireGuard last heard it from: a NAT's mapping for a peer behind one)
  and when its reachability changes;
- its counters ride along, and every `full_every_s` a complete report lists
  every peer (so counters of quiet peers, shown for external clients, stay
  fresh, and a control plane that lost a record gets it back).

Reachability: a peer is *unanswered* once more than `KEEPALIVE_BYTES` have been
sent to it since it was last heard from, and that has lasted `answer_within_s`.
WireGuard answers every data packet within 10 s even when the other side has
nothing to say (its passive keepalive), a ping or a TCP connection within one
round trip; persistent keepalives (32 bytes each) do not count, so an idle,
healthy pair is never unanswered. A relayed pair's direct entry (no allowed
IPs: a probe) carries only keepalives, both ways: there one keepalive left
unanswered for the keepalive interval and `answer_within_s` counts. Hazard: a one-way stream (UDP without
replies) is answered only by those passive keepalives, every 10 s, and looks
unanswered in between; the control plane's path delay must allow for it or
accept it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEEPALIVE_BYTES = 64
"""Bytes a peer may be sent without an answer before it counts: two keepalives."""


@dataclass
class PeerReport:
    """One peer's line of a `Health` report (times in nanoseconds, 0: none)."""

    public_key: str
    handshake_ns: int
    endpoint: str
    rx_bytes: int
    tx_bytes: int
    unanswered_since_ns: int
    configure_ns: int


@dataclass
class _Peer:
    configure_ns: int
    rx: int
    tx: int
    tx_at_rx: int  # tx when rx last moved
    pending_ns: int = 0  # when bytes beyond KEEPALIVE_BYTES went out unanswered
    unanswered_ns: int = 0
    sent: tuple[Any, ...] | None = None  # (handshake, endpoint, unanswered) last reported
    counters: tuple[int, int] = (-1, -1)


class PathWatch:
    """Keeps the previous sample of every peer; see the module docstring."""

    def __init__(self, answer_within_s: float = 2.0, full_every_s: float = 30.0) -> None:
        self.answer_within_ns = int(answer_within_s * 1e9)
        self.full_every_ns = int(full_every_s * 1e9)
        self._peers: dict[str, _Peer] = {}
        self._next_full_ns = 0

    def reset(self) -> None:
        """Report everything again next time (a new stream)."""
        self._next_full_ns = 0
        for p in self._peers.values():
            p.sent = None

    def observe(self, stats: Mapping[str, Any], now_ns: int,
                probes: Mapping[str, int] | None = None) -> tuple[list[PeerReport], bool] | None:
        """The peers to report now and whether the report is complete; None:
        nothing to say. `probes`: public key -> persistent keepalive (s) of the
        entries without allowed IPs (a relayed pair's direct entry): they carry
        only keepalives, both ways, so one left unanswered for the keepalive
        interval and `answer_within_s` counts."""
        probes = probes or {}
        for gone in [k for k in self._peers if k not in stats]:
            del self._peers[gone]
        complete = now_ns >= self._next_full_ns
        if complete:
            self._next_full_ns = now_ns + self.full_every_ns
        out: list[PeerReport] = []
        for key in sorted(stats):
            st = stats[key]
            p = self._peers.get(key)
            if p is None:
                p = self._peers[key] = _Peer(now_ns, st.rx_bytes, st.tx_bytes, st.tx_bytes)
            if st.rx_bytes != p.rx or st.tx_bytes < p.tx_at_rx:  # heard from, or counters reset
                p.tx_at_rx, p.pending_ns, p.unanswered_ns = st.tx_bytes, 0, 0
            elif st.tx_bytes - p.tx_at_rx > (0 if key in probes else KEEPALIVE_BYTES):
                if not p.pending_ns:
                    p.pending_ns = now_ns
                within = self.answer_within_ns + probes.get(key, 0) * 1_000_000_000
                if not p.unanswered_ns and now_ns - p.pending_ns >= within:
                    p.unanswered_ns = p.pending_ns
            p.rx, p.tx = st.rx_bytes, st.tx_bytes
            handshake = st.last_handshake_sec * 1_000_000_000 + st.last_handshake_nsec if st.last_handshake_sec else 0
            # A rekey every two minutes is no news: only the first handshake is.
            shown = (bool(handshake), st.endpoint or "", p.unanswered_ns)
            counters = (st.rx_bytes, st.tx_bytes)
            if complete or shown != p.sent or (p.sent is None):
                p.sent = shown
                p.counters = counters
                out.append(PeerReport(key, handshake, st.endpoint or "", st.rx_bytes, st.tx_bytes,
                                      p.unanswered_ns, p.configure_ns))
        if not out and not complete:
            return None
        return out, complete
