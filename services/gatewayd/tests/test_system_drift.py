"""Drift heals in moments (issue 17): gatewayd's drift watcher (drift.py) in network
namespaces, with real wireguard-go, nftables and traffic through an egress gateway.

The agents run with a periodic full pass an hour away, so only the watcher can heal
what the tests break: ``nft flush ruleset`` on the gateway, a peer removed with ``wg
set``, a route, a rule and an address deleted on the client.  Each is waited for
(the test prints how long it took, and asserts no time); foreign tables, routes and
rules stay as they were.  A fight (a loop deleting gatewayd's route as soon as it is
back) is rate limited and shown in the agent's status and in ``meshgate network
get-status``.

Topology: ``lab.build_egress`` (client -- gateway -- external host 198.51.100.10,
NAT on the gateway), in namespaces named ``m17d-<token>-<role>``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from meshgate.api.v1 import egress_pb2, enrollment_pb2, network_pb2
from meshgate.common.testing import in_ci
from meshgate.gatewayd.lab import Egress, Host, Lab, Node, build_egress, can_run
from test_system_controlplane import Loop, loop_for

pytestmark = pytest.mark.root

EXT = "198.51.100.10"
RANGE = "198.51.100.0/24"


@pytest.fixture
def dlab():
    reason = can_run()
    if reason is not None:
        if in_ci():
            pytest.fail(f"CI=true but system tests cannot run: {reason}")
        pytest.skip(reason)
    lab = Lab(prefix="m17d")
    try:
        yield lab
    finally:
        lab.close()
        left = lab.leftovers()
        assert not left, f"the test left things behind: {left}"


def pings(host: Host, addr: str = EXT) -> bool:
    return host.run("ping", "-n", "-c", "1", "-W", "0.3", addr, check=False).returncode == 0


def heal_time(what: str, healed, timeout: float = 30, nodes: tuple[Node, ...] = ()) -> float:
    """Seconds until ``healed()`` holds (fails past ``timeout``, with the agents'
    logs); printed."""
    t0 = time.monotonic()
    while not healed():
        if time.monotonic() - t0 > timeout:
            logs = "\n".join(n.log_path.read_text(errors="replace")[-4000:] for n in nodes)
            pytest.fail(f"{what}: not healed within {timeout:.0f}s\n{logs}")
        time.sleep(0.02)
    took = time.monotonic() - t0
    print(f"drift healed: {what} in {took:.2f}s")
    return took


def repairs(node: Node) -> int:
    return (node.status().get("drift") or {}).get("repairs", 0)


def test_drift_heals_in_moments_and_foreign_objects_stay(dlab: Lab):
    eg: Egress = build_egress(dlab, clients=1)
    gw, client = eg.gw, eg.clients[0]
    h, g = client.host, gw.host
    # foreign objects, before and beside gatewayd's
    h.run("nft", "add", "table", "inet", "foreign")
    h.run("nft", "add", "chain", "inet", "foreign", "c", "{ type filter hook input priority 10; }")
    h.ip("route", "add", "192.0.2.128/25", "via", "192.0.2.10")
    h.ip("route", "add", "192.0.2.64/26", "via", "192.0.2.10", "table", "51821")  # our table, not our proto
    h.ip("rule", "add", "to", "192.0.2.200", "lookup", "100", "priority", "3000")
    h.ip("route", "add", "198.51.100.0/24", "dev", "eth0", "table", "100", "proto", "static")
    gw.start(eg.gateway_state())
    client.start(eg.client_state(0))
    for n in (gw, client):
        n.wait_status(lambda s: s.get("state") == "applied" and len(s.get("drift", {}).get("watching", [])) == 3)
    h.wait_reachable(EXT)
    table = client.host.run("nft", "list", "table", "inet", "meshgate").stdout

    # 1. the gateway's ruleset flushed (its NAT with it): traffic stops until healed
    g.run("nft", "flush", "ruleset")
    g.run("nft", "add", "table", "ip", "foreign2")
    heal_time("nft flush ruleset", lambda: pings(h), nodes=(gw, client))
    assert "table ip foreign2" in g.run("nft", "list", "tables").stdout
    assert "masquerade" in g.run("nft", "list", "table", "inet", "meshgate").stdout

    # 2. the client's peer removed from the gateway's device. The gateway knows the
    # client's endpoint only from its handshake; once a drift poll (every second)
    # has seen it, the re-added peer gets it back and handshakes at once, else
    # traffic waits for the client's own retry (15 s or more)
    deadline = time.monotonic() + 30
    while gw.peers()[client.public_key]["endpoint"] == "(none)":
        assert time.monotonic() < deadline, "the gateway never learnt the client's endpoint"
        time.sleep(0.05)
    time.sleep(1.5)
    g.run("wg", "set", gw.ifname, "peer", client.public_key, "remove")
    heal_time("peer removed with wg set", lambda: client.public_key in gw.peers() and pings(h), nodes=(gw, client))

    # 3. the client's route to the range deleted
    h.ip("route", "del", RANGE, "table", "51821")
    heal_time("route deleted", lambda: h.route_dev(EXT) == client.ifname and pings(h), nodes=(gw, client))

    # 4. the client's rule that sends traffic to gatewayd's table deleted
    rule = next(r for r in json.loads(h.ip("-4", "-json", "rule", "show").stdout)
                if r.get("table") == "51821" and str(r.get("protocol")) == "77")
    h.ip("-4", "rule", "del", "priority", str(rule["priority"]))
    heal_time("rule deleted", lambda: h.route_dev(EXT) == client.ifname and pings(h), nodes=(gw, client))

    # 5. the client's overlay address removed
    h.ip("address", "del", f"{eg.overlay(0)}/24", "dev", client.ifname)
    heal_time("address removed", lambda: eg.overlay(0) in h.ip("address", "show", "dev", client.ifname).stdout
              and pings(h), nodes=(gw, client))

    # every repair was the watcher's (the full pass is an hour away), and foreign
    # objects are as they were
    assert repairs(gw) >= 2 and repairs(client) >= 3
    st = client.status()
    assert st["last_error"] is None and st["drift"]["fighting"] is False
    assert "table inet foreign" in h.run("nft", "list", "tables").stdout
    assert "192.0.2.128/25" in h.ip("route", "show").stdout
    assert "192.0.2.64/26" in h.ip("route", "show", "table", "51821").stdout
    assert "198.51.100.0/24" in h.ip("route", "show", "table", "100").stdout
    assert "to 192.0.2.200 lookup 100" in h.ip("rule", "show").stdout
    assert h.run("nft", "list", "table", "inet", "meshgate").stdout == table
    # and nothing loops: with no more drift, no more repairs
    before = (repairs(gw), repairs(client))
    time.sleep(2)
    assert (repairs(gw), repairs(client)) == before


@pytest.fixture
def loop(dlab, etcd_server, etcd_prefix):
    with loop_for(dlab, etcd_server, etcd_prefix) as lp:
        yield lp


def client_drift(loop: Loop) -> dict:
    r = loop.cli("network", "get-status", "networks/lab", "-o", "json")
    assert r.returncode == 0, r.stderr
    (node,) = [n for n in json.loads(r.stdout)["nodes"] if n["node"].endswith("/client0")]
    return node.get("drift", {})


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # itself and its children


def test_a_fight_is_rate_limited_and_reported(loop: Loop, dlab: Lab):
    eg = build_egress(dlab, clients=1)
    gw, client = eg.gw, eg.clients[0]
    h = client.host
    loop.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
        network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
    key = loop.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
        parent="networks/lab", enrollment_key_id="lab", enrollment_key=enrollment_pb2.EnrollmentKey(max_uses=2)))
    gw.join(loop.socket, key.secret, "gateway", endpoint=f"{eg.gw_underlay(0)}:51820", insecure_no_authority=True)
    client.join(loop.socket, key.secret, "client0", insecure_no_authority=True)
    gw.start()
    # three repairs back to back, then one a second
    client.start(env={"MESHGATE_GATEWAYD_DRIFT_BURST": "3", "MESHGATE_GATEWAYD_DRIFT_REFILL": "1"})
    egw = loop.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
        parent="networks/lab", egress_gateway_id="db",
        egress_gateway=egress_pb2.EgressGateway(node="networks/lab/nodes/gateway", ranges=[RANGE])))
    loop.wait_converged(2, at_least=int(egw.etag))
    client.wait_status(lambda s: len(s.get("drift", {}).get("watching", [])) == 3)
    assert RANGE in h.ip("route", "show", "table", "51821").stdout

    # another tool deletes gatewayd's route whenever it sees it
    fighter = h.spawn("sh", "-c", f"while :; do ip route del {RANGE} table 51821 2>/dev/null; sleep 0.05; done")
    st = client.wait_status(lambda s: s["drift"]["fighting"], timeout=60)
    assert any(RANGE in line for line in st["drift"]["last_drift"]), st["drift"]
    # the control plane shows the fight (the agent sent its last ack again)
    deadline = time.monotonic() + 30
    while not client_drift(loop).get("fighting"):
        assert time.monotonic() < deadline, client_drift(loop)
        time.sleep(0.2)
    assert any(RANGE in line for line in client_drift(loop)["last_drift"])
    table = loop.cli("network", "get-status", "networks/lab", "-o", "table").stdout
    assert any(line.startswith("networks/lab/nodes/client0") and "FIGHTING" in line for line in table.splitlines()), (
        table + json.dumps(client.status()) + client.log_path.read_text()[-3000:])

    # held to the refill rate: over a few seconds of fighting, about one repair a
    # second (counted against the time it really took), and no spinning CPU
    pid = client.daemon.pid
    t0, r0, c0 = time.monotonic(), repairs(client), cpu_seconds(pid)
    time.sleep(4)
    t1, r1, c1 = time.monotonic(), repairs(client), cpu_seconds(pid)
    print(f"fight: {r1 - r0} repairs and {c1 - c0:.2f}s of CPU in {t1 - t0:.1f}s")
    assert r1 - r0 <= (t1 - t0) / 1.0 + 2
    assert c1 - c0 < 0.5 * (t1 - t0)
    assert client.status()["drift"]["fighting"]

    # the fight ends: the route comes back and stays, the status says so
    fighter.terminate()
    fighter.wait(10)
    client.wait_status(lambda s: not s["drift"]["fighting"], timeout=60)
    heal_time("route after the fight", lambda: RANGE in h.ip("route", "show", "table", "51821").stdout)
    deadline = time.monotonic() + 30
    while client_drift(loop).get("fighting"):
        assert time.monotonic() < deadline, client_drift(loop)
        time.sleep(0.2)
    drift = client_drift(loop)
    assert int(drift["repairs"]) >= 3 and int(drift["fights"]) == 1
