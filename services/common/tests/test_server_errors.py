"""Error translation by the server kit, through a real gRPC server and channel.

A test servicer of the real NetworkService (and the streaming EventService)
raises on demand; the caller must see a proper status with `google.rpc`
details, never a traceback.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from meshgate.api.v1 import events_pb2, events_pb2_grpc, network_pb2, network_pb2_grpc
from meshgate.common import errors
from meshgate.common.errors import ApiError, FieldViolation
from meshgate.common.etcd import Etcd, EtcdUnavailable
from meshgate.common.etcdproc import free_port
from meshgate.common.server import ServiceBinding

SECRET = "s3cret-token-value-7f3a"


def raise_for(name: str) -> None:
    """What the test servicer does for a given resource name."""
    if name == "networks/bad":
        raise errors.invalid_argument(
            [FieldViolation("network.ipv4_cidr", "not a CIDR"), FieldViolation("network_id", "too long")]
        )
    if name == "networks/missing":
        raise errors.not_found("Network", name)
    if name == "networks/stale":
        raise errors.etag_mismatch("Network", name)
    if name == "networks/boom":
        raise RuntimeError(f"database password is {SECRET}")
    if name == "networks/keyerror":
        raise KeyError(SECRET)
    if name == "networks/etcd":
        raise EtcdUnavailable(f"etcd unavailable at 127.0.0.1:1 with token {SECRET}")


class RaisingNetworks(network_pb2_grpc.NetworkServiceServicer):
    async def GetNetwork(self, request, context):
        if request.name == "networks/abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")
        raise_for(request.name)
        return network_pb2.Network(name=request.name)


class RaisingEvents(events_pb2_grpc.EventServiceServicer):
    async def Watch(self, request, context):
        yield events_pb2.WatchEvent(revision=1, resource_name=request.parent)
        raise_for(request.parent)
        yield events_pb2.WatchEvent(revision=2, resource_name=request.parent)


def bindings() -> list[ServiceBinding]:
    return [
        ServiceBinding.of(network_pb2, network_pb2_grpc, "NetworkService", RaisingNetworks()),
        ServiceBinding.of(events_pb2, events_pb2_grpc, "EventService", RaisingEvents()),
    ]


def details_of(err: grpc.aio.AioRpcError) -> dict[str, object]:
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == err.code().value[0]
    assert status.message == err.details()
    out: dict[str, object] = {}
    for any_ in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.ResourceInfo):
            if any_.Is(cls.DESCRIPTOR):
                msg = cls()
                any_.Unpack(msg)
                out[cls.__name__] = msg
    return out


@pytest.fixture
async def stubs(grpc_server):
    _, channel = await grpc_server(bindings())
    return network_pb2_grpc.NetworkServiceStub(channel), events_pb2_grpc.EventServiceStub(channel)


async def get_error(stub, name: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.GetNetwork(network_pb2.GetNetworkRequest(name=name))
    return ei.value


async def test_success_passes_through(stubs):
    networks, _ = stubs
    got = await networks.GetNetwork(network_pb2.GetNetworkRequest(name="networks/ok"))
    assert got.name == "networks/ok"


async def test_invalid_argument_carries_field_violations_and_error_info(stubs):
    networks, _ = stubs
    err = await get_error(networks, "networks/bad")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "network.ipv4_cidr: not a CIDR" in err.details()
    d = details_of(err)
    assert [(v.field, v.description) for v in d["BadRequest"].field_violations] == [
        ("network.ipv4_cidr", "not a CIDR"),
        ("network_id", "too long"),
    ]
    assert d["ErrorInfo"].reason == "INVALID_FIELD"
    assert d["ErrorInfo"].domain == errors.DOMAIN == "meshgate.io"


async def test_not_found_carries_resource_info(stubs):
    networks, _ = stubs
    err = await get_error(networks, "networks/missing")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    d = details_of(err)
    assert d["ResourceInfo"].resource_type == "Network"
    assert d["ResourceInfo"].resource_name == "networks/missing"
    assert "BadRequest" not in d


async def test_etag_mismatch_is_aborted(stubs):
    networks, _ = stubs
    err = await get_error(networks, "networks/stale")
    assert err.code() == grpc.StatusCode.ABORTED
    d = details_of(err)
    assert d["ErrorInfo"].reason == "ETAG_MISMATCH"
    assert [v.field for v in d["BadRequest"].field_violations] == ["etag"]


@pytest.mark.parametrize("name", ["networks/boom", "networks/keyerror"])
async def test_unexpected_exception_is_internal_without_leaking(stubs, caplog, name):
    networks, _ = stubs
    with caplog.at_level(logging.ERROR, logger="meshgate.common.server"):
        err = await get_error(networks, name)
    assert err.code() == grpc.StatusCode.INTERNAL
    msg = err.details()
    assert msg.startswith("internal error (trace id ")
    for leak in (SECRET, "Traceback", "RuntimeError", "KeyError", "database", ".py"):
        assert leak not in msg
    # Nor in any detail or trailer the caller can read.
    assert SECRET not in str(err.trailing_metadata())
    assert SECRET not in (err.debug_error_string() or "")
    # The operator gets the traceback in the log instead.
    records = [r for r in caplog.records if r.name == "meshgate.common.server" and r.exc_info]
    assert records, "the unexpected exception was not logged"
    assert "GetNetwork" in records[-1].getMessage()


async def test_etcd_unavailable_is_unavailable(stubs):
    networks, _ = stubs
    err = await get_error(networks, "networks/etcd")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert SECRET not in err.details()
    assert details_of(err)["ErrorInfo"].reason == "STORAGE_UNAVAILABLE"


async def test_explicit_abort_passes_through(stubs):
    networks, _ = stubs
    err = await get_error(networks, "networks/abort")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "not yours"


@pytest.mark.parametrize(
    "name, code",
    [
        ("networks/bad", grpc.StatusCode.INVALID_ARGUMENT),
        ("networks/boom", grpc.StatusCode.INTERNAL),
        ("networks/etcd", grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_stream_error_after_first_message(stubs, name, code):
    _, events = stubs
    call = events.Watch(events_pb2.WatchRequest(parent=name))
    first = await call.read()
    assert first.revision == 1
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call.read()
    assert ei.value.code() == code
    assert SECRET not in ei.value.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details_of(ei.value)["BadRequest"].field_violations[0].field == "network.ipv4_cidr"


def test_api_error_to_status_round_trip():
    err = ApiError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "network has nodes",
        "NETWORK_NOT_EMPTY",
        resource_type="Network",
        resource_name="networks/a",
        metadata={"nodes": "3"},
    )
    st = err.to_status()
    assert st.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert st.message == "network has nodes"
    assert str(err) == "FAILED_PRECONDITION: network has nodes"
    info = error_details_pb2.ErrorInfo()
    assert st.details[0].Unpack(info)
    assert dict(info.metadata) == {"nodes": "3"}
    assert errors.code_name(st.code) == "FAILED_PRECONDITION"


class EtcdBackedNetworks(network_pb2_grpc.NetworkServiceServicer):
    """Reads through the real etcd adapter, as the control plane's handlers do."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    async def GetNetwork(self, request, context):
        kv = await self.etcd.get(self.etcd.key("networks", request.name))
        if kv is None:
            raise errors.not_found("Network", request.name)
        return network_pb2.Network.FromString(kv.value)

    async def ListNetworks(self, request, context):
        kvs, _ = await self.etcd.list_prefix(self.etcd.key("networks") + b"/")
        return network_pb2.ListNetworksResponse(networks=[network_pb2.Network.FromString(kv.value) for kv in kvs])


