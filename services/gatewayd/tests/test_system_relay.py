"""System test: a gateway node relays for its external client (``relayed_ranges``).

Three hosts, real namespaces, veths, wireguard-go and nftables::

    C (plain WireGuard, wg-quick style config; peers only with G)
      |  203.0.113.16/28
      G (gatewayd; relayed_ranges = [C's /32])  --198.51.100.0/24-- ext (whoami)
      |  203.0.113.0/28
    N (gatewayd; peer G, whose allowed IPs include C's /32)

C reaches N's overlay address only through G: in on G's WireGuard interface and
straight back out of it, which G's forward chain drops unless C's address is relayed.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import pytest

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.gatewayd import keys
from meshgate.gatewayd.lab import Host, Lab, Node, PlainWireGuard

pytestmark = pytest.mark.root

PORT = 51820
G_OVERLAY, N_OVERLAY, C_OVERLAY = "100.64.0.1", "100.64.0.2", "100.64.0.5"
G_TO_N, N_ADDR = "203.0.113.1", "203.0.113.2"
G_TO_C, C_ADDR = "203.0.113.17", "203.0.113.18"
EXT_ADDR, G_EXT = "198.51.100.10", "198.51.100.1"
EXT_PORT = 8080


@dataclass
class Relay:
    lab: Lab
    g: Node
    n: Node
    c: Host
    ext: Host
    c_private: str
    c_public: str
    psk: str

    def g_state(self, relayed: bool = True, egress: str = "", revision: int = 1) -> pb.DesiredState:
        """G's desired state; ``egress`` a range G egresses with NAT (``0.0.0.0/0``:
        an internet gateway)."""
        msg = pb.DesiredState(node="networks/lab/nodes/g", revision=revision)
        msg.interface.name = self.g.ifname
        msg.interface.addresses.append(f"{G_OVERLAY}/24")
        msg.interface.listen_port = PORT
        n = msg.peers.add(public_key=self.n.public_key, resource="networks/lab/nodes/n",
                          endpoint=f"{N_ADDR}:{PORT}")
        n.allowed_ips.append(f"{N_OVERLAY}/32")
        # the external client roams: no endpoint, it is learnt from C's handshake
        c = msg.peers.add(public_key=self.c_public, resource="networks/lab/externalClients/c",
                          preshared_key=self.psk)
        c.allowed_ips.append(f"{C_OVERLAY}/32")
        if relayed:
            msg.relayed_ranges.append(f"{C_OVERLAY}/32")
        if egress:
            # the client's address is inside the egress source range (the overlay's)
            internet = egress == "0.0.0.0/0"
            e = msg.egress.add(nat=True, internet_gateway=internet)
            if not internet:
                e.ranges.append(egress)
            e.source_ranges.append("100.64.0.0/24")
        return msg

    def n_state(self) -> pb.DesiredState:
        msg = pb.DesiredState(node="networks/lab/nodes/n", revision=1)
        msg.interface.name = self.n.ifname
        msg.interface.addresses.append(f"{N_OVERLAY}/24")
        msg.interface.listen_port = PORT
        g = msg.peers.add(public_key=self.g.public_key, resource="networks/lab/nodes/g",
                          endpoint=f"{G_TO_N}:{PORT}")
        g.allowed_ips.extend([f"{G_OVERLAY}/32", f"{C_OVERLAY}/32"])
        return msg

    def c_config(self, *extra_allowed: str) -> str:
        """What an external client's configuration file looks like."""
        allowed = ", ".join(["100.64.0.0/24", *extra_allowed])
        return (
            "[Interface]\n"
            f"PrivateKey = {self.c_private}\n"
            f"Address = {C_OVERLAY}/32\n"
            f"DNS = {G_OVERLAY}\n"
            "\n"
            "[Peer]\n"
            "# the gateway node\n"
            f"PublicKey = {self.g.public_key}\n"
            f"PresharedKey = {self.psk}\n"
            f"Endpoint = {G_TO_C}:{PORT}\n"
            f"AllowedIPs = {allowed}\n"
            "PersistentKeepalive = 25\n"
        )


