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

Silence: wireguard-go does not count what it failed to send (a local drop, an
``nft ... output ... drop`` on the sender's underlay, makes its sends fail
unseen), so on the sending side such a pair shows no unanswered bytes. With
persistent keepalives on an entry (`keepalives`), both sides send at least
every keepalive interval, and WireGuard answers data within 10 s (its passive
keepalive) even where one side only receives: so once the pair has had a
handshake, neither counter may stand still for longer than `SILENT_S` (or
twice the keepalive interval, if longer) plus `answer_within_s`. A counter that
does is unanswered since it last moved, whichever side failed: our sends (tx
stands still: a local drop) or theirs (rx stands still). Entries without
keepalives (external clients) are judged by unanswered data only.

Round-trip times (`rtts`: public key -> microseconds, 0: unanswered) are the
agent's pings to its relays over the overlay (desired peers' `rtt_address`,
every `path_rtt_interval`); a peer is reported when its time moves by more
than `RTT_CHANGE` of the last one reported, or appears or goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEEPALIVE_BYTES = 64
"""Bytes a peer may be sent without an answer before it counts: two keepalives."""
RTT_CHANGE = 0.25
SILENT_S = 11
"""The longest a counter of a healthy entry with keepalives stands still: WireGuard's
passive keepalive (10 s) answers data, plus a sample's slack."""


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
    rtt_us: int = 0


@dataclass
class _Peer:
    configure_ns: int
    rx: int
    tx: int
    tx_at_rx: int  # tx when rx last moved
    pending_ns: int = 0  # when bytes beyond KEEPALIVE_BYTES went out unanswered
    data_ns: int = 0  # since when those bytes count as unanswered
    unanswered_ns: int = 0  # what is reported: the earliest of data_ns and a silence
    rx_ns: int = 0  # when rx last moved (or the peer appeared)
    tx_ns: int = 0  # when tx last moved (or the peer appeared)
    sent: tuple[Any, ...] | None = None  # (handshake, endpoint, unanswered) last reported
    rtt_us: int = 0  # last reported
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
                probes: Mapping[str, int] | None = None,
                keepalives: Mapping[str, int] | None = None,
                rtts: Mapping[str, int] | None = None) -> tuple[list[PeerReport], bool] | None:
        """The peers to report now and whether the report is complete; None:
        nothing to say. `probes`: public key -> persistent keepalive (s) of the
        entries without allowed IPs (a relayed pair's direct entry): they carry
        only keepalives, both ways, so one left unanswered for the keepalive
        interval and `answer_within_s` counts. `keepalives`: public key ->
        persistent keepalive (s) of every entry with one (probes count too):
        their counters are judged for silence (module docstring). `rtts`: the
        round-trip times measured (microseconds)."""
        probes, rtts = probes or {}, rtts or {}
        keepalives = {**probes, **(keepalives or {})}
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
                p = self._peers[key] = _Peer(now_ns, st.rx_bytes, st.tx_bytes, st.tx_bytes,
                                             rx_ns=now_ns, tx_ns=now_ns)
            if st.rx_bytes != p.rx or st.tx_bytes < p.tx_at_rx:  # heard from, or counters reset
                p.tx_at_rx, p.pending_ns, p.data_ns = st.tx_bytes, 0, 0
            elif st.tx_bytes - p.tx_at_rx > (0 if key in probes else KEEPALIVE_BYTES):
                if not p.pending_ns:
                    p.pending_ns = now_ns
                within = self.answer_within_ns + probes.get(key, 0) * 1_000_000_000
                if not p.data_ns and now_ns - p.pending_ns >= within:
                    p.data_ns = p.pending_ns
            if st.rx_bytes != p.rx:
                p.rx_ns = now_ns
            if st.tx_bytes != p.tx:
                p.tx_ns = now_ns
            p.rx, p.tx = st.rx_bytes, st.tx_bytes
            handshake = st.last_handshake_sec * 1_000_000_000 + st.last_handshake_nsec if st.last_handshake_sec else 0
            since = [p.data_ns] if p.data_ns else []
            keepalive = keepalives.get(key, 0)
            if keepalive and handshake:
                silent_ns = max(SILENT_S, 2 * keepalive) * 1_000_000_000 + self.answer_within_ns
                since += [t for t in (p.rx_ns, p.tx_ns) if now_ns - t >= silent_ns]
            if not since:
                p.unanswered_ns = 0
            elif not p.unanswered_ns:  # (while it lasts, the time it started stays)
                p.unanswered_ns = min(since)
            # A rekey every two minutes is no news: only the first handshake is.
            shown = (bool(handshake), st.endpoint or "", p.unanswered_ns)
            counters = (st.rx_bytes, st.tx_bytes)
            rtt = rtts.get(key, 0)
            rtt_moved = bool(rtt) != bool(p.rtt_us) or abs(rtt - p.rtt_us) > RTT_CHANGE * p.rtt_us
            if complete or shown != p.sent or (p.sent is None) or rtt_moved:
                p.sent = shown
                p.counters = counters
                p.rtt_us = rtt
                out.append(PeerReport(key, handshake, st.endpoint or "", st.rx_bytes, st.tx_bytes,
                                      p.unanswered_ns, p.configure_ns, p.rtt_us))
        if not out and not complete:
            return None
        return out, complete