async def test_real_etcd_down_gives_unavailable(grpc_server, etcd_prefix):
    """A handler on an adapter whose etcd is not there: UNAVAILABLE, not INTERNAL."""
    dead = Etcd(f"127.0.0.1:{free_port()}", etcd_prefix, timeout=5)
    await dead.connect()
    try:
        binding = ServiceBinding.of(network_pb2, network_pb2_grpc, "NetworkService", EtcdBackedNetworks(dead))
        _, channel = await grpc_server([binding])
        stub = network_pb2_grpc.NetworkServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.GetNetwork(network_pb2.GetNetworkRequest(name="a"))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value.details()
        assert details_of(ei.value)["ErrorInfo"].reason == "STORAGE_UNAVAILABLE"
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ListNetworks(network_pb2.ListNetworksRequest())
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await dead.close()


async def test_live_etcd_backed_handler_works(grpc_server, etcd):
    """The same handler on the live etcd answers: the UNAVAILABLE above is about etcd, not the handler."""
    await etcd.put(etcd.key("networks", "a"), network_pb2.Network(name="networks/a").SerializeToString())
    binding = ServiceBinding.of(network_pb2, network_pb2_grpc, "NetworkService", EtcdBackedNetworks(etcd))
    _, channel = await grpc_server([binding])
    stub = network_pb2_grpc.NetworkServiceStub(channel)
    assert (await stub.GetNetwork(network_pb2.GetNetworkRequest(name="a"))).name == "networks/a"
    assert len((await stub.ListNetworks(network_pb2.ListNetworksRequest())).networks) == 1
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.GetNetwork(network_pb2.GetNetworkRequest(name="b"))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


async def test_etcd_adapter_maps_refused_connection(etcd_prefix):
    dead = Etcd(f"127.0.0.1:{free_port()}", etcd_prefix, timeout=5)
    await dead.connect()
    try:
        for op in (dead.get(dead.key("a")), dead.put(dead.key("a"), b"x"), dead.revision()):
            with pytest.raises(EtcdUnavailable):
                await op
    finally:
        await dead.close()
