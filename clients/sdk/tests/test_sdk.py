"""The SDK against real control planes: pages, errors, retries, deadlines, etags."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import signal

import grpc
import pytest

from meshgate.common.config import ServerConfig
from meshgate.common.server import GrpcServer
from meshgate.sdk import AsyncClient, Client, errors


@pytest.fixture
def client(controlplane):
    with Client(controlplane.target) as c:
        yield c


def test_page_iterator_follows_tokens(client, fresh):
    net = client.create_network(network_id=fresh.net, network={"ipv4_cidr": fresh.cidr})
    made = [client.create_node(parent=net.name, node_id=f"n{i}").name for i in range(7)]
    first = client.list_nodes(parent=net.name, page_size=3)
    assert len(first.nodes) == 3 and first.next_page_token
    assert [n.name for n in client.iter_nodes(parent=net.name, page_size=3)] == sorted(made)


def test_invalid_argument_maps_field_violations(client, fresh):
    with pytest.raises(errors.InvalidArgument) as exc:
        client.create_network(network_id="Bad_Id", network={"ipv4_cidr": "300.0.0.0/8"})
    e = exc.value
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "INVALID_FIELD" and e.domain == "meshgate.io"
    assert {"network_id", "network.ipv4_cidr"} <= set(e.fields)
    assert not e.retryable and "network_id" in e.one_line()
    with pytest.raises(errors.NotFound) as nf:
        client.get_network(name=f"networks/{fresh.net}")
    assert nf.value.resource_name == f"networks/{fresh.net}"
    assert isinstance(nf.value, errors.MeshgateError)


def test_modify_retries_on_etag_conflict(client, controlplane, fresh):
    net = client.create_network(network_id=fresh.net, network={"ipv4_cidr": fresh.cidr})
    calls = []

    def mutate(n):
        calls.append(n.etag)
        if len(calls) == 1:
            # Another writer gets in between our read and our write.
            with Client(controlplane.target) as other:
                other.update_network(network={"name": net.name, "description": "theirs"}, update_mask=["description"])
        n.display_name = "ours"

    out = client.modify(net.name, mutate)
    assert len(calls) == 2 and calls[0] != calls[1]
    assert (out.display_name, out.description) == ("ours", "theirs")
    # Nothing to change: no write at all.
    assert client.modify(net.name, lambda n: None).etag == out.etag


def test_stale_etag_is_aborted_and_not_retried(client, fresh):
    net = client.create_network(network_id=fresh.net, network={"ipv4_cidr": fresh.cidr})
    client.update_network(network={"name": net.name, "display_name": "x"}, update_mask=["display_name"])
    with pytest.raises(errors.Aborted) as exc:
        client.update_network(network={"name": net.name, "display_name": "y", "etag": net.etag}, update_mask=["display_name"])
    assert exc.value.retryable and "etag" in exc.value.fields


def test_config_timeout_and_deadline_exceeded(own_controlplane, fresh):
    cp = own_controlplane()
    with Client(cp.target, timeout=1.0) as c:
        c.create_network(network_id=fresh.net, network={"ipv4_cidr": fresh.cidr})
        cp.signal(signal.SIGSTOP)  # the server cannot answer until SIGCONT
        try:
            with pytest.raises(errors.DeadlineExceeded):
                c.get_network(name=f"networks/{fresh.net}")  # the default deadline
            with pytest.raises(errors.DeadlineExceeded):
                c.get_network(name=f"networks/{fresh.net}", timeout=0.2)  # a per-call deadline
        finally:
            cp.signal(signal.SIGCONT)
        assert c.get_network(name=f"networks/{fresh.net}").name == f"networks/{fresh.net}"


def test_idempotent_call_survives_control_plane_restart(own_controlplane, etcd_prefix, fresh):
    first = own_controlplane(prefix=etcd_prefix)
    with Client(first.target, timeout=60) as c:
        c.create_network(network_id=fresh.net, network={"ipv4_cidr": fresh.cidr})
        port = first.port
        first.stop()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.list_networks)
            # Nothing listens on the port now: the call cannot have completed.
            assert not pending.done()
            own_controlplane(prefix=etcd_prefix, listen=f"127.0.0.1:{port}")
            assert [n.name for n in pending.result(timeout=60).networks] == [f"networks/{fresh.net}"]


class Faults(grpc.aio.ServerInterceptor):
    """Counts attempts per method and answers UNAVAILABLE for the next `fail[method]` ones."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.fail: dict[str, int] = {}

    async def intercept_service(self, continuation, details):
        method = details.method.rsplit("/", 1)[-1]
        self.calls[method] += 1
        if self.fail.get(method, 0) > 0:
            self.fail[method] -= 1

            async def unavailable(request, context):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: storage unavailable")

            return grpc.unary_unary_rpc_method_handler(unavailable)
        return await continuation(details)


