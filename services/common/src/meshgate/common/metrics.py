"""Metrics: every instrument meshgate records, and the SDK set-up for entry points.

Library code records through the groups below (`controlplane`, `etcd`,
`keyservice`, `gatewayd`, and `ServerMetrics`, the gRPC server interceptor),
which use only the OpenTelemetry metrics API: until an entry point installs a
meter provider every call is a no-op on a proxy instrument, so tests and tools
that never call `configure()` pay almost nothing.

Entry points call `configure(service, listen)`:
- `listen` (`--metrics-listen`: `host:port`, or a bare port for loopback;
  empty: off) serves the Prometheus text exposition at `http://listen/metrics`
  through the OpenTelemetry Prometheus exporter (prometheus_client's HTTP
  server in a daemon thread);
- `OTEL_METRICS_EXPORTER=otlp` (comma-separated with `prometheus`, `none`)
  also pushes to OTLP (`OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT`, every
  `OTEL_METRIC_EXPORT_INTERVAL` ms); `OTEL_SDK_DISABLED=true` turns all off.

Names follow the OpenTelemetry semantic conventions where one exists
(`rpc.server.duration` with `rpc.system`, `rpc.service`, `rpc.method`,
`rpc.grpc.status_code`: the RPC conventions up to v1.37, which give it in ms;
it is in seconds here, Prometheus's base unit and the unit of the newer
`rpc.server.call.duration`) and sit under `meshgate.` otherwise; Prometheus shows
them with `_` for `.` and the unit appended (`meshgate_gatewayd_apply_duration_seconds`).
docs/operations.md lists them all.

Cardinality: attributes are bounded sets (networks, subsystems, kinds, gRPC
methods), never a node or a revision, except gatewayd's per-peer series,
which are capped (`--metrics-peer-cap`) and can be turned off
(`--no-metrics-per-peer`). Hazard: never put a key, a token or any secret in
an attribute.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
from opentelemetry import metrics as otel
from opentelemetry.metrics import CallbackOptions, Observation

log = logging.getLogger(__name__)

# Buckets (seconds) for things that take milliseconds to a minute: applies,
# convergence, etcd calls. The SDK's default buckets are made for milliseconds.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
COUNT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
BYTES_BUCKETS = (0, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

DEFAULT_PEER_CAP = 100
"""The most peers gatewayd exports per-peer series for (the rest are summed in the totals only)."""


def parse_listen(value: str) -> tuple[str, int] | None:
    """`--metrics-listen`: None when empty (off); a bare port means loopback.
    Raises ValueError for anything else."""
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        host, port_s = "127.0.0.1", value
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep or not port_s.isdigit():
            raise ValueError(f"{value!r} is not host:port or a port")
        host = host.strip("[]") or "0.0.0.0"
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


def exporter_choices(environ: Mapping[str, str]) -> set[str]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return set()
    return {c.strip().lower() for c in environ.get("OTEL_METRICS_EXPORTER", "").split(",") if c.strip()} - {"none"}


class Setup:
    """What `configure()` started: the provider and the HTTP server, if any."""

    def __init__(self, provider: Any, server: Any = None, address: tuple[str, int] | None = None) -> None:
        self.provider = provider
        self.server = server
        self.address = address
        """(host, port) the Prometheus endpoint is bound to (port 0 resolved)."""

    @property
    def url(self) -> str:
        if self.address is None:
            return ""
        host = self.address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.address[1]}/metrics"

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.provider is not None:
            self.provider.shutdown()


def configure(service_name: str, listen: str = "", environ: Mapping[str, str] | None = None) -> Setup | None:
    """Install a meter provider with the exporters asked for; None when none is.
    Exits with status 2 on a bad `listen` or exporter name."""
    environ = os.environ if environ is None else environ
    try:
        address = parse_listen(listen)
    except ValueError as e:
        print(f"--metrics-listen: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    choices = exporter_choices(environ)
    unknown = choices - {"otlp", "prometheus", "console"}
    if unknown:
        print(f"OTEL_METRICS_EXPORTER={','.join(sorted(unknown))!r} is not supported (use otlp, prometheus, console or none)",
              file=sys.stderr)
        raise SystemExit(2)
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        address = None
    if address is None and "prometheus" in choices:
        address = ("127.0.0.1", int(environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")))
    if address is None and not choices - {"prometheus"}:
        log.debug("metrics disabled")
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    readers: list[MetricReader] = []
    server = None
    if address is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import start_http_server

        registry = CollectorRegistry(auto_describe=False)
        # scope labels off: one meter per component, and shorter series
        readers.append(PrometheusMetricReader(registry=registry, scope_info_enabled=False))
        try:
            server, _ = start_http_server(address[1], addr=address[0], registry=registry)
        except OSError as e:
            print(f"--metrics-listen {listen}: cannot listen: {e.strerror or e}", file=sys.stderr)
            raise SystemExit(2) from None
        address = (address[0], server.server_address[1])
    if "otlp" in choices:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if "console" in choices:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    from opentelemetry.sdk.metrics import Histogram

    def buckets(name: str, bounds: tuple[float, ...]) -> View:
        return View(instrument_type=Histogram, instrument_name=name,
                    aggregation=ExplicitBucketHistogramAggregation(bounds))

    views = [
        buckets("rpc.server.duration", SECONDS_BUCKETS),
        buckets("meshgate.*.change.messages", COUNT_BUCKETS),
        buckets("meshgate.*.change.bytes", BYTES_BUCKETS),
        buckets("meshgate.*.duration", SECONDS_BUCKETS),
        buckets("meshgate.*.lag", SECONDS_BUCKETS),
        buckets("meshgate.*.delay", SECONDS_BUCKETS),
    ]
    resource = Resource.create({SERVICE_NAME: environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = MeterProvider(metric_readers=readers, resource=resource, views=views)
    otel.set_meter_provider(provider)
    setup = Setup(provider, server, address)
    if address is not None:
        log.info("metrics served at %s", setup.url)
    if "otlp" in choices:
        log.info("metrics exported to OTLP")
    return setup


def shutdown(setup: Setup | None) -> None:
    if setup is not None:
        setup.shutdown()


# --- gRPC servers -------------------------------------------------------------------


_rpc_meter = otel.get_meter("meshgate.rpc")
_rpc_duration = _rpc_meter.create_histogram(
    "rpc.server.duration", unit="s", description="Duration of inbound RPCs (a stream: its whole life)")


def _status_of(context: Any, exc: BaseException | None) -> int:
    code = None
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc: no code()
        pass
    if isinstance(code, grpc.StatusCode):
        return code.value[0]
    if isinstance(code, int):
        return code
    if exc is None or isinstance(exc, GeneratorExit):
        return 0
    if isinstance(exc, BaseException) and type(exc).__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED.value[0]
    return grpc.StatusCode.UNKNOWN.value[0]


class ServerMetrics(grpc.aio.ServerInterceptor):
    """`rpc.server.duration` of every call, per service, method and status code."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").rpartition("/")
        base = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

        def record(t0: float, context: Any, exc: BaseException | None) -> None:
            _rpc_duration.record(time.perf_counter() - t0,
                                 {**base, "rpc.grpc.status_code": _status_of(context, exc)})

        def unary(fn):
            async def wrapped(request_or_iterator, context):
                t0, exc = time.perf_counter(), None
                try:
                    return await fn(request_or_iterator, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    record(t0, context, exc)
            return wrapped

        def streaming(fn):
            async def wrapped(request_or_iterator, context):
                t0, exc = time.perf_counter(), None
                try:
                    async for item in fn(request_or_iterator, context):
                        yield item
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    record(t0, context, exc)
            return wrapped

        if handler.unary_unary:
            return handler._replace(unary_unary=unary(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=unary(handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=streaming(handler.unary_stream))
        if handler.stream_stream:
            return handler._replace(stream_stream=streaming(handler.stream_stream))
        return handler


# --- etcd ---------------------------------------------------------------------------


class _Etcd:
    """etcd calls of every service (common/etcd.py, etcdwatch.py)."""

    def __init__(self) -> None:
        m = otel.get_meter("meshgate.etcd")
        self.duration = m.create_histogram(
            "meshgate.etcd.operation.duration", unit="s", description="Duration of etcd KV calls, by operation")
        self.watch_lag = m.create_gauge(
            "meshgate.etcd.watch.lag", unit="{revision}",
            description="Revisions between etcd's head (the watch response's header) and the events it delivers")

        self.watch_delay = m.create_histogram(
            "meshgate.etcd.watch.delay", unit="s",
            description="From the start of this process's write to its event on this process's watch "
                        "(the put-to-watch time)")
        # revision -> perf_counter: writes whose event has not been seen yet
        # (their start), and events whose write's answer has not arrived yet
        # (when seen): the watch can deliver before the write's call returns.
        self._written: OrderedDict[int, float] = OrderedDict()
        self._seen: OrderedDict[int, float] = OrderedDict()

    def timed(self, operation: str, t0: float, ok: bool, revision: int = 0) -> None:
        """A KV call that started at `t0`; `revision`: the one a write made (its watch event is timed)."""
        now = time.perf_counter()
        attrs = {"db.operation.name": operation} if ok else {"db.operation.name": operation, "error.type": "unavailable"}
        self.duration.record(now - t0, attrs)
        if revision:
            seen = self._seen.pop(revision, None)
            if seen is not None:
                self.watch_delay.record(max(0.0, seen - t0))
            else:
                _remember(self._written, revision, t0)

    def watched(self, revision: int) -> None:
        """A watch delivered `revision`: the first sighting of a write of ours is timed."""
        t0 = self._written.pop(revision, None)
        now = time.perf_counter()
        if t0 is not None:
            self.watch_delay.record(now - t0)
        elif revision not in self._seen:
            _remember(self._seen, revision, now)


def _remember(d: OrderedDict[int, float], key: int, value: float, most: int = 1024) -> None:
    d[key] = value
    if len(d) > most:
        d.popitem(last=False)


etcd = _Etcd()


# --- control plane ------------------------------------------------------------------


class _ControlPlane:
    """The fan-out of desired states and agents' acknowledgements (sync.py), gateway
    failover (liveness.py). Gauges are read from the registered Fanout at collection."""

    MAX_CHANGES = 4096  # revisions whose first sight is remembered for the lag

    def __init__(self) -> None:
        m = otel.get_meter("meshgate.controlplane")
        self.convergence = m.create_histogram(
            "meshgate.controlplane.convergence.duration", unit="s",
            description="From a change reaching this replica's fan-out to each affected agent's acknowledgement "
                        "that it applied it")
        # Per-message counts are plain integers here, read at collection
        # (observable counters): the fan-out pays an addition, not an SDK call.
        self._counts: dict[tuple[str, str], int] = {}
        m.create_observable_counter(
            "meshgate.controlplane.sync.messages", callbacks=[self._observer("messages", "kind")], unit="{message}",
            description="Desired-state messages queued to agents, by kind (snapshot, delta)")
        m.create_observable_counter(
            "meshgate.controlplane.sync.bytes", callbacks=[self._observer("bytes", "kind")], unit="By",
            description="Bytes of desired-state messages, by kind")
        self.per_change = m.create_histogram(
            "meshgate.controlplane.sync.change.messages", unit="{message}",
            description="Messages one change caused (the nodes it affected, with a stream here)")
        self.bytes_change = m.create_histogram(
            "meshgate.controlplane.sync.change.bytes", unit="By", description="Bytes one change caused")
        m.create_observable_counter(
            "meshgate.controlplane.sync.resyncs", callbacks=[self._observer("resyncs", "reason")], unit="{resync}",
            description="Snapshots sent instead of deltas: slow_agent (its queue overflowed), agent_request")
        m.create_observable_counter(
            "meshgate.controlplane.sync.acks", callbacks=[self._observer("acks", "result")], unit="{ack}",
            description="Acknowledgements from agents, by result (applied, failed)")
        self.failovers = m.create_counter(
            "meshgate.controlplane.gateway.failovers", unit="{failover}",
            description="Gateways this replica failed over (their ranges move to standbys: down) and back, "
                        "by cause: node (its agent's stream gone for the failover delay) or health (its agent "
                        "reported its egress path broken)")
        m.create_observable_gauge(
            "meshgate.controlplane.agents.connected", callbacks=[self._connected], unit="{agent}",
            description="Agents holding a Sync stream to this replica, per network")
        m.create_observable_gauge(
            "meshgate.controlplane.nodes.desired", callbacks=[self._desired], unit="{node}",
            description="Nodes per network (each has a desired state)")
        m.create_observable_gauge(
            "meshgate.controlplane.nodes.converged", callbacks=[self._converged], unit="{node}",
            description="Nodes per network whose agent, streaming to this replica, acknowledged its current "
                        "desired state")
        self._fanouts: weakref.WeakSet = weakref.WeakSet()
        self._seen: OrderedDict[int, float] = OrderedDict()
        self._change_bytes = 0

    def observe(self, fanout: Any) -> None:
        """Read the gauges from `fanout` (its sessions, desired digests, records)."""
        self._fanouts.add(fanout)

    # recording (called on the event loop)

    def change_seen(self, revision: int) -> None:
        if revision not in self._seen:
            self._seen[revision] = time.monotonic()
            if len(self._seen) > self.MAX_CHANGES:
                self._seen.popitem(last=False)
        self._change_bytes = 0

    def change_done(self, messages: int) -> None:
        self.per_change.record(messages)
        self.bytes_change.record(self._change_bytes)
        self._change_bytes = 0

    def _count(self, what: str, label: str, n: int = 1) -> None:
        key = (what, label)
        self._counts[key] = self._counts.get(key, 0) + n

    def _observer(self, what: str, attribute: str) -> Callable[[CallbackOptions], list[Observation]]:
        def observe(options: CallbackOptions) -> list[Observation]:
            return [Observation(n, {attribute: label}) for (w, label), n in _snapshot(self._counts) if w == what]
        return observe

    def pushed(self, msg: Any, overflow: bool) -> None:
        kind = "snapshot" if overflow else msg.WhichOneof("message")
        size = msg.ByteSize()
        self._change_bytes += size
        self._count("messages", kind)
        self._count("bytes", kind, size)
        if overflow:
            self._count("resyncs", "slow_agent")

    def resync_requested(self) -> None:
        self._count("resyncs", "agent_request")

    def acked(self, revision: int, ok: bool, first: bool) -> None:
        """An ack of `revision`; `first`: the first OK of it from this node (the lag counts once)."""
        self._count("acks", "applied" if ok else "failed")
        if ok and first:
            t = self._seen.get(revision)
            if t is not None:
                self.convergence.record(time.monotonic() - t)

    def failover(self, direction: str, cause: str = "node") -> None:
        self.failovers.add(1, {"direction": direction, "cause": cause})

    # gauges (called from the exporter's thread: read only, never await)

    def _per_network(self, count: Callable[[Any], Iterable[tuple[str, int]]]) -> list[Observation]:
        totals: dict[str, int] = {}
        for f in list(self._fanouts):
            try:
                for net, n in count(f):
                    totals[net] = totals.get(net, 0) + n
            except RuntimeError:  # a dict changed size under us: skip this collection
                continue
        return [Observation(n, {"network": net}) for net, n in sorted(totals.items())]

    def _connected(self, options: CallbackOptions) -> list[Observation]:
        def count(f):
            nets: dict[str, int] = {}
            for name in list(f.sessions):
                net = name.split("/")[1]
                nets[net] = nets.get(net, 0) + 1
            for net in list(f.cache.networks):
                nets.setdefault(net, 0)
            return nets.items()
        return self._per_network(count)

    def _desired(self, options: CallbackOptions) -> list[Observation]:
        out: dict[str, int] = {}
        for f in list(self._fanouts):
            for net, st in _snapshot(f.cache.networks):
                out[net] = max(out.get(net, 0), len(st.nodes))  # every replica sees every node
        return [Observation(n, {"network": net}) for net, n in sorted(out.items())]

    def _converged(self, options: CallbackOptions) -> list[Observation]:
        def count(f):
            nets: dict[str, int] = {net: 0 for net in list(f.cache.networks)}
            for name in list(f.sessions):
                d = f.desired.get(name)
                rec = f._records.get(f._status_key(name))
                if d is not None and rec is not None and rec.get("applied_digest") == d.digest:
                    net = name.split("/")[1]
                    nets[net] = nets.get(net, 0) + 1
            return nets.items()
        return self._per_network(count)


def _snapshot(d: dict) -> list[tuple[Any, Any]]:
    """The items of a dict the event loop may be changing (callbacks run in the exporter's thread)."""
    for _ in range(5):
        try:
            return list(d.items())
        except RuntimeError:  # changed size during the copy
            continue
    return []


controlplane = _ControlPlane()


# --- key service --------------------------------------------------------------------


class _KeyService:
    """Signatures, pre-shared keys, scheduled rotations, the KEK and the election."""

    def __init__(self) -> None:
        m = otel.get_meter("meshgate.keyservice")
        self.signatures = m.create_counter(
            "meshgate.keyservice.signatures", unit="{signature}",
            description="Signatures made, by kind (node_key: a WireGuard key bound to its node or client; "
                        "certificate: an mTLS certificate from the internal CA)")
        self.psk_issued = m.create_counter(
            "meshgate.keyservice.psk.issued", unit="{key}", description="Pre-shared keys issued (new pairs)")
        self.psk_rotated = m.create_counter(
            "meshgate.keyservice.psk.rotations", unit="{key}",
            description="Pre-shared keys rotated, by trigger (request: by name; epoch: a network rotation)")
        self.rotation_lag = m.create_histogram(
            "meshgate.keyservice.rotation.lag", unit="s",
            description="How late the scheduler started a rotation its policy made due, by kind (psk, node_key)")
        self.leader = m.create_gauge(
            "meshgate.keyservice.scheduler.leader", unit="1",
            description="1 while this replica leads the scheduler election, else 0")
        m.create_observable_gauge(
            "meshgate.keyservice.kek.age", callbacks=[self._kek_age], unit="s",
            description="Seconds since the key-encryption key file last changed (a new KEK is added to it); "
                        "absent for KEKs given in the environment")
        self._kek_file = ""

    def kek_file(self, path: str) -> None:
        self._kek_file = path

    def _kek_age(self, options: CallbackOptions) -> list[Observation]:
        if not self._kek_file:
            return []
        try:
            return [Observation(max(0.0, time.time() - os.stat(self._kek_file).st_mtime))]
        except OSError:
            return []

    def leading(self, yes: bool) -> None:
        self.leader.set(1 if yes else 0)


keyservice = _KeyService()


# --- gatewayd -----------------------------------------------------------------------


class _Gatewayd:
    """The agent's passes (agent.py), their steps (reconciler.py), its stream and peers."""

    STATS_MAX_AGE_S = 5.0  # a scrape reuses WireGuard's counters read this recently

    def __init__(self) -> None:
        m = otel.get_meter("meshgate.gatewayd")
        self.duration = m.create_histogram(
            "meshgate.gatewayd.apply.duration", unit="s",
            description="Time to apply one pass, by subsystem (sysctl, wireguard, routing, nftables; total: "
                        "the whole pass with its reads, and kind full or delta)")
        self.applies = m.create_counter(
            "meshgate.gatewayd.applies", unit="{pass}",
            description="Reconcile passes, by result (applied, failed, rejected: an invalid desired state) "
                        "and kind (full, delta)")
        self.failures = m.create_counter(
            "meshgate.gatewayd.apply.failures", unit="{failure}",
            description="Passes that failed, by subsystem, or rejected (an invalid desired state)")
        self.drift = m.create_counter(
            "meshgate.gatewayd.drift.repairs", unit="{repair}",
            description="Drift found and repaired by a full pass of an unchanged desired state, by kind")
        m.create_observable_gauge(
            "meshgate.gatewayd.apply.since_success", callbacks=[self._since], unit="s",
            description="Seconds since the last successful pass (absent before the first)")
        m.create_observable_gauge(
            "meshgate.gatewayd.applied.revision", callbacks=[self._revision], unit="{revision}",
            description="Revision of the desired state applied last")
        m.create_observable_gauge(
            "meshgate.gatewayd.peers", callbacks=[self._peers], unit="{peer}",
            description="WireGuard peers of the applied state")
        m.create_observable_gauge(
            "meshgate.gatewayd.stream.connected", callbacks=[self._connected], unit="1",
            description="1 while the agent holds its stream to the control plane (absent following a file)")
        m.create_observable_counter(
            "meshgate.gatewayd.stream.reconnects", callbacks=[self._reconnects], unit="{stream}",
            description="Streams to the control plane opened after the first (each reconnection attempt)")
        m.create_observable_gauge(
            "meshgate.gatewayd.peer.handshake.age", callbacks=[self._handshake], unit="s",
            description="Seconds since each peer's latest handshake, per peer (the first --metrics-peer-cap "
                        "peers by public key: peer, its first 12 characters; resource, the node or client it is; "
                        "peers that have had one)")
        m.create_observable_gauge(
            "meshgate.gatewayd.peers.handshake.max_age", callbacks=[self._handshake_max], unit="s",
            description="The oldest latest handshake among all peers that have had one (not capped)")
        m.create_observable_counter(
            "meshgate.gatewayd.peer.traffic", callbacks=[self._traffic], unit="By",
            description="Bytes received (rx) and sent (tx) per peer, up to the cap")
        m.create_observable_counter(
            "meshgate.gatewayd.peers.traffic", callbacks=[self._traffic_total], unit="By",
            description="Bytes received (rx) and sent (tx) over all peers")
        self.per_peer = True
        self.peer_cap = DEFAULT_PEER_CAP
        self._agent: Any = None
        self._last_ok: float | None = None
        self._stats: tuple[float, dict[str, Any]] = (0.0, {})
        self._stats_lock = threading.Lock()

    def observe(self, agent: Any, *, per_peer: bool | None = None, peer_cap: int | None = None) -> None:
        self._agent = weakref.proxy(agent)
        if per_peer is not None:
            self.per_peer = per_peer
        if peer_cap is not None:
            self.peer_cap = max(0, peer_cap)

    # recording

    def laps(self) -> Callable[[str], None]:
        """A stopwatch for the steps of one apply: `lap(subsystem)` after each step
        records the time since the previous lap."""
        last = [time.perf_counter()]

        def lap(subsystem: str) -> None:
            now = time.perf_counter()
            self.duration.record(now - last[0], {"subsystem": subsystem})
            last[0] = now
        return lap

    def applied(self, result: Any, same_target: bool) -> None:
        """A successful pass; `same_target`: of the state the last pass applied (so what
        a full pass changed was drift)."""
        kind = "full" if result.full else "delta"
        self._last_ok = time.monotonic()
        self.applies.add(1, {"result": "applied", "kind": kind})
        self.duration.record(result.seconds, {"subsystem": "total", "kind": kind})
        if result.full and same_target:
            for k in drift_kinds(result.plan):
                self.drift.add(1, {"kind": k})

    def failed(self, error: Any, full: bool) -> None:
        self.applies.add(1, {"result": "failed", "kind": "full" if full else "delta"})
        self.failures.add(1, {"reason": str(getattr(error, "subsystem", "") or "internal")[:32]})

    def rejected(self) -> None:
        self.applies.add(1, {"result": "rejected", "kind": "none"})
        self.failures.add(1, {"reason": "rejected"})

    # gauges (the exporter's thread)

    def _since(self, options: CallbackOptions) -> list[Observation]:
        if self._last_ok is None:
            return []
        return [Observation(time.monotonic() - self._last_ok)]

    def _revision(self, options: CallbackOptions) -> list[Observation]:
        try:
            rev = self._agent.status.get("applied_revision") if self._agent is not None else None
        except ReferenceError:
            return []
        return [] if rev is None else [Observation(int(rev))]

    def _target_peers(self) -> dict[str, Any]:
        try:
            target = self._agent.rec.applied if self._agent is not None else None
        except ReferenceError:
            return {}
        return dict(target.peers) if target is not None else {}

    def _peers(self, options: CallbackOptions) -> list[Observation]:
        if self._agent is None:
            return []
        return [Observation(len(self._target_peers()))]

    def _source(self) -> Any:
        try:
            return self._agent.source if self._agent is not None else None
        except ReferenceError:
            return None

    def _connected(self, options: CallbackOptions) -> list[Observation]:
        src = self._source()
        ev = getattr(src, "connected", None)
        return [] if ev is None else [Observation(1 if ev.is_set() else 0)]

    def _reconnects(self, options: CallbackOptions) -> list[Observation]:
        src = self._source()
        opened = getattr(src, "streams_opened", None)
        return [] if opened is None else [Observation(max(0, int(opened) - 1))]

    def peer_stats(self) -> dict[str, Any]:
        """WireGuard's per-peer counters, read at most every STATS_MAX_AGE_S."""
        with self._stats_lock:
            at, stats = self._stats
            if time.monotonic() - at < self.STATS_MAX_AGE_S:
                return stats
            try:
                stats = self._agent.rec.peer_stats() if self._agent is not None else {}
            except Exception:  # noqa: BLE001 - the interface may be gone; report nothing
                stats = {}
            self._stats = (time.monotonic(), stats)
            return stats

    def _labelled(self, stats: Mapping[str, Any]) -> list[tuple[dict[str, str], Any]]:
        """(labels, stats) of the peers that get their own series: the first `peer_cap`
        by public key. Labels: `peer`, the first 12 characters of its key (public;
        enough to tell peers apart), and `resource`, the node or external client the
        desired state names it as (empty when it names none)."""
        if not self.per_peer or self.peer_cap <= 0:
            return []
        try:
            msg = self._agent.target_msg if self._agent is not None else None
            names = {p.public_key: p.resource for p in msg.peers} if msg is not None else {}
        except (ReferenceError, AttributeError):
            names = {}
        return [({"peer": k[:12], "resource": names.get(k, "")}, stats[k]) for k in sorted(stats)[: self.peer_cap]]

    def _handshake(self, options: CallbackOptions) -> list[Observation]:
        now = time.time()
        return [Observation(max(0.0, now - (s.last_handshake_sec + s.last_handshake_nsec / 1e9)), labels)
                for labels, s in self._labelled(self.peer_stats()) if s.last_handshake_sec]

    def _handshake_max(self, options: CallbackOptions) -> list[Observation]:
        now = time.time()
        ages = [now - (s.last_handshake_sec + s.last_handshake_nsec / 1e9)
                for s in self.peer_stats().values() if s.last_handshake_sec]
        return [Observation(max(0.0, max(ages)))] if ages else []

    def _traffic(self, options: CallbackOptions) -> list[Observation]:
        out = []
        for labels, s in self._labelled(self.peer_stats()):
            out.append(Observation(s.rx_bytes, {**labels, "direction": "rx"}))
            out.append(Observation(s.tx_bytes, {**labels, "direction": "tx"}))
        return out

    def _traffic_total(self, options: CallbackOptions) -> list[Observation]:
        stats = self.peer_stats()
        if self._agent is None:
            return []
        return [Observation(sum(s.rx_bytes for s in stats.values()), {"direction": "rx"}),
                Observation(sum(s.tx_bytes for s in stats.values()), {"direction": "tx"})]


def drift_kinds(plan: Any) -> list[str]:
    """What a plan changes, as drift kinds: interface, device, peers, link, routes,
    rules, nftables, sysctls."""
    out = []
    if getattr(plan, "create_interface", False):
        out.append("interface")
    if getattr(plan, "device", None) is not None:
        out.append("device")
    if getattr(plan, "peers", ()):
        out.append("peers")
    if getattr(plan, "mtu", None) or getattr(plan, "set_up", False) or getattr(plan, "addr_add", ()) \
            or getattr(plan, "addr_del", ()):
        out.append("link")
    if getattr(plan, "route_add", ()) or getattr(plan, "route_del", ()):
        out.append("routes")
    if getattr(plan, "rule_add", ()) or getattr(plan, "rule_del", ()):
        out.append("rules")
    if getattr(plan, "nft", None) is not None:
        out.append("nftables")
    if getattr(plan, "handoff_change", False):
        out.append("handoff")
    if getattr(plan, "sysctls", ()):
        out.append("sysctls")
    return out


gatewayd = _Gatewayd()
