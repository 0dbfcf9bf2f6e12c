"""The bootstrap admin token works on the first call after the control plane
starts, even when its token cache's etcd watch lags the write (a member of a
three-member cluster that is behind: seen in CI as UNAUTHENTICATED 'unknown
API token' on the first CreateNetwork)."""

import asyncio
import time

import grpc
import pytest

from meshgate.api.v1 import network_pb2, network_pb2_grpc
from meshgate.common.server import GrpcServer, ServerConfig
from meshgate.controlplane.api import AuthSettings, ControlPlane
from meshgate.controlplane.auth import tokens


@pytest.fixture
def lagging_token_watch(monkeypatch):
    """The token cache's real watch, each batch handed on a second late."""
    real = tokens.etcdwatch.watch

    async def late(*a, **kw):
        async for batch in real(*a, **kw):
            await asyncio.sleep(1.0)
            yield batch

    monkeypatch.setattr(tokens.etcdwatch, "watch", late)


async def test_the_bootstrap_token_is_accepted_as_soon_as_the_control_plane_serves(etcd, tmp_path, lagging_token_watch):
    path = tmp_path / "admin-token"
    app = ControlPlane(etcd, auth=AuthSettings(bootstrap_token_file=str(path)))
    await app.start()
    server = GrpcServer(ServerConfig(listen="127.0.0.1:0", shutdown_grace=0), app.bindings)
    port = await server.start()
    try:
        bearer = path.read_text().strip()
        assert app.token_cache.check(bearer, tokens.parse_bearer(bearer), time.time()).name == "tokens/bootstrap-admin"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            got = await network_pb2_grpc.NetworkServiceStub(ch).CreateNetwork(
                network_pb2.CreateNetworkRequest(network_id="prod", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")),
                metadata=(("authorization", f"Bearer {bearer}"),))
        assert got.name == "networks/prod"
    finally:
        await server.stop(0)
        await app.stop()
