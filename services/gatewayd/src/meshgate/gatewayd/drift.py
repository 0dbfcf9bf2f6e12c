"""The drift watcher: gatewayd notices within moments when something changes what it
owns, and has the agent repair it (an adapter; the agent starts it).

What it watches, in the agent's network namespace:
- **rtnetlink** (a netlink socket bound to the link, address, route and rule groups,
  IPv4 and IPv6, its messages parsed by pyroute2's rtnetlink marshal): events of gatewayd's interface, of addresses on it, of
  routes in its table with its protocol id, of rules with its protocol id.  Every
  other object's events are ignored, so foreign routes, rules and links never cause
  any work, let alone a change;
- **nfnetlink** (the ``NFNLGRP_NFTABLES`` group on a raw netlink socket, what ``nft
  monitor`` listens to): a transaction that touches ``table inet meshgate`` (a
  flushed ruleset deletes it), unless it is gatewayd's own (the kernel names the
  process of each transaction; libnftables runs inside gatewayd);
- **the WireGuard device**, read every ``drift_poll_interval`` (one UAPI ``get`` or
  netlink dump: there is no event for a peer removed with ``wg set``).

An event only makes the watcher *check*: under the reconciler's lock (never during a
pass), it reads back the suspected subsystems and plans the last applied state
against them (``planner.plan``, the rest taken as the last pass left it).  An empty
plan is no drift, which is why gatewayd's own writes cannot loop: their events are
checked against the state they just applied and match it.  A non-empty plan is drift:
the agent runs a full pass at once, and the watcher waits for that pass before it
checks again.  An endpoint that WireGuard learnt from a roaming peer is not drift
here (the periodic full pass still sets configured endpoints).

Rate limit: repairs take a token from a bucket of ``drift_burst`` tokens that regains
one every ``drift_refill`` seconds.  Drift found with no token left is a *fight*
(another tool keeps undoing gatewayd's changes): it is logged, shown in the status
(``drift.fighting``, and through the agent's acks in the control plane's network
status), and repaired only as tokens come back, so a fight costs one full pass per
``drift_refill`` seconds, never a spinning CPU.  The fight ends once the bucket is full
again (no drift for ``drift_burst * drift_refill`` seconds).  Checks are limited too
(ten back to back, then five a second), so a flood of events in gatewayd's own table
that changes nothing costs little.

The periodic full pass stays the safety net (for sysctls, and for whatever an event
could not say).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from meshgate.gatewayd import routing
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.model import Desired, ObservedDevice, expected_observed
from meshgate.gatewayd.nftrules import TABLE
from meshgate.gatewayd.planner import PeerOp, plan
from meshgate.gatewayd.reconciler import Reconciler

log = logging.getLogger(__name__)

WIREGUARD, LINK, ROUTES, RULES, NFTABLES = "wireguard", "link", "routes", "rules", "nftables"
EVERYTHING = frozenset({WIREGUARD, LINK, ROUTES, RULES, NFTABLES})
DEBOUNCE_S = 0.05
"""After a first event, how long to gather more before checking (a pass of another
tool is many events)."""
MAX_CHANGES = 16
"""The most drift lines kept in the status."""


class TokenBucket:
    """``capacity`` tokens, one regained every ``refill_s`` seconds."""

    def __init__(self, capacity: int, refill_s: float, clock: Callable[[], float] = time.monotonic):
        self.capacity, self.refill_s, self.clock = capacity, refill_s, clock
        self._tokens = float(capacity)
        self._at = clock()

    def _update(self) -> None:
        now = self.clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) / self.refill_s)
        self._at = now

    def available(self) -> bool:
        self._update()
        return self._tokens >= 1

    def take(self) -> bool:
        self._update()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def full(self) -> bool:
        self._update()
        return self._tokens >= self.capacity

    def wait_s(self) -> float:
        """Seconds until a token is there (0 if one is)."""
        self._update()
        return max(0.0, (1 - self._tokens) * self.refill_s)


# ---------------------------------------------------------------- event filters (pure)


def rtnl_subsystems(msg: Any, ifname: str, ifindex: int | None, table: int, protocol: int) -> frozenset[str]:
    """What a pyroute2 rtnetlink message may have changed of gatewayd's own objects;
    empty for anyone else's."""
    event = msg.get("event") or ""
    if event in ("RTM_NEWLINK", "RTM_DELLINK"):
        if msg.get_attr("IFLA_IFNAME") == ifname or (ifindex is not None and msg.get("index") == ifindex):
            # a link down or deleted takes its routes with it, and a deleted one its device
            return frozenset({LINK, ROUTES, RULES} | ({WIREGUARD} if event == "RTM_DELLINK" else set()))
        return frozenset()
    if event in ("RTM_NEWADDR", "RTM_DELADDR"):
        return frozenset({LINK}) if ifindex is not None and msg.get("index") == ifindex else frozenset()
    if event in ("RTM_NEWROUTE", "RTM_DELROUTE"):
        t = msg.get_attr("RTA_TABLE") or msg.get("table")
        return frozenset({ROUTES}) if t == table and msg.get("proto") == protocol else frozenset()
    if event in ("RTM_NEWRULE", "RTM_DELRULE"):
        return frozenset({RULES}) if msg.get_attr("FRA_PROTOCOL") == protocol else frozenset()
    return frozenset()


NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFPROTO_INET = 1
NFNLGRP_NFTABLES = 7
NETLINK_NETFILTER = 12
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1


@dataclasses.dataclass(frozen=True)
class NftEvent:
    """One nfnetlink message of the nftables subsystem."""

    kind: int
    """``NFT_MSG_*``: 0 new table, 2 delete table, 6 new rule, ..., 15 new generation."""
    family: int
    table: str | None = None
    """For an object message: the table it belongs to (attribute 1 of every kind)."""
    pid: int | None = None
    """For a new generation (the end of a transaction): the process that made it."""


def parse_nfnl(data: bytes) -> list[NftEvent]:
    """The nftables messages in one datagram of the ``NFNLGRP_NFTABLES`` group."""
    out: list[NftEvent] = []
    off = 0
    while off + 20 <= len(data):
        length, typ = struct.unpack_from("=IH", data, off)
        if length < 20 or off + length > len(data):
            break
        if typ >> 8 == NFNL_SUBSYS_NFTABLES:
            family = data[off + 16]
            attrs: dict[int, bytes] = {}
            a = off + 20
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                attrs[atype & 0x3FFF] = data[a + 4:a + alen]
                a += (alen + 3) & ~3
            kind = typ & 0xFF
            if kind == NFT_MSG_NEWGEN:
                pid = struct.unpack(">I", attrs[2])[0] if len(attrs.get(2, b"")) == 4 else None
                out.append(NftEvent(kind, family, pid=pid))
            else:
                name = attrs.get(1)
                out.append(NftEvent(kind, family, table=name.rstrip(b"\0").decode(errors="replace")
                                    if name is not None else None))
        off += (length + 3) & ~3
    return out


class NftTransactions:
    """Follows nftables events transaction by transaction: ``feed`` says whether a
    transaction just ended that touched ``table inet meshgate`` and was not made by
    ``own_pid``."""

    def __init__(self, own_pid: int):
        self.own_pid = own_pid
        self.touched = False

    def feed(self, events: Iterable[NftEvent]) -> bool:
        found = False
        for e in events:
            if e.kind == NFT_MSG_NEWGEN:
                if self.touched and e.pid != self.own_pid:
                    found = True
                self.touched = False
            elif e.family == NFPROTO_INET and e.table == TABLE:
                self.touched = True
        return found


def without_roaming(dev: ObservedDevice, desired: Desired) -> ObservedDevice:
    """``dev`` with each configured endpoint as desired: WireGuard moves a peer's
    endpoint when the peer roams, which is not drift for the watcher."""
    peers = dict(dev.peers)
    for key, have in dev.peers.items():
        want = desired.peers.get(key)
        if want is not None and want.endpoint is not None and have.endpoint != want.endpoint:
            peers[key] = dataclasses.replace(have, endpoint=want.endpoint)
    return dataclasses.replace(dev, peers=peers)


# ---------------------------------------------------------------- the watcher


