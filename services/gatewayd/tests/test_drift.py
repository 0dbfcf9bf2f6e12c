"""The drift watcher (drift.py): its pure parts (the repair rate limit, the reading
of nftables events and which rtnetlink events concern gatewayd's own objects), and
its loop driven against a stand-in reconciler and kernel (a route another tool
deletes).  The watcher at work, with a real kernel, is test_system_drift.py."""

from __future__ import annotations

import struct
import threading
import time
from types import SimpleNamespace

import pytest

from meshgate.common.testing import eventually
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.drift import (
    LINK,
    ROUTES,
    RULES,
    WIREGUARD,
    DriftWatcher,
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


# ---------------------------------------------------------------- the watcher's loop

DESIRED = SimpleNamespace(interface="mg0")
DELROUTE = Msg("RTM_DELROUTE", {"RTA_TABLE": 51821}, proto=77)


class Host:
    """A stand-in reconciler (what the watcher reads of it) and its kernel: one route
    of gatewayd's, which another tool may delete.  A pass runs in a thread of its
    own, as the agent's does, and like a real one sets ``applied`` to None while it
    makes its changes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.applied: SimpleNamespace | None = DESIRED
        self.interface: str | None = "mg0"
        self.passes = 0
        self.route = False
        self.strike_during_pass = False
        """The other tool deletes the route the next pass adds, before that pass ends."""
        self.watcher: DriftWatcher | None = None

    def check(self, suspects) -> list[str] | None:  # DriftWatcher.check, against this kernel
        with self.lock:
            if self.applied is None:
                return None
            return [] if ROUTES not in suspects or self.route else ["add route 198.51.100.0/24 metric 0"]

    def repair(self, changes: list[str]) -> None:  # the agent's on_drift: a full pass, soon
        threading.Thread(target=self._pass).start()

    def _pass(self) -> None:
        assert self.watcher is not None
        with self.lock:
            self.interface = DESIRED.interface
            self.applied = None
            self.route = True
            if self.strike_during_pass:
                self.strike_during_pass = False
                self.delete_route()  # its event is read while applied is None
            self.applied = DESIRED
            self.passes += 1

    def delete_route(self) -> None:
        assert self.watcher is not None
        self.route = False
        self.watcher.on_rtnl([DELROUTE])  # what the netlink thread reads


class OffsetClock:
    """The monotonic clock, which a test can move ahead."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def _watch(host: Host, settings: Settings, clock=time.monotonic) -> DriftWatcher:
    w = DriftWatcher(host, settings, on_drift=host.repair, clock=clock)  # type: ignore[arg-type]
    w.check = host.check  # type: ignore[method-assign]
    host.watcher = w
    t = threading.Thread(target=w._work, name="drift-check", daemon=True)  # the loop only, no sockets
    t.start()
    w._threads.append(t)
    return w


@pytest.fixture
def host():
    h = Host()
    yield h
    if h.watcher is not None:
        h.watcher.stop()


def test_a_route_deleted_while_the_repair_pass_runs_is_repaired_too(host: Host):
    # the other tool deletes the route right after the repair pass added it, before
    # the pass ends (applied is None then): that event is the last one, so a watcher
    # that dropped it would leave the route deleted until the periodic pass
    w = _watch(host, Settings(drift_burst=5, drift_refill=2.0))
    host.strike_during_pass = True
    w.poke({ROUTES})
    eventually(lambda: host.route and w.status()["repairs"] == 2 and host.passes == 2,
               "the route repaired again after the pass", timeout=30)


def test_a_repair_held_by_the_rate_limit_runs_when_a_token_is_back(host: Host):
    clock = OffsetClock()
    w = _watch(host, Settings(drift_burst=1, drift_refill=60.0), clock)
    w.poke({ROUTES})
    eventually(lambda: host.route and host.passes == 1, "the first repair", timeout=30)
    host.delete_route()  # again, and then never again: no further event
    eventually(lambda: w.status()["held_back"] == 1, "the drift held back", timeout=30)
    st = w.status()
    assert st["fighting"] and st["repairs"] == 1 and not host.route
    clock.offset += 60  # the token is back; nothing else happens
    eventually(lambda: host.route and w.status()["repairs"] == 2, "the held repair", timeout=30)
    clock.offset += 60  # and the bucket full again: the fight is over
    eventually(lambda: not w.status()["fighting"], "the end of the fight", timeout=30)
    assert w.status()["fights"] == 1
