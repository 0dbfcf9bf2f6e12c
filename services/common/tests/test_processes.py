"""The control plane as a real process on the server kit: health, reflection,
config from env and file, `--help`, bad input.

(The key service has the same checks in services/keyservice/tests.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshgate.api.v1 import egress_pb2, network_pb2, node_pb2
from meshgate.common.testing import ServiceProcess

CP_SERVICES = [
    m.DESCRIPTOR.services_by_name[n].full_name
    for m, n in [(network_pb2, "NetworkService"), (node_pb2, "NodeService"), (egress_pb2, "EgressGatewayService")]
]
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


def exe(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def reflect(target: str, **req) -> reflection_pb2.ServerReflectionResponse:
    with grpc.insecure_channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        (resp,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**req)]), timeout=5))
        return resp


@pytest.fixture
def controlplane(etcd_server, etcd_prefix):
    proc = ServiceProcess(
        "meshgate-controlplane", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix]
    ).start()
    yield proc
    assert proc.stop() == 0, proc.log()


def listed_services(target: str) -> set[str]:
    resp = reflect(target, list_services="")
    return {s.name for s in resp.list_services_response.service}


def test_controlplane_reflection_and_health(controlplane):
    names = listed_services(controlplane.target)
    assert {*CP_SERVICES, HEALTH, REFLECTION} <= names
    meshgate = sorted(n for n in names if n.startswith("meshgate."))
    # Health answers SERVING for the whole server and for every meshgate service it lists.
    for name in ["", *meshgate]:
        assert health(controlplane.target, name) == health_pb2.HealthCheckResponse.SERVING, name
    for name in meshgate:
        # The descriptors are really there: a client can build stubs from reflection alone.
        resp = reflect(controlplane.target, file_containing_symbol=name)
        assert resp.file_descriptor_response.file_descriptor_proto, name
    with pytest.raises(grpc.RpcError) as ei:
        health(controlplane.target, "meshgate.api.v1.NoSuchService")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_controlplane_serves_real_calls(controlplane):
    from meshgate.api.v1 import network_pb2_grpc

    with grpc.insecure_channel(controlplane.target) as ch:
        stub = network_pb2_grpc.NetworkServiceStub(ch)
        net = stub.CreateNetwork(
            network_pb2.CreateNetworkRequest(network_id="p1", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")),
            timeout=10, metadata=controlplane.auth_metadata,
        )
        assert net.name == "networks/p1"
        with pytest.raises(grpc.RpcError) as ei:
            stub.GetNetwork(network_pb2.GetNetworkRequest(name="networks/nope"), timeout=10,
                            metadata=controlplane.auth_metadata)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_controlplane_config_from_env_and_file(etcd_server, etcd_prefix, tmp_path):
    """Env (MESHGATE_CONTROLPLANE_*) and a TOML file named by env reach the real process."""
    cfg = tmp_path / "cp.toml"
    cfg.write_text(f'etcd_prefix = "{etcd_prefix}"\nshutdown_grace = 2\nlog_level = "debug"\n')
    proc = ServiceProcess(
        "meshgate-controlplane",
        env={
            "MESHGATE_CONTROLPLANE_ETCD_ENDPOINTS": etcd_server.endpoint,
            "MESHGATE_CONTROLPLANE_CONFIG": str(cfg),
            "MESHGATE_CONTROLPLANE_LOG_JSON": "true",
        },
    ).start()
    try:
        assert health(proc.target, "") == health_pb2.HealthCheckResponse.SERVING
    finally:
        code = proc.stop()
    assert code == 0, proc.log()
    records = [json.loads(line) for line in proc.log(tail=0).splitlines() if line.startswith("{")]
    assert records, proc.log()
    assert all(r["service"] == "controlplane" for r in records)
    config = {r["message"].split(" = ")[0]: r["message"] for r in records if r["message"].startswith("config ")}
    assert config["config etcd_endpoints"].endswith("(env MESHGATE_CONTROLPLANE_ETCD_ENDPOINTS)")
    assert config["config etcd_prefix"] == f"config etcd_prefix = '{etcd_prefix}' (file {cfg})"
    assert config["config shutdown_grace"] == f"config shutdown_grace = 2.0 (file {cfg})"
    assert config["config listen"] == "config listen = '127.0.0.1:0' (flag)"


@pytest.mark.parametrize("entry_point, prefix", [
    ("meshgate-controlplane", "MESHGATE_CONTROLPLANE_"),
    ("meshgate-keyservice", "MESHGATE_KEYSERVICE_"),
])
def test_help_names_env_prefix(entry_point, prefix):
    r = subprocess.run([exe(entry_point), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for opt in ("LISTEN", "ETCD_ENDPOINTS", "ETCD_PREFIX", "INSECURE", "CONFIG", "LOG_JSON"):
        assert prefix + opt in r.stdout, opt


@pytest.mark.parametrize("entry_point, prefix", [
    ("meshgate-controlplane", "MESHGATE_CONTROLPLANE_"),
    ("meshgate-keyservice", "MESHGATE_KEYSERVICE_"),
])
@pytest.mark.parametrize("args, env", [
    (["--shutdown-grace", "soon"], {}),
    ([], {"SHUTDOWN_GRACE": "soon"}),
    ([], {"INSECURE": "maybe"}),
    ([], {"LOG_LEVEL": "loud"}),
])
def test_bad_config_exits_2(entry_point, prefix, args, env):
    full_env = {**os.environ, **{prefix + k: v for k, v in env.items()}}
    r = subprocess.run([exe(entry_point), *args], capture_output=True, text=True, timeout=60, env=full_env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("entry_point", ["meshgate-controlplane", "meshgate-keyservice"])
def test_unknown_file_key_exits_2(entry_point, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('lisen = "127.0.0.1:1"\n')
    r = subprocess.run([exe(entry_point), "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "lisen" in r.stderr


@pytest.mark.parametrize("entry_point", ["meshgate-controlplane", "meshgate-keyservice"])
def test_plaintext_off_loopback_refused_by_entry_point(entry_point, etcd_server, etcd_prefix):
    r = subprocess.run(
        [exe(entry_point), "--listen", "192.0.2.1:0", "--etcd-endpoints", etcd_server.endpoint,
         "--etcd-prefix", etcd_prefix],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0
    assert "refusing to serve plaintext on non-loopback address 192.0.2.1:0" in r.stderr
    assert "Traceback" not in r.stderr
