"""Pre-shared keys per unordered pair of peers, their generations and rotation epochs.

A pair's key lives sealed at `keys/psk/{net}/{pair}` (pair ids in names.py);
the envelope header carries, readable without the KEK:

    gen      1 on issue, +1 on every rotation
    epoch    the network rotation epoch the key belongs to
    created  when this generation was made (ns since the epoch)

Issuing is race-safe: a missing pair is created with "create revision = 0"
compares, so two replicas issuing the same pair at once return the same key.
Bulk issue reads the network's pairs in one range and creates what is
missing in transactions of up to 120 keys (etcd's default limit is 128
operations per transaction), run concurrently.

Rotating a whole network is an *epoch*, recorded at `keys/rotation/{net}`
(JSON: epoch, state running|done, started, finished, reason, rotated):

1. claim: one transaction moves the record from epoch E (done) to E+1
   (running), comparing its mod revision, so an epoch is claimed once;
2. run: every pair whose key has epoch < E+1 gets a new key of epoch E+1, gen
   + 1, in transactions comparing each pair's mod revision, so a pair is
   rotated at most once per epoch however many workers run the epoch;
3. finish: the record moves to done.

Pairs with an external client (`~` in the id) are not part of epochs: the
client's key sits in a static configuration that no rotation can reach.

A worker that dies between 1 and 3 leaves the epoch running; the next
scheduler leader (or anyone calling `resume`) finishes it without rotating a
pair twice. Callers may add fence compares (the scheduler adds "the leader
key is still mine") to every transaction.

Hazard: the key bytes must never be logged or put into an error; log pair
names and generations only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import timestamp_pb2

from meshgate.api.v1 import keys_pb2, network_pb2
from meshgate.common import metrics
from meshgate.common.errors import FieldViolation, failed_precondition, invalid_argument, not_found
from meshgate.common.etcd import KV
from meshgate.keyservice import names
from meshgate.keyservice.sealing import SealError, header
from meshgate.keyservice.vault import TXN_BATCH, Retry, Vault, optimistic, sealed_broken

log = logging.getLogger(__name__)

PSK_LEN = 32
MAX_PAIRS = 20000
# Up to this many pairs are read by key (batched point reads, etcd.get_many);
# more, say a hub's snapshot, by one range over the network's keys. A
# whole-network rotation arrives at the control plane as one transaction of
# 120 pairs after another, and each one's keys used to be fetched with a range
# over all of the network's pairs: 167 ranges of 20,000 records at 10,000
# nodes (issue 18).
BY_KEY_READS = 2048


def _by_smaller_end(pairs: Iterable[str]) -> Callable[[tuple[Any, str, int]], tuple[int, str, str]]:
    """A sort key that puts each pair next to the other pairs of its end with
    fewer pairs: a spoke's pairs with its hubs land in one transaction, so the
    control plane patches and sends the spoke one message per rotation instead
    of one per hub (a hub's own messages are gathered anyway, sync.py)."""
    degree = Counter(seg for pair in pairs for seg in pair.split(".", 1))

    def key(item: tuple[Any, str, int]) -> tuple[int, str, str]:
        pair = item[1]
        end = min(pair.split(".", 1), key=lambda seg: (degree[seg], seg))
        return degree[end], end, pair

    return key


@dataclass(frozen=True)
class Psk:
    network: str
    pair: str
    key: bytes
    generation: int
    epoch: int
    create_time_ns: int

    def __repr__(self) -> str:  # never the key
        return f"Psk({self.name!r}, generation={self.generation}, epoch={self.epoch})"

    @property
    def name(self) -> str:
        return f"networks/{self.network}/presharedKeys/{self.pair}"

    @property
    def peers(self) -> tuple[str, str]:
        return names.pair_peers(self.network, self.pair)

    def to_proto(self) -> keys_pb2.PresharedKey:
        ts = timestamp_pb2.Timestamp()
        ts.FromNanoseconds(self.create_time_ns)
        return keys_pb2.PresharedKey(
            name=self.name, peers=list(self.peers), key=base64.b64encode(self.key).decode(),
            generation=self.generation, create_time=ts,
        )


@dataclass(frozen=True)
class RotationState:
    epoch: int = 0
    state: str = "done"
    started: int = 0
    finished: int = 0
    reason: str = ""
    rotated: int = 0
    mod_revision: int = 0  # 0: no record yet

    def encode(self) -> bytes:
        d = {k: getattr(self, k) for k in ("epoch", "state", "started", "finished", "reason", "rotated")}
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def decode(cls, kv: KV | None) -> RotationState:
        if kv is None:
            return cls()
        d = json.loads(kv.value)
        return cls(mod_revision=kv.mod_revision, **d)


def parse_pairs(network: str, pairs: Iterable[str | tuple[str, str]], field: str = "pairs") -> tuple[str, list[str]]:
    """(network id, unique pair ids in request order); INVALID_ARGUMENT with field violations."""
    errs: list[FieldViolation] = []
    net = names.parse_network(network)
    if net is None:
        errs.append(FieldViolation("network", f"must be networks/{{network}} with an id of {names.ID_RULE}"))
    out: dict[str, None] = {}
    for i, p in enumerate(pairs):
        if i >= MAX_PAIRS:
            errs.append(FieldViolation(field, f"at most {MAX_PAIRS} pairs per request"))
            break
        if isinstance(p, tuple):
            a, b = p
        elif p.count("|") == 1:
            a, b = p.split("|")
        else:
            a = b = ""
        pa, pb = names.parse_peer(a), names.parse_peer(b)
        if pa is None or pb is None:
            errs.append(FieldViolation(f"{field}[{i}]", "must be '{peer a}|{peer b}', each a node or external "
                                       "client resource name (networks/{network}/nodes/{node})"))
        elif net is not None and (pa[0] != net or pb[0] != net):
            errs.append(FieldViolation(f"{field}[{i}]", f"both peers must be in networks/{net}"))
        elif pa[1] == pb[1]:
            errs.append(FieldViolation(f"{field}[{i}]", "a pair needs two different peers"))
        else:
            out[names.pair_id(pa[1], pb[1])] = None
    if errs:
        raise invalid_argument(errs)
    assert net is not None
    return net, list(out)


class PresharedKeys:
    def __init__(self, vault: Vault) -> None:
        self.vault = vault

    # --- paths and reads ---------------------------------------------------------

    @staticmethod
    def path(net: str, pair: str) -> str:
        return f"keys/psk/{net}/{pair}"

    @staticmethod
    def rotation_path(net: str) -> str:
        return f"keys/rotation/{net}"

    async def network(self, net: str) -> network_pb2.Network:
        kv = await self.vault.etcd.get(self.vault.key(f"networks/{net}"))
        if kv is None:
            raise not_found("Network", f"networks/{net}")
        return network_pb2.Network.FromString(kv.value)

    async def _usable_network(self, net: str) -> None:
        if (await self.network(net)).disable_preshared_keys:
            raise failed_precondition(
                f"pre-shared keys are turned off in networks/{net} (disable_preshared_keys)",
                "PRESHARED_KEYS_DISABLED", f"networks/{net}", "Network",
            )

    async def rotation_state(self, net: str) -> RotationState:
        return RotationState.decode(await self.vault.etcd.get(self.vault.key(self.rotation_path(net))))

    async def _read(self, net: str, pairs: Sequence[str]) -> dict[str, KV]:
        v = self.vault
        if len(pairs) <= BY_KEY_READS:
            keys = {v.key(self.path(net, p)): p for p in pairs}
            return {keys[k]: kv for k, kv in (await v.etcd.get_many(list(keys))).items()}
        base = v.key(f"keys/psk/{net}/")
        all_kvs, _ = await v.etcd.list_prefix(base)
        wanted = set(pairs)
        found = ((kv.key[len(base):].decode(), kv) for kv in all_kvs)
        return {p: kv for p, kv in found if p in wanted}

    def _open(self, net: str, pair: str, kv: KV) -> Psk:
        meta, key = self.vault.unseal(self.path(net, pair), kv.value)
        return Psk(net, pair, key, int(meta["gen"]), int(meta["epoch"]), int(meta["created"]))

    def _new(self, net: str, pair: str, generation: int, epoch: int) -> tuple[Psk, bytes]:
        psk = Psk(net, pair, os.urandom(PSK_LEN), generation, epoch, time.time_ns())
        meta = {"gen": generation, "epoch": epoch, "created": psk.create_time_ns}
        return psk, self.vault.seal(self.path(net, pair), meta, psk.key)

    async def _commit_batches(self, batches: list[tuple[list[Any], list[Any]]]) -> None:
        """Commit independent transactions concurrently; Retry if any lost its compares."""
        results = await asyncio.gather(*(self.vault.commit(c, o) for c, o in batches), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for r in errors:
            if not isinstance(r, Retry):
                raise r
        if errors:
            raise Retry()

    # --- issue ---------------------------------------------------------------------

    async def issue(self, network: str, pairs: Iterable[str | tuple[str, str]]) -> list[Psk]:
        """The current key of every pair (creating missing ones), in request order.

        `network` is `networks/{net}`; a pair is `"{peer a}|{peer b}"` or a tuple
        of the two resource names, in any order. This is the bulk call the control
        plane uses: 1,000 pairs cost one range read and, for the missing ones,
        ceil(missing / 120) transactions."""
        net, pair_ids = parse_pairs(network, pairs)
        await self._usable_network(net)
        v = self.vault
        have: dict[str, Psk] = {}

        async def attempt() -> list[Psk]:
            todo = [p for p in pair_ids if p not in have]
            existing = await self._read(net, todo)
            for p, kv in existing.items():
                have[p] = self._open(net, p, kv)
            missing = [p for p in todo if p not in existing]
            if missing:
                epoch = (await self.rotation_state(net)).epoch
                made = [(p, *self._new(net, p, 1, epoch)) for p in missing]
                batches = []
                for i in range(0, len(made), TXN_BATCH):
                    chunk = made[i : i + TXN_BATCH]
                    batches.append((
                        [v.t.create(v.key(self.path(net, p))) == 0 for p, _, _ in chunk],
                        [v.t.put(v.key(self.path(net, p)), sealed) for p, _, sealed in chunk],
                    ))
                try:
                    await self._commit_batches(batches)
                    created = set(missing)
                except Retry:
                    created = set()
                    # Keep what landed; lost batches are re-read on the retry.
                    landed = await self._read(net, missing)
                    for p, psk, sealed in made:
                        got = landed.get(p)
                        if got is not None and got.value == sealed:
                            have[p] = psk
                    raise
                for p, psk, _ in made:
                    if p in created:
                        have[p] = psk
                metrics.keyservice.psk_issued.add(len(created))
                log.info("issued %d new pre-shared keys in networks/%s", len(missing), net)
            return [have[p] for p in pair_ids]

        return await optimistic(attempt, "issuing pre-shared keys")

    # --- rotate named pairs -----------------------------------------------------------

    async def rotate(self, network: str, pairs: Iterable[str | tuple[str, str]]) -> int:
        """New generations for the named pairs now (a missing pair is issued); returns how many."""
        net, pair_ids = parse_pairs(network, pairs)
        await self._usable_network(net)
        v = self.vault
        done: set[str] = set()

        async def attempt() -> int:
            todo = [p for p in pair_ids if p not in done]
            existing = await self._read(net, todo)
            epoch = (await self.rotation_state(net)).epoch
            batches, order = [], []
            for i in range(0, len(todo), TXN_BATCH):
                chunk = todo[i : i + TXN_BATCH]
                cmp, ops = [], []
                for p in chunk:
                    kv = existing.get(p)
                    key = v.key(self.path(net, p))
                    if kv is None:
                        cmp.append(v.t.create(key) == 0)
                        _, sealed = self._new(net, p, 1, epoch)
                    else:
                        meta = self._header(net, p, kv)
                        cmp.append(v.t.mod(key) == kv.mod_revision)
                        _, sealed = self._new(net, p, int(meta["gen"]) + 1, max(int(meta["epoch"]), epoch))
                    ops.append(v.t.put(key, sealed))
                batches.append((cmp, ops))
                order.append(chunk)
            results = await asyncio.gather(*(v.commit(c, o) for c, o in batches), return_exceptions=True)
            for chunk, r in zip(order, results, strict=True):
                if isinstance(r, Retry):
                    continue
                if isinstance(r, BaseException):
                    raise r
                done.update(chunk)
            if len(done) < len(pair_ids):
                raise Retry()
            return len(done)

        n = await optimistic(attempt, "rotating pre-shared keys")
        metrics.keyservice.psk_rotated.add(n, {"trigger": "request"})
        log.info("rotated %d pre-shared keys in networks/%s on demand", n, net)
        return n

    def _header(self, net: str, pair: str, kv: KV) -> dict[str, Any]:
        try:
            return header(kv.value)
        except SealError as e:
            raise sealed_broken(e) from None

    # --- rotate a whole network (epochs) ----------------------------------------------

    async def claim_epoch(self, net: str, reason: str, fence: Sequence[Any] = ()) -> int:
        """Start a new rotation epoch of `net` (or join the one running); returns its number."""
        v = self.vault

        async def attempt() -> int:
            st = await self.rotation_state(net)
            if st.state == "running":
                return st.epoch
            new = RotationState(st.epoch + 1, "running", time.time_ns(), 0, reason, 0)
            key = v.key(self.rotation_path(net))
            cmp = v.t.mod(key) == st.mod_revision if st.mod_revision else v.t.create(key) == 0
            ok, _, _ = await v.etcd.txn([cmp, *fence], [v.t.put(key, new.encode())])
            if not ok:
                raise Retry()
            log.info("pre-shared key rotation epoch %d of networks/%s started (%s)", new.epoch, net, reason)
            return new.epoch

        return await optimistic(attempt, "starting a pre-shared key rotation")

    async def run_epoch(self, net: str, epoch: int, fence: Sequence[Any] = ()) -> int:
        """Bring every pair of `net` to `epoch` (each at most once), then mark the epoch done.

        Returns how many keys this call rotated."""
        v = self.vault
        base = v.key(f"keys/psk/{net}/")
        rotated = 0

        async def attempt() -> None:
            nonlocal rotated
            kvs, _ = await v.etcd.list_prefix(base)
            todo = []
            for kv in kvs:
                pair = kv.key[len(base):].decode()
                if "~" in pair:
                    # An external client holds its key in a static
                    # configuration that nothing can update: whole-network
                    # rotations leave its pair alone (rotate it by name, then
                    # hand the client a new configuration).
                    continue
                meta = self._header(net, pair, kv)
                if int(meta["epoch"]) < epoch:
                    todo.append((kv, pair, int(meta["gen"])))
            todo.sort(key=_by_smaller_end(pair for _, pair, _ in todo))
            lost = False
            for i in range(0, len(todo), TXN_BATCH):
                chunk = todo[i : i + TXN_BATCH]
                cmp = [v.t.mod(kv.key) == kv.mod_revision for kv, _, _ in chunk]
                ops = [v.t.put(kv.key, self._new(net, pair, gen + 1, epoch)[1]) for kv, pair, gen in chunk]
                try:
                    await v.commit([*cmp, *fence], ops)
                    rotated += len(chunk)
                    metrics.keyservice.psk_rotated.add(len(chunk), {"trigger": "epoch"})
                except Retry:
                    lost = True
            if lost:
                raise Retry()

        await optimistic(attempt, "rotating pre-shared keys")

        async def finish() -> None:
            st = await self.rotation_state(net)
            if st.epoch != epoch or st.state != "running":
                return
            done = RotationState(epoch, "done", st.started, time.time_ns(), st.reason, st.rotated + rotated)
            key = v.key(self.rotation_path(net))
            ok, _, _ = await v.etcd.txn([v.t.mod(key) == st.mod_revision, *fence], [v.t.put(key, done.encode())])
            if not ok:
                raise Retry()

        await optimistic(finish, "finishing a pre-shared key rotation")
        log.info("pre-shared key rotation epoch %d of networks/%s done: %d keys rotated here", epoch, net, rotated)
        return rotated

    async def rotate_all(self, network: str, reason: str = "on demand", fence: Sequence[Any] = ()) -> int:
        """Rotate every pair of the network once (a new epoch); returns how many keys this call rotated."""
        net, _ = parse_pairs(network, [])
        await self._usable_network(net)
        epoch = await self.claim_epoch(net, reason, fence)
        return await self.run_epoch(net, epoch, fence)

    # --- clean-up ------------------------------------------------------------------

    async def forget(self, network: str, peer: str = "") -> int:
        """Delete the keys of a deleted network, or of every pair of a deleted peer; returns how many."""
        net = names.parse_network(network)
        if net is None:
            raise invalid_argument([FieldViolation("network", "must be networks/{network}")])
        v = self.vault
        base = v.key(f"keys/psk/{net}/")
        kvs, _ = await v.etcd.list_prefix(base)
        if peer:
            parsed = names.parse_peer(peer)
            if parsed is None or parsed[0] != net:
                raise invalid_argument([FieldViolation("peer", "must be a node or external client of the network")])
            seg = parsed[1]
            kvs = [kv for kv in kvs if seg in kv.key[len(base):].decode().split(".")]
        for i in range(0, len(kvs), TXN_BATCH):
            await v.etcd.txn([], [v.t.delete(kv.key) for kv in kvs[i : i + TXN_BATCH]])
        if not peer:
            await v.etcd.txn([], [v.t.delete(v.key(self.rotation_path(net)))])
        return len(kvs)

