"""The key service's surface, in-process and as a real process.

Methods are enumerated from keys_pb2.DESCRIPTOR, so an RPC added to the proto
and forgotten in the servicer (which would answer the generated "Method not
implemented!") fails these tests. An empty request to any method is either
served or refused as bad input; never UNIMPLEMENTED or INTERNAL.
"""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from meshgate.api.v1 import keys_pb2, keys_pb2_grpc
from meshgate.common.testing import ServiceProcess
from meshgate.keyservice.api import KeyService

SERVICE = keys_pb2.DESCRIPTOR.services_by_name["KeyService"]
METHODS = [m.name for m in SERVICE.methods]
# What an empty request gets: OK, or INVALID_ARGUMENT naming the required fields.
EMPTY_OK = {"GetKeyAuthority"}


def test_descriptor_has_methods():
    assert SERVICE.full_name == "meshgate.api.v1.KeyService"
    assert len(METHODS) >= 8


@pytest.mark.parametrize("method", METHODS)
def test_servicer_overrides_every_method(method):
    assert getattr(KeyService, method) is not getattr(keys_pb2_grpc.KeyServiceServicer, method)


def request_for(method: str):
    return getattr(keys_pb2, SERVICE.methods_by_name[method].input_type.name)()


def violations(err: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    br = error_details_pb2.BadRequest()
    for d in status.details:
        if d.Unpack(br):
            return {v.field: v.description for v in br.field_violations}
    return {}


def check_empty(stub, method: str) -> None:
    if method in EMPTY_OK:
        getattr(stub, method)(request_for(method), timeout=10)
        return
    with pytest.raises(grpc.RpcError) as ei:
        getattr(stub, method)(request_for(method), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, ei.value.details())
    assert violations(ei.value), method


@pytest.mark.parametrize("method", METHODS)
async def test_every_rpc_served_in_process(ks, method):
    if method in EMPTY_OK:
        await getattr(ks.stub, method)(request_for(method), timeout=10)
        return
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await getattr(ks.stub, method)(request_for(method), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, ei.value.details())
    assert violations(ei.value)


# --- the real process ----------------------------------------------------------


@pytest.fixture
def keyservice(etcd_server, etcd_prefix, kek_env, keks, tmp_path):
    keks.new("k1")
    proc = ServiceProcess(
        "meshgate-keyservice", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix, "--insecure"],
        env=kek_env("k1", path=str(tmp_path / "kek")),
    ).start()
    yield proc
    assert proc.stop() == 0, proc.log()


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def reflect(target: str, **req) -> reflection_pb2.ServerReflectionResponse:
    with grpc.insecure_channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        (resp,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**req)]), timeout=5))
        return resp


def test_process_health_reflection_and_surface(keyservice, secret_guard):
    target = keyservice.target
    # The process exports its spans to the guard, which searches them for secrets.
    for method in METHODS:
        secret_guard.expect_span(f"/{SERVICE.full_name}/{method}", "meshgate-keyservice")
    for name in ("", SERVICE.full_name):
        assert health(target, name) == health_pb2.HealthCheckResponse.SERVING, name
    names = {s.name for s in reflect(target, list_services="").list_services_response.service}
    assert names == {SERVICE.full_name, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    resp = reflect(target, file_containing_symbol=SERVICE.full_name)
    assert resp.file_descriptor_response.file_descriptor_proto
    with grpc.insecure_channel(target) as ch:
        stub = keys_pb2_grpc.KeyServiceStub(ch)
        for method in METHODS:
            check_empty(stub, method)
        ka = stub.GetKeyAuthority(keys_pb2.GetKeyAuthorityRequest(), timeout=10)
        assert len(ka.public_keys) == 1 and len(ka.public_keys[0]) == 32
    assert "KeyService" in keyservice.log()  # "serving meshgate.api.v1.KeyService on port ..."


def test_process_config_from_env(etcd_server, etcd_prefix, keks, kek_env):
    keks.new("k1")
    proc = ServiceProcess(
        "meshgate-keyservice",
        env={
            "MESHGATE_KEYSERVICE_ETCD_ENDPOINTS": etcd_server.endpoint,
            "MESHGATE_KEYSERVICE_ETCD_PREFIX": etcd_prefix,
            "MESHGATE_KEYSERVICE_LOG_LEVEL": "debug",
            "MESHGATE_KEYSERVICE_INSECURE": "true",
            **kek_env("k1"),
        },
    ).start()
    try:
        assert health(proc.target, "") == health_pb2.HealthCheckResponse.SERVING
    finally:
        code = proc.stop()
    assert code == 0, proc.log()
    log = proc.log(tail=0)
    assert f"config etcd_prefix = '{etcd_prefix}' (env MESHGATE_KEYSERVICE_ETCD_PREFIX)" in log
    assert "config etcd_endpoints" in log and "(env MESHGATE_KEYSERVICE_ETCD_ENDPOINTS)" in log
    assert "config kek = <secret> (env MESHGATE_KEYSERVICE_KEK)" in log
    assert "[service=keyservice]" in log
    for form in (keks.line("k1").split(":")[1], keks.made["k1"].hex()):
        assert form not in log