@pytest.fixture
async def faulty(etcd):
    from meshgate.controlplane.api import ControlPlane

    app = ControlPlane(etcd)
    await app.start()
    faults = Faults()
    server = GrpcServer(ServerConfig(listen="127.0.0.1:0", shutdown_grace=1), app.bindings, extra_interceptors=[faults])
    port = await server.start()
    from cptest import mint_token

    async with AsyncClient(f"127.0.0.1:{port}", token=await mint_token(app)) as c:
        yield c, faults
    await server.stop(0)
    await app.stop()


async def test_retries_idempotent_calls_on_unavailable_only(faulty, fresh):
    c, faults = faulty
    await c.create_network(network_id=fresh.net, network={"ipv4_cidr": fresh.cidr})

    faults.fail["GetNetwork"] = 2
    got = await c.get_network(name=f"networks/{fresh.net}")
    assert got.ipv4_cidr == fresh.cidr and faults.calls["GetNetwork"] == 3

    # A create that failed with UNAVAILABLE may have happened: never resent.
    faults.fail["CreateNode"] = 1
    with pytest.raises(errors.Unavailable) as exc:
        await c.create_node(parent=f"networks/{fresh.net}", node_id="a")
    assert faults.calls["CreateNode"] == 1 and exc.value.retryable

    # INVALID_ARGUMENT is final, also for an idempotent call.
    with pytest.raises(errors.InvalidArgument):
        await c.get_network(name="not-a-name")
    with pytest.raises(errors.InvalidArgument):
        await c.update_network(network={"name": f"networks/{fresh.net}", "mtu": 5}, update_mask=["mtu"])
    assert faults.calls["GetNetwork"] == 4 and faults.calls["UpdateNetwork"] == 1

    # Retries are bounded: five attempts, then the error.
    faults.fail["GetNetwork"] = 99
    with pytest.raises(errors.Unavailable):
        await c.get_network(name=f"networks/{fresh.net}")
    assert faults.calls["GetNetwork"] == 4 + 5


async def test_async_pages_and_watch_events_resume(faulty, fresh):
    c, _ = faulty
    net = await c.create_network(network_id=fresh.net, network={"ipv4_cidr": fresh.cidr})
    for i in range(4):
        await c.create_node(parent=net.name, node_id=f"n{i}")
    assert [n.name async for n in c.iter_nodes(parent=net.name, page_size=3)] == [f"{net.name}/nodes/n{i}" for i in range(4)]
    seen = []
    async for ev in c.watch_events(net.name, start_revision=int(net.etag)):
        seen.append(ev)
        if len(seen) == 4:
            break
    assert [e.resource_name for e in seen] == [f"{net.name}/nodes/n{i}" for i in range(4)]
    rest = []
    async for ev in c.watch_events(net.name, start_revision=seen[1].revision):
        rest.append(ev.revision)
        if len(rest) == 2:
            break
    assert rest == [e.revision for e in seen[2:]]


def test_config_precedence_and_token_safety(tmp_path, monkeypatch, mgconfig):
    from meshgate.sdk import config

    cf = config.ContextFile()
    cf.set("a", {"target": "10.0.0.1:7400", "timeout": 5})
    cf.set("b", {"target": "127.0.0.1:9", "token-file": str(tmp_path / "tok")})
    cf.use("a")
    cf.write()
    assert oct(mgconfig.stat().st_mode & 0o777) == "0o600"
    cfg = config.load()
    assert (cfg.target, cfg.timeout, cfg.sources["target"]) == ("10.0.0.1:7400", 5.0, "context a")
    monkeypatch.setenv("MESHGATE_TIMEOUT", "7")
    cfg = config.load({"target": "127.0.0.1:1"})
    assert (cfg.target, cfg.timeout) == ("127.0.0.1:1", 7.0)
    assert cfg.sources == {"target": "argument", "timeout": "MESHGATE_TIMEOUT", "context": str(mgconfig)}
    (tmp_path / "tok").write_text("s3cret\n")
    cfg = config.load(context="b")
    assert cfg.resolved_token() == "s3cret" and "s3cret" not in json.dumps(cfg.describe())
    with pytest.raises(config.ConfigError):
        config.load({"target": "203.0.113.5:7400", "token": "x"})


def test_client_span_is_parent_of_server_span(own_controlplane, fresh):
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    cp = own_controlplane(env={"OTEL_TRACES_EXPORTER": "console"})
    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0x00F067AA0BA902B7
    parent = NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
    with Client(cp.target) as c, trace.use_span(parent):
        c.create_network(network_id=fresh.net, network={"ipv4_cidr": fresh.cidr})
    cp.stop()  # flushes the server's spans to its log
    log = cp.log(tail=0)
    assert f'"trace_id": "0x{trace_id:032x}"' in log
    assert f'"parent_id": "0x{span_id:016x}"' in log
