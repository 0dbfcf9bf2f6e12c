"""`Client` (synchronous) and `AsyncClient` (asyncio) over the generated stubs.

Both inherit one typed method per RPC from `_generated` and share:

- settings from `config.load` (constructor arguments, `MESHGATE_*`, the
  context file the CLI writes);
- a default deadline on every unary call (`timeout`, 30 s);
- a channel whose gRPC service config carries the call policy: every call
  waits for the server to be ready
  (until its deadline) rather than failing while it restarts, which is safe
  because nothing has been sent yet; idempotent calls (`Get*`, `List*`,
  `Update*`, `Delete*`, `Watch`) are retried on UNAVAILABLE with capped
  exponential backoff and jitter, by gRPC itself. Nothing else is retried:
  a Create that failed with UNAVAILABLE may have happened;
- errors as `meshgate.sdk.errors.MeshgateError` subclasses;
- OpenTelemetry client interceptors (only `opentelemetry-api` is needed: with
  no SDK configured they cost nothing), so a caller's span is the parent of
  the server's;
- `modify()`: read-modify-write with the etag, retried on ABORTED.

Hazard: a streaming call (`watch`, `sync`) has no default deadline; it ends
when the caller stops iterating (the call is cancelled then).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import Message

from meshgate.api.v1 import events_pb2
from meshgate.sdk import api, errors, masks
from meshgate.sdk import config as config_mod
from meshgate.sdk._generated import AsyncMethods, SyncMethods

RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
MODIFY_ATTEMPTS = 8
EVENT_SERVICE = "meshgate.api.v1.EventService"


def service_config(cfg: config_mod.ClientConfig) -> dict[str, Any]:
    """The gRPC service config: wait-for-ready, and retries on UNAVAILABLE for idempotent calls.

    The default deadline is not in here but passed with each unary call:
    grpc 1.85 fails calls at once when a service-config timeout is under
    about two seconds.
    """
    groups: dict[tuple[bool, bool], list[dict[str, str]]] = {}
    for s in api.services():
        for m in s.methods:
            streaming = m.client_streaming or m.server_streaming
            groups.setdefault((m.idempotent, streaming), []).append({"service": s.full_name, "method": m.name})
    out = []
    for (idempotent, _streaming), names in sorted(groups.items()):
        mc: dict[str, Any] = {"name": names, "waitForReady": cfg.wait_for_ready}
        if idempotent:
            mc["retryPolicy"] = RETRY_POLICY
        out.append(mc)
    return {"methodConfig": out}


def channel_options(cfg: config_mod.ClientConfig) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config(cfg))),
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        # Reconnect quickly after a control-plane restart, but never spin.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    if cfg.server_name:
        opts.append(("grpc.ssl_target_name_override", cfg.server_name))
    return opts


def _credentials(cfg: config_mod.ClientConfig) -> grpc.ChannelCredentials | None:
    if not cfg.use_tls:
        return None

    def read(path: str) -> bytes | None:
        return open(path, "rb").read() if path else None

    return grpc.ssl_channel_credentials(read(cfg.ca_file), read(cfg.key_file), read(cfg.cert_file))


class _Base:
    def __init__(
        self,
        target: str | None = None,
        *,
        context: str | None = None,
        token: str | None = None,
        tls: bool | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        timeout: float | None = None,
        key_service_target: str | None = None,
        wait_for_ready: bool | None = None,
        config: config_mod.ClientConfig | None = None,
    ) -> None:
        if config is None:
            config = config_mod.load(
                dict(target=target, token=token, tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                     timeout=timeout, key_service_target=key_service_target, wait_for_ready=wait_for_ready),
                context=context,
            )
        config.check()
        self.config = config
        token_value = config.resolved_token()
        self._auth = (("authorization", f"Bearer {token_value}"),) if token_value else ()
        self._channels: dict[str, Any] = {}
        self._stubs: dict[str, Any] = {}
        self._raw_channels: list[Any] = []

    def _target_for(self, service: str) -> str:
        if service == api.KEY_SERVICE and self.config.key_service_target:
            return self.config.key_service_target
        return self.config.target

    def _stub(self, service: str):
        stub = self._stubs.get(service)
        if stub is None:
            target = self._target_for(service)
            ch = self._channels.get(target)
            if ch is None:
                ch = self._channels[target] = self._make_channel(target)
            svc = next(s for s in api.services() if s.full_name == service)
            stub = self._stubs[service] = svc.stub(ch)
        return stub

    def _md(self, metadata) -> tuple[tuple[str, str], ...] | None:
        md = (*self._auth, *(metadata or ()))
        return md or None

    def _make_channel(self, target: str):
        raise NotImplementedError

    def _deadline(self, timeout: float | None) -> float:
        return self.config.timeout if timeout is None else timeout

    @staticmethod
    def _resource_methods(name: str) -> tuple[api.Resource, str, str]:
        res = api.resource_of_name(name)
        if res.get is None or res.update is None:
            raise ValueError(f"{res.type_name} cannot be updated")
        return res, res.get.python_name, res.update.python_name


class Client(SyncMethods, _Base):
    """A synchronous client. Use as a context manager, or call `close()`.

        with Client("127.0.0.1:7400") as c:
            net = c.create_network(network_id="demo", network={"ipv4_cidr": "100.64.0.0/24"})
            for node in c.iter_nodes(parent=net.name):
                print(node.name, node.ipv4_address)
    """

    def _make_channel(self, target: str) -> grpc.Channel:
        from opentelemetry.instrumentation.grpc import client_interceptor
        from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

        creds = _credentials(self.config)
        opts = channel_options(self.config)
        ch = grpc.secure_channel(target, creds, opts) if creds else grpc.insecure_channel(target, opts)
        self._raw_channels.append(ch)
        return intercept_channel(ch, client_interceptor())

    def check_reachable(self, service: str = "", timeout: float | None = None) -> None:
        """Raise `errors.Unavailable` naming the address unless the server that
        serves `service` (default: the control plane) accepts a connection
        within `timeout` seconds (default: `connect_timeout`).

        Calls wait for the server until their deadline (30 s), which is right
        while it restarts but leaves a person with a bare DEADLINE_EXCEEDED
        when the address is wrong; the CLI checks first.
        """
        target = self._target_for(service)
        wait = self.config.connect_timeout if timeout is None else timeout
        creds = _credentials(self.config)
        opts = channel_options(self.config)
        ch = grpc.secure_channel(target, creds, opts) if creds else grpc.insecure_channel(target, opts)
        try:
            grpc.channel_ready_future(ch).result(timeout=wait)
        except grpc.FutureTimeoutError:
            # One call that does not wait, for gRPC's reason (refused, TLS handshake failed, ...).
            reason = ""
            try:
                check = ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=bytes,
                                       response_deserializer=bytes)
                check(b"", timeout=1, wait_for_ready=False)
            except grpc.RpcError as e:
                reason = (e.details() or "").rsplit("last error: ", 1)[-1]
            raise errors.Unavailable(
                grpc.StatusCode.UNAVAILABLE,
                f"nothing answers at {target}: no connection within {wait:g}s"
                + (f" ({reason})" if reason else "")
                + "; is the service running there, and is that the right address (--target, the context)?",
                retryable=True,
            ) from None
        finally:
            ch.close()

    def close(self) -> None:
        for ch in self._raw_channels:
            ch.close()
        self._raw_channels.clear()
        self._channels.clear()
        self._stubs.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, service, method, request, timeout, metadata):
        try:
            return getattr(self._stub(service), method)(request, timeout=self._deadline(timeout), metadata=self._md(metadata))
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None

    def _unary_stream(self, service, method, request, timeout, metadata) -> Iterator:
        call = getattr(self._stub(service), method)(request, timeout=timeout, metadata=self._md(metadata))
        return self._drain(call)

    def _stream_stream(self, service, method, requests, timeout, metadata) -> Iterator:
        call = getattr(self._stub(service), method)(iter(requests), timeout=timeout, metadata=self._md(metadata))
        return self._drain(call)

    @staticmethod
    def _drain(call) -> Iterator:
        try:
            yield from call
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
        finally:
            call.cancel()

    @staticmethod
    def _pages(list_method, request, items_field, timeout, metadata) -> Iterator:
        req = type(request)()
        req.CopyFrom(request)
        while True:
            resp = list_method(req, timeout=timeout, metadata=metadata)
            yield from getattr(resp, items_field)
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    def modify(self, name: str, mutate: Callable[[Message], Message | None], *, attempts: int = MODIFY_ATTEMPTS,
               timeout: float | None = None) -> Message:
        """Read `name`, apply `mutate` to a copy, and update exactly the fields it changed.

        The update carries the etag that was read, so a concurrent change makes
        it fail with ABORTED; then the resource is read again and `mutate` runs
        again on the fresh copy (so it must be a function of the resource, not
        of anything read before). Returns the updated resource, or the current
        one if `mutate` changed nothing.
        """
        res, get, update = self._resource_methods(name)
        for attempt in range(attempts):
            current = getattr(self, get)(name=name, timeout=timeout)
            desired: Any = type(current)()  # the resource's message (every one has an etag)
            desired.CopyFrom(current)
            desired = mutate(desired) or desired
            mask = masks.diff(current, desired)
            if not mask.paths:
                return current
            desired.etag = current.etag
            try:
                return getattr(self, update)(**{res.update_field: desired, "update_mask": mask}, timeout=timeout)
            except errors.Aborted:
                if attempt == attempts - 1:
                    raise
                time.sleep(random.uniform(0, 0.02 * 2**attempt))
        raise AssertionError("unreachable")


class AsyncClient(AsyncMethods, _Base):
    """An asyncio client: every RPC is a coroutine, streams and pages are async iterators.

        async with AsyncClient() as c:
            async for ev in c.watch_events(parent="networks/demo"):
                print(ev.type, ev.resource_name)
    """

    def _make_channel(self, target: str) -> grpc.aio.Channel:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        creds = _credentials(self.config)
        opts = channel_options(self.config)
        icpts = aio_client_interceptors()
        if creds:
            return grpc.aio.secure_channel(target, creds, opts, interceptors=icpts)
        return grpc.aio.insecure_channel(target, opts, interceptors=icpts)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._stubs.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _unary(self, service, method, request, timeout, metadata):
        try:
            return await getattr(self._stub(service), method)(request, timeout=self._deadline(timeout), metadata=self._md(metadata))
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None

    def _unary_stream(self, service, method, request, timeout, metadata) -> AsyncIterator:
        return self._drain(lambda: getattr(self._stub(service), method)(request, timeout=timeout, metadata=self._md(metadata)))

    def _stream_stream(self, service, method, requests, timeout, metadata) -> AsyncIterator:
        return self._drain(lambda: getattr(self._stub(service), method)(requests, timeout=timeout, metadata=self._md(metadata)))

    @staticmethod
    async def _drain(start) -> AsyncIterator:
        call = start()
        try:
            async for item in call:
                yield item
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
        finally:
            call.cancel()

    @staticmethod
    async def _pages(list_method, request, items_field, timeout, metadata) -> AsyncIterator:
        req = type(request)()
        req.CopyFrom(request)
        while True:
            resp = await list_method(req, timeout=timeout, metadata=metadata)
            for item in getattr(resp, items_field):
                yield item
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    async def watch_events(
        self,
        parent: str = "",
        *,
        start_revision: int = 0,
        resource_types: list[str] | tuple[str, ...] = (),
        max_reconnects: int | None = None,
        on_start: Callable[[int], Any] | None = None,
    ) -> AsyncIterator[events_pb2.WatchEvent]:
        """Resource change events, in order, surviving control-plane restarts.

        `start_revision` 0 means from now; pass a revision (an event's
        `revision`, or an etag) to get exactly the events after it. When the
        stream breaks with UNAVAILABLE it is reopened after the last revision
        delivered, so no event is lost or repeated. `on_start(revision)` is
        called each time the server has started watching: every change after
        `revision` will be delivered.
        """
        last = start_revision
        reconnects = 0
        req = events_pb2.WatchRequest(parent=parent, resource_types=list(resource_types))
        while True:
            req.start_revision = last
            call = self._stub(EVENT_SERVICE).Watch(req, metadata=self._md(None))
            try:
                md = dict(await call.initial_metadata() or ())
                begun = int(md.get("meshgate-watch-start-revision", last + 1)) - 1
                last = max(last, begun)
                if on_start is not None:
                    on_start(last)
                async for ev in call:
                    last = ev.revision
                    reconnects = 0
                    yield ev
                return
            except grpc.RpcError as e:
                err = errors.from_rpc_error(e)
                reconnects += 1
                if not isinstance(err, errors.Unavailable) or (max_reconnects is not None and reconnects > max_reconnects):
                    raise err from None
                await asyncio.sleep(min(2.0, 0.1 * 2**reconnects) * random.uniform(0.5, 1))
            finally:
                call.cancel()

    async def modify(self, name: str, mutate: Callable[[Message], Message | None], *, attempts: int = MODIFY_ATTEMPTS,
                     timeout: float | None = None) -> Message:
        """Async `Client.modify`: read, mutate a copy, update the changed fields, retry on ABORTED."""
        res, get, update = self._resource_methods(name)
        for attempt in range(attempts):
            current = await getattr(self, get)(name=name, timeout=timeout)
            desired: Any = type(current)()  # the resource's message (every one has an etag)
            desired.CopyFrom(current)
            desired = mutate(desired) or desired
            mask = masks.diff(current, desired)
            if not mask.paths:
                return current
            desired.etag = current.etag
            try:
                return await getattr(self, update)(**{res.update_field: desired, "update_mask": mask}, timeout=timeout)
            except errors.Aborted:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(random.uniform(0, 0.02 * 2**attempt))
        raise AssertionError("unreachable")
