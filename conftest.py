"""Fixtures shared by every test in the repository.

- `etcd_server` (session): a real etcd (Debian's etcd-server binary) on free
  loopback ports with a temporary data directory, stopped by PID at the end.
- `etcd`: an adapter bound to a prefix unique to the test, so tests never see
  each other's keys and can snapshot "their" keyspace.
- `cp`: a control plane served in-process on a free port against that prefix,
  with stubs for its services on a real gRPC channel.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass

import grpc
import pytest

from meshgate.api.v1 import (
    agent_pb2_grpc,
    egress_pb2_grpc,
    enrollment_pb2_grpc,
    network_pb2_grpc,
    node_pb2_grpc,
    policy_pb2_grpc,
)
from meshgate.common.config import ServerConfig
from meshgate.common.etcd import Etcd
from meshgate.common.etcdproc import EtcdProcess
from meshgate.common.server import GrpcServer
from meshgate.common.testing import in_ci


def pytest_collection_modifyitems(config, items):
    if in_ci():
        return
    # Outside CI, tests marked root skip (with the reason) on machines without
    # root; under CI=true they run and fail loudly instead.
    import os

    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root and network namespaces (runs in CI)")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def etcd_server():
    if shutil.which("etcd") is None:
        msg = "etcd not installed: run `make install` (Debian package etcd-server)"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    data = tempfile.mkdtemp(prefix="meshgate-test-etcd-")
    proc = EtcdProcess(data).start()
    yield proc
    proc.stop()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def etcd_prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def etcd(etcd_server, etcd_prefix):
    client = Etcd(etcd_server.endpoint, etcd_prefix)
    await client.connect()
    yield client
    await client.close()


@dataclass
class ControlPlane:
    server: GrpcServer
    channel: grpc.aio.Channel
    networks: network_pb2_grpc.NetworkServiceStub
    nodes: node_pb2_grpc.NodeServiceStub
    egress: egress_pb2_grpc.EgressGatewayServiceStub
    etcd: Etcd
    app: object
    keys: enrollment_pb2_grpc.EnrollmentKeyServiceStub
    policies: policy_pb2_grpc.AccessPolicyServiceStub
    agents: agent_pb2_grpc.AgentServiceStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture
async def cp(etcd):
    from meshgate.controlplane.api import ControlPlane as App

    app = App(etcd)
    await app.start()
    cfg = ServerConfig(listen="127.0.0.1:0", shutdown_grace=1)
    server = GrpcServer(cfg, app.bindings)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield ControlPlane(
        server,
        channel,
        network_pb2_grpc.NetworkServiceStub(channel),
        node_pb2_grpc.NodeServiceStub(channel),
        egress_pb2_grpc.EgressGatewayServiceStub(channel),
        etcd,
        app,
        enrollment_pb2_grpc.EnrollmentKeyServiceStub(channel),
        policy_pb2_grpc.AccessPolicyServiceStub(channel),
        agent_pb2_grpc.AgentServiceStub(channel),
    )
    await channel.close()
    await server.stop(0)
    await app.stop()
