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

Every write carries the election fence. Networks with
`disable_preshared_keys` are skipped for pre-shared keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from meshgate.api.v1 import external_client_pb2, keys_pb2, network_pb2, node_pb2
from meshgate.common.errors import ApiError
from meshgate.common.etcd import EtcdUnavailable
from meshgate.keyservice.psk import PresharedKeys
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
                log.info("requested a key rotation of networks/%s/nodes/%s (key older than %ds)",
                         net, node_id, age // 1_000_000_000)
                report.node_rotations_requested.append(f"networks/{net}/nodes/{node_id}")
