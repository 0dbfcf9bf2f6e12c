"""Access policies enforced in the data plane, in network namespaces with real traffic.

A real control plane, real gatewayd agents (wireguard-go, nft) and real connections:
each test drives the API (the CLI for the policy a user writes first, gRPC for the
rest) and checks what a user would: a TCP connection answered or not, a ping
answered or not, the address a server sees. Outcomes change after convergence,
which the network status reports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from meshgate.api.v1 import (
    egress_pb2,
    enrollment_pb2,
    network_pb2,
    node_pb2,
    node_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from meshgate.common.testing import ServiceProcess
from meshgate.gatewayd.lab import ControlPlaneView, Lab
from test_system_controlplane import start_control_plane

RANGE = "198.51.100.0/24"
MESHGATE = str(Path(sys.executable).with_name("meshgate"))


class Api(ControlPlaneView):
    def __init__(self, cp: ServiceProcess, socket: str):
        super().__init__(cp.target, socket, token=cp.admin_token)
        self.cp, self.socket = cp, socket
        self.policies = policy_pb2_grpc.AccessPolicyServiceStub(self.channel)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "MESHGATE_TOKEN": self.cp.admin_token}
        return subprocess.run([MESHGATE, "--target", self.cp.target, *args], env=env,
                              capture_output=True, text=True, timeout=60)

    def set_default(self, policy: int) -> int:
        net = self.networks.UpdateNetwork(network_pb2.UpdateNetworkRequest(
            network=network_pb2.Network(name="networks/lab", default_policy=policy),
            update_mask={"paths": ["default_policy"]}))
        return int(net.etag)


@pytest.fixture
def api(lab: Lab, etcd_server, etcd_prefix):
    socket = str(lab.dir / "cp.sock")
    cp = start_control_plane(etcd_server, etcd_prefix, socket)
    a = Api(cp, f"unix:{socket}")
    try:
        yield a
    finally:
        a.close()
        cp.stop()


def _network(api: Api, ipv6: bool = False, default=network_pb2.DENY, uses: int = 3) -> str:
    api.networks.CreateNetwork(network_pb2.CreateNetworkRequest(network_id="lab", network=network_pb2.Network(
        ipv4_cidr="100.64.0.0/24", ipv6_cidr="fd00:64::/64" if ipv6 else "", default_policy=default)))
    key = api.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
        parent="networks/lab", enrollment_key_id="lab", enrollment_key=enrollment_pb2.EnrollmentKey(max_uses=uses)))
    return key.secret


def _tcp(host, addr: str, port: int) -> bool:
    return host.ask(addr, port, timeout=1.5) is not None


def _ping(host, addr: str) -> bool:
    return host.run("ping", "-n", "-c", "1", "-W", "1", addr, check=False).returncode == 0


def test_policies_allow_their_ports_and_protocols_only_and_follow_changes(api: Api, egress2):
    eg = egress2
    secret = _network(api, ipv6=True)
    eg.gw.join(api.socket, secret, "gateway", endpoint=f"{eg.gw_underlay(0)}:51820", insecure_no_authority=True)
    for i, c in enumerate(eg.clients):
        c.join(api.socket, secret, f"c{i}", endpoint=f"{eg.client_underlay(i)}:51820", insecure_no_authority=True)
    for n in (eg.gw, *eg.clients):
        n.start()
    api.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
        parent="networks/lab", egress_gateway_id="db",
        egress_gateway=egress_pb2.EgressGateway(node="networks/lab/nodes/gateway", ranges=[RANGE])))
    # The policy a user writes first, through the CLI: c0 may reach the range on TCP 7070 only.
    r = api.cli("access-policy", "create", "--parent", "networks/lab", "--access-policy-id", "c0-db",
                "--access-policy.sources", "node:c0", "--access-policy.destinations", "egress:db",
                "--access-policy.protocol", "tcp", "--access-policy.ports", "{first: 7070}")
    assert r.returncode == 0, r.stderr
    # c0 may reach c1 on TCP 80 (IPv4 and IPv6), not the other way round.
    web = api.policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
        parent="networks/lab", access_policy_id="c0-c1-web", access_policy=policy_pb2.AccessPolicy(
            sources=["node:c0"], destinations=["node:c1"], protocol=policy_pb2.TCP,
            ports=[policy_pb2.PortRange(first=80)])))
    api.wait_converged(3, at_least=int(web.etag))
    c0, c1 = eg.clients[0].host, eg.clients[1].host
    c1_v4, c0_v4 = eg.overlay(1), eg.overlay(0)
    node_api = node_pb2_grpc.NodeServiceStub(api.channel)
    v6 = {i: node_api.GetNode(node_pb2.GetNodeRequest(name=f"networks/lab/nodes/c{i}")).ipv6_address for i in (0, 1)}
    assert all(v6.values())

    for port in (7070, 8080):
        eg.ext.whoami_server(eg.ext_addr, port)
    for addr in (c1_v4, v6[1]):
        for port in (80, 8080):
            c1.whoami_server(addr, port)
    c0.whoami_server(c0_v4, 80)
    assert c0.ask(eg.ext_addr, 7070) == eg.gw_ext_addr  # allowed, NATed, replies pass
    assert not _tcp(c0, eg.ext_addr, 8080)  # another port
    assert not _ping(c0, eg.ext_addr)  # another protocol
    assert not _tcp(c1, eg.ext_addr, 7070)  # another source
    assert c0.ask(c1_v4, 80) == c0_v4  # node to node
    assert c0.ask(v6[1], 80) == v6[0]  # and over IPv6
    assert not _tcp(c0, c1_v4, 8080) and not _tcp(c0, v6[1], 8080)
    assert not _ping(c0, c1_v4)
    assert not _tcp(c1, c0_v4, 80)  # the policy has a direction
    listing = eg.clients[1].host.run("nft", "list", "table", "inet", "meshgate").stdout
    assert 'tcp dport 80 accept comment "c0-c1-web"' in listing, listing

    # A change inside a policy reaches c1 as a replacement of that policy's chain only:
    # the table is not replaced (a new table would have a new handle).
    def handles():
        return c1.run("nft", "-a", "list", "table", "inet", "meshgate").stdout.splitlines()[0]
    before = handles()
    assert "# handle" in before
    wider = api.policies.UpdateAccessPolicy(policy_pb2.UpdateAccessPolicyRequest(
        access_policy=policy_pb2.AccessPolicy(name=web.name, ports=[policy_pb2.PortRange(first=80),
                                                                    policy_pb2.PortRange(first=8080)]),
        update_mask={"paths": ["ports"]}))
    api.wait_converged(3, at_least=int(wider.etag))
    assert _tcp(c0, c1_v4, 8080) and _tcp(c0, c1_v4, 80), c1.run("nft", "list", "table", "inet", "meshgate").stdout
    assert handles() == before

    # Disabled: the outcome changes once the change has converged.
    assert _tcp(c0, c1_v4, 80)
    off = api.policies.UpdateAccessPolicy(policy_pb2.UpdateAccessPolicyRequest(
        access_policy=policy_pb2.AccessPolicy(name=web.name, disabled=True), update_mask={"paths": ["disabled"]}))
    api.wait_converged(3, at_least=int(off.etag))
    assert not _tcp(c0, c1_v4, 80) and not _tcp(c0, v6[1], 80)
    assert c0.ask(eg.ext_addr, 7070) == eg.gw_ext_addr  # the other policy still holds

    # ALLOW: everything passes once converged; a DROP policy then still drops.
    rev = api.set_default(network_pb2.ALLOW)
    api.wait_converged(3, at_least=rev)
    # c0 and c1 peer again (under DENY, with c0-c1-web disabled, no policy linked them):
    # the first handshake can race one side's apply, so wait for it
    c0.wait_reachable(c1_v4)
    c1.wait_reachable(eg.overlay(None))  # c1 and the gateway peer again too
    assert _tcp(c0, c1_v4, 8080) and _ping(c0, c1_v4) and _tcp(c1, c0_v4, 80)
    assert _tcp(c1, eg.ext_addr, 8080)
    drop = api.policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
        parent="networks/lab", access_policy_id="no-icmp", access_policy=policy_pb2.AccessPolicy(
            sources=["*"], destinations=["node:c1"], protocol=policy_pb2.ICMP, action=policy_pb2.DROP)))
    api.wait_converged(3, at_least=int(drop.etag))
    assert not _ping(c0, c1_v4) and _tcp(c0, c1_v4, 8080) and _ping(c1, c0_v4)


def test_a_policy_naming_a_missing_node_is_refused_and_changes_nothing(api: Api):
    _network(api)
    before = list(api.policies.ListAccessPolicies(policy_pb2.ListAccessPoliciesRequest(parent="networks/lab")).access_policies)
    r = api.cli("access-policy", "create", "--parent", "networks/lab", "--access-policy-id", "typo",
                "--access-policy.sources", "node:nobody", "--access-policy.destinations", "tag:web")
    assert r.returncode != 0
    assert "INVALID_ARGUMENT" in r.stderr and "access_policy.sources[0]" in r.stderr and "nobody" in r.stderr, r.stderr
    with pytest.raises(grpc.RpcError) as e:
        api.policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
            parent="networks/lab", access_policy_id="typo", access_policy=policy_pb2.AccessPolicy(
                sources=["*"], destinations=["egress:nothing", "client:nobody"])))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "access_policy.destinations[0]" in e.value.details() and "access_policy.destinations[1]" in e.value.details()
    after = list(api.policies.ListAccessPolicies(policy_pb2.ListAccessPoliciesRequest(parent="networks/lab")).access_policies)
    assert after == before == []


def _site(lab: Lab):
    """Two gateway nodes, each with a LAN host behind it:

    la (198.51.100.10) -- sa -- 203.0.113.0/28 underlay -- sb -- lb (198.51.100.130)
    """
    sa, sb = lab.host("sa"), lab.host("sb")
    la, lb = lab.host("la"), lab.host("lb")
    lab.wire(sa, "eth-u", "203.0.113.1/28", sb, "eth-u", "203.0.113.2/28")
    lab.wire(sa, "eth-lan", "198.51.100.1/25", la, "eth0", "198.51.100.10/25")
    lab.wire(sb, "eth-lan", "198.51.100.129/25", lb, "eth0", "198.51.100.130/25")
    la.ip("route", "add", "default", "via", "198.51.100.1")
    lb.ip("route", "add", "default", "via", "198.51.100.129")
    return lab.node(sa, "sa"), lab.node(sb, "sb"), la, lb


def test_site_to_site_lans_talk_both_ways_with_real_addresses_subject_to_policy(api: Api, lab: Lab):
    na, nb, la, lb = _site(lab)
    secret = _network(api, default=network_pb2.ALLOW, uses=2)
    na.join(api.socket, secret, "sa", endpoint="203.0.113.1:51820", insecure_no_authority=True)
    nb.join(api.socket, secret, "sb", endpoint="203.0.113.2:51820", insecure_no_authority=True)
    na.start()
    nb.start()
    for gw_id, node, rng in (("lan-a", "sa", "198.51.100.0/25"), ("lan-b", "sb", "198.51.100.128/25")):
        gw = api.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
            parent="networks/lab", egress_gateway_id=gw_id, egress_gateway=egress_pb2.EgressGateway(
                node=f"networks/lab/nodes/{node}", ranges=[rng], nat=False)))
    api.wait_converged(2, at_least=int(gw.etag))
    la.whoami_server("198.51.100.10", 7070)
    lb.whoami_server("198.51.100.130", 7070)
    # each side sees the other's real address
    assert la.ask("198.51.100.130", 7070) == "198.51.100.10"
    assert lb.ask("198.51.100.10", 7070) == "198.51.100.130"

    rev = api.set_default(network_pb2.DENY)
    api.wait_converged(2, at_least=rev)
    assert not _tcp(la, "198.51.100.130", 7070) and not _tcp(lb, "198.51.100.10", 7070)

    p = api.policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
        parent="networks/lab", access_policy_id="sites", access_policy=policy_pb2.AccessPolicy(
            sources=["egress:lan-a"], destinations=["egress:lan-b"], protocol=policy_pb2.TCP,
            ports=[policy_pb2.PortRange(first=7000, last=7100)], bidirectional=True)))
    api.wait_converged(2, at_least=int(p.etag))
    assert la.ask("198.51.100.130", 7070) == "198.51.100.10"
    assert lb.ask("198.51.100.10", 7070) == "198.51.100.130"
    assert not _ping(la, "198.51.100.130")  # TCP only


def test_an_internet_gateway_serves_the_nodes_it_selects_and_gateways_keep_their_own_route(api: Api, egress2):
    eg = egress2
    secret = _network(api)
    rev = api.set_default(network_pb2.ALLOW)
    eg.gw.join(api.socket, secret, "gateway", endpoint=f"{eg.gw_underlay(0)}:51820", insecure_no_authority=True)
    for i, c in enumerate(eg.clients):
        c.join(api.socket, secret, f"c{i}", endpoint=f"{eg.client_underlay(i)}:51820",
               insecure_no_authority=True, accept_default_route=True)
    for n in (eg.gw, *eg.clients):
        n.start()
    api.wait_converged(3, at_least=rev)
    # c1 runs an egress gateway of its own; by default it keeps its own default route
    spare = api.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
        parent="networks/lab", egress_gateway_id="spare",
        egress_gateway=egress_pb2.EgressGateway(node="networks/lab/nodes/c1", ranges=["203.0.113.128/25"])))
    inet = api.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
        parent="networks/lab", egress_gateway_id="internet",
        egress_gateway=egress_pb2.EgressGateway(node="networks/lab/nodes/gateway", internet_gateway=True)))
    api.wait_converged(3, at_least=max(int(spare.etag), int(inet.etag)))
    c0, c1 = eg.clients[0], eg.clients[1]
    eg.ext.whoami_server(eg.ext_addr, 7070)
    assert c0.host.route_dev(eg.ext_addr) == c0.ifname
    assert c0.host.ask(eg.ext_addr, 7070) == eg.gw_ext_addr  # out through the internet gateway, NATed
    assert c1.host.route_dev(eg.ext_addr) == "eth0"  # a gateway node keeps its own default route
    assert eg.gw.host.route_dev(eg.ext_addr) == "eth-ext"

    # selected by name: only c1 uses it now (its own gateway does not matter once selected)
    r = api.cli("egress-gateway", "update", "networks/lab/egressGateways/internet",
                "--egress-gateway.used-by", "node:c1")
    assert r.returncode == 0, r.stderr
    api.wait_converged(3, at_least=api.status().revision)
    assert c1.host.route_dev(eg.ext_addr) == c1.ifname
    assert c1.host.ask(eg.ext_addr, 7070) == eg.gw_ext_addr
    assert c0.host.route_dev(eg.ext_addr) == "eth0"
    assert c0.host.ask(eg.ext_addr, 7070, timeout=1.5) is None  # the service is reached only through a gateway
