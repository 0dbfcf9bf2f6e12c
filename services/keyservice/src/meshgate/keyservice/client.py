"""A thin asyncio client for the control plane (and tools) to call the key service over gRPC.

    ks = KeyClient(channel)
    psks = await ks.preshared_keys("networks/n", [(a, b), ...])   # {(a, b) sorted: PresharedKey}
    signed = await ks.register_node_key("networks/n/nodes/a", public_key_b64)
    authority = await ks.authority_public_keys()                    # [raw 32-byte keys], current first

`preshared_keys` chunks large requests (5,000 pairs per call, well inside the
default 4 MiB message limit) and runs the chunks concurrently.

Hazard: the results hold secrets (PresharedKey.key); never log them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc

from meshgate.api.v1 import keys_pb2, keys_pb2_grpc

CHUNK = 5000


def pair_key(a: str, b: str) -> tuple[str, str]:
    x, y = sorted((a, b))
    return x, y


class KeyClient:
    def __init__(self, channel: grpc.aio.Channel, timeout: float = 30) -> None:
        self.stub = keys_pb2_grpc.KeyServiceStub(channel)
        self.timeout = timeout

    async def preshared_keys(
        self, network: str, pairs: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], keys_pb2.PresharedKey]:
        """The current pre-shared key of every pair (issued if absent), keyed by the sorted pair."""
        wanted = list(dict.fromkeys(pair_key(a, b) for a, b in pairs))
        chunks = [wanted[i : i + CHUNK] for i in range(0, len(wanted), CHUNK)]
        replies = await asyncio.gather(*(
            self.stub.IssuePresharedKeys(
                keys_pb2.IssuePresharedKeysRequest(network=network, pairs=[f"{a}|{b}" for a, b in chunk]),
                timeout=self.timeout,
            )
            for chunk in chunks
        ))
        return {pair_key(*k.peers): k for r in replies for k in r.keys}

    async def register_node_key(self, node: str, public_key: str) -> keys_pb2.SignedNodeKey:
        return await self.stub.RegisterNodeKey(
            keys_pb2.RegisterNodeKeyRequest(node=node, public_key=public_key), timeout=self.timeout
        )

    async def authority_public_keys(self) -> list[bytes]:
        ka = await self.stub.GetKeyAuthority(keys_pb2.GetKeyAuthorityRequest(), timeout=self.timeout)
        return list(ka.public_keys)
