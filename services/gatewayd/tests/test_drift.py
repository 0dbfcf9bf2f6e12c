"""The drift watcher's pure parts (drift.py): the repair rate limit, the reading of
nftables events and which rtnetlink events concern gatewayd's own objects.  The
watcher at work, with a real kernel, is test_system_drift.py."""

from __future__ import annotations

import struct

from meshgate.gatewayd.drift import (
    LINK,
    ROUTES,
    RULES,
    WIREGUARD,
    NftEvent,
    NftTransactions,
    TokenBucket,
    parse_nfnl,
    rtnl_subsystems,
    without_roaming,
)
from meshgate.gatewayd.model import ObservedDevice, PeerSpec


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_one_per_refill():
    clock = Clock()
    b = TokenBucket(3, 2.0, clock)
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    assert b.wait_s() == 2.0 and not b.full()
    clock.now += 1.0
    assert not b.take() and b.wait_s() == 1.0
    clock.now += 1.0
    assert b.take() and not b.take()
    clock.now += 60
    assert b.full() and b.take()  # never more than the burst, however long the quiet


def _attr(kind: int, value: bytes) -> bytes:
    body = struct.pack("=HH", 4 + len(value), kind) + value
    return body + b"\0" * ((4 - len(body) % 4) % 4)


def _msg(kind: int, family: int, attrs: bytes) -> bytes:
    payload = bytes([family, 0]) + struct.pack(">H", 0) + attrs
    return struct.pack("=IHHII", 16 + len(payload), (10 << 8) | kind, 0, 0, 0) + payload


def test_nftables_events_are_read_per_transaction_and_own_ones_skipped():
    flush = (_msg(2, 1, _attr(1, b"meshgate\0")) + _msg(2, 2, _attr(1, b"foreign\0"))
             + _msg(15, 0, _attr(1, struct.pack(">I", 7)) + _attr(2, struct.pack(">I", 4242)) + _attr(3, b"nft\0")))
    events = parse_nfnl(flush)
    assert events == [NftEvent(2, 1, table="meshgate"), NftEvent(2, 2, table="foreign"), NftEvent(15, 0, pid=4242)]
    assert NftTransactions(own_pid=1).feed(events)  # another process deleted our table
    assert not NftTransactions(own_pid=4242).feed(events)  # our own load
    other = _msg(6, 1, _attr(1, b"foreign\0")) + _msg(15, 0, _attr(2, struct.pack(">I", 9)))
    assert not NftTransactions(own_pid=1).feed(parse_nfnl(other))  # someone else's table
    assert parse_nfnl(b"\x01\x02") == []  # a truncated datagram is no event


class Msg(dict):
    def __init__(self, event: str, attrs: dict | None = None, **fields):
        super().__init__(event=event, **fields)
        self.attrs = attrs or {}

    def get_attr(self, name):
        return self.attrs.get(name)


def test_only_events_of_gatewayd_s_own_objects_count():
    def of(msg):
        return rtnl_subsystems(msg, "mg0", 7, table=51821, protocol=77)

    assert of(Msg("RTM_NEWLINK", {"IFLA_IFNAME": "mg0"}, index=7)) == {LINK, ROUTES, RULES}
    assert WIREGUARD in of(Msg("RTM_DELLINK", {"IFLA_IFNAME": "mg0"}, index=7))
    assert of(Msg("RTM_NEWLINK", {"IFLA_IFNAME": "eth0"}, index=2)) == set()
    assert of(Msg("RTM_DELADDR", index=7)) == {LINK}
    assert of(Msg("RTM_DELADDR", index=2)) == set()
    assert of(Msg("RTM_DELROUTE", {"RTA_TABLE": 51821}, proto=77)) == {ROUTES}
    assert of(Msg("RTM_DELROUTE", {"RTA_TABLE": 51821}, proto=4)) == set()  # our table, not our protocol
    assert of(Msg("RTM_DELROUTE", {"RTA_TABLE": 254}, proto=77)) == set()
    assert of(Msg("RTM_DELRULE", {"FRA_PROTOCOL": 77})) == {RULES}
    assert of(Msg("RTM_NEWRULE", {"FRA_PROTOCOL": 0})) == set()


def test_an_endpoint_learnt_by_roaming_is_not_drift():
    from types import SimpleNamespace

    want = PeerSpec(public_key="k", allowed_ips=frozenset({"100.64.0.2/32"}), endpoint="203.0.113.1:51820")
    unmanaged = PeerSpec(public_key="u", allowed_ips=frozenset({"100.64.0.3/32"}))
    desired = SimpleNamespace(peers={"k": want, "u": unmanaged})
    dev = ObservedDevice("pub", 51820, 0, {
        "k": PeerSpec(public_key="k", allowed_ips=want.allowed_ips, endpoint="198.51.100.7:4000"),
        "u": PeerSpec(public_key="u", allowed_ips=unmanaged.allowed_ips, endpoint="198.51.100.8:4000")})
    seen = without_roaming(dev, desired)  # type: ignore[arg-type]
    assert seen.peers["k"] == want
    assert seen.peers["u"].endpoint == "198.51.100.8:4000"  # not managed: the planner ignores it anyway
