"""The gRPC server kit every meshgate service runs on.

`GrpcServer` is a grpc.aio server with the standard health service, server
reflection, OpenTelemetry tracing and error translation in interceptors, and
optional TLS/mTLS. `serve()` runs one until SIGTERM or SIGINT and then shuts
down gracefully: health goes NOT_SERVING, new calls are refused, in-flight
calls get `shutdown_grace` seconds to finish, then shutdown hooks run.

Hazards:
- A plaintext server on a non-loopback address is refused unless the operator
  passed `--insecure` explicitly.
- Errors: `ApiError` becomes its status with details; `asyncio.CancelledError`
  and grpc aborts pass through; anything else is logged with its traceback and
  the caller gets INTERNAL with only a trace id.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry import trace

from meshgate.common.config import ServerConfig
from meshgate.common.errors import ApiError
from meshgate.common.etcd import EtcdUnavailable
from meshgate.common.metrics import ServerMetrics
from meshgate.common.streaming import CloseStreams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to serve: the generated add function and the servicer."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str

    @classmethod
    def of(cls, pb2_module, grpc_module, name: str, servicer) -> ServiceBinding:
        full = pb2_module.DESCRIPTOR.services_by_name[name].full_name
        return cls(getattr(grpc_module, f"add_{name}Servicer_to_server"), servicer, full)


async def _abort(context: grpc.aio.ServicerContext, err: ApiError) -> None:
    st = rpc_status.to_status(err.to_status())
    await context.abort(st.code, st.details, st.trailing_metadata)


def _translate(exc: Exception) -> ApiError | None:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EtcdUnavailable):
        return ApiError(grpc.StatusCode.UNAVAILABLE, "storage (etcd) is unavailable; retry", "STORAGE_UNAVAILABLE")
    return None


async def _internal(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    span = trace.get_current_span().get_span_context()
    trace_id = format(span.trace_id, "032x") if span.is_valid else "none"
    log.error("unhandled error in %s (trace %s)", method, trace_id, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (trace id {trace_id})")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions raised by handlers into proper gRPC statuses."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method

        def guard_unary(fn):
            async def wrapped(request, context):
                try:
                    return await fn(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as e:  # noqa: BLE001 - last-resort translation
                    api = _translate(e)
                    if api is None:
                        await _internal(context, method, e)
                    else:
                        await _abort(context, api)

            return wrapped

        def guard_stream(fn):
            async def wrapped(request, context):
                try:
                    async for item in fn(request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as e:  # noqa: BLE001
                    api = _translate(e)
                    if api is None:
                        await _internal(context, method, e)
                    else:
                        await _abort(context, api)

            return wrapped

        kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(guard_unary(handler.unary_unary), **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(guard_unary(handler.stream_unary), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(guard_stream(handler.unary_stream), **kw)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(guard_stream(handler.stream_stream), **kw)
        return handler


def listen_addresses(listen: str) -> list[str]:
    """`--listen` may name several addresses, comma-separated; `unix:/path`
    serves on a Unix socket (reachable from other network namespaces of the
    host, which is how agents in test namespaces reach a local control plane)."""
    return [a.strip() for a in listen.split(",") if a.strip()]


def is_loopback(listen: str) -> bool:
    if listen.startswith("unix:"):
        return True
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_warned_insecure: set[tuple[str, ...]] = set()


def _warn_insecure(outside: list[str]) -> None:
    """The WARNING of every start that serves plaintext beyond loopback (--insecure);
    once per process and set of addresses (entry points call server_credentials
    early to refuse, and again when the server starts)."""
    key = tuple(outside)
    if key in _warned_insecure:
        return
    _warned_insecure.add(key)
    log.warning("INSECURE: serving plaintext on non-loopback address(es) %s (--insecure): callers and "
                "their credentials are not protected on the network; development only", ", ".join(outside))


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """The TLS credentials `cfg` asks for, or None for plaintext; exits with a
    message when plaintext would face a non-loopback address without --insecure
    or the TLS files are incomplete. Entry points may call it before anything
    else, to refuse early."""
    if not cfg.tls_cert:
        outside = [a for a in listen_addresses(cfg.listen) if not is_loopback(a)]
        if outside and not cfg.insecure:
            raise SystemExit(
                f"refusing to serve plaintext on non-loopback address {outside[0]}: "
                "configure --tls-cert/--tls-key, or pass --insecure for development"
            )
        if outside:
            _warn_insecure(outside)
        return None
    if not cfg.tls_key:
        raise SystemExit("--tls-cert needs --tls-key (the certificate's private key)")

    cert = read_file(cfg.tls_cert, "TLS certificate")
    key = read_file(cfg.tls_key, "TLS private key")
    ca = read_file(cfg.tls_client_ca, "client CA bundle") if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def read_file(path: str, what: str) -> bytes:
    """A TLS file's bytes, or a clear exit naming what it was for."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"cannot read the {what} {path}: {e.strerror}") from None