@pytest.fixture
def relay(lab: Lab) -> Relay:
    g, n, c, ext = lab.host("g"), lab.host("n"), lab.host("c"), lab.host("ext")
    lab.wire(g, "eth-n", f"{G_TO_N}/28", n, "eth0", f"{N_ADDR}/28")
    lab.wire(g, "eth-c", f"{G_TO_C}/28", c, "eth0", f"{C_ADDR}/28")
    lab.wire(g, "eth-ext", f"{G_EXT}/24", ext, "eth0", f"{EXT_ADDR}/24")
    priv = keys.generate_private_key()
    return Relay(lab, lab.node(g, "g"), lab.node(n, "n"), c, ext, priv.reveal(),
                 keys.public_key_of(priv), base64.b64encode(os.urandom(32)).decode())


def pings(host: Host, addr: str, count: int = 3) -> bool:
    return host.run("ping", "-n", "-c", str(count), "-W", "1", addr, check=False).returncode == 0


def up(r: Relay, egress: str = "") -> PlainWireGuard:
    r.g.apply(r.g_state(egress=egress))
    r.n.apply(r.n_state())
    return r.lab.plain_wireguard(r.c, r.lab.ifname("c"), r.c_config(*[egress] if egress else []))


def test_gateway_relays_its_external_client_to_a_node_and_only_while_relayed(relay: Relay):
    r = relay
    assert r.g.host.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    client = up(r)
    # the plain host is what its config says: the wg-quick keys became addresses and routes
    assert r.c.ip("-4", "-o", "address", "show", "dev", client.ifname).stdout.split()[3] == f"{C_OVERLAY}/32"
    assert r.c.route_dev(N_OVERLAY) == client.ifname
    assert client.public_key() == r.c_public
    assert set(client.peers()) == {r.g.public_key}  # C knows only G

    r.c.wait_reachable(N_OVERLAY)  # C -> G -> N and back, through G's tunnel twice
    assert r.g.host.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    table = r.g.host.run("nft", "list", "table", "inet", "meshgate").stdout
    assert f'iifname "{r.g.ifname}" oifname "{r.g.ifname}" ip saddr @relay4 accept' in table
    assert f'iifname "{r.g.ifname}" oifname "{r.g.ifname}" ip daddr @relay4 accept' in table
    assert pings(r.n.host, C_OVERLAY)  # and N reaches C: "to" the relayed range as well
    n_peer = r.n.peers()[r.g.public_key]
    assert n_peer["rx"] > 0 and n_peer["tx"] > 0

    # the same state without relayed_ranges: G drops what would turn around in its tunnel
    out = r.g.apply(r.g_state(relayed=False, revision=2)).stdout
    assert "replace table inet meshgate" in out and "peer" not in out  # no session touched
    assert "relay" not in r.g.host.run("nft", "list", "table", "inet", "meshgate").stdout
    assert not pings(r.c, N_OVERLAY)
    assert not pings(r.n.host, C_OVERLAY)
    assert pings(r.c, G_OVERLAY)  # the tunnel itself is still up: only the relay is gone

    r.g.apply(r.g_state(relayed=True, revision=3))
    r.c.wait_reachable(N_OVERLAY, timeout=10)


@pytest.mark.parametrize("egress", ["198.51.100.0/24", "0.0.0.0/0"])
def test_relayed_client_still_egresses_with_nat(relay: Relay, egress: str):
    r = relay
    client = up(r, egress)
    r.ext.whoami_server(EXT_ADDR, EXT_PORT)
    r.c.wait_reachable(N_OVERLAY)
    assert r.c.route_dev(EXT_ADDR) == client.ifname
    if egress == "0.0.0.0/0":
        # wg-quick's way for a /0: the tunnel's own packets (fwmark) keep the underlay
        mark = int(client.wg("show", client.ifname, "fwmark").stdout.strip(), 0)
        assert r.c.route_dev(G_TO_C, mark=mark) == "eth0"
    # the client's egress traffic is NATed to G's address; its relayed traffic is not
    assert r.c.ask(EXT_ADDR, EXT_PORT) == G_EXT
    r.n.host.whoami_server(N_OVERLAY, EXT_PORT)
    assert r.c.ask(N_OVERLAY, EXT_PORT) == C_OVERLAY
    client.down()
    assert not r.c.ip("link", "show", client.ifname, check=False).stdout
    assert "suppress_prefixlength" not in r.c.ip("rule", "show").stdout
