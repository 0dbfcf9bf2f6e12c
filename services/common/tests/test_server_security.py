"""Transport security: no silent plaintext off loopback; TLS and mTLS when configured.

Nothing here binds a non-loopback address: the refusal must come before
binding, which the tests prove with 192.0.2.1 (TEST-NET-1, not on this host).
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate.common.config import ServerConfig
from meshgate.common.server import GrpcServer, is_loopback, server_credentials
from meshgate.common.testing import write_test_pki


@pytest.mark.parametrize(
    "listen, loopback",
    [
        ("127.0.0.1:7400", True),
        ("127.0.0.5:0", True),
        ("localhost:7400", True),
        ("[::1]:7400", True),
        ("0.0.0.0:7400", False),
        ("[::]:7400", False),
        ("192.0.2.1:0", False),
        ("10.0.0.1:7400", False),
        ("example.com:7400", False),
        ("", False),
    ],
)
def test_is_loopback(listen, loopback):
    assert is_loopback(listen) is loopback


@pytest.mark.parametrize("listen", ["192.0.2.1:0", "0.0.0.0:7400", "[::]:7400", "example.com:7400"])
def test_plaintext_off_loopback_is_refused(listen):
    with pytest.raises(SystemExit) as ei:
        server_credentials(ServerConfig(listen=listen))
    assert "refusing to serve plaintext" in str(ei.value.code)
    assert "--insecure" in str(ei.value.code)


def test_insecure_allows_plaintext_off_loopback():
    assert server_credentials(ServerConfig(listen="192.0.2.1:0", insecure=True)) is None


def test_plaintext_on_loopback_needs_no_flag():
    assert server_credentials(ServerConfig(listen="127.0.0.1:0")) is None


async def test_start_refuses_before_binding():
    server = GrpcServer(ServerConfig(listen="192.0.2.1:0"), [])
    try:
        with pytest.raises(SystemExit, match="refusing to serve plaintext"):
            await server.start()
        assert server.port == 0
    finally:
        await server.server.stop(0)


# --- TLS ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_test_pki(tmp_path_factory.mktemp("pki"))


async def _check(port: int, creds: grpc.ChannelCredentials | None) -> health_pb2.HealthCheckResponse:
    target = f"127.0.0.1:{port}"
    ch = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
    async with ch:
        return await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)


def test_tls_off_loopback_needs_no_insecure_flag(pki):
    cfg = ServerConfig(listen="192.0.2.1:0", tls_cert=pki["srv.pem"], tls_key=pki["srv.key"])
    assert isinstance(server_credentials(cfg), grpc.ServerCredentials)


async def test_tls_server(pki):
    cfg = ServerConfig(listen="127.0.0.1:0", tls_cert=pki["srv.pem"], tls_key=pki["srv.key"])
    server = GrpcServer(cfg, [])
    port = await server.start()
    try:
        ca = open(pki["ca.pem"], "rb").read()
        r = await _check(port, grpc.ssl_channel_credentials(root_certificates=ca))
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _check(port, None)  # plaintext client against a TLS server
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


async def test_mtls_server_requires_client_certificate(pki):
    cfg = ServerConfig(
        listen="127.0.0.1:0", tls_cert=pki["srv.pem"], tls_key=pki["srv.key"], tls_client_ca=pki["ca.pem"]
    )
    server = GrpcServer(cfg, [])
    port = await server.start()
    try:
        ca = open(pki["ca.pem"], "rb").read()
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _check(port, grpc.ssl_channel_credentials(root_certificates=ca))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=open(pki["cli.key"], "rb").read(),
            certificate_chain=open(pki["cli.pem"], "rb").read(),
        )
        r = await _check(port, creds)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


def test_tls_cert_without_key_is_a_clear_exit(pki):
    from meshgate.common.server import server_credentials

    with pytest.raises(SystemExit) as e:
        server_credentials(ServerConfig(listen="127.0.0.1:0", tls_cert=pki["srv.pem"]))
    assert "--tls-key" in str(e.value.code)


def test_unreadable_tls_file_is_a_clear_exit(tmp_path):
    from meshgate.common.server import server_credentials

    with pytest.raises(SystemExit) as e:
        server_credentials(ServerConfig(listen="127.0.0.1:0", tls_cert=str(tmp_path / "no.pem"), tls_key=str(tmp_path / "no.key")))
    assert "cannot read the TLS certificate" in str(e.value.code)