class GrpcServer:
    """A started-on-demand grpc.aio server with health and reflection."""

    def __init__(
        self,
        cfg: ServerConfig,
        services: Sequence[ServiceBinding],
        *,
        extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
        extra_ports: Sequence[tuple[str, grpc.ServerCredentials]] = (),
    ) -> None:
        """`extra_ports`: more addresses with credentials of their own (the
        control plane's mTLS agent listener)."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        self.cfg = cfg
        self.extra_ports = list(extra_ports)
        self.extra_bound: list[int] = []
        self.services = list(services)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            # CloseStreams outermost: a cancelled stream unwinds (spans, finally) in its own task.
            interceptors=[CloseStreams(), aio_server_interceptor(), ServerMetrics(), ErrorInterceptor(),
                          *extra_interceptors],
            options=[("grpc.so_reuseport", 0), *options],
        )
        for s in self.services:
            s.add_to_server(s.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [s.full_name for s in self.services]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        self.port = 0

    async def start(self) -> int:
        creds = server_credentials(self.cfg)
        self.port = 0
        for address in listen_addresses(self.cfg.listen):
            if creds is None:
                port = self.server.add_insecure_port(address)
            else:
                port = self.server.add_secure_port(address, creds)
            if not port:
                raise SystemExit(f"cannot listen on {address}")
            if not address.startswith("unix:") and not self.port:
                self.port = port  # the first TCP port is the one reported
        if not listen_addresses(self.cfg.listen):
            raise SystemExit("--listen names no address")
        self.extra_bound = []
        for address, extra_creds in self.extra_ports:
            port = self.server.add_secure_port(address, extra_creds)
            if not port:
                raise SystemExit(f"cannot listen on {address}")
            self.extra_bound.append(port)
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for s in self.services:
            await self.health.set(s.full_name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on port %d", ", ".join(s.full_name for s in self.services), self.port)
        return self.port

    async def stop(
        self, grace: float | None = None, before_drain: Sequence[Callable[[], Awaitable[None]]] = ()
    ) -> None:
        """NOT_SERVING, then `before_drain` hooks (to end long-lived streams,
        which would otherwise hold the drain for the whole grace period), then
        refuse new calls and let in-flight ones finish within `grace`."""
        grace = self.cfg.shutdown_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        for hook in before_drain:
            await hook()
        log.info("shutting down: draining in-flight calls for up to %.1fs", grace)
        await self.server.stop(grace)


async def serve(
    server: GrpcServer,
    *,
    before_drain: Sequence[Callable[[], Awaitable[None]]] = (),
    on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
) -> None:
    """Run `server` until SIGTERM/SIGINT, then shut down gracefully: see
    `GrpcServer.stop` for `before_drain`; `on_shutdown` hooks run last."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        # Inside the try: a refused start must still remove the handlers and
        # run the hooks (which close etcd).
        port = await server.start()
        if server.cfg.port_file:
            tmp = server.cfg.port_file + ".tmp"
            with open(tmp, "w") as f:  # noqa: ASYNC230 - a few bytes, once, before serving
                f.write(f"{port}\n")
            os.replace(tmp, server.cfg.port_file)
        await stopping.wait()
        await server.stop(before_drain=before_drain)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for hook in on_shutdown:
            await hook()
    log.info("stopped")
