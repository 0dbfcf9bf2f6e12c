"""Each replica's in-memory view of the network state, fed by an etcd watch.

List everything under the prefix at one revision, then watch from the next
revision; on compaction or a broken watch, list again (with capped, jittered
backoff while etcd is away). After every transaction that touched networks,
nodes, egress gateways or access policies, listeners get a `Change`: its
revision, the trace context the writer left in `changes/trace`, and per
network the nodes whose desired state may have changed (see
`compiler.affected_by_node`). A relist reports every node as affected, so
listeners recompute and send only what really differs.

Hazard: listeners run inline in the watch loop; they must not block on a slow
consumer (the fan-out queues and returns).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from meshgate.api.v1 import agent_pb2, egress_pb2, external_client_pb2, keys_pb2, network_pb2, node_pb2, policy_pb2
from meshgate.common import etcdwatch
from meshgate.common.aiotasks import cancel_and_wait
from meshgate.common.errors import ApiError
from meshgate.common.etcd import Etcd, EtcdUnavailable, prefix_end
from meshgate.controlplane import compiler, ipam, store

log = logging.getLogger(__name__)

_Resource = node_pb2.Node | egress_pb2.EgressGateway | policy_pb2.AccessPolicy | external_client_pb2.ExternalClient
_COLLECTIONS: dict[str, tuple[str, type[_Resource]]] = {
    "nodes": ("nodes", node_pb2.Node),
    "egressGateways": ("gateways", egress_pb2.EgressGateway),
    "accessPolicies": ("policies", policy_pb2.AccessPolicy),
    "externalClients": ("external_clients", external_client_pb2.ExternalClient),
}


@dataclass
class Change:
    revision: int
    traceparent: str = ""
    # network id -> names of nodes whose desired state may have changed
    affected: dict[str, set[str]] = field(default_factory=dict)
    # names of nodes that no longer exist
    deleted_nodes: set[str] = field(default_factory=set)
    # (network id, pair id) of pre-shared keys the key service wrote
    psk_pairs: set[tuple[str, str]] = field(default_factory=set)
    # nodes with a new key-rotation request (keys/nodeRotation/...)
    rotations: set[str] = field(default_factory=set)
    reset: bool = False
    # Only pre-shared keys changed: a listener may patch them into what it
    # last sent instead of recompiling (the key service writes a rotation of a
    # thousand pairs as a run of transactions).
    psk_only: bool = False
    # nodes whose agent session appeared or went (sessions/...; see liveness.py)
    sessions: set[str] = field(default_factory=set)
    # nodes whose path health record changed (pathHealth/...; relays.py)
    paths: set[str] = field(default_factory=set)


Listener = Callable[[Change], Awaitable[None]]


class StateCache:
    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.networks: dict[str, compiler.NetworkState] = {}
        self.revision = 0
        self.ready = asyncio.Event()
        self.listeners: list[Listener] = []
        self._task: asyncio.Task | None = None
        self._prefix = etcd.key("")
        # Indexes over nodes, for IPAM and key uniqueness hints:
        # (network, family) -> addresses in use, as integers (see
        # ipam.pick_int); (network, public key) -> node.
        self.addresses: dict[tuple[str, str], ipam.UsedInts] = {}
        self.pubkeys: dict[tuple[str, str], str] = {}
        self._waiters: list[tuple[int, asyncio.Future]] = []
        # node name -> when a key rotation was last requested for it (ns)
        self.rotation_requests: dict[str, int] = {}
        # names of nodes whose agent holds a stream on some replica (sessions/...)
        self.sessions: set[str] = set()
        # Path health (paths.py, relays.py): network -> node -> its agent's
        # record of its node peers; the relay marks' records and the mod
        # revisions of marks and learned endpoints (for compare-and-swap).
        self.path_health: dict[str, dict[str, dict]] = {}
        self.relay_records: dict[str, dict[str, dict]] = {}
        self.relay_revisions: dict[str, dict[str, int]] = {}
        self.learned_revisions: dict[str, dict[str, int]] = {}
        # Bumped before any change to the networks' state is applied (in the
        # same step, with no await between): whatever was worked out from a
        # NetworkState (a compiler.PeerIndex) is valid while this is unchanged.
        # Events that touch no network's state (agent sessions, status) leave
        # it alone, so thousands of streams connecting at once share one index;
        # so do changes of nodes' own fields only (`_own_fields_only`).
        self.generation = 0

    def _index(self, net_id: str, node: node_pb2.Node | external_client_pb2.ExternalClient | None, add: bool) -> None:
        if node is None:
            return
        for family, addr in (("v4", node.ipv4_address), ("v6", node.ipv6_address)):
            if addr:
                used = self.addresses.setdefault((net_id, family), ipam.UsedInts())
                (used.add if add else used.discard)(ipam.as_int(addr))
        if node.public_key:
            if add:
                self.pubkeys[(net_id, node.public_key)] = node.name
            elif self.pubkeys.get((net_id, node.public_key)) == node.name:
                del self.pubkeys[(net_id, node.public_key)]

    def _drop_network(self, net_id: str) -> None:
        for k in [k for k in self.addresses if k[0] == net_id]:
            del self.addresses[k]
        for k in [k for k in self.pubkeys if k[0] == net_id]:
            del self.pubkeys[k]

    def state_of(self, node_name: str) -> compiler.NetworkState | None:
        net_id = node_name.split("/")[1]
        st = self.networks.get(net_id)
        if st is None or node_name not in st.nodes:
            return None
        return st

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="state-cache")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def wait_for_revision(self, revision: int, timeout: float | None = None) -> bool:
        """Wait until the cache has seen `revision` (read-your-writes); False on timeout."""
        if self.revision >= revision:
            return True
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except TimeoutError:
            return False

    async def catch_up(self, revision: int, timeout: float, what: str) -> None:
        """`wait_for_revision`, or UNAVAILABLE (reason CACHE_BEHIND, with the
        revisions) when the cache is still behind after `timeout`: under load
        (thousands of agents connecting at once) it can lag etcd, and that is
        a reason to retry, not an internal error."""
        if not await self.wait_for_revision(revision, timeout):
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE,
                f"the control plane is catching up with its storage ({what}); retry shortly",
                "CACHE_BEHIND",
                metadata={"wanted_revision": str(revision), "cache_revision": str(self.revision)},
            )

    def _advance(self, revision: int) -> None:
        self.revision = max(self.revision, revision)
        if self._waiters:
            keep = []
            for rev, fut in self._waiters:
                if fut.done():
                    continue
                if rev <= self.revision:
                    fut.set_result(None)
                else:
                    keep.append((rev, fut))
            self._waiters = keep

    # the loop ------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._load()
                delay = 0.1
                async for batch in etcdwatch.watch(self.etcd, self._prefix, prefix_end(self._prefix), self.revision + 1):
                    await self._apply(batch)
            except etcdwatch.Compacted as e:
                log.warning("watch fell behind compaction (%s); listing again", e)
            except EtcdUnavailable as e:
                log.warning("etcd watch lost (%s); listing again in %.1fs", e, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)

    async def _load(self) -> None:
        kvs, rev = await self.etcd.list_prefix(self._prefix)
        nets: dict[str, compiler.NetworkState] = {}
        children = []
        path_kvs: list = []
        traceparent = ""
        for kv in kvs:
            parts = self._split(kv.key)
            if parts is None:
                continue
            if parts[0] in ("egressHealth", "egressDrain") and len(parts) == 3:  # egresshealth.py's, handoff.py's marks
                children.append((parts, kv))
                continue
            if parts[0] == "networks" and len(parts) == 2:
                nets[parts[1]] = compiler.NetworkState(store.decode(network_pb2.Network, kv))
            elif parts[0] in _COLLECTIONS and len(parts) == 3:
                children.append((parts, kv))
            elif parts[0] in _PATH_KEYS and len(parts) == 3:
                path_kvs.append((parts, kv))
            elif parts == ["changes", "trace"]:
                traceparent = kv.value.decode(errors="replace")
            elif _key_record(parts) or (parts[0] in (*_NODE_FLAGS, "learned") and len(parts) == 3):
                children.append((parts, kv))
        rotations: dict[str, int] = {}
        sessions: set[str] = set()
        for parts, kv in children:
            if parts[0] == "egressDrain":  # a drain change waiting for its handoff (handoff.py)
                if parts[1] in nets:
                    nets[parts[1]].drain_held[f"networks/{parts[1]}/egressGateways/{parts[2]}"] = (
                        _held(kv.value), kv.mod_revision)
                continue
            if parts[0] == "egressHealth":  # a gateway reported unhealthy (egresshealth.py)
                if parts[1] in nets:
                    nets[parts[1]].unhealthy[f"networks/{parts[1]}/egressGateways/{parts[2]}"] = _reason(kv.value)
                continue
            if parts[0] == "learned":
                if parts[1] in nets:
                    rep = _parse(agent_pb2.SyncRequest.Domains, kv.key, kv.value)
                    if rep is not None:
                        nets[parts[1]].learned[f"networks/{parts[1]}/nodes/{parts[2]}"] = rep
                continue
            if parts[0] in _NODE_FLAGS:
                name = f"networks/{parts[1]}/nodes/{parts[2]}"
                if parts[0] == "sessions":
                    sessions.add(name)
                elif parts[1] in nets:
                    nets[parts[1]].down.add(name)
                continue
            if parts[0] == "keys":
                st = nets.get(parts[2])
                name = _key_owner(parts)
                if st is not None and parts[1] in ("nodes", "clientKeys"):
                    sig = _parse(keys_pb2.SignedNodeKey, kv.key, kv.value)
                    if sig is not None:
                        compiler.add_signature(st.signatures.setdefault(name, {}), sig)
                elif parts[1] == "nodeRotation":
                    req = _parse(keys_pb2.RotateNodeKeyResponse, kv.key, kv.value)
                    if req is not None:
                        rotations[name] = req.request_time.ToNanoseconds()
                continue
            st = nets.get(parts[1])
            if st is None:
                continue
            attr, cls = _COLLECTIONS[parts[0]]
            msg = store.decode(cls, kv)
            getattr(st, attr)[msg.name] = msg
        for st in nets.values():
            st.index_tags()
        self.networks = nets
        self.generation += 1
        self.path_health, self.relay_records, self.relay_revisions, self.learned_revisions = {}, {}, {}, {}
        self._apply_paths([(parts, kv.value, True, kv.mod_revision) for parts, kv in path_kvs], Change(rev))
        self.rotation_requests = rotations
        self.sessions = sessions
        self.addresses, self.pubkeys = {}, {}
        for net_id, st in nets.items():
            for node in st.nodes.values():
                self._index(net_id, node, True)
            for client in st.external_clients.values():
                self._index(net_id, client, True)
        self.revision = 0
        self._advance(rev)
        self.ready.set()
        change = Change(rev, traceparent, {n: set(st.nodes) for n, st in nets.items()}, reset=True,
                        rotations=set(rotations), sessions=set(sessions))
        log.info("state cache loaded at revision %d: %d networks", rev, len(nets))
        await self._notify(change)

    def _split(self, key: bytes) -> list[str] | None:
        if not key.startswith(self._prefix):
            return None
        return key[len(self._prefix):].decode(errors="replace").split("/")

    def _apply_keys(self, events, change: Change) -> bool:
        """Signatures, pre-shared keys and rotation requests written by the key
        service; True when only pre-shared keys changed."""
        psk_only = True
        for parts, ev in events:
            kind, net_id, rid = parts[1], parts[2], parts[3]
            st = self.networks.get(net_id)
            if kind != "psk":
                psk_only = False
            if kind == "psk":
                change.psk_pairs.add((net_id, rid))
                if st is not None:
                    for n in rid.split("."):
                        name = f"networks/{net_id}/nodes/{n}"
                        if name in st.nodes:
                            change.affected.setdefault(net_id, set()).add(name)
                continue
            name = _key_owner(parts)
            if kind in ("nodes", "clientKeys") and st is not None:
                sig = _parse(keys_pb2.SignedNodeKey, ev.key, ev.value) if ev.put else None
                if sig is not None:
                    compiler.add_signature(st.signatures.setdefault(name, {}), sig)
                else:
                    st.signatures.pop(name, None)
                if name in st.nodes:
                    # Those who peer with the node carry its signature.
                    change.affected.setdefault(net_id, set()).update({name, *compiler.peers_of(st, name)})
                elif name in st.external_clients:
                    change.affected.setdefault(net_id, set()).update(compiler.affected_by_client(None, st, name))
            elif kind == "nodeRotation":
                req = _parse(keys_pb2.RotateNodeKeyResponse, ev.key, ev.value) if ev.put else None
                if req is not None:
                    self.rotation_requests[name] = req.request_time.ToNanoseconds()
                    change.rotations.add(name)
                else:
                    self.rotation_requests.pop(name, None)
        return psk_only

    async def _apply(self, batch: etcdwatch.Batch) -> None:
        relevant = []
        keyed = []
        traceparent = ""
        sessions: set[str] = set()
        path_events: list = []
        for ev in batch.events:
            parts = self._split(ev.key)
            if parts is None:
                continue
            if parts[0] in _PATH_KEYS and len(parts) == 3:  # relays.py's records
                path_events.append((parts, ev.value, ev.put, ev.mod_revision))
                continue
            if parts[0] in ("egressHealth", "egressDrain") and len(parts) == 3:  # egresshealth.py's, handoff.py's marks
                relevant.append((parts, ev))
                continue
            if parts[0] == "sessions" and len(parts) == 3:
                name = f"networks/{parts[1]}/nodes/{parts[2]}"
                (self.sessions.add if ev.put else self.sessions.discard)(name)
                sessions.add(name)
            elif parts[0] in ("liveness", "learned") and len(parts) == 3:
                relevant.append((parts, ev))
            elif parts == ["changes", "trace"] and ev.put:
                traceparent = ev.value.decode(errors="replace")
            elif (parts[0] == "networks" and len(parts) == 2) or (parts[0] in _COLLECTIONS and len(parts) == 3):
                relevant.append((parts, ev))
            elif _key_record(parts):
                keyed.append((parts, ev))
        change = Change(batch.revision, traceparent, sessions=sessions)
        if (relevant and not self._own_fields_only(relevant)) or keyed or path_events:
            self.generation += 1
        if path_events:
            self._apply_paths(path_events, change)
        if keyed:
            psk_only = self._apply_keys(keyed, change)
            if not relevant:
                change.psk_only = psk_only and not path_events
                self._advance(batch.revision)
                await self._notify(change)
                return
        if not relevant:
            self._advance(batch.revision)
            if sessions or change.paths or change.affected:
                await self._notify(change)
            return
        # Who a node or client change reaches is asked of the state just before
        # and just after each event (the union over the batch's steps covers
        # the batch), rather than of a copy of the network taken before the
        # batch: at 10,000 nodes that copy was a quarter of a join's cost.
        whole_network: set[str] = set()
        for parts, ev in relevant:
            net_id = parts[1]
            if parts[0] == "networks":
                whole_network.add(net_id)
                if ev.put:
                    net = network_pb2.Network.FromString(ev.value)
                    net.etag = str(ev.mod_revision)
                    if net_id in self.networks:
                        self.networks[net_id].network = net
                    else:
                        self.networks[net_id] = compiler.NetworkState(net)
                        self.networks[net_id].index_tags()
                else:
                    dropped = self.networks.pop(net_id, None)
                    self._drop_network(net_id)
                    if dropped is not None:
                        change.deleted_nodes.update(dropped.nodes)
                continue
            st = self.networks.get(net_id)
            if st is None:
                continue
            if parts[0] == "egressDrain":
                name = f"networks/{net_id}/egressGateways/{parts[2]}"
                if ev.put:
                    st.drain_held[name] = (_held(ev.value), ev.mod_revision)
                else:
                    st.drain_held.pop(name, None)
                change.affected.setdefault(net_id, set()).update(compiler.affected_by_health(st, name))
                continue
            if parts[0] == "egressHealth":
                name = f"networks/{net_id}/egressGateways/{parts[2]}"
                if ev.put:
                    st.unhealthy[name] = _reason(ev.value)
                else:
                    st.unhealthy.pop(name, None)
                change.affected.setdefault(net_id, set()).update(compiler.affected_by_health(st, name))
                continue
            if parts[0] == "liveness":
                name = f"networks/{net_id}/nodes/{parts[2]}"
                (st.down.add if ev.put else st.down.discard)(name)
                change.affected.setdefault(net_id, set()).update(compiler.affected_by_liveness(st, name))
                continue
            if parts[0] == "learned":  # a gateway agent's egress-domain addresses (sync.py)
                name = f"networks/{net_id}/nodes/{parts[2]}"
                rep = _parse(agent_pb2.SyncRequest.Domains, ev.key, ev.value) if ev.put else None
                if rep is not None:
                    st.learned[name] = rep
                else:
                    st.learned.pop(name, None)
                change.affected.setdefault(net_id, set()).update(compiler.affected_by_learned(st, name))
                continue
            attr, cls = _COLLECTIONS[parts[0]]
            name = names_of(parts)
            coll = getattr(st, attr)
            previous = coll.get(name)
            msg = None
            if ev.put:
                msg = cls.FromString(ev.value)
                msg.etag = str(ev.mod_revision)
            if parts[0] not in ("nodes", "externalClients"):  # gateways, policies: every node
                if msg is not None:
                    coll[msg.name] = msg
                else:
                    coll.pop(name, None)
                whole_network.add(net_id)
                continue
            assert msg is None or isinstance(msg, (node_pb2.Node, external_client_pb2.ExternalClient))
            self._index(net_id, previous, False)
            self._index(net_id, msg, True)
            aff = change.affected.setdefault(net_id, set())
            if parts[0] == "nodes":
                aff.add(name)
                # Only itself when no field its peers see changed (its listen port).
                reach = not (previous is not None and msg is not None and all(
                    getattr(previous, f) == getattr(msg, f) for f in compiler.PEER_VISIBLE_FIELDS))
                if reach:
                    aff |= compiler.node_reach(st, name)
                if isinstance(msg, node_pb2.Node):
                    st.put_node(msg)
                else:
                    st.drop_node(name)
                    change.deleted_nodes.add(name)
                if reach:
                    aff |= compiler.node_reach(st, name)
            else:
                aff |= compiler.affected_by_client(None, st, name)
                if msg is not None:
                    coll[msg.name] = msg
                else:
                    coll.pop(name, None)
                aff |= compiler.affected_by_client(None, st, name)
        for net_id in whole_network:
            if net_id in self.networks:  # deleted nodes are left out below
                change.affected.setdefault(net_id, set()).update(self.networks[net_id].nodes)
        for gone in change.deleted_nodes:
            for aff in change.affected.values():
                aff.discard(gone)
        self._advance(batch.revision)
        await self._notify(change)

    def _own_fields_only(self, relevant) -> bool:
        """Whether the batch only changes existing nodes' own fields (none of
        `compiler.PEER_VISIBLE_FIELDS`, say a listen port): then what was worked
        out from the network state (a `PeerIndex`) still holds, and a change
        touching one node costs that node, not an index over 10,000 (issue 18)."""
        for parts, ev in relevant:
            if parts[0] != "nodes" or not ev.put:
                return False
            st = self.networks.get(parts[1])
            previous = st.nodes.get(names_of(parts)) if st is not None else None
            if previous is None:
                return False
            try:
                new = node_pb2.Node.FromString(ev.value)
            except DecodeError:
                return False
            if any(getattr(previous, f) != getattr(new, f) for f in compiler.PEER_VISIBLE_FIELDS):
                return False
        return True

    def _apply_paths(self, events, change: Change) -> None:
        """Path health records, relay marks and learned endpoints: `events` are
        (key parts, value, put, mod revision)."""
        import json

        for parts, value, put, mod in events:
            kind, net_id, rid = parts
            st = self.networks.get(net_id)
            try:
                rec = json.loads(value) if put and kind != "learnedEndpoints" else None
            except ValueError:
                log.warning("ignoring %s/%s/%s: not JSON", kind, net_id, rid)
                continue
            if kind == "pathHealth":
                name = f"networks/{net_id}/nodes/{rid}"
                per = self.path_health.setdefault(net_id, {})
                if isinstance(rec, dict):
                    per[name] = rec
                else:
                    per.pop(name, None)
                change.paths.add(name)
            elif kind == "pathRoutes":
                recs, revs = self.relay_records.setdefault(net_id, {}), self.relay_revisions.setdefault(net_id, {})
                old = st.relay_marks.get(rid) if st is not None else None
                if isinstance(rec, dict):
                    recs[rid], revs[rid] = rec, mod
                    if st is not None:
                        st.relay_marks[rid] = str(rec.get("relay", ""))
                else:
                    recs.pop(rid, None)
                    revs.pop(rid, None)
                    if st is not None:
                        st.relay_marks.pop(rid, None)
                if st is not None:
                    a, _, b = rid.partition("~")
                    touched = {f"networks/{net_id}/nodes/{x}" for x in (a, b, old or "", st.relay_marks.get(rid) or "")
                               if x}
                    change.affected.setdefault(net_id, set()).update(n for n in touched if n in st.nodes)
                change.paths.add(f"networks/{net_id}/nodes/{rid}")
            elif kind == "learnedEndpoints":
                name = f"networks/{net_id}/nodes/{rid}"
                revs = self.learned_revisions.setdefault(net_id, {})
                if put:
                    revs[name] = mod
                else:
                    revs.pop(name, None)
                if st is not None:
                    if put:
                        st.learned_endpoints[name] = value.decode(errors="replace")[:128]
                    else:
                        st.learned_endpoints.pop(name, None)
                    if name in st.nodes:
                        change.affected.setdefault(net_id, set()).update({name, *compiler.peers_of(st, name)})

    async def _notify(self, change: Change) -> None:
        for listener in self.listeners:
            try:
                await listener(change)
            except Exception:  # noqa: BLE001 - one listener must not stop the watch
                log.exception("state cache listener failed at revision %d", change.revision)


def _parse(cls, key: bytes, value: bytes):
    """A record the key service wrote, or None (logged) if it does not parse:
    one bad value must not stop the watch."""
    try:
        return cls.FromString(value)
    except DecodeError:
        log.warning("ignoring %s: not a %s", key.decode(errors="replace"), cls.DESCRIPTOR.name)
        return None


# Per-node flags the cache follows besides resources: agent sessions and
# liveness marks (liveness.py).
_NODE_FLAGS = ("sessions", "liveness")


def _held(value: bytes) -> bool:
    """The drain an egressDrain mark holds (JSON `{"drained": ...}`)."""
    try:
        return bool(json.loads(value).get("drained", False))
    except (ValueError, AttributeError):
        return False


def _reason(value: bytes) -> str:
    """The reason of an egressHealth mark (JSON `{"reason": ...}`)."""
    try:
        return str(json.loads(value).get("reason", ""))[:256]
    except (ValueError, AttributeError):
        return ""


# Path health records, relay marks and learned endpoints (relays.py).
_PATH_KEYS = ("pathHealth", "pathRoutes", "learnedEndpoints")


def _key_record(parts: list[str]) -> bool:
    """keys/{nodes|clientKeys|psk|nodeRotation}/{net}/{id}: what the key
    service writes that the control plane follows (not the sealed client keys
    or its own state)."""
    return len(parts) == 4 and parts[0] == "keys" and parts[1] in ("nodes", "clientKeys", "psk", "nodeRotation")


def _key_owner(parts: list[str]) -> str:
    """The resource a keys/{kind}/{net}/{id} record belongs to."""
    collection = "externalClients" if parts[1] == "clientKeys" else "nodes"
    return f"networks/{parts[2]}/{collection}/{parts[3]}"


def names_of(parts: list[str]) -> str:
    collection, net_id, rid = parts
    return f"networks/{net_id}/{collection}/{rid}"
