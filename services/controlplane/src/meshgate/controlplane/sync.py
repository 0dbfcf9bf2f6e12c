"""Desired-state streaming to agents, acknowledgements and convergence status.

`Fanout` listens to the state cache. For every node a change may affect whose
agent holds a stream on this replica, it recompiles the node's desired state
and compares a digest with the previous one; only nodes whose state really
changed get a message. Nodes without a stream here are only marked as touched
(a full mesh would otherwise cost a recompile of every node per join); their
state is compiled when an agent connects or a status is asked for. Messages are deltas against what the
session last sent, stamped with the change's revision and the W3C trace
context the writer left in etcd.

Each session has a bounded queue. When an agent does not keep up and its queue
fills, the queued deltas are dropped and replaced by one fresh snapshot, so a
slow agent costs memory bounded by the queue and never delays others.

Convergence: an acknowledgement records, in `status/{net}/{node}`, the applied
revision and the digest of the state applied (and the routes the agent
declined, from the `google.rpc.ErrorInfo`s of its ack: `declined_routes`). A node has converged when that
digest equals the digest of its current desired state, which every replica can
compute from its own cache; `sessions/{net}/{node}`, attached to the holding
replica's lease, says whether the agent is connected. Status writes are
coalesced per node and flushed in batches.

Hazards: a snapshot carries the peers' pre-shared keys (once the key service
issues them); never log messages. The fan-out runs inside the cache's watch
loop: it must only queue, never await a stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aetcd
import grpc
from google.rpc import error_details_pb2
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from meshgate.api.v1 import agent_pb2, agent_pb2_grpc, network_pb2, node_pb2
from meshgate.api.v1 import desired_state_pb2 as ds
from meshgate.common import metrics
from meshgate.common.errors import ApiError, FieldViolation, invalid_argument, not_found
from meshgate.common.etcd import Etcd
from meshgate.common.identity import node_of, peer_identity, peer_spki_sha256
from meshgate.controlplane import compiler, egresshealth, names
from meshgate.controlplane import domains as domains_
from meshgate.controlplane.cache import Change, StateCache
from meshgate.controlplane.enrollment import EnrollmentKeys, bound_keys, check_csr, csr_binding
from meshgate.controlplane.keymaterial import KeyMaterial

log = logging.getLogger(__name__)
tracer = trace.get_tracer("meshgate.controlplane")

QUEUE_SIZE = 64
HEARTBEAT_S = 20.0
LEASE_TTL_S = 15
STATUS_FLUSH_S = 0.05
# Limits of an agent's report of its egress domains (SyncRequest.Domains).
MAX_LEARNED = 1024
MAX_LEARNED_ADDRESSES = 64
ROTATION_WAIT_S = 5.0  # longest a rotating node waits for its peers to learn its new key
YIELD_EVERY = 64  # compiles between yields to the event loop in a fan-out
MAX_TXN_OPS = 100  # etcd's default limit is 128 operations per transaction
# A pre-shared key rotation arrives as a run of key-service transactions (120
# pairs each): a session with more peers than this (a hub) gets its new keys
# gathered over PSK_COALESCE_S and sent in one delta, not one per transaction
# (at 10,000 agents: 167 copies and sends of a 10,000-peer state per hub).
PSK_COALESCE_PEERS = 256
PSK_COALESCE_S = 0.2
# Longest a stream's start or a status read waits for the state cache to reach
# etcd's revision before answering UNAVAILABLE (CACHE_BEHIND) instead.
CACHE_WAIT_S = 10.0


def digest(state: ds.DesiredState, body: bytes | None = None) -> str:
    """The digest of a state without its revision; `body`: its `compiler.body()`, if at hand."""
    return hashlib.sha256(compiler.body(state) if body is None else body).hexdigest()[:32]


@dataclass
class Desired:
    digest: str
    revision: int


@dataclass
class Session:
    node: str
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    sent: ds.DesiredState | None = None
    sent_body: bytes = b""  # compiler.body(sent)
    inflight: dict[int, str] = field(default_factory=dict)  # revision -> digest
    closed: bool = False
    close_reason: ApiError | None = None
    acked: int = 0  # the newest revision the agent acknowledged as applied
    overflows: int = 0
    agent_version: str = ""
    # What this session writes at sessions/{net}/{node}: unique per stream, so
    # a replica deletes the key only while it is still this session's (the
    # agent may have reconnected to another replica meanwhile).
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    spki: str = ""  # the key hash of the stream's certificate ('' for a token)
    # resource -> index in sent.peers, for the `sent` it was worked out of
    _peer_pos: dict[str, int] = field(default_factory=dict)
    _peer_pos_of: ds.DesiredState | None = None

    def peer_positions(self) -> dict[str, int]:
        """Where each peer (by resource name) is in `sent.peers`: a hub's
        pre-shared key patch touches the pairs that changed, not its 10,000
        peers (issue 18)."""
        if self._peer_pos_of is not self.sent:
            self._peer_pos = {p.resource: i for i, p in enumerate(self.sent.peers)} if self.sent is not None else {}
            self._peer_pos_of = self.sent
        return self._peer_pos

    def keep_positions(self, state: ds.DesiredState) -> None:
        """`state` (now `sent`) has the same peers in the same order as the
        state the positions were worked out of."""
        if self.sent is state and self._peer_pos_of is not None:
            self._peer_pos_of = state

    def record(self) -> bytes:
        return f"{self.agent_version or '-'} {self.token}".encode()

    def _snapshot(self, state: ds.DesiredState, traceparent: str) -> agent_pb2.SyncResponse:
        return agent_pb2.SyncResponse(
            revision=state.revision,
            trace_context=agent_pb2.TraceContext(traceparent=traceparent),
            snapshot=agent_pb2.SyncResponse.Snapshot(state=state),
        )

    def push(self, state: ds.DesiredState, traceparent: str, force_snapshot: bool = False,
             body: bytes | None = None, dg: str | None = None, delta: ds.DesiredStateDelta | None = None) -> int:
        """Queue the message taking the agent to `state`; returns messages queued.
        `body` and `dg`: the state's `compiler.body()` and digest, if at hand;
        `delta`: the delta from `sent` to `state`, if the caller knows it."""
        if self.closed:
            return 0
        if body is None:
            body = compiler.body(state)
        if self.sent is None or force_snapshot:
            msg = self._snapshot(state, traceparent)
        else:
            if body == self.sent_body:
                return 0
            if delta is None:
                delta = compiler.diff(self.sent, state, differ=True)
            msg = agent_pb2.SyncResponse(
                revision=state.revision,
                trace_context=agent_pb2.TraceContext(traceparent=traceparent),
                delta=agent_pb2.SyncResponse.Delta(delta=delta),
            )
        self.sent = state
        self.sent_body = body
        self.inflight[state.revision] = dg if dg is not None else digest(state, body)
        try:
            self.queue.put_nowait(msg)
            metrics.controlplane.pushed(msg, False)
        except asyncio.QueueFull:
            # Too slow: replace everything queued by one snapshot of the newest state.
            self.overflows += 1
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(msg := self._snapshot(state, traceparent))
            metrics.controlplane.pushed(msg, True)
            log.warning("agent %s fell behind; resyncing it with a snapshot", self.node)
        return 1

    def ask_rotation(self, reason: str) -> None:
        """Ask the agent for a new key pair (it answers with NewKey)."""
        if self.closed:
            return
        msg = agent_pb2.SyncResponse(
            revision=self.sent.revision if self.sent else 0,
            rotate_key=agent_pb2.SyncResponse.RotateKey(reason=reason),
        )
        try:
            self.queue.put_nowait(msg)
        except asyncio.QueueFull:
            pass  # the snapshot that replaces the queue is followed by a new ask on reconnect

    def close(self, reason: ApiError | None = None) -> None:
        self.closed = True
        self.close_reason = reason
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


class StatusWriter:
    """Coalesces per-node status records and writes them in batched transactions."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        # key -> value, or a record (dict) written as JSON at the flush: a
        # record updated again before the flush is encoded once, as it is then.
        self.pending: dict[bytes, bytes | dict | None] = {}  # None: delete
        self.taken: dict[bytes, bytes | dict | None] = {}  # taken from pending by the flush, not yet written
        self.writing: dict[bytes, bytes | None] = {}  # in a transaction now
        self.wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def put(self, key: bytes, value: bytes | dict) -> None:
        self.pending[key] = value
        self.wake.set()

    def delete(self, key: bytes) -> None:
        """Delete `key` at the next flush, after any put of it already under
        way (a deleted node's last ack must not outlive the node)."""
        self.pending[key] = None
        self.wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="status-writer")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            await asyncio.sleep(STATUS_FLUSH_S)
            self.wake.clear()
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - retried on the next wake
                log.exception("writing agent status failed; will retry")
                self.wake.set()
                await asyncio.sleep(1)

    async def flush(self) -> None:
        """Write what is pending, MAX_TXN_OPS records per transaction. Each
        transaction's records are encoded just before it, not all at once: at
        10,000 acks the encoding alone held the event loop for tens of
        milliseconds, in front of the next change's API call."""
        taken = self.taken = self.pending
        self.pending = {}
        t = self.etcd.txn_ops
        keys = list(taken)
        try:
            for i in range(0, len(keys), MAX_TXN_OPS):
                chunk = [(k, _encoded(taken.pop(k))) for k in keys[i : i + MAX_TXN_OPS]]
                self.writing.update(chunk)
                try:
                    await self.etcd.txn([], [t.delete(k) if v is None else t.put(k, v) for k, v in chunk])
                except Exception:
                    for k, v in chunk:
                        self.pending.setdefault(k, v)
                    for k, later in taken.items():  # not tried yet: the next flush writes them
                        self.pending.setdefault(k, later)
                    raise
                finally:
                    for k, v in chunk:
                        if k in self.writing and self.writing[k] is v:
                            del self.writing[k]
        finally:
            self.taken = {}

    def latest(self, key: bytes) -> tuple[bool, bytes | None]:
        """What this writer will have written at `key` once it has flushed:
        (False, None) when it holds nothing for it, (True, None) for a delete."""
        if key in self.pending:
            return True, _encoded(self.pending[key])
        if key in self.taken:
            return True, _encoded(self.taken[key])
        if key in self.writing:
            return True, self.writing[key]
        return False, None


