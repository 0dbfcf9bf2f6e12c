"""Fixtures for the server kit's own tests.

`grpc_server` starts in-process `GrpcServer`s on free loopback ports and stops
every one it started (by handle) when the test ends, passed or failed.
"""

from __future__ import annotations

import grpc
import pytest

from meshgate.common.config import ServerConfig
from meshgate.common.server import GrpcServer, ServiceBinding


@pytest.fixture
async def grpc_server():
    started: list[GrpcServer] = []
    channels: list[grpc.aio.Channel] = []

    async def start(bindings: list[ServiceBinding], **cfg) -> tuple[GrpcServer, grpc.aio.Channel]:
        cfg.setdefault("listen", "127.0.0.1:0")
        cfg.setdefault("shutdown_grace", 1)
        server = GrpcServer(ServerConfig(**cfg), bindings)
        port = await server.start()
        started.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return server, channel

    yield start
    for ch in channels:
        await ch.close()
    for s in started:
        await s.server.stop(0)
