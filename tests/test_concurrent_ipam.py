"""200 concurrent node creations across two control-plane processes sharing
one etcd: 200 distinct addresses, all inside the range, none reserved."""

import asyncio
import ipaddress

import pytest

from cptest import authed_channel
from meshgate.api.v1 import network_pb2, network_pb2_grpc, node_pb2, node_pb2_grpc
from meshgate.common.testing import ServiceProcess

CIDR = "100.64.0.0/24"
V6 = "fd00:64::/120"


@pytest.fixture
def two_control_planes(etcd_server, etcd_prefix):
    procs = []
    try:
        for _ in range(2):
            procs.append(
                ServiceProcess(
                    "meshgate-controlplane",
                    ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix],
                ).start()
            )
        yield procs
    finally:
        for p in procs:
            p.stop()


async def test_200_concurrent_creates_on_two_processes(two_control_planes, etcd):
    token = next(p.admin_token for p in two_control_planes if p.admin_token)
    channels = [authed_channel(p.target, token) for p in two_control_planes]
    try:
        await network_pb2_grpc.NetworkServiceStub(channels[0]).CreateNetwork(
            network_pb2.CreateNetworkRequest(
                network_id="race", network=network_pb2.Network(ipv4_cidr=CIDR, ipv6_cidr=V6)
            )
        )
        stubs = [node_pb2_grpc.NodeServiceStub(c) for c in channels]

        async def create(i: int):
            return await stubs[i % 2].CreateNode(
                node_pb2.CreateNodeRequest(parent="networks/race", node_id=f"n{i:03d}", node=node_pb2.Node()),
                timeout=60,
            )

        nodes = await asyncio.gather(*(create(i) for i in range(200)))
    finally:
        for c in channels:
            await c.close()

    net4, net6 = ipaddress.ip_network(CIDR), ipaddress.ip_network(V6)
    v4 = [ipaddress.ip_address(n.ipv4_address) for n in nodes]
    v6 = [ipaddress.ip_address(n.ipv6_address) for n in nodes]
    assert len(set(v4)) == 200 and len(set(v6)) == 200
    assert all(a in net4 and a not in (net4.network_address, net4.broadcast_address) for a in v4)
    assert all(a in net6 and a not in (net6.network_address, net6.broadcast_address) for a in v6)
    # What etcd holds agrees: one claim per address, naming the node that has it.
    dump = await etcd.dump()
    claims = {k.rsplit(b"/", 1)[1].decode(): v.decode() for k, v in dump.items() if b"/ipam/race/v4/" in k}
    assert claims == {n.ipv4_address: n.name for n in nodes}
