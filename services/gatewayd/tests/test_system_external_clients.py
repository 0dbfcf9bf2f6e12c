"""External clients end to end, in namespaces: a real key service and control
plane, gatewayd agents that joined with an enrollment key, and a laptop that
runs nothing of ours: the configuration `CreateExternalClient` returned, brought
up the way `wg-quick up` would (`Lab.plain_wireguard`).

    laptop (plain WireGuard) --203.0.113.32/28-- gateway --198.51.100.0/24-- ext
                                                   |  203.0.113.0/28
                                                 client0 (gatewayd)

The laptop reaches the gateway node, another node (relayed by the gateway) and
the egress range (NATed by the gateway); disabling or deleting the client cuts
it off.
"""

from __future__ import annotations

import base64
import configparser
import time

import pytest

from meshgate.api.v1 import egress_pb2, external_client_pb2_grpc
from meshgate.api.v1 import external_client_pb2 as ec
from meshgate.gatewayd.lab import Egress
from test_system_keys_e2e import KeyedLoop, keyed, up  # noqa: F401 - keyed is a fixture

pytestmark = pytest.mark.root

LAPTOP_UNDERLAY, GW_TO_LAPTOP = "203.0.113.34", "203.0.113.33"
WHOAMI_PORT = 8080


def pings(host, addr: str, count: int = 3) -> bool:
    return host.run("ping", "-n", "-c", str(count), "-W", "1", addr, check=False).returncode == 0


def laptop_client(keyed: KeyedLoop, eg: Egress, egress_ranges: tuple[str, ...] = ()):  # noqa: F811
    """The laptop's host wired to the gateway node, the network up, the gateway node's
    egress gateway `out` for `egress_ranges` if any, and the laptop's external client
    created through the API: (host, client, parsed configuration). Its secrets go to
    the guard."""
    laptop = eg.lab.host("laptop")
    eg.lab.wire(eg.gw.host, "eth-l", f"{GW_TO_LAPTOP}/28", laptop, "eth0", f"{LAPTOP_UNDERLAY}/28")
    laptop.ip("route", "add", "default", "via", GW_TO_LAPTOP)
    up(keyed, eg)
    if egress_ranges:
        keyed.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
            parent="networks/lab", egress_gateway_id="out",
            egress_gateway=egress_pb2.EgressGateway(node="networks/lab/nodes/gateway", ranges=list(egress_ranges))))
    clients = external_client_pb2_grpc.ExternalClientServiceStub(keyed.channel)
    c = clients.CreateExternalClient(ec.CreateExternalClientRequest(
        parent="networks/lab", external_client_id="laptop",
        external_client=ec.ExternalClient(gateway_node="networks/lab/nodes/gateway")), timeout=30)
    conf = configparser.ConfigParser()
    conf.optionxform = str  # type: ignore[assignment,method-assign]  # keep the keys' case
    conf.read_string(c.config)
    # The laptop's private key and pre-shared key: in no log, span or etcd value.
    keyed.guard.add(base64.b64decode(conf["Interface"]["PrivateKey"]), base64.b64decode(conf["Peer"]["PresharedKey"]),
                    c.config)
    return laptop, c, conf