class DriftWatcher:
    """Watches, checks and asks for repairs (see the module docstring).

    ``on_drift(changes)`` is called (from the watcher's threads) when a repair is
    due; ``on_status(report)`` when its status changed: a fight started or ended
    (``report``: worth telling the control plane) or a source started or stopped.
    ``status()`` is the part of the agent's status it owns."""

    def __init__(self, rec: Reconciler, settings: Settings, on_drift: Callable[[list[str]], object],
                 on_status: Callable[[bool], object] = lambda report: None, clock: Callable[[], float] = time.monotonic):
        self.rec, self.settings = rec, settings
        self.on_drift, self.on_status, self.clock = on_drift, on_status, clock
        self.repairs_bucket = TokenBucket(settings.drift_burst, settings.drift_refill, clock)
        self.checks_bucket = TokenBucket(10, 0.2, clock)
        self._cond = threading.Condition()
        self._suspects: set[str] = set()
        self._first_poke: float | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._endpoints: dict[str, str] = {}
        """Endpoints WireGuard learnt, of peers without a configured one."""
        self._restore: dict[str, str] = {}
        """Peers found removed, and the endpoint each had."""
        self._status: dict[str, Any] = {
            "watching": [], "repairs": 0, "held_back": 0, "fighting": False, "fights": 0,
            "last_drift": [], "last_drift_time": None, "checks": 0,
        }

    # -- lifecycle

    def start(self) -> None:
        for name, fn in (("drift-check", self._work), ("drift-rtnl", self._rtnl), ("drift-nft", self._nfnl)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._watching("wireguard", True)
        log.info("watching for drift (netlink, nftables, WireGuard every %.1fs); repairs: %d back to back, "
                 "then one per %.1fs", self.settings.drift_poll_interval, self.settings.drift_burst,
                 self.settings.drift_refill)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=2)
        self._threads = []

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {k: list(v) if isinstance(v, list) else v for k, v in self._status.items()}

    def poke(self, subsystems: Iterable[str]) -> None:
        """Something in ``subsystems`` may have changed: check it soon."""
        with self._cond:
            if not self._suspects:
                self._first_poke = self.clock()
            self._suspects.update(subsystems)
            self._cond.notify_all()

    def _watching(self, source: str, on: bool) -> None:
        with self._lock:
            w = [s for s in self._status["watching"] if s != source]
            self._status["watching"] = sorted(w + [source]) if on else w
        self.on_status(False)

    # -- checking

    def check(self, suspects: Iterable[str]) -> list[str] | None:
        """The changes that would bring the suspected subsystems back to the last
        applied state (empty: no drift); None when nothing is applied (a pass is due
        anyway)."""
        rec, s = self.rec, self.settings
        suspects = set(suspects)
        with rec.lock:
            applied = rec.applied
            if applied is None:
                return None
            seen: dict[str, Any] = {}
            if WIREGUARD in suspects:
                found = rec.backend.observe(applied.interface)
                seen["device"] = without_roaming(found[0], applied) if found else None
                self._learn_endpoints(applied, found[0] if found else None)
            if LINK in suspects:
                seen["link"] = routing.observe_link(applied.interface)
            if ROUTES in suspects:
                seen["routes"] = routing.observe_routes(s.route_table, s.route_protocol)
            if RULES in suspects:
                seen["rules"] = routing.observe_rules(s.route_protocol)
            if NFTABLES in suspects:
                seen["nft_digest"] = rec.nft.observe()
            observed = dataclasses.replace(expected_observed(applied), **seen)
            return plan(applied, observed).changes()

    def _learn_endpoints(self, applied: Desired, dev: ObservedDevice | None) -> None:
        """Remember the endpoints WireGuard learnt for peers without a configured one,
        and which of those peers are gone (a removed peer comes back without it)."""
        if dev is None:
            return
        if any(k not in applied.peers for k in self._endpoints):
            self._endpoints = {k: v for k, v in self._endpoints.items() if k in applied.peers}
        for key, p in dev.peers.items():
            if p.endpoint and key in applied.peers and applied.peers[key].endpoint is None:
                self._endpoints[key] = p.endpoint
        for key in applied.peers:
            if key not in dev.peers and key in self._endpoints:
                self._restore[key] = self._endpoints[key]

    def restore_endpoints(self) -> None:
        """After a repair: give each re-added peer the endpoint WireGuard had learnt
        for it and send it a keepalive, so the handshake starts now rather than when
        the peer notices its packets go unanswered (15 s or more).  The endpoint of a
        peer that has none configured is not managed by the plan, so this changes
        nothing the planner compares."""
        restore, self._restore = self._restore, {}
        rec = self.rec
        with rec.lock:
            applied = rec.applied
            found = rec.backend.observe(applied.interface) if applied is not None and restore else None
            if applied is None or found is None:
                return
            dev = found[0]
            keys = [k for k in sorted(restore) if k in dev.peers and dev.peers[k].endpoint is None
                    and k in applied.peers and applied.peers[k].endpoint is None]
            if not keys:
                return
            rec.backend.configure(applied.interface, None, None,
                                  [PeerOp("update", k, endpoint=restore[k]) for k in keys])
            rec.backend.kick(applied.interface, {k: applied.peers[k].keepalive for k in keys})
        log.info("gave %d re-added peer(s) the endpoint WireGuard had learnt and started a handshake: %s",
                 len(keys), ", ".join(f"{k[:8]}… {restore[k]}" for k in keys))

    def _work(self) -> None:
        poll = self.settings.drift_poll_interval
        next_poll = self.clock() + poll
        held: set[str] = set()  # drift found while out of repair tokens
        awaiting: tuple[int, float] | None = None  # (passes when a repair was asked, when)
        while not self._stop.is_set():
            now = self.clock()
            with self._cond:
                waits = [next_poll - now]
                if self._suspects and self._first_poke is not None:
                    waits.append(self._first_poke + DEBOUNCE_S - now)
                if held:
                    waits.append(self.repairs_bucket.wait_s())
                if self._status["fighting"]:
                    waits.append(1.0)
                if awaiting is not None:
                    waits.append(0.05)
                timeout = max(0.0, min(waits))
                if timeout > 0:
                    self._cond.wait(timeout)
                if self._stop.is_set():
                    return
                now = self.clock()
                ready = bool(self._suspects) and self._first_poke is not None \
                    and now >= self._first_poke + DEBOUNCE_S
                suspects = set(self._suspects) if ready else set()
                if ready:
                    self._suspects.clear()
                    self._first_poke = None
            if now >= next_poll:
                suspects.add(WIREGUARD)
                next_poll = now + poll
            if awaiting is not None:
                if self.rec.passes == awaiting[0] and now - awaiting[1] < 30:
                    if suspects:
                        self.poke(suspects)  # checked after the repair
                    continue
                awaiting = None
                if self._restore:
                    try:
                        self.restore_endpoints()
                    except Exception as e:  # noqa: BLE001 - the handshake then starts on its own
                        log.warning("could not restore learnt endpoints: %s", e)
            if held:
                if not self.repairs_bucket.available():
                    held |= suspects
                    continue
                suspects |= held
                held = set()
            if not suspects:
                self._maybe_end_fight(held, awaiting)
                continue
            if suspects != {WIREGUARD} and not self.checks_bucket.take():
                self.poke(suspects)
                time.sleep(self.checks_bucket.wait_s())
                continue
            try:
                changes = self.check(suspects)
            except Exception as e:  # noqa: BLE001 - the periodic pass is the safety net
                log.warning("drift check of %s failed: %s", ", ".join(sorted(suspects)), e)
                continue
            with self._lock:
                self._status["checks"] += 1
            if changes is None:
                continue  # nothing applied (the agent retries a failed pass): no verdict either way
            if not changes:
                self._maybe_end_fight(held, awaiting)
                continue
            if self.repairs_bucket.take():
                self._record_repair(changes)
                awaiting = (self.rec.passes, self.clock())
                self.on_drift(changes)
                continue
            held = suspects
            self._start_fight(changes)

    def _record_repair(self, changes: list[str]) -> None:
        # during a fight, said once when it starts (and counted in the status)
        log.log(logging.DEBUG if self._status["fighting"] else logging.WARNING,
                "drift in what gatewayd owns: %s; repairing",
                "; ".join(changes[:10]) + (" …" if len(changes) > 10 else ""))
        with self._lock:
            self._status["repairs"] += 1
            self._status["last_drift"] = changes[:MAX_CHANGES]
            self._status["last_drift_time"] = time.time()

    def _start_fight(self, changes: list[str]) -> None:
        with self._lock:
            self._status["held_back"] += 1
            self._status["last_drift"] = changes[:MAX_CHANGES]
            self._status["last_drift_time"] = time.time()
            started = not self._status["fighting"]
            if started:
                self._status["fighting"] = True
                self._status["fights"] += 1
        if started:
            log.warning("something keeps undoing gatewayd's changes (%s); repairs are held to one every %.1fs",
                        "; ".join(changes[:5]), self.settings.drift_refill)
            self.on_status(True)

    def _maybe_end_fight(self, held: set[str], awaiting: tuple[int, float] | None) -> None:
        with self._lock:
            ended = self._status["fighting"] and not held and awaiting is None and self.repairs_bucket.full()
            if ended:
                self._status["fighting"] = False
        if ended:
            log.info("no drift for %.0fs: the fight is over (%d repairs so far)",
                     self.settings.drift_burst * self.settings.drift_refill, self._status["repairs"])
            self.on_status(True)

    # -- sources

    def _current(self) -> tuple[str | None, int | None]:
        """The interface whose events count, and its index.  It is the reconciler's
        ``interface`` (the pass running or the last one), not ``applied``'s: a pass
        sets ``applied`` to None from its first change until it succeeds, and an
        event then (another tool deleting the route the pass just added) must not be
        dropped, for no other event may follow."""
        ifname = self.rec.interface
        if ifname is None:
            return None, None
        try:
            return ifname, socket.if_nametoindex(ifname)
        except OSError:
            return ifname, None

    def on_rtnl(self, msgs: Iterable[Any]) -> None:
        """Poke for the rtnetlink messages (one datagram) that concern gatewayd's own
        objects."""
        ifname, ifindex = self._current()
        if ifname is None:
            return  # no pass yet: the first one reads everything anyway
        s = self.settings
        found: set[str] = set()
        for msg in msgs:
            found |= rtnl_subsystems(msg, ifname, ifindex, s.route_table, s.route_protocol)
        if found:
            self.poke(found)

    def _rtnl(self) -> None:
        # A netlink socket of our own, subscribed to the groups, read with recv and
        # parsed by pyroute2's rtnetlink marshal: IPRoute.get() reads through an event
        # loop that may drain the socket ahead of what it returns, so a select on its
        # descriptor can miss events that are already in.
        try:
            from pyroute2.netlink import rtnl
            from pyroute2.netlink.rtnl.marshal import MarshalRtnl
        except ImportError as e:
            log.warning("no netlink monitor (%s): links, addresses, routes and rules heal on the periodic pass", e)
            return
        groups = (rtnl.RTMGRP_LINK | rtnl.RTMGRP_IPV4_IFADDR | rtnl.RTMGRP_IPV6_IFADDR | rtnl.RTMGRP_IPV4_ROUTE
                  | rtnl.RTMGRP_IPV6_ROUTE | rtnl.RTMGRP_IPV4_RULE | rtnl.RTMGRP_IPV6_RULE)
        while not self._stop.is_set():
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.bind((0, groups))
                sock.settimeout(0.5)
            except OSError as e:
                log.warning("cannot open the netlink monitor: %s; retrying", e)
                self._stop.wait(5)
                continue
            marshal = MarshalRtnl()
            self._watching("netlink", True)
            try:
                while not self._stop.is_set():
                    try:
                        data = sock.recv(1 << 16)
                    except TimeoutError:
                        continue
                    except OSError as e:  # ENOBUFS after a flood: events were lost
                        log.info("netlink events lost (%s); checking everything", e)
                        self.poke(EVERYTHING - {NFTABLES})
                        continue
                    self.on_rtnl(marshal.parse(data))
            except Exception as e:  # noqa: BLE001 - a message pyroute2 cannot parse: check everything, reopen
                log.warning("netlink monitor: %s; checking everything and reopening", e)
                self.poke(EVERYTHING - {NFTABLES})
            finally:
                self._watching("netlink", False)
                sock.close()

    def _nfnl(self) -> None:
        txns = NftTransactions(os.getpid())
        while not self._stop.is_set():
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.bind((0, 0))
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
                sock.settimeout(0.5)
            except OSError as e:
                log.warning("cannot listen to nftables events: %s; table inet meshgate heals on the periodic pass", e)
                self._stop.wait(30)
                continue
            self._watching("nftables", True)
            try:
                while not self._stop.is_set():
                    try:
                        data = sock.recv(1 << 16)
                    except TimeoutError:
                        continue
                    except OSError as e:  # ENOBUFS: events were lost
                        log.info("nftables events lost (%s); checking the table", e)
                        txns.touched = False
                        self.poke({NFTABLES})
                        continue
                    if txns.feed(parse_nfnl(data)):
                        self.poke({NFTABLES})
            finally:
                self._watching("nftables", False)
                sock.close()

