"""The agent's side of path health (pathwatch.py): what a sample reports."""

from __future__ import annotations

from meshgate.gatewayd.pathwatch import PathWatch
from meshgate.gatewayd.wireguard import PeerStats

S = 10**9


def stats(rx: int, tx: int, hs: int = 0, ep: str = "203.0.113.2:51820") -> PeerStats:
    return PeerStats(endpoint=ep, last_handshake_sec=hs, last_handshake_nsec=0, rx_bytes=rx, tx_bytes=tx)


def test_first_sample_reports_everything_then_only_changes():
    w = PathWatch(answer_within_s=2, full_every_s=30)
    got = w.observe({"k": stats(0, 0)}, 1 * S)
    assert got is not None and got[1] and got[0][0].configure_ns == 1 * S
    assert w.observe({"k": stats(0, 0)}, 2 * S) is None
    # counters moving alone are not a change ...
    assert w.observe({"k": stats(500, 500, hs=1)}, 3 * S) is not None  # ... a handshake is
    assert w.observe({"k": stats(900, 900, hs=1)}, 4 * S) is None
    # a new endpoint (the peer roamed, or a NAT changed its mapping) is reported
    moved = w.observe({"k": stats(900, 900, hs=1, ep="203.0.113.6:40000")}, 5 * S)
    assert moved is not None and moved[0][0].endpoint == "203.0.113.6:40000"
    # every full_every_s, a complete report
    full = w.observe({"k": stats(900, 900, hs=1, ep="203.0.113.6:40000")}, 40 * S)
    assert full is not None and full[1]


def test_unanswered_traffic_is_reported_once_it_lasts_and_cleared_when_answered():
    w = PathWatch(answer_within_s=2, full_every_s=300)
    w.observe({"k": stats(100, 100, hs=1)}, 0)
    assert w.observe({"k": stats(100, 132, hs=1)}, 1 * S) is None  # one keepalive: nothing
    assert w.observe({"k": stats(100, 400, hs=1)}, 2 * S) is None  # data, not yet for long
    got = w.observe({"k": stats(100, 800, hs=1)}, 4 * S)
    assert got is not None and got[0][0].unanswered_since_ns == 2 * S
    assert w.observe({"k": stats(100, 900, hs=1)}, 5 * S) is None  # still so: no news
    back = w.observe({"k": stats(200, 1000, hs=1)}, 6 * S)
    assert back is not None and back[0][0].unanswered_since_ns == 0


def test_idle_keepalives_never_count_as_unanswered():
    w = PathWatch(answer_within_s=2, full_every_s=300)
    rx = tx = 0
    w.observe({"k": stats(rx, tx, hs=1)}, 0)
    for t in range(1, 60):
        tx += 32  # our keepalive every second ...
        if t % 2 == 0:
            rx += 32  # ... theirs every other
        assert w.observe({"k": stats(rx, tx, hs=1)}, t * S) is None


def test_a_probe_entry_counts_one_unanswered_keepalive():
    w = PathWatch(answer_within_s=2, full_every_s=300)
    probes = {"k": 1}
    w.observe({"k": stats(100, 100, hs=1)}, 0, probes)
    for t in range(1, 10):  # healthy: a keepalive each way every second
        assert w.observe({"k": stats(100 + 32 * t, 100 + 32 * t, hs=1)}, t * S, probes) is None
    rx = 100 + 32 * 9
    w.observe({"k": stats(rx, rx + 32, hs=1)}, 10 * S, probes)  # cut: ours go unanswered
    w.observe({"k": stats(rx, rx + 64, hs=1)}, 11 * S, probes)
    w.observe({"k": stats(rx, rx + 96, hs=1)}, 12 * S, probes)
    got = w.observe({"k": stats(rx, rx + 128, hs=1)}, 13 * S, probes)
    assert got is not None and got[0][0].unanswered_since_ns == 10 * S  # keepalive 1 s + 2 s
    # the same traffic on an ordinary entry is not yet unanswered (64 bytes of keepalives allowed)
    w2 = PathWatch(answer_within_s=2, full_every_s=300)
    w2.observe({"k": stats(100, 100, hs=1)}, 0)
    w2.observe({"k": stats(100, 132, hs=1)}, 1 * S)
    assert w2.observe({"k": stats(100, 164, hs=1)}, 2 * S) is None


def test_a_local_send_failure_with_keepalives_on_is_unanswered():
    """wireguard-go does not count what it failed to send (a local output drop):
    tx stands still while keepalives are due, rx may still move (theirs arrive)."""
    w = PathWatch(answer_within_s=2, full_every_s=300)
    keep = {"k": 1}
    rx = tx = 100
    w.observe({"k": stats(rx, tx, hs=1)}, 0, keepalives=keep)
    for t in range(1, 30):  # healthy: keepalives both ways
        rx, tx = rx + 32, tx + 32
        assert w.observe({"k": stats(rx, tx, hs=1)}, t * S, keepalives=keep) is None
    got = None
    for t in range(30, 60):  # our sends fail unseen: tx stands still, theirs still arrive
        rx += 32
        got = got or w.observe({"k": stats(rx, tx, hs=1)}, t * S, keepalives=keep)
        if got:
            break
    assert got is not None and got[0][0].unanswered_since_ns == 29 * S  # when tx last moved
    assert t >= 29 + 11 + 2  # not before the silence allowed (passive keepalive 10 s, a sample, the answer time)
    assert w.observe({"k": stats(rx + 32, tx, hs=1)}, (t + 1) * S, keepalives=keep) is None  # no news while it lasts
    back = w.observe({"k": stats(rx + 64, tx + 32, hs=1)}, (t + 2) * S, keepalives=keep)
    assert back is not None and back[0][0].unanswered_since_ns == 0


def test_silence_is_judged_only_with_keepalives_and_after_a_handshake():
    w = PathWatch(answer_within_s=2, full_every_s=300)
    w.observe({"k": stats(100, 100, hs=1), "c": stats(100, 100, hs=1), "n": stats(0, 0)}, 100 * S, keepalives={"k": 1, "n": 1})
    got = w.observe({"k": stats(100, 100, hs=1), "c": stats(100, 100, hs=1), "n": stats(0, 0)}, 120 * S,
                    keepalives={"k": 1, "n": 1})
    assert got is not None and {r.public_key: r.unanswered_since_ns for r in got[0]} == {"k": 100 * S}
    # "c" (an external client: no keepalive) and "n" (never a handshake) say nothing
    assert w.observe({"k": stats(100, 100, hs=1), "c": stats(100, 100, hs=1), "n": stats(0, 0)}, 121 * S,
                     keepalives={"k": 1, "n": 1}) is None


def test_a_round_trip_is_reported_when_it_moves_by_more_than_a_quarter():
    w = PathWatch(answer_within_s=2, full_every_s=300)
    w.observe({"k": stats(100, 100, hs=1)}, 0)
    got = w.observe({"k": stats(100, 100, hs=1)}, 1 * S, rtts={"k": 1000})
    assert got is not None and got[0][0].rtt_us == 1000
    assert w.observe({"k": stats(100, 100, hs=1)}, 2 * S, rtts={"k": 1200}) is None  # +20%: no news
    moved = w.observe({"k": stats(100, 100, hs=1)}, 3 * S, rtts={"k": 1300})
    assert moved is not None and moved[0][0].rtt_us == 1300
    gone = w.observe({"k": stats(100, 100, hs=1)}, 4 * S, rtts={})
    assert gone is not None and gone[0][0].rtt_us == 0
