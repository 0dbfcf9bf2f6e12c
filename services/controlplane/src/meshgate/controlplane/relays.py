"""Path health records, relay decisions and learned endpoints (the I/O half of
paths.py, which says what they mean).

- `report()`: a node's agent sent `Health` on the stream this replica holds:
  the peers it names (node peers only; external clients are sync.py's) are
  merged into `pathHealth/{net}/{node}` (JSON, peer id -> handshake, endpoint,
  unanswered since, configured at), written only when that changed (counters
  are not kept), through the fan-out's batched status writer.
- `Relays` runs on every replica, like liveness.py: once a second, and on
  every change of those records, it works out each pair's direct state and
  writes `pathRoutes/{net}/{a}~{b}` when a pair must move: to the best relay
  once its direct path has been unhealthy for the path delay
  (`--path-delay`), back to direct once it has been up for the recovery delay
  (`--path-recover-after`), doubled for every move of the pair in the last ten
  minutes (at most 32 times), so an unstable link settles on the relay instead
  of flapping. A record is `{"relay": id or "", "moves": [ns, ...]}`; a
  switch of a relayed pair to a closer relay is no flap and is not counted.
- It also writes `learnedEndpoints/{net}/{node}` for nodes without an endpoint
  of their own: the endpoint a node with one (a relay, a gateway) hears them
  from, while it has a live session with them.
- A deleted node's records (its path health, learned endpoint and the marks of
  its pairs) are deleted with it.

Writes compare the mod revision the cache holds for the key, so replicas that
decide the same move write it once; the others' compare fails and they see the
move through the watch. "Up since" is this replica's own observation (a
replica that starts later waits the recovery delay again, which only delays a
move back).

Hazard: agents stamp their reports with their own clocks; a node whose clock
is off by more than the path delay can look unhealthy or healthy for that
long. The best relay (paths.choose_relay) is the one both sides report up,
then the closest (the sum of the round-trip times both sides' agents measure
to it over the overlay, `rtt_us` in their reports), then the one relaying the
fewest pairs, then by name. A relayed pair moves to another relay only when
that one is healthier, or clearly closer (under 70% of the current round trip
and at least 10 ms less), so small changes never move pairs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from meshgate.api.v1 import network_pb2
from meshgate.common.etcd import Etcd
from meshgate.controlplane import compiler, paths
from meshgate.controlplane.cache import Change, StateCache

log = logging.getLogger(__name__)

TICK_S = 1.0
HISTORY_NS = 600 * 10**9  # moves counted for the recovery delay's doubling
MAX_DOUBLINGS = 5
MAX_UNREACHABLE = 64
RECHOOSE_S = 10.0  # how often a relayed pair's relay is reconsidered (closer, healthier)
STATE_WORDS: dict[int, str] = {network_pb2.PATH_UP: "up", network_pb2.PATH_NEVER_CONNECTED: "never connected",
               network_pb2.PATH_STALE: "stale"}


def _ns(ts) -> int:
    return ts.ToNanoseconds() if ts.seconds or ts.nanos else 0


def merge_report(old: dict[str, dict], health, peers_by_key: dict[str, str]) -> dict[str, dict]:
    """The node's record after `health` (agent_pb2.SyncRequest.Health):
    `peers_by_key` maps the public keys of its node peers to node ids."""
    out = {} if health.complete else dict(old)
    for p in health.peers:
        pid = peers_by_key.get(p.public_key)
        if pid is None:
            continue
        out[pid] = {"handshake_ns": _ns(p.latest_handshake_time), "endpoint": p.endpoint,
                    "unanswered_ns": _ns(p.unanswered_since_time), "configure_ns": _ns(p.configure_time)}
        if p.rtt_us:
            out[pid]["rtt_us"] = p.rtt_us
    keep = set(peers_by_key.values())
    return {k: v for k, v in sorted(out.items()) if k in keep}


class Relays:
    """See the module docstring."""

    def __init__(self, etcd: Etcd, cache: StateCache, status_writer: Any = None,
                 delay_s: float = paths.DEFAULT_DELAY_S, recover_s: float = paths.DEFAULT_RECOVER_S) -> None:
        self.etcd = etcd
        self.cache = cache
        self.writer = status_writer  # sync.StatusWriter: batched, coalesced puts
        self.delay_s = delay_s
        self.recover_s = recover_s
        self.t = etcd.txn_ops
        self._sent: dict[bytes, dict] = {}  # what this replica last wrote per node record
        self._up_since: dict[tuple[str, str], float] = {}  # (net, pair) -> monotonic time seen up
        # (net, pair) -> when a relayed pair's relay may next be reconsidered (RECHOOSE_S)
        self._rechoose_at: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task | None = None
        self._kick = asyncio.Event()
        self.moves = 0  # marks this replica wrote
        self._forgetting: set[asyncio.Task] = set()

    # reports ------------------------------------------------------------

    def report(self, session, health) -> None:
        """Keep what `session`'s agent says of its node peers (see merge_report)."""
        if session.sent is None or self.writer is None:
            return
        _, net, _, nid = session.node.split("/")
        by_key = {p.public_key: p.resource.rsplit("/", 1)[1] for p in session.sent.peers if "/nodes/" in p.resource}
        key = self.etcd.key("pathHealth", net, nid)
        old = self._sent.get(key)
        if old is None:
            old = self.cache.path_health.get(net, {}).get(session.node, {})
        rec = merge_report(old, health, by_key)
        if rec == old and key in self._sent:
            return
        self._sent[key] = rec
        self.writer.put(key, rec)

    # lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self.cache.listeners.append(self.on_change)
        self._task = asyncio.create_task(self._run(), name="relays")

    async def stop(self) -> None:
        if self.on_change in self.cache.listeners:
            self.cache.listeners.remove(self.on_change)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001 - cancelled
                pass

    async def on_change(self, change: Change) -> None:
        if change.paths:
            self._kick.set()
        if change.deleted_nodes:
            task = asyncio.get_running_loop().create_task(self._forget(set(change.deleted_nodes)))
            self._forgetting.add(task)
            task.add_done_callback(self._forgetting.discard)

    async def _forget(self, nodes: set[str]) -> None:
        """A deleted node's records go with it: its path health, its learned
        endpoint and the marks of its pairs (every replica deletes them; a
        delete of what is gone is harmless)."""
        t = self.t
        ops = []
        for name in nodes:
            _, net, _, nid = name.split("/")
            ops += [t.delete(self.etcd.key("pathHealth", net, nid)), t.delete(self.etcd.key("learnedEndpoints", net, nid))]
            ops += [t.delete(self.etcd.key("pathRoutes", net, pid)) for pid in self.cache.relay_records.get(net, {})
                    if nid in pid.split("~")]
            self._sent.pop(self.etcd.key("pathHealth", net, nid), None)
            for key in [k for k in self._rechoose_at if k[0] == net and nid in k[1].split("~")]:
                del self._rechoose_at[key]
        try:
            for i in range(0, len(ops), 100):
                await self.etcd.txn([], ops[i:i + 100])
        except Exception:  # noqa: BLE001 - records of a deleted node only cost space
            log.warning("could not delete the path records of %d deleted nodes", len(nodes))

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(TICK_S):
                    await self._kick.wait()
            except TimeoutError:
                pass
            self._kick.clear()
            if not self.cache.ready.is_set():
                continue
            try:
                await self.evaluate()
            except Exception:  # noqa: BLE001 - retried on the next tick
                log.exception("evaluating relays failed; retrying")

    # decisions -----------------------------------------------------------

    def seen(self, net_id: str, a: str, b: str) -> tuple[paths.PeerSeen | None, paths.PeerSeen | None]:
        recs = self.cache.path_health.get(net_id, {})
        ai, bi = a.rsplit("/", 1)[1], b.rsplit("/", 1)[1]
        return paths.PeerSeen.of(recs.get(a, {}).get(bi)), paths.PeerSeen.of(recs.get(b, {}).get(ai))

    def direct(self, st: compiler.NetworkState, a: str, b: str, now_ns: int) -> paths.Direct:
        net_id = st.network.name.split("/")[1]
        sa, sb = self.seen(net_id, a, b)
        return paths.direct_state(sa, sb, now_ns, self.delay_s)

    async def evaluate(self) -> None:
        now_ns, mono = time.time_ns(), time.monotonic()
        for net_id, st in list(self.cache.networks.items()):
            relays = paths.relays(st)
            recs = self.cache.path_health.get(net_id, {})
            await self._learn(net_id, st, recs)
            if not relays:
                continue
            candidates = self._pairs(net_id, st, recs)
            if not candidates:
                continue
            index = compiler.PeerIndex(st)
            for a, b in sorted(candidates):
                await self._decide(net_id, st, index, relays, a, b, now_ns, mono)

    def _pairs(self, net_id: str, st: compiler.NetworkState, recs: dict) -> set[tuple[str, str]]:
        """Pairs that may have to move, in the size of the reports (never all
        pairs): marked ones; direct ones a report says are not plainly up; and
        pairs without endpoints (relayed by default) whose direct entry has had
        a handshake, or all of them where there are several relays (one may be
        closer than the default)."""
        out: set[tuple[str, str]] = set()
        several = len(paths.relays(st)) > 1  # a relayed pair may move to a closer relay
        for pid in st.relay_marks:
            a, b = paths.pair_nodes(net_id, pid)
            if a in st.nodes and b in st.nodes:
                out.add((a, b))
        live = self.cache.sessions  # nodes whose agent holds a stream (on any replica)
        for node, peers in recs.items():
            if node not in st.nodes:
                continue
            for pid, rec in peers.items():
                peer = f"networks/{net_id}/nodes/{pid}"
                if peer not in st.nodes or peer not in live or node not in live:
                    continue  # an agent that is offline is not a broken path: a relay would not help
                bare = not paths.has_endpoint(st, node) and not paths.has_endpoint(st, peer)
                if (bare and (rec.get("handshake_ns") or several)) or (
                        not bare and (not rec.get("handshake_ns") or rec.get("unanswered_ns"))):
                    x, y = sorted((node, peer))
                    out.add((x, y))
        return out

    def _best(self, st, index, relays: list[str], a: str, b: str, now_ns: int, current: str = "") -> str:
        """paths.choose_relay over the relays both sides peer with: reached
        (path up), summed round trips (each side's report of the relay), load."""
        load: dict[str, int] = {}
        for mark in st.relay_marks.values():
            if mark:
                load[mark] = load.get(mark, 0) + 1
        view = paths.peer_view(index)
        peers_a, peers_b = view(a), view(b)
        net_id = st.network.name.split("/")[1]
        found = []
        for r in relays:
            if r in (a, b) or r not in peers_a or r not in peers_b:
                continue
            up = sum(1 for x in (a, b) if self.direct(st, x, r, now_ns).up)
            rtts = [seen.rtt_us if seen is not None else 0 for seen in (self.seen(net_id, a, r)[0],
                                                                           self.seen(net_id, b, r)[0])]
            rid = r.rsplit("/", 1)[1]
            found.append(paths.Candidate(r, up, sum(rtts) if all(rtts) else None,
                                         load.get(rid, 0) - (1 if r == current else 0)))
        return paths.choose_relay(found, current)

    async def _decide(self, net_id, st, index, relays, a, b, now_ns, mono) -> None:
        pid = paths.pair_id(a, b)
        current = paths.route(st, a, b, relays, paths.peer_view(index))
        d = self.direct(st, a, b, now_ns)
        key = (net_id, pid)
        if current:
            # Back only after the recovery delay without a single unanswered
            # report (stricter than "up": a short cut that never lasted the
            # path delay still restarts the wait).
            if not d.up or any(v is not None and v.unanswered_ns for v in self.seen(net_id, a, b)):
                self._up_since.pop(key, None)
                # Meanwhile, a clearly closer (or healthier) relay takes the pair
                # (looked at every RECHOOSE_S: round trips are measured every 10 s).
                if len(relays) > 1 and mono >= self._rechoose_at.get(key, 0.0):
                    self._rechoose_at[key] = mono + RECHOOSE_S
                    best = self._best(st, index, relays, a, b, now_ns, current)
                    if best and best != current:
                        rec = self.cache.relay_records.get(net_id, {}).get(pid, {})
                        await self._mark(net_id, pid, best.rsplit("/", 1)[1], rec, now_ns, flap=False,
                                         reason=f"closer or healthier than {current.rsplit('/', 1)[1]}")
                return
            since = self._up_since.setdefault(key, mono)
            rec = self.cache.relay_records.get(net_id, {}).get(pid, {})
            recent = [t for t in rec.get("moves", []) if now_ns - t < HISTORY_NS]
            wait = self.recover_s * (2 ** min(len(recent), MAX_DOUBLINGS))
            if mono - since >= wait:
                await self._mark(net_id, pid, "", rec, now_ns)
            return
        self._up_since.pop(key, None)
        self._rechoose_at.pop(key, None)  # direct: no relay to reconsider
        if not d.unhealthy:
            return
        best = self._best(st, index, relays, a, b, now_ns)
        if best:
            rec = self.cache.relay_records.get(net_id, {}).get(pid, {})
            await self._mark(net_id, pid, best.rsplit("/", 1)[1], rec, now_ns, reason=d.reason)

    async def _mark(self, net_id: str, pid: str, relay: str, rec: dict, now_ns: int, reason: str = "",
                    flap: bool = True) -> None:
        # flap: the move counts into `moves` (off for a switch to a closer
        # relay, which says nothing of the direct link's stability)
        key = self.etcd.key("pathRoutes", net_id, pid)
        moves = [t for t in rec.get("moves", []) if now_ns - t < HISTORY_NS][-16:] + ([now_ns] if flap else [])
        value = json.dumps({"relay": relay, "moves": moves}, sort_keys=True).encode()
        rev = self.cache.relay_revisions.get(net_id, {}).get(pid, 0)
        ok, _, _ = await self.etcd.txn([self.t.mod(key) == rev], [self.t.put(key, value)])
        if ok:
            self.moves += 1
            self._up_since.pop((net_id, pid), None)
            if not relay:
                self._rechoose_at.pop((net_id, pid), None)
            log.info("pair %s of network %s now goes %s%s", pid, net_id,
                     f"through relay {relay}" if relay else "direct", f" ({reason})" if reason else "")

    async def _learn(self, net_id: str, st: compiler.NetworkState, recs: dict) -> None:
        """Learned endpoints: for each node without its own, where the nodes
        with one hear it from while their sessions are live. When two of them
        hear it from different places its NAT maps per destination: that
        mapping is no use to anyone else, so nothing is learned (and what was
        learned before is dropped)."""
        heard: dict[str, set[str]] = {}
        for node, peers in recs.items():
            me = st.nodes.get(node)
            if me is None or not me.endpoint:
                continue
            for pid, rec in peers.items():
                peer = f"networks/{net_id}/nodes/{pid}"
                p = st.nodes.get(peer)
                hs = rec.get("handshake_ns", 0)
                if p is None or p.endpoint or not rec.get("endpoint") or not hs or rec.get("unanswered_ns"):
                    continue
                heard.setdefault(peer, set()).add(rec["endpoint"])
        for peer in set(heard) | set(st.learned_endpoints):
            if peer not in st.nodes:
                continue
            seen = heard.get(peer)
            if seen is None:
                continue  # nobody hears it now: keep what was learned (its NAT may keep the mapping)
            want = next(iter(seen)) if len(seen) == 1 else ""
            if st.learned_endpoints.get(peer, "") == want:
                continue
            key = self.etcd.key("learnedEndpoints", net_id, peer.rsplit("/", 1)[1])
            rev = self.cache.learned_revisions.get(net_id, {}).get(peer, 0)
            op = self.t.put(key, want.encode()) if want else self.t.delete(key)
            ok, _, _ = await self.etcd.txn([self.t.mod(key) == rev], [op])
            if ok:
                log.info("%s the endpoint of %s from its peers' reports", "learned" if want else
                         "dropped (its NAT maps per destination)", peer)

    # status --------------------------------------------------------------

    def annotate(self, status: network_pb2.NetworkStatus, st: compiler.NetworkState | None,
                 peers_of: dict[str, list[str]]) -> None:
        """Fill each node's `unreachable_peers` and `healthy` (peers_of: node ->
        the node peers of its desired state)."""
        if st is None:
            return
        now_ns = time.time_ns()
        relays = paths.relays(st)
        view = paths.peer_view(compiler.PeerIndex(st))
        healthy = 0
        for nc in status.nodes:
            ok = True
            for peer in peers_of.get(nc.node, ()):
                if peer not in st.nodes:
                    continue
                offline = peer not in self.cache.sessions  # listed, but no fault of this node's
                d = self.direct(st, nc.node, peer, now_ns)
                relay = paths.route(st, nc.node, peer, relays, view)
                if not d.unhealthy and not relay:
                    continue
                if relay and self.direct(st, nc.node, relay, now_ns).unhealthy:
                    relay_ok = False
                else:
                    relay_ok = bool(relay)
                if d.unhealthy and not relay_ok and not offline:
                    ok = False
                if len(nc.unreachable_peers) >= MAX_UNREACHABLE:
                    continue
                pp = nc.unreachable_peers.add(peer=peer, state=d.state, reason=d.reason, relay=relay)
                if d.since_ns:
                    pp.since_time.FromNanoseconds(d.since_ns)
                state = STATE_WORDS.get(d.state, "not known yet")
                pp.summary = (f"{peer.rsplit('/', 1)[1]} ({state}" + (f" {d.reason}" if d.reason else "")
                              + (f", via {relay.rsplit('/', 1)[1]}" if relay else "")
                              + (", its agent is offline" if offline else "") + ")")
            nc.healthy = ok
            healthy += ok
        status.healthy_nodes = healthy
