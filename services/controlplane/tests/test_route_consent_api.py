"""An egress range may not cover an underlay address: a node's endpoint host,
or the control plane's own address (egress.py). Refused with a field violation
saying why (reason RANGE_COVERS_UNDERLAY) and etcd unchanged, from both sides:
creating or updating a gateway, and a node (created, updated or enrolled)
taking an endpoint inside an existing range. Through the API (real etcd, real
gRPC server) and the CLI against a control plane process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cptest import details, key, make_gateway, make_key, make_network, make_node, state_dump
from meshgate.api.v1 import agent_pb2, egress_pb2, node_pb2
from meshgate.common.testing import ServiceProcess
from meshgate.controlplane.egress import control_plane_ips, endpoint_ip

MESHGATE = str(Path(sys.executable).parent / "meshgate")


@pytest.fixture
async def net(cp):
    await make_network(cp, ipv6_cidr="fd00:64::/64")
    await make_node(cp, node_id="a", endpoint="203.0.113.5:51820")
    await make_node(cp, node_id="b", endpoint="[2001:db8::5]:51820")
    await make_node(cp, node_id="c", endpoint="vpn.example.com:51820")  # a host name: not resolved


async def refused(call, field: str, says: str, cp) -> None:
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    violations, reason = details(e.value)
    assert reason == "RANGE_COVERS_UNDERLAY", (reason, violations)
    assert says in violations[field], violations
    assert await state_dump(cp.etcd) == before


def test_addresses():
    assert str(endpoint_ip("[2001:db8::5]:51820")) == "2001:db8::5" and endpoint_ip("vpn.example.com:1") is None
    assert endpoint_ip("unix:/run/x.sock") is None and endpoint_ip("") is None
    assert control_plane_ips(["0.0.0.0:7400,192.0.2.7:7400,unix:/x", "", "[2001:db8::7]:7402", "cp.example:1",
                              "192.0.2.7:7402"]) == ("192.0.2.7", "2001:db8::7")


async def test_a_range_covering_a_nodes_endpoint_is_refused(cp, net):
    await refused(make_gateway(cp, ranges=["198.51.100.0/24", "203.0.113.0/24"]), "egress_gateway.ranges[1]",
                  "203.0.113.0/24 covers 203.0.113.5, the endpoint (underlay address) of node "
                  "'networks/prod/nodes/a': traffic to it must not be routed through the gateway", cp)
    await refused(make_gateway(cp, node="c", ranges=["2001:db8::/64"]), "egress_gateway.ranges[0]",
                  "covers 2001:db8::5, the endpoint (underlay address) of node 'networks/prod/nodes/b'", cp)
    # beside them, and a host name's range: accepted
    await make_gateway(cp, ranges=["203.0.113.128/25"])


async def test_an_update_into_an_endpoint_is_refused(cp, net):
    gw = await make_gateway(cp, ranges=["198.51.100.0/24"])
    await refused(cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
        egress_gateway=egress_pb2.EgressGateway(name=gw.name, ranges=["203.0.113.0/28"]),
        update_mask=field_mask_pb2.FieldMask(paths=["ranges"]))), "egress_gateway.ranges[0]", "203.0.113.5", cp)


async def test_a_range_covering_the_control_planes_address_is_refused(cp, net):
    cp.app.gateways.control_plane_addresses = control_plane_ips(["192.0.2.7:7400"])
    await refused(make_gateway(cp, ranges=["192.0.2.0/24"]), "egress_gateway.ranges[0]",
                  "192.0.2.0/24 covers 192.0.2.7, the control plane's address", cp)


async def test_a_node_taking_an_endpoint_inside_a_range_is_refused(cp, net):
    await make_gateway(cp, ranges=["198.51.100.0/24"])
    says = "198.51.100.9 is inside 198.51.100.0/24, an egress range of networks/prod/egressGateways/gw"
    # created with it
    await refused(make_node(cp, node_id="d", endpoint="198.51.100.9:51820"), "node.endpoint", says, cp)
    # updated to it
    await refused(cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
        node=node_pb2.Node(name="networks/prod/nodes/c", endpoint="198.51.100.9:51820"),
        update_mask=field_mask_pb2.FieldMask(paths=["endpoint"]))), "node.endpoint", says, cp)
    # enrolled with it (what `gatewayd join --endpoint` sends)
    k = await make_key(cp, max_uses=1)
    await refused(cp.agents.Enroll(agent_pb2.EnrollRequest(
        enrollment_secret=k.secret, node_id="e", public_key=key(), endpoint="198.51.100.9:51820")),
        "endpoint", says, cp)
    # elsewhere is fine, and so is an update that leaves the endpoint alone
    await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
        node=node_pb2.Node(name="networks/prod/nodes/c", endpoint="192.0.2.9:51820"),
        update_mask=field_mask_pb2.FieldMask(paths=["endpoint"])))


async def test_a_node_endpoint_change_bumps_the_guard_egress_writes_compare(cp, net):
    """The race: a gateway write that read the nodes before an endpoint moved
    into its range must lose its transaction (and, run again, be refused)."""
    guard = cp.app.gateways.keys.guard("prod", "nodes")
    before = await cp.etcd.get(guard)
    await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
        node=node_pb2.Node(name="networks/prod/nodes/c", endpoint="192.0.2.9:51820"),
        update_mask=field_mask_pb2.FieldMask(paths=["endpoint"])))
    after = await cp.etcd.get(guard)
    assert after.mod_revision > (before.mod_revision if before else 0)


def test_the_cli_says_why_and_changes_nothing(etcd_server, tmp_path):
    proc = ServiceProcess("meshgate-controlplane", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix",
                                                    f"/t-{uuid.uuid4().hex[:12]}"], listen="127.0.0.1:0").start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_")}
    env.update(MESHGATE_CONFIG=str(tmp_path / "mg.yaml"), MESHGATE_TOKEN=proc.admin_token)

    def mg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([MESHGATE, "--target", proc.target, *args], capture_output=True, text=True,
                              env=env, timeout=60)

    try:
        assert mg("network", "create", "--network-id", "x", "--network.ipv4-cidr", "100.64.9.0/24").returncode == 0
        assert mg("node", "create", "--parent", "networks/x", "--node-id", "a",
                  "--node.endpoint", "203.0.113.5:51820").returncode == 0
        for ranges, says in (("203.0.113.0/24", "203.0.113.0/24 covers 203.0.113.5, the endpoint (underlay "
                                                "address) of node 'networks/x/nodes/a'"),
                             # Loopback space is refused before the underlay rule (issue 15, item 6);
                             # the control plane's address is covered in-process above (192.0.2.7).
                             ("127.0.0.0/8", "127.0.0.0/8 is loopback space")):
            r = mg("egress-gateway", "create", "--parent", "networks/x", "--egress-gateway-id", "gw",
                   "--egress-gateway.node", "networks/x/nodes/a", "--egress-gateway.ranges", ranges)
            assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr and says in r.stderr, r.stderr
        listed = json.loads(mg("egress-gateway", "list", "--parent", "networks/x", "-o", "json").stdout)
        assert listed.get("egress_gateways", []) == []
    finally:
        proc.stop()