def _encoded(value: bytes | dict | None) -> bytes | None:
    """A pending status value as written: a record (dict) as sorted JSON."""
    return value if value is None or isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()


class Fanout:
    def __init__(self, cache: StateCache, etcd: Etcd, keys: KeyMaterial | None = None) -> None:
        self.cache = cache
        self.etcd = etcd
        self.keys = keys or KeyMaterial()
        # Nodes whose pre-shared keys could not be fetched (key service away):
        # compiled again by the retry task, never sent a state without them.
        self._psk_retry: set[str] = set()
        self._retry_task: asyncio.Task | None = None
        # Large sessions' new pre-shared keys waiting for the coalesced patch:
        # node -> (network id, peers with a new key, newest revision, traceparent).
        self._psk_later: dict[str, tuple[str, set[str], int, str]] = {}
        self._psk_later_task: asyncio.Task | None = None
        # Node key rotations in their first phase: node -> the key its own
        # interface keeps until its peers have the new one (see rotate()).
        self.holds: dict[str, str] = {}
        # ... or, for a node with an endpoint, the key its PEERS keep seeing
        # until it has switched (node first): node -> (old key, old signature).
        self.peer_holds: dict[str, tuple[str, bytes]] = {}
        # Compile-and-send is serialized: fetching PSKs awaits, and a state
        # compiled before the wait must never be sent after a newer one.
        self._send_lock = asyncio.Lock()
        # Wakes waiters on acks (rotate() waits for peers to apply a revision).
        self._acked = asyncio.Condition()
        self.desired: dict[str, Desired] = {}
        # node -> revision of the newest change that may have altered its state
        self.touched: dict[str, int] = {}
        # network name -> (state, its PeerIndex), valid for _indexes_gen (peer_index)
        self._indexes: dict[str, tuple[compiler.NetworkState, compiler.PeerIndex]] = {}
        self._indexes_gen = -1
        self.sessions: dict[str, Session] = {}
        self.status = StatusWriter(etcd)
        self.messages_sent = 0
        self._records: dict[bytes, dict] = {}
        self._client_health: dict[bytes, dict] = {}  # what this replica last wrote per client
        self.paths: Any = None  # relays.Relays: path health, relays (set by the ControlPlane)
        self.health: egresshealth.EgressHealth | None = None  # gateways' health reports (set by the ControlPlane)
        self.lease: Any = None  # aetcd's Lease (untyped), made by start()
        self._lease_lock = asyncio.Lock()  # one replacement at a time (_replace_lease)
        self._rewrite_pending = False  # a replacement's rewrite of the session keys did not finish
        self._lease_task: asyncio.Task | None = None
        cache.listeners.append(self.on_change)
        metrics.controlplane.observe(self)  # its gauges: connected agents, converged nodes

    async def start(self) -> None:
        self.lease = await self.etcd.client.lease(LEASE_TTL_S)
        self._lease_task = asyncio.create_task(self._keep_lease(), name="session-lease")
        self.status.start()

    async def close_sessions(self) -> None:
        """End every agent stream with UNAVAILABLE so agents reconnect (to
        another replica); used at the start of a graceful shutdown."""
        for s in list(self.sessions.values()):
            s.close(ApiError(grpc.StatusCode.UNAVAILABLE, "control plane shutting down; reconnect"))

    async def stop(self) -> None:
        await self.close_sessions()
        if self._retry_task is not None:
            self._retry_task.cancel()
        if self._psk_later_task is not None:
            self._psk_later_task.cancel()
        if self._lease_task:
            self._lease_task.cancel()
        await self.status.stop()
        if self.lease is not None:
            try:
                await self.lease.revoke()
            except Exception:  # noqa: BLE001 - the lease expires on its own
                pass

    async def _keep_lease(self) -> None:
        delay = LEASE_TTL_S / 3
        while True:
            await asyncio.sleep(delay)
            try:
                if self._rewrite_pending:
                    await self._replace_lease(None)
                reply = await self.lease.refresh()
                if reply is None or reply.TTL <= 0:
                    await self._replace_lease(self.lease)
                delay = LEASE_TTL_S / 3
            except Exception:  # noqa: BLE001
                # etcd slow or away: retry soon, the TTL leaves room for a few
                # attempts before the session keys expire.
                log.warning("refreshing the session lease failed; retrying in 1 s")
                delay = 1.0

    async def _replace_lease(self, expired: Any) -> None:
        """The lease `expired` (etcd or this loop stalled for longer than its
        TTL), taking every session key with it, and etcd refuses puts on it:
        take a new lease and write the keys of the open sessions again. One
        replacement at a time: a caller whose lease was already replaced
        returns at once (`expired` None: finish a rewrite that failed)."""
        async with self._lease_lock:
            if expired is not None and self.lease is not expired:
                return
            if expired is not None:
                log.warning("session lease expired; granting a new one for %d open sessions", len(self.sessions))
                self.lease = await self.etcd.client.lease(LEASE_TTL_S)
            self._rewrite_pending = True
            t = self.etcd.txn_ops
            puts = [t.put(self._session_key(n), s.record(), lease=self.lease) for n, s in list(self.sessions.items())]
            for i in range(0, len(puts), MAX_TXN_OPS):
                await self.etcd.txn([], puts[i : i + MAX_TXN_OPS])
            self._rewrite_pending = False

    async def _put_session(self, session: Session) -> None:
        """Write a session's key on the replica's lease. A lease that expired
        under load is replaced (which rewrites every open session's key) and
        the put retried; etcd being slow or away is UNAVAILABLE to the agent,
        never INTERNAL."""
        key = self._session_key(session.node)
        for attempt in (1, 2):
            lease = self.lease
            try:
                await self.etcd.client.put(key, session.record(), lease=lease)
                return
            except aetcd.exceptions.ClientError as e:  # timeouts and outages included
                if attempt == 2 or "lease not found" not in str(e):
                    raise self.etcd.error(e) from e
                await self._replace_lease(lease)

    def _session_key(self, node: str) -> bytes:
        _, net, _, nid = node.split("/")
        return self.etcd.key("sessions", net, nid)

    def _status_key(self, node: str) -> bytes:
        _, net, _, nid = node.split("/")
        return self.etcd.key("status", net, nid)

    def _learned_key(self, node: str) -> bytes:
        _, net, _, nid = node.split("/")
        return self.etcd.key("learned", net, nid)

    def learned(self, session: Session, report: agent_pb2.SyncRequest.Domains) -> None:
        """Keep what a gateway's agent learned of its egress domains in
        `learned/{net}/{node}` (the cache turns it into routes for the nodes
        that use the gateway, see domains.py). Only names under the domains the
        node was sent count, at most MAX_LEARNED of them with MAX_LEARNED_ADDRESSES
        addresses each; addresses that are not IP literals or fall in the
        overlay are dropped here too. Written only when it changed."""
        if session.sent is None:
            return
        declared = {d for e in session.sent.egress for d in e.domains}
        st = self.cache.state_of(session.node)
        if st is None:
            return
        overlay = compiler.overlay_ranges(st)
        out = agent_pb2.SyncRequest.Domains()
        for entry in report.domains[:MAX_LEARNED]:
            name = domains_.canonical(entry.domain)
            if not any(name == d or domains_.matches(d, name) for d in declared):
                continue
            kept = out.domains.add(domain=name, error=entry.error[:512], node=session.node)
            if entry.HasField("resolve_time"):
                kept.resolve_time.CopyFrom(entry.resolve_time)
            refused = []
            for a in entry.addresses[:MAX_LEARNED_ADDRESSES]:
                why = domains_.refused_address(a, overlay)
                if why is None:
                    kept.addresses.append(str(ipaddress.ip_address(a)))
                else:
                    refused.append(f"{a[:64]} ({why})")
            if refused and not kept.error:
                kept.error = ("dropped addresses: " + ", ".join(refused))[:512]
        out.domains.sort(key=lambda e: e.domain)
        for e in out.domains:
            e.addresses.sort()
        value = out.SerializeToString(deterministic=True)
        old = st.learned.get(session.node)
        if old is not None and old.SerializeToString(deterministic=True) == value:
            return
        if old is None and not out.domains:
            return
        self.status.put(self._learned_key(session.node), value)

    async def compile(
        self, st: compiler.NetworkState, names_: list[str], revision: int, index: compiler.PeerIndex | None = None
    ) -> dict[str, ds.DesiredState]:
        """Desired states of `names_`, with their pre-shared keys; a node whose
        keys cannot be fetched now is left out and retried later."""
        net_id = names.parse_network(st.network.name)
        assert net_id is not None  # a stored network's name
        index = index or self.peer_index(st)
        psk = None
        if self.keys.enabled and not st.network.disable_preshared_keys:
            pairs = [(n, p) for n in names_ for p in index.peers_of(n)]
            if st.external_clients:
                served = index.clients_by_gateway()
                pairs += [(n, c.name) for n in names_ for c in served.get(n, ())]
            if not await self.keys.ensure(net_id, pairs):
                self._psk_retry.update(names_)
                self._start_retry()
                return {}
            psk = lambda a, b: self.keys.psk(net_id, a, b)  # noqa: E731
        return {n: self._held(compiler.compile_node(st, n, revision, index, psk)) for n in names_}

    def _held(self, state: ds.DesiredState) -> ds.DesiredState:
        old = self.holds.get(state.node)
        if old is not None:
            state.interface.public_key = old
        if self.peer_holds:
            for peer in state.peers:
                held = self.peer_holds.get(peer.resource)
                if held is None or peer.public_key == held[0]:
                    continue
                new_key = peer.public_key
                peer.public_key, peer.public_key_signature = held
                for r in state.routes:
                    if r.via_peer == new_key:
                        r.via_peer = held[0]
                if state.default_route_via_peer == new_key:
                    state.default_route_via_peer = held[0]
        return state

    def _start_retry(self) -> None:
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.create_task(self._retry_psks(), name="psk-retry")

    async def _retry_psks(self) -> None:
        delay = 0.5
        while self._psk_retry:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)
            pending, self._psk_retry = self._psk_retry, set()
            by_net: dict[str, set[str]] = {}
            for name in pending:
                by_net.setdefault(name.split("/")[1], set()).add(name)
            await self.on_change(Change(self.cache.revision, "", by_net))

    def peer_index(self, st: compiler.NetworkState) -> compiler.PeerIndex:
        """The PeerIndex of `st`, built once per state: reused by every
        compile until the cache's generation moves. Building one looks at
        every node of the network, so a stream's snapshot would otherwise cost
        the size of the network (10,000 streams connecting at once: 10,000
        such builds, issue 18)."""
        if self._indexes_gen != self.cache.generation:
            self._indexes.clear()
            self._indexes_gen = self.cache.generation
        got = self._indexes.get(st.network.name)
        if got is not None and got[0] is st:
            return got[1]
        index = compiler.PeerIndex(st)
        self._indexes[st.network.name] = (st, index)
        return index

    async def current(self, node: str) -> ds.DesiredState | None:
        st = self.cache.state_of(node)
        if st is None:
            return None
        d = self.desired.get(node)
        rev = d.revision if d else self.cache.revision
        return (await self.compile(st, [node], rev)).get(node)

    def rotation_pending(self, node: str) -> bool:
        """A key rotation was requested after the node's current key was registered."""
        st = self.cache.state_of(node)
        asked = self.cache.rotation_requests.get(node, 0)
        return st is not None and asked > st.nodes[node].public_key_create_time.ToNanoseconds()

    # changes -------------------------------------------------------------

    async def on_change(self, change: Change) -> None:
        async with self._send_lock:
            await self._on_change(change)

    async def _on_change(self, change: Change) -> None:
        parent = propagate.extract({"traceparent": change.traceparent}) if change.traceparent else None
        with tracer.start_as_current_span(
            "controlplane.fanout", context=parent,
            attributes={"meshgate.revision": change.revision, "meshgate.reset": change.reset},
        ) as span:
            metrics.controlplane.change_seen(change.revision)
            if change.psk_only:
                sent = await self._patch_psks(change)
                metrics.controlplane.change_done(sent)
                self.messages_sent += sent
                span.set_attribute("meshgate.messages_sent", sent)
                return
            sent = 0
            recomputed = 0
            for net_id, pair in change.psk_pairs:
                self.keys.forget(net_id, pair)
            for net_id, nodes in change.affected.items():
                st = self.cache.networks.get(net_id)
                if st is None:
                    self.keys.forget_network(net_id)
                    continue
                live = []
                for name in nodes:
                    if name not in st.nodes:
                        continue
                    self.touched[name] = change.revision
                    if name in self.sessions:
                        live.append(name)
                if not live:
                    continue
                index = self.peer_index(st)  # shared by the change's compiles
                if self.keys.enabled and not st.network.disable_preshared_keys:
                    states = await self.compile(st, live, change.revision, index)
                    live = [n for n in live if n in states]
                else:
                    states = None
                for name in live:
                    recomputed += 1
                    if recomputed % YIELD_EVERY == 0:
                        # Let the streams send what is queued (and other calls
                        # run) while a large change is still being compiled.
                        # The cache does not move on until this listener returns.
                        await asyncio.sleep(0)
                    new = states[name] if states is not None else self._held(
                        compiler.compile_node(st, name, change.revision, index))
                    body = compiler.body(new)  # serialized once: digest and the delta's test
                    dg = digest(new, body)
                    prev = self.desired.get(name)
                    if prev is not None and prev.digest == dg:
                        continue
                    self.desired[name] = Desired(dg, change.revision)
                    s = self.sessions.get(name)
                    if s is not None:
                        sent += s.push(new, change.traceparent, body=body, dg=dg)
            for name in change.deleted_nodes:
                self.desired.pop(name, None)
                self.touched.pop(name, None)
                self._psk_later.pop(name, None)  # as a peer, _patch_gathered drops it
                self.status.delete(self._status_key(name))  # after an ack written meanwhile
                self.status.delete(self._learned_key(name))
                s = self.sessions.pop(name, None)
                if s is not None:
                    s.close(not_found("meshgate.io/Node", name))
                    asyncio.get_running_loop().create_task(self._drop_session_key(s))
            for name in change.rotations:
                s = self.sessions.get(name)
                if s is not None and self.rotation_pending(name):
                    s.ask_rotation("requested by the key service")
            self.messages_sent += sent
            metrics.controlplane.change_done(sent)
            span.set_attribute("meshgate.nodes_recomputed", recomputed)
            span.set_attribute("meshgate.messages_sent", sent)

    async def rotate(self, node: str, switch) -> None:
        """A node key rotation in two phases. `switch()` makes the new key the
        node's (signed, committed at revision R); who learns it first depends
        on who can start the handshake with the new key:

        - a node with an endpoint (a gateway, a server) switches first while
          its peers keep its old key; once it acknowledged R, the peers get the
          new key and, adding it, handshake with it at once (they know where it
          is);
        - a node without one (behind NAT) switches last: its peers learn the
          new key first, and once they acknowledged R the node switches and
          handshakes with them (it knows where they are).

        The other order loses traffic until WireGuard retries (5 s): the side
        that learns last has nowhere to send its handshake, or sends it too
        early. Each phase waits at most ROTATION_WAIT_S."""
        st = self.cache.state_of(node)
        if st is None:
            return
        me = st.nodes[node]
        net_id = node.split("/")[1]
        node_first = bool(me.endpoint)
        if node_first:
            old_sig = st.signatures.get(node, {}).get(me.public_key)
            self.peer_holds[node] = (me.public_key, old_sig.signature if old_sig else b"")
        else:
            self.holds[node] = me.public_key
        try:
            revision = await switch()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + ROTATION_WAIT_S
            while loop.time() < deadline:
                if node_first:
                    s = self.sessions.get(node)
                    done = s is None or s.acked >= revision
                else:
                    done = await self._peers_applied(net_id, node, revision)
                if done:
                    break
                async with self._acked:
                    try:
                        # an ack here wakes us at once; peers elsewhere are polled
                        await asyncio.wait_for(self._acked.wait(), 0.05)
                    except TimeoutError:
                        pass
        finally:
            self.holds.pop(node, None)
            self.peer_holds.pop(node, None)
            st = self.cache.state_of(node)
            affected = {node, *compiler.peers_of(st, node)} if st is not None else {node}
            await self.on_change(Change(self.cache.revision, "", {net_id: affected}))

    async def _notify_acked(self) -> None:
        async with self._acked:
            self._acked.notify_all()

    async def _peers_applied(self, net_id: str, node: str, revision: int) -> bool:
        """Have the node's connected peers applied `revision`? Peers with a
        stream here answer from memory (woken by their acks); only peers on
        other replicas need their status records read."""
        st = self.cache.networks.get(net_id)
        if st is None or node not in st.nodes:
            return True
        remote = []
        for peer in compiler.peers_of(st, node):
            s = self.sessions.get(peer)
            if s is not None:
                if s.acked < revision:
                    return False
            else:
                remote.append(peer.rsplit("/", 1)[1])
        if not remote:
            return True
        records, _ = await self.etcd.list_prefix(self.etcd.key("status", net_id, ""))
        sessions, _ = await self.etcd.list_prefix(self.etcd.key("sessions", net_id, ""))
        applied = {kv.key.rsplit(b"/", 1)[1].decode(): json.loads(kv.value).get("applied_revision", 0) for kv in records}
        connected = {kv.key.rsplit(b"/", 1)[1].decode() for kv in sessions}
        return all(applied.get(pid, 0) >= revision for pid in remote if pid in connected)

    async def _patch_psks(self, change: Change) -> int:
        """A change of pre-shared keys only: patch the new keys into the state
        each affected session was last sent (the same result as a full compile,
        at the cost of the pairs changed rather than of the nodes' peers)."""
        changed: dict[str, dict[str, set[str]]] = {}  # network -> node -> peers with a new key
        for net_id, pair in change.psk_pairs:
            self.keys.forget(net_id, pair)
            na, nb = (_peer_name(net_id, seg) for seg in pair.split(".", 1))
            per_net = changed.setdefault(net_id, {})
            # External clients have no stream: only the node end is patched.
            for me, other in ((na, nb), (nb, na)):
                if "/nodes/" in me:
                    per_net.setdefault(me, set()).add(other)
        sent = 0
        for net_id, per_node in changed.items():
            st = self.cache.networks.get(net_id)
            if st is None or st.network.disable_preshared_keys:
                continue
            live = []
            for name in per_node:
                if name not in st.nodes:
                    continue
                self.touched[name] = change.revision
                s = self.sessions.get(name)
                if s is not None and s.sent is not None and name not in self._psk_retry:
                    # Only its peers as last sent: a pair of a peer deleted since
                    # (nodes.py deletes its keys) must not be issued again.
                    pos = s.peer_positions()
                    per_node[name] = {p for p in per_node[name] if p in pos}
                    if not per_node[name]:
                        continue
                    if len(pos) > PSK_COALESCE_PEERS:
                        self._patch_later(net_id, name, per_node[name], change.revision, change.traceparent)
                    else:
                        live.append(name)
            if not live:
                continue
            if not await self.keys.ensure(net_id, [(n, p) for n in live for p in per_node[n]]):
                self._psk_retry.update(live)
                self._start_retry()
                continue
            for name in live:
                sent += self._patch_session(net_id, name, per_node[name], change.revision, change.traceparent)
        return sent

    def _patch_session(self, net_id: str, name: str, others: set[str], revision: int, traceparent: str) -> int:
        """Patch the keys of `name`'s pairs with `others` (in memory already)
        into the state its session was last sent, as `revision`; messages queued."""
        session = self.sessions.get(name)
        if session is None or session.sent is None:
            return 0  # the stream ended while the keys were fetched
        pos = session.peer_positions()
        new = ds.DesiredState()
        new.CopyFrom(session.sent)
        new.revision = revision
        delta = ds.DesiredStateDelta(base_revision=session.sent.revision, revision=revision)
        for other in sorted(others):
            i = pos.get(other)
            if i is None:
                continue
            peer = new.peers[i]
            key = self.keys.psk(net_id, name, other)
            if key != peer.preshared_key:
                peer.preshared_key = key
                delta.upserted_peers.append(peer)
        if not delta.upserted_peers:
            return 0
        body = compiler.body(new)
        dg = digest(new, body)
        self.desired[name] = Desired(dg, revision)
        n = session.push(new, traceparent, body=body, dg=dg, delta=delta)
        session.keep_positions(new)  # the same peers in the same order
        return n

    def _patch_later(self, net_id: str, name: str, others: set[str], revision: int, traceparent: str) -> None:
        got = self._psk_later.get(name)
        if got is not None:
            others = got[1] | others
        self._psk_later[name] = (net_id, others, revision, traceparent)
        if self._psk_later_task is None or self._psk_later_task.done():
            self._psk_later_task = asyncio.create_task(self._patch_gathered(), name="psk-coalesce")

    async def _patch_gathered(self) -> None:
        """The coalesced patch of large sessions, PSK_COALESCE_S after the first
        key of a run. A session compiled in full since (a newer revision) already
        has the keys; the cache forgot them when they changed. Only peers still
        in the state last sent are patched (a peer deleted meanwhile must not
        get its pair's key issued again); one key-service call per network."""
        await asyncio.sleep(PSK_COALESCE_S)
        async with self._send_lock:
            later, self._psk_later = self._psk_later, {}
            todo: dict[str, list[tuple[str, set[str], int, str]]] = {}  # network -> patches
            for name, (net_id, others, revision, traceparent) in later.items():
                session = self.sessions.get(name)
                if session is None or session.sent is None or session.sent.revision >= revision:
                    continue
                others = others & session.peer_positions().keys()
                if others:
                    todo.setdefault(net_id, []).append((name, others, revision, traceparent))
            sent = 0
            for net_id, patches in todo.items():
                try:
                    ok = await self.keys.ensure(net_id, [(n, p) for n, others, _, _ in patches for p in others])
                except Exception:  # noqa: BLE001 - retried by a full compile, like a key service away
                    log.exception("fetching gathered pre-shared keys of networks/%s failed", net_id)
                    ok = False
                if not ok:
                    self._psk_retry.update(n for n, _, _, _ in patches)
                    self._start_retry()
                    continue
                for name, others, revision, traceparent in patches:
                    sent += self._patch_session(net_id, name, others, revision, traceparent)
            self.messages_sent += sent
            metrics.controlplane.change_done(sent)

    # sessions ------------------------------------------------------------

    async def open(self, node: str, hello: agent_pb2.SyncRequest.Hello) -> Session:
        old = self.sessions.pop(node, None)
        if old is not None:
            old.close(ApiError(grpc.StatusCode.ABORTED, "superseded by a newer stream from the same node"))
        try:
            return await self._open(node, hello)
        except BaseException:
            if old is not None:  # its key must not outlive it when no new one replaces it
                await self._drop_session_key(old)
            raise

    async def _open(self, node: str, hello: agent_pb2.SyncRequest.Hello) -> Session:
        session = Session(node, agent_version=hello.agent_version)
        if self.cache.state_of(node) is None:
            raise not_found("meshgate.io/Node", node)
        async with self._send_lock:
            state = await self.current(node)
            if state is None:
                raise ApiError(grpc.StatusCode.UNAVAILABLE, "the key service is unavailable; reconnect later",
                               "KEY_SERVICE_UNAVAILABLE")
            body = compiler.body(state)
            dg = digest(state, body)
            d = self.desired.get(node)
            if d is None or d.digest != dg:
                rev = self.touched.get(node, self.cache.revision)
                self.desired[node] = Desired(dg, rev)
                state.revision = rev
            self.sessions[node] = session
            session.push(state, "", force_snapshot=True, body=body, dg=dg)
            self.messages_sent += 1
            if self.rotation_pending(node):
                session.ask_rotation("requested by the key service")
        try:
            await self._put_session(session)
        except BaseException:
            if self.sessions.get(node) is session:  # the fan-out must not feed a stream that never started
                del self.sessions[node]
            raise
        self._record(node, contact=True)
        return session

    async def close(self, session: Session) -> None:
        if self.sessions.get(session.node) is session:
            del self.sessions[session.node]
            if self.health is not None:
                self.health.stream_closed(session.node)
            # Shielded: the stream's handler is cancelled when its peer vanishes (keepalive),
            # possibly again while this runs; a key left behind would show the node
            # connected for as long as this replica lives, and it would never fail over.
            await asyncio.shield(self._drop_session_key(session))

    async def _drop_session_key(self, session: Session) -> None:
        """Delete the session's key if it is still this session's (compared by
        value: another replica may hold the agent's newer stream)."""
        key = self._session_key(session.node)
        t = self.etcd.txn_ops
        try:
            await self.etcd.txn([t.value(key) == session.record()], [t.delete(key)])
        except Exception:  # noqa: BLE001 - the lease removes it anyway
            pass

    async def resync(self, session: Session) -> None:
        async with self._send_lock:
            state = await self.current(session.node)
            if state is not None:
                session.push(state, "", force_snapshot=True)
                self.messages_sent += 1
                metrics.controlplane.resync_requested()

    def ack(self, session: Session, ack: agent_pb2.SyncRequest.Ack) -> None:
        if ack.status.code == 0:
            session.acked = max(session.acked, ack.revision)
            if self.holds or self.peer_holds:  # set for as long as rotate() may wait on acks
                asyncio.get_running_loop().create_task(self._notify_acked())
        dg = session.inflight.get(ack.revision)
        metrics.controlplane.acked(ack.revision, ack.status.code == 0, dg is not None)
        # A failed apply of R is retried by the agent and acked again: keep R's
        # digest until then, or the retry's OK could not count as applied.
        done = ack.revision if ack.status.code == 0 else ack.revision - 1
        for r in [r for r in session.inflight if r <= done]:
            del session.inflight[r]
        declined = declined_routes(ack.status)
        if ack.status.code == 0 and dg is not None:
            self._record(session.node, applied=(ack.revision, dg), error="", declined=declined)
        elif ack.status.code != 0:
            self._record(session.node, error=ack.status.message[:1024] or f"code {ack.status.code}",
                         declined=declined)
        else:
            # OK for a revision whose digest is gone (already recorded, e.g. a
            # resync that failed and then passed): its last apply succeeded
            self._record(session.node, error="", declined=declined)
        if ack.HasField("drift"):  # the agent's drift watcher, kept beside the ack's record
            rec = self._records[self._status_key(session.node)]
            rec["drift"] = {"repairs": ack.drift.repairs, "fighting": ack.drift.fighting, "fights": ack.drift.fights,
                            "last_drift": [line[:256] for line in ack.drift.last_drift[:16]],
                            "last_drift_ns": ack.drift.last_drift_time.ToNanoseconds()
                            if ack.drift.HasField("last_drift_time") else 0}
            self.status.put(self._status_key(session.node), rec)

    def _record(self, node: str, applied: tuple[int, str] | None = None, error: str | None = None, contact: bool = True,
                declined: list[dict] | None = None) -> None:
        key = self._status_key(node)
        rec = self._records.setdefault(key, {"applied_revision": 0, "applied_digest": "", "last_error": "", "contact_ns": 0})
        if applied is not None:
            rec["applied_revision"], rec["applied_digest"] = applied
        if error is not None:
            rec["last_error"] = error
        if declined is not None:
            rec["declined_routes"] = declined
        if contact:
            rec["contact_ns"] = time.time_ns()
        self.status.put(key, rec)  # serialized when flushed: one encoding per node per flush

    def egress_health(self, session: Session, msg: agent_pb2.SyncRequest.EgressHealth) -> None:
        """A gateway node's report of its egress path (egresshealth.py)."""
        if self.health is not None and not session.closed:
            self.health.report(session.node, msg)

    def client_health(self, session: Session, health: agent_pb2.SyncRequest.Health) -> None:
        """Keep what a gateway node reports of its external clients' tunnels
        (`clientHealth/{net}/{client}`, JSON; externalclients.py shows it). Only
        peers the node was sent as external clients count, and only changes are
        written."""
        if session.sent is None:
            return
        clients = {p.public_key: p.resource for p in session.sent.peers if "/externalClients/" in p.resource}
        if not clients:
            return
        now = time.time_ns()
        for peer in health.peers:
            name = clients.get(peer.public_key)
            if name is None:
                continue
            _, net, _, cid = name.split("/")
            st = self.cache.networks.get(net)
            if st is None or name not in st.external_clients:
                # deleted since it was sent: do not bring its record back
                self._client_health.pop(self.etcd.key("clientHealth", net, cid), None)
                continue
            rec = {"gateway_node": session.node, "public_key": peer.public_key,
                   "handshake_ns": peer.latest_handshake_time.ToNanoseconds() if peer.HasField("latest_handshake_time")
                   else 0, "rx_bytes": peer.rx_bytes, "tx_bytes": peer.tx_bytes}
            key = self.etcd.key("clientHealth", net, cid)
            if self._client_health.get(key) == rec:
                continue
            self._client_health[key] = rec
            self.status.put(key, {**rec, "report_ns": now})

    # status --------------------------------------------------------------

    async def network_status(self, network: network_pb2.Network) -> network_pb2.NetworkStatus:
        net_id = names.parse_network(network.name)
        assert net_id is not None  # a stored network's name
        rev = await self.etcd.revision()
        await self.cache.catch_up(rev, CACHE_WAIT_S, "network status")
        await self.status.flush()
        records, _ = await self.etcd.list_prefix(self.etcd.key("status", net_id, ""))
        sessions, _ = await self.etcd.list_prefix(self.etcd.key("sessions", net_id, ""))
        recs = {kv.key.rsplit(b"/", 1)[1].decode(): json.loads(kv.value) for kv in records}
        connected = {kv.key.rsplit(b"/", 1)[1].decode() for kv in sessions}
        out = network_pb2.NetworkStatus(name=network.name, revision=rev)
        st = self.cache.networks.get(net_id)
        compiled = await self.compile(st, sorted(st.nodes), 0) if st else {}
        if st and len(compiled) < len(st.nodes):
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the key service is unavailable; retry",
                           "KEY_SERVICE_UNAVAILABLE")
        down = st.down if st else set()
        for name in sorted(st.nodes if st else ()):
            nid = name.rsplit("/", 1)[1]
            dg = digest(compiled[name])
            # Read-only: recording this digest as sent would hide the change
            # from the fan-out when it has not processed it yet.
            d = self.desired.get(name)
            if d is None or d.digest != dg:
                d = Desired(dg, self.touched.get(name, self.cache.revision))
            rec = recs.get(nid, {})
            nc = out.nodes.add(
                node=name,
                desired_revision=d.revision,
                applied_revision=rec.get("applied_revision", 0),
                converged=rec.get("applied_digest") == d.digest,
                connected=nid in connected,
                last_error=rec.get("last_error", ""),
                failed_over=name in down,
            )
            for d in rec.get("declined_routes", ()):
                nc.declined_routes.add(destination=d.get("destination", ""), reason=d.get("reason", ""),
                                       message=d.get("message", ""))
            if rec.get("contact_ns"):
                nc.last_contact_time.FromNanoseconds(rec["contact_ns"])
            if "drift" in rec:
                dr = rec["drift"]
                nc.drift.SetInParent()
                nc.drift.repairs, nc.drift.fighting, nc.drift.fights = dr["repairs"], dr["fighting"], dr["fights"]
                nc.drift.last_drift.extend(dr["last_drift"])
                if dr["last_drift_ns"]:
                    nc.drift.last_drift_time.FromNanoseconds(dr["last_drift_ns"])
        if st is not None:
            egresshealth.fill_status(out, st)
        out.total_nodes = len(out.nodes)
        out.converged_nodes = sum(1 for n in out.nodes if n.converged)
        if self.paths is not None:  # path health (relays.py)
            self.paths.annotate(out, st, {n: [p.resource for p in s.peers if "/nodes/" in p.resource]
                                          for n, s in compiled.items()})
        return out

    async def node_states(self, net_id: str, nodes: list[str]) -> dict[str, int]:
        """`Node.State` of each of `nodes` (of network `net_id`), as the network
        status sees it: READY when its agent is connected (to any replica) and
        has applied its current desired state, CONVERGING when connected but
        not there yet, OFFLINE when its agent has connected before but is not
        now, PENDING when it never has. Node records store PENDING; Get, List
        and Update show this instead."""
        st = self.cache.networks.get(net_id)
        known = [n for n in nodes if n in st.nodes] if st is not None else []
        if st is None or not known:
            return {}
        if len(known) <= FEW_NODES:  # a Get or an Update: their keys, not the network's
            # Our own status writes not yet in etcd count as written, rather than
            # waiting for a flush of everyone's (after a change that touched
            # 10,000 agents, 10,000 acks: a second for one node's Update).
            ids = [n.rsplit("/", 1)[1] for n in known]
            got = await asyncio.gather(*(self.etcd.get(self.etcd.key(kind, net_id, i))
                                         for kind in ("status", "sessions") for i in ids))
            sessions = [kv for kv in got[len(ids):] if kv]
            recs = {}
            for nid, kv in zip(ids, got[:len(ids)], strict=True):
                mine, value = self.status.latest(self.etcd.key("status", net_id, nid))
                raw = value if mine else (kv.value if kv is not None else None)
                if raw is not None:
                    recs[nid] = json.loads(raw)
        else:
            await self.status.flush()
            records, _ = await self.etcd.list_prefix(self.etcd.key("status", net_id, ""))
            sessions, _ = await self.etcd.list_prefix(self.etcd.key("sessions", net_id, ""))
            recs = {kv.key.rsplit(b"/", 1)[1].decode(): json.loads(kv.value) for kv in records}
        connected = {kv.key.rsplit(b"/", 1)[1].decode() for kv in sessions}
        live = [n for n in known if n.rsplit("/", 1)[1] in connected]
        compiled = await self.compile(st, live, 0) if live else {}
        out: dict[str, int] = {}
        for name in known:
            nid = name.rsplit("/", 1)[1]
            rec = recs.get(nid)
            if nid not in connected:
                out[name] = node_pb2.Node.OFFLINE if rec and rec.get("contact_ns") else node_pb2.Node.PENDING
                continue
            # Without its compiled state (the key service away) the digest last sent stands in.
            dg = digest(compiled[name]) if name in compiled else getattr(self.desired.get(name), "digest", None)
            applied = (rec or {}).get("applied_digest")
            out[name] = node_pb2.Node.READY if applied and applied == dg else node_pb2.Node.CONVERGING
        return out


