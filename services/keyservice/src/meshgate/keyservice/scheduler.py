"""Scheduled rotations, run by the elected leader among the key-service replicas.

Each tick reads every network (`networks/{net}`, written by the control
plane; read here, never written) and:

- finishes a pre-shared-key rotation epoch left running by a leader that died
  (see psk.py: each pair is rotated at most once per epoch);
- starts a new epoch when the network's `preshared_key_rotation_period` has
  elapsed since the last epoch started (or since the network was created);
- records a node key rotation request (`keys/nodeRotation/{net}/{node}`) for
  every node whose public key is older than `max_node_key_age` and has no
  request since that key was registered. The control plane forwards requests
  to the agents, which generate the new pair. Nodes that external clients
  connect to are skipped: the clients' static configurations name their key.

- sweeps key material whose owner is gone (`_sweep`): pre-shared keys of pairs
  with a deleted peer, deleted clients' key pairs and signatures, deleted
  nodes' signatures and rotation requests, once older than SWEEP_GRACE_S.

Every write carries the election fence. Networks with
`disable_preshared_keys` are skipped for pre-shared keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from meshgate.api.v1 import external_client_pb2, keys_pb2, network_pb2, node_pb2
from meshgate.common import metrics
from meshgate.common.errors import ApiError
from meshgate.common.etcd import EtcdUnavailable, prefix_end
from meshgate.keyservice.psk import PresharedKeys
from meshgate.keyservice.sealing import header
from meshgate.keyservice.vault import Vault

log = logging.getLogger(__name__)


def node_rotation_path(net: str, node: str) -> str:
    return f"keys/nodeRotation/{net}/{node}"


async def request_node_rotation(vault: Vault, net: str, node: str, fence: Sequence[Any] = (),
                                only_if_older_than_ns: int | None = None) -> keys_pb2.RotateNodeKeyResponse | None:
    """Record that `node` should rotate its key; None if a request newer than the given time exists."""
    key = vault.key(node_rotation_path(net, node))
    kv = await vault.etcd.get(key)
    if kv is not None and only_if_older_than_ns is not None:
        prev = keys_pb2.RotateNodeKeyResponse.FromString(kv.value)
        if prev.request_time.ToNanoseconds() >= only_if_older_than_ns:
            return None
    resp = keys_pb2.RotateNodeKeyResponse()
    resp.request_time.GetCurrentTime()
    t = vault.t
    cmp = t.mod(key) == kv.mod_revision if kv else t.create(key) == 0
    ok, _, _ = await vault.etcd.txn([cmp, *fence], [t.put(key, resp.SerializeToString())])
    return resp if ok else None


@dataclass
class TickReport:
    epochs_started: list[str] = field(default_factory=list)
    epochs_resumed: list[str] = field(default_factory=list)
    keys_rotated: int = 0
    node_rotations_requested: list[str] = field(default_factory=list)
    # due, but external clients connect to them (see _node_keys)
    node_rotations_skipped: list[str] = field(default_factory=list)
    # key records deleted because their node or client is gone (see _sweep)
    swept: int = 0


SWEEP_GRACE_S = 600.0  # key material younger than this is never swept


def _issued_ns(kind: str, value: bytes) -> int:
    """When a key record was made (ns), from what it carries in the open; 0
    (old enough) when it does not say."""
    try:
        if kind in ("clients", "psk"):
            return int(header(value).get("created", 0))
        if kind in ("clientKeys", "nodes"):
            return keys_pb2.SignedNodeKey.FromString(value).sign_time.ToNanoseconds()
        if kind == "nodeRotation":
            return keys_pb2.RotateNodeKeyResponse.FromString(value).request_time.ToNanoseconds()
    except Exception:  # noqa: BLE001 - unreadable (a broken envelope too): judged by its owner alone
        log.warning("a key record of kind %s does not parse; swept if its owner is gone", kind)
        return 0
    return 0


class Scheduler:
    def __init__(self, vault: Vault, psk: PresharedKeys, interval: float = 30.0) -> None:
        self.vault = vault
        self.psk = psk
        self.interval = interval
        self.ticks = 0

    async def lead(self, fence: list[Any]) -> None:
        """Tick every `interval` seconds while leading (cancelled when leadership ends)."""
        while True:
            try:
                await self.tick(fence)
                await self.sweep(fence)
            except (ApiError, EtcdUnavailable) as e:
                log.warning("scheduled rotation tick failed: %s", e)
            self.ticks += 1
            await asyncio.sleep(self.interval)

    async def tick(self, fence: Sequence[Any] = (), now_ns: int | None = None) -> TickReport:
        now_ns = time.time_ns() if now_ns is None else now_ns
        report = TickReport()
        base = self.vault.key("networks/")
        kvs, _ = await self.vault.etcd.list_prefix(base)
        for kv in kvs:
            net = kv.key[len(base):].decode()
            if "/" in net:
                continue
            network = network_pb2.Network.FromString(kv.value)
            if not network.disable_preshared_keys:
                await self._psk(net, network, fence, now_ns, report)
            if network.max_node_key_age.ToNanoseconds() > 0:
                await self._node_keys(net, network, fence, now_ns, report)
        return report

    async def sweep(self, fence: Sequence[Any] = (), now_ns: int | None = None) -> TickReport:
        """Garbage collection of every network's key material (see `_sweep`)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        report = TickReport()
        base = self.vault.key("networks/")
        kvs, _, _ = await self.vault.etcd.range(base, prefix_end(base), keys_only=True)
        for kv in kvs:
            net = kv.key[len(base):].decode()
            if "/" not in net:
                await self._sweep(net, fence, now_ns, report)
        return report

    async def _sweep(self, net: str, fence: Sequence[Any], now_ns: int, report: TickReport) -> None:
        """Delete key material whose owner is gone: pre-shared keys of pairs with
        a deleted peer, the key pairs and signatures of deleted external
        clients, the signatures and rotation requests of deleted nodes. The
        control plane deletes them with their owners; this catches what a
        lagging replica re-issued afterwards or a crash left behind. Only
        material older than SWEEP_GRACE_S is touched (a create in flight issues
        key material before its record exists), and each delete compares that
        the owner still does not exist and the record is unchanged."""
        v = self.vault
        cutoff = now_ns - int(SWEEP_GRACE_S * 1e9)

        async def ids(collection: str) -> set[str]:
            prefix = v.key(f"{collection}/{net}/")
            kvs, _, _ = await v.etcd.range(prefix, prefix_end(prefix), keys_only=True)
            return {kv.key[len(prefix):].decode() for kv in kvs}

        nodes, clients = await ids("nodes"), await ids("externalClients")

        def owner_key(segment: str) -> bytes:
            if segment.startswith("~"):
                return v.key(f"externalClients/{net}/{segment[1:]}")
            return v.key(f"nodes/{net}/{segment}")

        def exists(segment: str) -> bool:
            return segment[1:] in clients if segment.startswith("~") else segment in nodes

        doomed: list[tuple[Any, list[bytes]]] = []  # (kv, owner keys that must still be absent)
        base = v.key(f"keys/psk/{net}/")
        for kv in (await v.etcd.list_prefix(base))[0]:
            gone = [seg for seg in kv.key[len(base):].decode().split(".") if not exists(seg)]
            if gone and _issued_ns("psk", kv.value) < cutoff:
                doomed.append((kv, [owner_key(seg) for seg in gone]))
        for kind, collection, present in (("clients", "externalClients", clients),
                                          ("clientKeys", "externalClients", clients),
                                          ("nodes", "nodes", nodes), ("nodeRotation", "nodes", nodes)):
            base = v.key(f"keys/{kind}/{net}/")
            for kv in (await v.etcd.list_prefix(base))[0]:
                rid = kv.key[len(base):].decode()
                if rid in present or _issued_ns(kind, kv.value) >= cutoff:
                    continue
                doomed.append((kv, [v.key(f"{collection}/{net}/{rid}")]))
        for kv, owners in doomed:
            ok, _, _ = await v.etcd.txn(
                [v.t.mod(kv.key) == kv.mod_revision, *(v.t.create(k) == 0 for k in owners), *fence],
                [v.t.delete(kv.key)],
            )
            if ok:
                report.swept += 1
        if report.swept:
            log.info("swept %d key records of deleted nodes and clients in networks/%s", report.swept, net)

    async def _psk(self, net: str, network: network_pb2.Network, fence: Sequence[Any], now_ns: int,
                   report: TickReport) -> None:
        st = await self.psk.rotation_state(net)
        if st.state == "running":
            report.epochs_resumed.append(net)
            report.keys_rotated += await self.psk.run_epoch(net, st.epoch, fence)
            return
        period = network.preshared_key_rotation_period.ToNanoseconds()
        if period <= 0:
            return
        since = st.started if st.mod_revision else network.create_time.ToNanoseconds()
        if not since or now_ns < since + period:
            return
        metrics.keyservice.rotation_lag.record((now_ns - since - period) / 1e9, {"kind": "psk"})
        epoch = await self.psk.claim_epoch(net, "schedule", fence)
        report.epochs_started.append(net)
        report.keys_rotated += await self.psk.run_epoch(net, epoch, fence)

    async def _node_keys(self, net: str, network: network_pb2.Network, fence: Sequence[Any], now_ns: int,
                         report: TickReport) -> None:
        age = network.max_node_key_age.ToNanoseconds()
        base = self.vault.key(f"nodes/{net}/")
        kvs, _ = await self.vault.etcd.list_prefix(base)
        # A node that external clients connect to is named by its public key in
        # their static configurations: rotating it on a schedule would cut
        # them off, so only an explicit request rotates it.
        client_kvs, _ = await self.vault.etcd.list_prefix(self.vault.key(f"externalClients/{net}/"))
        serving = {external_client_pb2.ExternalClient.FromString(c.value).gateway_node for c in client_kvs}
        for kv in kvs:
            node = node_pb2.Node.FromString(kv.value)
            created = node.public_key_create_time.ToNanoseconds()
            if not node.public_key or not created or now_ns < created + age:
                continue
            node_id = kv.key[len(base):].decode()
            if f"networks/{net}/nodes/{node_id}" in serving:
                report.node_rotations_skipped.append(f"networks/{net}/nodes/{node_id}")
                continue
            if await request_node_rotation(self.vault, net, node_id, fence, only_if_older_than_ns=created):
                metrics.keyservice.rotation_lag.record((now_ns - created - age) / 1e9, {"kind": "node_key"})
                log.info("requested a key rotation of networks/%s/nodes/%s (key older than %ds)",
                         net, node_id, age // 1_000_000_000)
                report.node_rotations_requested.append(f"networks/{net}/nodes/{node_id}")
