"""Services on an etcd cluster: `--etcd-endpoints` lists the members, and a
control plane keeps serving (API writes and its watch-fed fan-out) when the
member it was talking to dies."""

from __future__ import annotations

import asyncio
import signal
import tempfile

import grpc
import pytest

import cptest
from meshgate.api.v1 import (
    agent_pb2_grpc,
    egress_pb2,
    egress_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
)
from meshgate.common.etcd import channel_target
from meshgate.common.etcdproc import start_cluster
from meshgate.common.testing import ServiceProcess


@pytest.mark.parametrize("endpoints, target", [
    ("127.0.0.1:2379", ("127.0.0.1", 2379)),
    ("etcd.example:2379", ("etcd.example", 2379)),
    ("[::1]:2379", ("[::1]", 2379)),
    ("127.0.0.1:1, 127.0.0.2:2,10.0.0.1:3", ("ipv4:127.0.0.1:1,127.0.0.2:2,10.0.0.1", 3)),
    ("[::1]:1,[fd00::2]:2", ("ipv6:[::1]:1,[fd00::2]", 2)),
])
def test_endpoints_become_one_channel_target(endpoints, target):
    assert channel_target(endpoints) == target


@pytest.mark.parametrize("endpoints, message", [
    ("", "no etcd endpoint"),
    ("127.0.0.1", "not host:port"),
    ("a.example:1,b.example:2", "must be IP addresses"),
    ("127.0.0.1:1,[::1]:2", "all be IPv4 or all IPv6"),
])
def test_bad_endpoints_are_refused(endpoints, message):
    with pytest.raises(ValueError, match=message):
        channel_target(endpoints)


@pytest.fixture
def cluster():
    with tempfile.TemporaryDirectory(prefix="etcd-cluster-") as d:
        procs = start_cluster(d, 3)
        try:
            yield procs
        finally:
            for p in procs:
                p.stop()


async def test_the_control_plane_survives_the_loss_of_its_etcd_member(cluster):
    endpoints = ",".join(p.endpoint for p in cluster)
    cp = ServiceProcess("meshgate-controlplane", ["--etcd-endpoints", endpoints, "--etcd-prefix", "/cluster"]).start()
    ch = cptest.authed_channel(cp.target, cp.admin_token)
    agent = None
    try:
        await network_pb2_grpc.NetworkServiceStub(ch).CreateNetwork(network_pb2.CreateNetworkRequest(
            network_id="prod", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
        key = await enrollment_pb2_grpc.EnrollmentKeyServiceStub(ch).CreateEnrollmentKey(
            enrollment_pb2.CreateEnrollmentKeyRequest(parent="networks/prod", enrollment_key_id="k",
                                                      enrollment_key=enrollment_pb2.EnrollmentKey()))
        agent = await (await cptest.SimAgent(agent_pb2_grpc.AgentServiceStub(ch), key.secret, "gw",
                                             "192.0.2.1:51820").enroll()).connect()
        await cptest.wait_until(lambda: agent.state is not None, "snapshot")

        # The first member (the one a new channel uses) dies.
        cluster[0].proc.send_signal(signal.SIGKILL)
        cluster[0].proc.wait(10)

        async def create_gateway():
            try:
                return await egress_pb2_grpc.EgressGatewayServiceStub(ch).CreateEgressGateway(
                    egress_pb2.CreateEgressGatewayRequest(
                        parent="networks/prod", egress_gateway_id="db",
                        egress_gateway=egress_pb2.EgressGateway(node="networks/prod/nodes/gw",
                                                                ranges=["198.51.100.0/24"])), timeout=5)
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    await asyncio.sleep(0.2)
                    return None  # while the channel moves to another member
                if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                    return True  # an earlier attempt went through
                raise

        await cptest.wait_until(create_gateway, "a write through another member", timeout=60)
        # The watch moved too: the change reaches the agent as a delta.
        await cptest.wait_until(lambda: [list(e.ranges) for e in agent.state.egress] == [["198.51.100.0/24"]],
                                "the gateway reaches the agent", timeout=60)
    finally:
        if agent is not None:
            await agent.close()
        await ch.close()
        cp.stop()
