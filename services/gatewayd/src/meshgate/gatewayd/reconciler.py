"""The reconciler: observe the kernel, ``plan``, and carry the plan out.

Two paths:
- **full** (on start, after any failure, on every periodic resync): every subsystem
  is read back from the kernel, so drift (a flushed ruleset, a removed peer, a
  deleted route, a dead wireguard-go) is found and repaired;
- **delta** (a new desired state while the last apply succeeded): the plan is made
  against what the last apply left in the kernel, which costs no reads, so one
  changed peer is one UAPI ``set`` of that peer.  The next full pass checks it.

Appliers run in a fixed order: sysctls, WireGuard (interface, device, peers), link and
addresses, routes and rules (they need the link up), then the nftables table.  A
failure stops the pass and forgets what was applied, so the retry is a full pass.

Ownership: gatewayd manages only an interface it created (``interfaces.json`` in the
state directory records each one right before creating it).  When the interface a
state names exists but is not recorded (an operator's ``wg0``, another tool's, one in
another namespace answering on the same UAPI socket path), the pass fails with
``ForeignInterface`` before anything changes, and is retried with backoff like any
failed apply.  A state directory from before the record adopts the interface of its
last applied state (``desired.pb``), which that gatewayd did manage.

Node key rotation: a desired state whose ``interface.public_key`` names the pending
key (``keys.NodeKeys``) promotes it at the start of the pass that applies it; the plan
then sees a private-key change and sets it in the same UAPI/netlink transaction as the
rest of the WireGuard changes.  Setting a private key makes WireGuard drop its current
sessions, so right after it every peer is sent a keepalive, which starts a handshake
with the new key at once instead of on the next packet (or after the peer's 5 s
retry).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.common import metrics
from meshgate.gatewayd import handoff, routing, sysctl
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.errors import ApplyError, FieldViolation, ForeignInterface, InvalidDesiredState
from meshgate.gatewayd.keys import NodeKeys
from meshgate.gatewayd.model import Desired, HandoffSpec, Observed, compile_desired, expected_observed
from meshgate.gatewayd.nftables import NftTables
from meshgate.gatewayd.nftrules import Table, handoff_device
from meshgate.gatewayd.planner import Plan, plan
from meshgate.gatewayd.store import StateStore
from meshgate.gatewayd.wireguard import Backend, choose_backend

log = logging.getLogger(__name__)
_POOL: ThreadPoolExecutor | None = None


def _observed_handoff(ho: handoff.Observed, desired: Desired) -> HandoffSpec | None:
    """The late-reply link and copying as the planner compares them: the link as
    found, with the desired copies when the copy table holds exactly them."""
    if ho.foreign:
        # someone else's link of that name: nothing of ours to compare (applying
        # a wanted link fails there, and says so)
        return None if desired.handoff is None else HandoffSpec("", "", frozenset(), 0)
    if ho.link is None and ho.copies_digest is None:
        return None
    link = ho.link or HandoffSpec(handoff_device(desired.interface), "", frozenset(), 0)
    want = desired.handoff
    same = want is not None and ho.copies_digest == handoff.copy_table(want, desired.interface)[1]
    return replace(link, copies=want.copies if same and want is not None else ((("?",), (), ""),))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=5, thread_name_prefix="observe")
    return _POOL


@dataclass(frozen=True)
class Result:
    plan: Plan
    full: bool
    seconds: float


class Reconciler:
    def __init__(self, settings: Settings, backend: Backend, store: StateStore,
                 nft: NftTables | None = None):
        self.settings = settings
        self.backend = backend
        self.store = store
        self.nft = nft or NftTables(store.nft_cache)
        self.keys = NodeKeys(store.dir)
        self.applied: Desired | None = None
        """What the last successful pass left in the kernel; None forces a full pass."""
        self.lock = threading.Lock()
        """Held by a pass; the drift watcher holds it to compare the kernel with ``applied``."""
        self.passes = 0
        """Passes run (successful or not), so the drift watcher knows a repair ran."""
        self.interface: str | None = None
        """The interface of the pass running or the last one, set before any change
        (``applied`` is None while a pass makes its changes): the drift watcher's
        netlink filter, which must not drop an event then."""
        if store.created_interfaces() is None:
            last = store.load_desired()
            store._save_interfaces({last.interface.name or settings.default_interface} if last else set())

    @classmethod
    def for_host(cls, settings: Settings) -> Reconciler:
        store = StateStore(settings.state_dir)
        backend = choose_backend(settings.backend, settings.state_dir, settings.wireguard_go,
                                 settings.wireguard_go_log_level)
        return cls(settings, backend, store)

    @property
    def public_key(self) -> str:
        """The public half of the key the interface uses now."""
        return self.keys.current.public

    def own_key(self, msg: pb.DesiredState, restoring: bool = False) -> str:
        """The public key the interface must use for ``msg``: ``interface.public_key``
        when set (the current key, or the pending one during a rotation), else the
        current key.  A key this node does not hold is an invalid state, except in
        the state restored from disk (a crash during a switch): the current key."""
        want = msg.interface.public_key
        if not want or self.keys.holds(want):
            return want or self.keys.current.public
        if restoring:
            log.warning("the state on disk names key %s, which this node no longer holds; "
                        "using the current key %s", want, self.keys.current.public)
            return self.keys.current.public
        pending = self.keys.pending
        raise InvalidDesiredState([FieldViolation(
            "interface.public_key",
            f"names {want}, a key this node does not hold (current {self.keys.current.public}"
            + (f", pending {pending.public}" if pending else ", none pending") + ")")])

    def compile(self, msg: pb.DesiredState, restoring: bool = False) -> Desired:
        """Validate and expand a desired state against this host (raises InvalidDesiredState)."""
        return compile_desired(msg, settings=self.settings, public_key=self.own_key(msg, restoring),
                               host_links=routing.link_names())

    def observe(self, desired: Desired) -> Observed:
        """Read every subsystem back from the kernel.  The reads are independent
        (separate processes and sockets), so they run side by side."""
        s = self.settings
        pool = _pool()
        dev = pool.submit(self.backend.observe, desired.interface)
        link = pool.submit(routing.observe_link, desired.interface)
        routes = pool.submit(routing.observe_routes, s.route_table, s.route_protocol)
        rules = pool.submit(routing.observe_rules, s.route_protocol)
        nft = pool.submit(self.nft.observe)
        ho = pool.submit(handoff.observe, handoff_device(desired.interface), s.handoff_table,
                         desired.handoff is not None)
        found = dev.result()
        return Observed(
            device=found[0] if found else None,
            link=link.result(),
            routes=routes.result(),
            rules=rules.result(),
            nft_digest=nft.result(),
            sysctls=sysctl.read(desired.sysctls),
            handoff=_observed_handoff(ho.result(), desired),
        )

    def reconcile(self, desired: Desired, full: bool = True) -> Result:
        # one pass at a time, and never beside a check of the drift watcher (drift.py)
        with self.lock:
            try:
                return self._reconcile(desired, full)
            finally:
                self.passes += 1

    def _reconcile(self, desired: Desired, full: bool) -> Result:
        t0 = time.perf_counter()
        if desired.public_key != self.keys.current.public and not self.keys.promote(desired.public_key):
            # compiled while that key was held; it is no longer (another switch came first)
            raise ApplyError("keys", f"key {desired.public_key} is neither current nor pending")
        owned = self.store.created_interfaces() or set()
        if desired.interface not in owned and self.interface_exists(desired.interface):
            self.applied = None
            raise ForeignInterface(desired.interface)
        self.interface = desired.interface
        retired = None
        for old in sorted(owned - {desired.interface}):
            # removed first: the new interface may need the old one's listen port
            log.info("interface renamed from %s to %s; removing %s", old, desired.interface, old)
            self.applied = None
            self.backend.destroy(old)
            self.store.forget_created(old)
            retired = old
        previous = self.applied
        if full or previous is None or previous.interface != desired.interface:
            observed = self.observe(desired)
            full = True
        else:
            observed = expected_observed(previous)
        p = plan(desired, observed)
        # the table known to be live: what the last apply loaded, if nothing changed it since
        live_nft = previous.nft if previous is not None and observed.nft_digest == previous.nft.digest else None
        if not p.empty:
            self.applied = None
            try:
                self._apply(p, desired, live_nft)
            except ApplyError:
                raise
            except OSError as e:
                raise ApplyError("host", str(e)) from None
        self.applied = desired
        if retired:
            p = replace(p, retired_interface=retired)
        return Result(p, full, time.perf_counter() - t0)

    def _apply(self, p: Plan, desired: Desired, live_nft: Table | None = None) -> None:
        s = self.settings
        lap = metrics.gatewayd.laps()  # apply duration by subsystem
        if p.sysctls:
            sysctl.write(p.sysctls)
            lap("sysctl")
        if p.create_interface:
            if p.interface not in (self.store.created_interfaces() or set()):
                if self.interface_exists(p.interface):  # appeared since the check
                    raise ForeignInterface(p.interface)
                self.store.record_created(p.interface)
            self.backend.create(p.interface)
        if p.device is not None or p.peers:
            self.backend.configure(p.interface, self.keys.current.private, p.device, p.peers)
            if p.device is not None and p.device.replaces_key:
                # the new key dropped every session: handshake now, not on the next packet
                kick = getattr(self.backend, "kick", None)
                if kick is not None and desired.peers:
                    kick(p.interface, {k: spec.keepalive for k, spec in desired.peers.items()})
        if p.create_interface or p.device is not None or p.peers:
            lap("wireguard")
        if p.touches_links():
            routing.apply(p, s.route_table, s.route_protocol)
            lap("routing")
        if p.handoff_change:
            # before the table, whose copies name the link (and after the rules)
            handoff.apply(p.handoff, handoff.observe(handoff_device(p.interface), s.handoff_table),
                          p.interface, s.handoff_table, s.route_protocol)
            lap("handoff")
        if p.nft is not None:
            self.nft.load(p.nft, live_nft)
            lap("nftables")

    def interface_exists(self, ifname: str) -> bool:
        """A link of that name in this namespace, or a WireGuard device answering
        for it (wireguard-go's UAPI socket path is shared by every namespace)."""
        return routing.observe_link(ifname) is not None or self.backend.observe(ifname) is not None

    def owns(self, ifname: str) -> bool:
        return ifname in (self.store.created_interfaces() or set())

    def alive(self) -> bool:
        return self.applied is None or self.backend.alive(self.applied.interface)

    def peer_stats(self) -> dict[str, Any]:
        """Per-peer counters of the applied interface (public key -> PeerStats); empty
        before the first apply or when the interface is gone."""
        if self.applied is None:
            return {}
        found = self.backend.observe(self.applied.interface)
        return dict(found[1]) if found else {}

    def show(self, ifname: str) -> dict[str, Any]:
        """The observed state as JSON-ready data, without key material."""
        s = self.settings
        found = self.backend.observe(ifname)
        link = routing.observe_link(ifname)
        out: dict[str, Any] = {
            "backend": self.backend.name,
            "interface": ifname,
            "public_key": self.public_key,
            "pending_public_key": self.keys.pending.public if self.keys.pending else None,
            "exists": found is not None,
            "link": None if link is None else {
                "mtu": link.mtu, "up": link.up, "addresses": sorted(link.addresses)},
            "routes": sorted(f"{r.dst} metric {r.metric}" for r in
                             routing.observe_routes(s.route_table, s.route_protocol)),
            "rules": sorted(str(r) for r in routing.observe_rules(s.route_protocol)),
            "nft_table": self.nft.listing(),
        }
        if found:
            dev, stats = found
            out["device"] = {"public_key": dev.public_key, "listen_port": dev.listen_port,
                             "fwmark": dev.fwmark}
            out["peers"] = {
                k: {
                    "allowed_ips": sorted(p.allowed_ips),
                    "endpoint": p.endpoint,
                    "keepalive": p.keepalive,
                    "preshared_key": p.preshared_key is not None,
                    "last_handshake_sec": stats[k].last_handshake_sec,
                    "rx_bytes": stats[k].rx_bytes,
                    "tx_bytes": stats[k].tx_bytes,
                } for k, p in dev.peers.items()
            }
        return out

    def down(self, ifname: str) -> bool:
        """Remove everything gatewayd owns on this host (keeps the key and nothing else).
        False when ``ifname`` is not gatewayd's: it is left alone."""
        s = self.settings
        self.nft.delete()
        routing.remove_owned(s.route_table, s.route_protocol)
        handoff.apply(None, handoff.observe(handoff_device(ifname), s.handoff_table), ifname,
                      s.handoff_table, s.route_protocol)
        ours = self.owns(ifname)
        if ours:
            self.backend.destroy(ifname)
            self.store.forget_created(ifname)
        self.store.clear_desired()
        self.applied = None
        self.interface = None
        return ours
