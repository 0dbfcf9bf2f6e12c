"""The kernel (netlink) WireGuard backend.  Runs only where the wireguard module
exists; elsewhere (including CI, which uses wireguard-go) it is skipped with the reason.
"""

from __future__ import annotations

import json

import pytest

from meshgate.gatewayd.lab import Egress

pytestmark = pytest.mark.root


@pytest.fixture
def kernel_egress(egress: Egress) -> Egress:
    probe = egress.gw.host.run("ip", "link", "add", "mgkprobe", "type", "wireguard", check=False)
    if probe.returncode != 0:
        pytest.skip("no wireguard kernel module on this host "
                    f"(ip link add type wireguard: {probe.stderr.strip()})")
    egress.gw.host.run("ip", "link", "del", "mgkprobe")
    for n in (egress.gw, *egress.clients):
        n.backend = "kernel"
    return egress


def test_auto_backend_picks_what_the_host_has_and_leaves_no_probe(lab):
    h = lab.host("auto")
    node = lab.node(h, "au")
    node.backend = "auto"
    show = json.loads(node.gatewayd("show", check=True).stdout)
    has_module = h.run("ip", "link", "add", "mgkprobe", "type", "wireguard", check=False).returncode == 0
    assert show["backend"] == ("kernel" if has_module else "userspace")
    if has_module:
        h.run("ip", "link", "del", "mgkprobe")
    assert "mgprobe" not in h.ip("link", "show").stdout


def test_kernel_backend_egress_idempotence_and_in_place_update(kernel_egress: Egress):
    eg = kernel_egress
    eg.gw.apply(eg.gateway_state())
    eg.clients[0].apply(eg.client_state(0))
    eg.ext.whoami_server(eg.ext_addr, 8080)
    assert eg.clients[0].host.ask(eg.ext_addr, 8080) == eg.gw_ext_addr
    show = json.loads(eg.gw.gatewayd("show").stdout)
    assert show["backend"] == "kernel" and eg.clients[0].public_key in show["peers"]
    assert "0 change(s)" in eg.gw.apply(eg.gateway_state()).stdout
    hs = eg.gw.peers()[eg.clients[0].public_key]["handshake"]
    r = eg.gw.apply(eg.gateway_state(revision=2, client0={"persistent_keepalive_seconds": 25}))
    assert "update peer" in r.stdout
    assert eg.gw.peers()[eg.clients[0].public_key]["handshake"] == hs
    eg.gw.gatewayd("down", check=True)
