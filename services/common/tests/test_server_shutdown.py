"""Graceful shutdown: SIGTERM stops new calls, drains in-flight ones, then exits.

The in-process tests send SIGTERM to the test process itself; `serve()` owns the
loop's SIGTERM/SIGINT handlers while it runs and removes them when it returns.
Each test checks a handler is installed before signalling, so a broken
`serve()` fails the test instead of killing pytest.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate.api.v1 import network_pb2, network_pb2_grpc
from meshgate.common.config import ServerConfig
from meshgate.common.server import GrpcServer, ServiceBinding, serve
from meshgate.common.testing import ServiceProcess

SERVING = health_pb2.HealthCheckResponse.SERVING


class SlowNetworks(network_pb2_grpc.NetworkServiceServicer):
    """GetNetwork parks until the test releases it: a call that is in flight on demand."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = 0

    async def GetNetwork(self, request, context):
        self.entered.set()
        await self.release.wait()
        self.finished += 1
        return network_pb2.Network(name=request.name)


def loop_owns(sig: int) -> bool:
    h = signal.getsignal(sig)
    return h not in (signal.SIG_DFL, signal.SIG_IGN, None, signal.default_int_handler)


async def wait_serving(server: GrpcServer, serve_task: asyncio.Task) -> None:
    while not server.port:
        assert not serve_task.done(), serve_task
        await asyncio.sleep(0.01)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), wait_for_ready=True)
        assert r.status == SERVING


async def wait_refusing(target: str) -> grpc.StatusCode:
    """Poll a fresh connection until the server stops taking new calls; return the refusal code."""
    for _ in range(500):
        async with grpc.aio.insecure_channel(target) as ch:
            try:
                r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError as e:
                return e.code()
            if r.status != SERVING:
                return grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(0.01)
    raise AssertionError("server kept serving after SIGTERM")


@pytest.fixture
async def slow_server():
    # Built inside the test's loop: a grpc.aio server binds to the loop it is made in.
    servicer = SlowNetworks()
    cfg = ServerConfig(listen="127.0.0.1:0", shutdown_grace=30)
    server = GrpcServer(cfg, [ServiceBinding.of(network_pb2, network_pb2_grpc, "NetworkService", servicer)])
    yield server, servicer
    servicer.release.set()


async def test_sigterm_drains_in_flight_call(slow_server, tmp_path):
    server, servicer = slow_server
    server.cfg.port_file = str(tmp_path / "port")
    hooks: list[str] = []

    async def hook():
        hooks.append("ran")

    task = asyncio.create_task(serve(server, on_shutdown=[hook]))
    try:
        await wait_serving(server, task)
        assert (tmp_path / "port").read_text().strip() == str(server.port)
        target = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(target) as ch:
            stub = network_pb2_grpc.NetworkServiceStub(ch)
            in_flight = asyncio.ensure_future(stub.GetNetwork(network_pb2.GetNetworkRequest(name="networks/slow")))
            await servicer.entered.wait()

            assert loop_owns(signal.SIGTERM), "serve() did not install a SIGTERM handler"
            os.kill(os.getpid(), signal.SIGTERM)

            # New calls are refused while the old one is still running...
            await wait_refusing(target)
            assert not in_flight.done()
            async with grpc.aio.insecure_channel(target) as late_ch:
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await network_pb2_grpc.NetworkServiceStub(late_ch).GetNetwork(
                        network_pb2.GetNetworkRequest(name="networks/late"), timeout=5
                    )
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert servicer.finished == 0
            assert not task.done()

            # ...and the in-flight call, once it finishes, gets its answer.
            servicer.release.set()
            got = await in_flight
            assert got.name == "networks/slow"
        await asyncio.wait_for(task, 30)
        assert task.result() is None
    finally:
        servicer.release.set()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.server.stop(0)
    assert servicer.finished == 1
    assert hooks == ["ran"]
    assert not loop_owns(signal.SIGTERM), "serve() left its SIGTERM handler installed"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


async def test_sigint_also_stops(slow_server):
    server, _ = slow_server
    task = asyncio.create_task(serve(server))
    try:
        await wait_serving(server, task)
        assert loop_owns(signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.wait_for(task, 30)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.server.stop(0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


async def test_call_outliving_grace_is_cut_off_and_serve_returns(slow_server):
    server, servicer = slow_server
    server.cfg.shutdown_grace = 0.2
    task = asyncio.create_task(serve(server))
    try:
        await wait_serving(server, task)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            call = network_pb2_grpc.NetworkServiceStub(ch).GetNetwork(network_pb2.GetNetworkRequest(name="networks/x"))
            await servicer.entered.wait()
            assert loop_owns(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await call  # never released: the grace period ends it
            assert ei.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        await asyncio.wait_for(task, 30)
    finally:
        servicer.release.set()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.server.stop(0)
    assert servicer.finished == 0
    assert not loop_owns(signal.SIGTERM)


async def test_stop_sets_health_not_serving_for_every_service(slow_server):
    server, _ = slow_server
    await server.start()
    try:
        await server.health.enter_graceful_shutdown()
        for name in ("", "meshgate.api.v1.NetworkService"):
            r = await server.health.Check(health_pb2.HealthCheckRequest(service=name), None)
            assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(0)


async def test_serve_that_fails_to_start_leaves_no_signal_handler():
    """A refused listen address ends serve() with SystemExit and restores signal handling."""
    hooks: list[str] = []

    async def hook():
        hooks.append("ran")

    server = GrpcServer(ServerConfig(listen="192.0.2.1:0"), [])
    with pytest.raises(SystemExit, match="refusing to serve plaintext"):
        await serve(server, on_shutdown=[hook])
    assert not loop_owns(signal.SIGTERM), "serve() left its SIGTERM handler installed after a failed start"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert hooks == ["ran"], "shutdown hooks (e.g. closing etcd) must run even when start fails"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("entry_point", ["meshgate-controlplane", "meshgate-keyservice"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_real_process_exits_zero_on_signal(etcd_server, etcd_prefix, entry_point, sig):
    env = {}
    if entry_point == "meshgate-keyservice":
        env["MESHGATE_KEYSERVICE_KEK"] = "t:" + base64.b64encode(os.urandom(32)).decode()
        env["MESHGATE_KEYSERVICE_INSECURE"] = "true"
    proc = ServiceProcess(
        entry_point, ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix], env=env
    ).start()
    try:
        pid = proc.proc.pid
        proc.signal(sig)
        code = proc.proc.wait(30)
    finally:
        proc.stop()
    assert code == 0, proc.log()
    assert not pid_alive(pid)
    log = proc.log()
    assert "shutting down" in log and "stopped" in log, log
    assert "Traceback" not in log, log