def test_laptop_with_the_returned_config_reaches_nodes_and_egress(keyed: KeyedLoop, egress: Egress,  # noqa: F811
                                                                  monkeypatch):
    eg, lab = egress, egress.lab
    monkeypatch.setenv("MESHGATE_GATEWAYD_HEALTH_INTERVAL", "1")  # gatewayd reports its peers every second
    laptop, c, conf = laptop_client(keyed, eg, ("198.51.100.0/24",))
    clients = external_client_pb2_grpc.ExternalClientServiceStub(keyed.channel)
    keyed.guard.expect_span("/meshgate.api.v1.KeyService/IssueClientKeyPair", "meshgate-keyservice")
    assert conf["Peer"]["AllowedIPs"] == "100.64.0.0/24, 198.51.100.0/24"
    # The client config names the gateway node's underlay address its agent registered.
    assert conf["Peer"]["Endpoint"] == f"{eg.gw_underlay(0)}:51820"
    keyed.wait_converged(2, at_least=keyed.status().revision)
    wg = lab.plain_wireguard(laptop, lab.ifname("lap"), c.config)
    try:
        laptop.wait_reachable("100.64.0.1")  # the gateway node
        eg.clients[0].host.wait_reachable("100.64.0.1")  # the nodes' own tunnel (see Host.wait_reachable)
        assert pings(laptop, eg.overlay(0)), "the other node, relayed by the gateway node"
        assert pings(eg.clients[0].host, c.ipv4_address), "the other node reaches the laptop back"
        server = eg.ext.whoami_server(eg.ext_addr, WHOAMI_PORT)
        try:
            assert laptop.ask(eg.ext_addr, WHOAMI_PORT) == eg.gw_ext_addr, "egress NATed by the gateway node"
        finally:
            server.kill()
        assert list(wg.peers()) == [eg.gw.public_key]
        # The gateway node's reports show the laptop's tunnel on the client resource.
        deadline = time.monotonic() + 30
        got = clients.GetExternalClient(ec.GetExternalClientRequest(name=c.name))
        while not (got.HasField("last_handshake_time") and got.rx_bytes) and time.monotonic() < deadline:
            time.sleep(0.5)
            got = clients.GetExternalClient(ec.GetExternalClientRequest(name=c.name))
        assert got.HasField("last_handshake_time") and got.rx_bytes > 0 and got.tx_bytes > 0, got

        # Disabled: the gateway node drops the peer; the laptop is cut off.
        clients.UpdateExternalClient(ec.UpdateExternalClientRequest(
            external_client=ec.ExternalClient(name=c.name, disabled=True),
            update_mask={"paths": ["disabled"]}))
        keyed.wait_converged(2, at_least=keyed.status().revision)
        assert c.public_key not in eg.gw.peers()
        assert not pings(laptop, "100.64.0.1", count=2)
        # Enabled again: the same configuration works.
        clients.UpdateExternalClient(ec.UpdateExternalClientRequest(
            external_client=ec.ExternalClient(name=c.name, disabled=False),
            update_mask={"paths": ["disabled"]}))
        keyed.wait_converged(2, at_least=keyed.status().revision)
        laptop.wait_reachable("100.64.0.1")
        # Deleted: cut off for good.
        clients.DeleteExternalClient(ec.DeleteExternalClientRequest(name=c.name))
        keyed.wait_converged(2, at_least=keyed.status().revision)
        assert c.public_key not in eg.gw.peers()
        assert not pings(laptop, eg.overlay(0), count=2)
    finally:
        wg.down()


def test_a_laptop_in_a_deny_network_reaches_only_what_a_client_policy_allows(keyed: KeyedLoop, egress: Egress,  # noqa: F811
                                                                            ):
    """Relayed traffic is subject to policies like direct traffic: the laptop (an
    external client, relayed by the gateway node) reaches client0 on the allowed port
    only, and nothing else; client0 cannot open a connection to it. The gateway
    node's DNS, which its configuration names, still answers it."""
    from meshgate.api.v1 import network_pb2, policy_pb2, policy_pb2_grpc

    eg, lab = egress, egress.lab
    laptop, c, _ = laptop_client(keyed, eg)
    policies = policy_pb2_grpc.AccessPolicyServiceStub(keyed.channel)
    p = policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
        parent="networks/lab", access_policy_id="laptop-web", access_policy=policy_pb2.AccessPolicy(
            sources=["client:laptop"], destinations=["node:client0"], protocol=policy_pb2.TCP,
            ports=[policy_pb2.PortRange(first=WHOAMI_PORT)])))
    net = keyed.networks.UpdateNetwork(network_pb2.UpdateNetworkRequest(
        network=network_pb2.Network(name="networks/lab", default_policy=network_pb2.DENY),
        update_mask={"paths": ["default_policy"]}))
    keyed.wait_converged(2, at_least=max(int(p.etag), int(net.etag)))
    wg = lab.plain_wireguard(laptop, lab.ifname("lap"), c.config)
    node = eg.clients[0].host
    try:
        node.whoami_server(eg.overlay(0), WHOAMI_PORT)
        node.whoami_server(eg.overlay(0), WHOAMI_PORT + 1)
        deadline = time.monotonic() + 30
        seen = None
        while seen is None and time.monotonic() < deadline:  # the laptop's first handshake
            seen = laptop.ask(eg.overlay(0), WHOAMI_PORT, timeout=2)
        assert seen == c.ipv4_address, "allowed: the laptop reaches client0 on the port, relayed"
        assert laptop.ask(eg.overlay(0), WHOAMI_PORT + 1, timeout=1.5) is None, "another port"
        assert not pings(laptop, eg.overlay(0), count=2), "another protocol"
        assert not pings(laptop, "100.64.0.1", count=2), "the gateway node itself: no policy"
        # ... but the DNS its configuration names (the gateway node) answers it
        from test_system_dns import ZONE, lookup
        assert lookup(laptop, "100.64.0.1", f"client0.{ZONE}") == ["NOERROR", eg.overlay(0)]
        laptop.whoami_server(c.ipv4_address, WHOAMI_PORT)
        assert node.ask(c.ipv4_address, WHOAMI_PORT, timeout=1.5) is None, "the policy has a direction"
    finally:
        wg.down()