FEW_NODES = 16
"""`node_states` of at most this many nodes reads their own status and session
keys; more read the network's (a node's Update at 10,000 nodes listed 20,000
keys to show one node's state, issue 18)."""

ROUTE_REASONS = ("DEFAULT_ROUTE_DECLINED", "ROUTE_NOT_ACCEPTED")
"""ErrorInfo reasons of an ack that name routes the agent declined (gatewayd's consent.py)."""
MAX_DECLINED = 64
"""The most declined routes kept per node: the record is rewritten on every ack
(the agent's own status.json lists them all)."""


def declined_routes(status) -> list[dict] | None:
    """The routes an ack says its agent declined, `{destination, reason, message}`:
    from its ErrorInfos of `ROUTE_REASONS`. None when the ack says nothing about
    routes (a rejected state or a failed apply: the node keeps what it applied
    before, declines included); an empty list for an applied state (OK, or
    applied with refused peers) without any."""
    out: list[dict] = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if not detail.Is(info.DESCRIPTOR) or not detail.Unpack(info) or info.reason not in ROUTE_REASONS:
            continue
        message = info.metadata.get("reason", "")[:256]
        for route in info.metadata.get("routes", "").split(","):
            if route.strip() and len(out) < MAX_DECLINED:
                out.append({"destination": route.strip()[:64], "reason": info.reason, "message": message})
    if out or status.code in (grpc.StatusCode.OK.value[0], grpc.StatusCode.PERMISSION_DENIED.value[0]):
        return out
    return None


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    """Enroll and Sync. A Sync stream is authenticated by the agent's
    certificate (its URI SAN names the node; the node must still exist), or,
    where `agent_tokens` allows it (development, or a control plane without
    an mTLS agent listener), by the bearer token issued at enrollment."""

    def __init__(self, enrollment: EnrollmentKeys, fanout: Fanout, cache: StateCache, *,
                 agent_tokens: bool = True) -> None:
        self.enrollment = enrollment
        self.fanout = fanout
        self.cache = cache
        self.agent_tokens = agent_tokens
        self._background: set[asyncio.Task] = set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background, holding its task until it ends (the
        event loop keeps only a weak reference: a dropped task can vanish)."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _who(self, context) -> str:
        """The node a Sync stream speaks for."""
        identity = peer_identity(context)
        node = node_of(identity)
        if node:
            net_id, node_id = node.split("/")[1], node.split("/")[3]
            # The node's record lists the keys of its certificates: refused at
            # once when the node is deleted (however long the certificate has
            # left), and also when a node of that name was made anew since.
            kv = await self.fanout.etcd.get(self.enrollment.agent_key(net_id, node_id))
            if kv is None:
                raise ApiError(grpc.StatusCode.UNAUTHENTICATED, f"{node} no longer exists", "NODE_DELETED")
            if peer_spki_sha256(context) not in bound_keys(kv.value):
                raise ApiError(grpc.StatusCode.UNAUTHENTICATED,
                               f"this certificate is not one of {node}'s (the node was made anew since?)",
                               "CERTIFICATE_NOT_BOUND")
            return node
        if identity:
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED, f"{identity} is not an agent's identity",
                           "NOT_AN_AGENT")
        if not self.agent_tokens:
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED,
                           "this stream needs the agent's certificate (mTLS, on the agent endpoint); bearer "
                           "tokens are refused", "AGENT_CERTIFICATE_REQUIRED")
        return await self.enrollment.authenticate(context.invocation_metadata())

    async def _renew(self, session: Session, csr: bytes) -> None:
        """A new certificate for the session's node, sent down its stream. The
        node's record then binds the new key besides the one in use (until
        the agent reconnects with the new pair)."""
        net_id, node_id = session.node.split("/")[1], session.node.split("/")[3]
        etcd, key = self.fanout.etcd, self.enrollment.agent_key(net_id, node_id)
        try:
            kv = await etcd.get(key)
            if kv is None or not bound_keys(kv.value) or check_csr(csr):
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "not an agent with a certificate, or a bad CSR",
                               "RENEWAL_REFUSED")
            issued = await self.enrollment.nodes.key_material.sign_certificate(csr, session.node)
            current = session.spki or sorted(bound_keys(kv.value))[0]
            t = etcd.txn_ops
            ok, _, _ = await etcd.txn([t.mod(key) == kv.mod_revision],
                                      [t.put(key, csr_binding(csr) + b"," + current.encode())])
            if not ok:
                raise ApiError(grpc.StatusCode.ABORTED, "the node changed during the renewal", "CONCURRENT_MODIFICATION")
        except ApiError as e:
            log.warning("certificate renewal for %s failed: %s", session.node, e)
            self.fanout._record(session.node, error=f"certificate renewal failed: {e.message}")
            return
        if session.closed:
            return
        try:
            session.queue.put_nowait(agent_pb2.SyncResponse(
                revision=session.sent.revision if session.sent else 0, certificate=issued))
        except asyncio.QueueFull:
            pass  # a slow agent gets a snapshot instead; it asks again, its certificate still valid

    async def _rotate(self, session: Session, public_key: str) -> None:
        """The agent's new key: signed by the key service and made the node's
        key in one update, which its peers learn first; then the node's desired
        state names it in interface.public_key (Fanout.rotate)."""
        from google.protobuf import field_mask_pb2

        from meshgate.api.v1 import node_pb2

        async def switch() -> int:
            updated = await self.enrollment.nodes.update(node_pb2.UpdateNodeRequest(
                node=node_pb2.Node(name=session.node, public_key=public_key),
                update_mask=field_mask_pb2.FieldMask(paths=["public_key"]),
            ))
            return int(updated.etag)

        try:
            await self.fanout.rotate(session.node, switch)
            log.info("node %s switched to a new key", session.node)
        except ApiError as e:
            log.warning("key rotation of %s failed: %s", session.node, e)
            self.fanout._record(session.node, error=f"key rotation failed: {e.message}")

    async def Enroll(self, request, context):
        return await self.enrollment.enroll(request)

    async def Sync(self, request_iterator, context):
        node = await self._who(context)
        spki = peer_spki_sha256(context)
        it = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(it.__anext__(), 30)
        except (TimeoutError, StopAsyncIteration):
            raise invalid_argument([FieldViolation("hello", "the first message of a stream must be hello")]) from None
        if first.WhichOneof("message") != "hello":
            raise invalid_argument([FieldViolation("hello", "the first message of a stream must be hello")])
        if first.hello.node != node:
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED, "this credential belongs to another node", "WRONG_NODE")
        await self.cache.ready.wait()
        rev = await self.fanout.etcd.revision()
        await self.cache.catch_up(rev, CACHE_WAIT_S, "agent stream")
        session = await self.fanout.open(node, first.hello)
        session.spki = spki
        reader = asyncio.create_task(self._read(it, session))
        try:
            while True:
                try:
                    if not session.queue.empty():
                        msg = session.queue.get_nowait()
                    else:
                        # asyncio.timeout, not wait_for: no task per message
                        async with asyncio.timeout(HEARTBEAT_S):
                            msg = await session.queue.get()
                except TimeoutError:
                    msg = agent_pb2.SyncResponse(
                        revision=session.sent.revision if session.sent else 0,
                        heartbeat=agent_pb2.SyncResponse.Heartbeat(),
                    )
                if msg is None:
                    if session.close_reason is not None:
                        raise session.close_reason
                    return
                yield msg
        finally:
            reader.cancel()
            await self.fanout.close(session)

    async def _read(self, it, session: Session) -> None:
        try:
            async for req in it:
                kind = req.WhichOneof("message")
                if kind == "ack":
                    self.fanout.ack(session, req.ack)
                elif kind == "resync":
                    await self.fanout.resync(session)
                elif kind == "new_key":
                    if self.fanout.rotation_pending(session.node):
                        self._spawn(self._rotate(session, req.new_key.public_key))
                    else:
                        # Only a key the control plane asked for: whoever holds an
                        # agent's credential must not be able to swap its key.
                        log.warning("refused an unsolicited new key from %s (no rotation was requested)",
                                    session.node)
                        self.fanout._record(session.node, error="refused a new key: no key rotation was requested")
                elif kind == "renew_certificate":
                    self._spawn(self._renew(session, req.renew_certificate.csr))
                elif kind == "egress_health":
                    self.fanout.egress_health(session, req.egress_health)
                elif kind == "health":
                    self.fanout._record(session.node)
                    self.fanout.client_health(session, req.health)
                    if self.fanout.paths is not None:
                        self.fanout.paths.report(session, req.health)
                elif kind == "domains":
                    self.fanout.learned(session, req.domains)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            if not session.closed:
                session.close()


def with_trace(etcd: Etcd) -> Etcd:
    """Make every write transaction record the current trace context in
    `changes/trace`, so watchers can stamp the messages it causes."""
    original = etcd.txn
    key = etcd.key("changes", "trace")

    async def txn(compare, success, failure=()):
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=otel_context.get_current())
        success = list(success)
        if success and carrier.get("traceparent"):
            success.append(etcd.txn_ops.put(key, carrier["traceparent"].encode()))
        return await original(compare, success, failure)

    etcd.txn = txn  # type: ignore[method-assign]
    return etcd


def _peer_name(net_id: str, segment: str) -> str:
    """The resource name of one end of a pre-shared key pair id (keymaterial.pair_id)."""
    if segment.startswith("~"):
        return f"networks/{net_id}/externalClients/{segment[1:]}"
    return f"networks/{net_id}/nodes/{segment}"
