"""System tests: gatewayd against real namespaces, veths, wireguard-go, nftables and
real TCP connections.  Each test builds its own hosts (see ``meshgate.gatewayd.lab``)
and the ``lab`` fixture removes them and checks nothing is left behind.
"""

from __future__ import annotations

import base64
import json
import os
import signal

import pytest

from meshgate.common.testing import eventually as until
from meshgate.gatewayd.lab import Egress

pytestmark = pytest.mark.root

EXT_PORT = 8080


def up(eg: Egress, nat: bool = True, internet_gateway: bool = False) -> None:
    eg.gw.apply(eg.gateway_state(nat=nat, internet_gateway=internet_gateway))
    for i, c in enumerate(eg.clients):
        c.apply(eg.client_state(i, internet_gateway=internet_gateway))
    eg.ext.whoami_server(eg.ext_addr, EXT_PORT)


def test_egress_with_nat_external_host_sees_gateway(egress: Egress):
    up(egress, nat=True)
    client = egress.clients[0].host
    # the external host is reachable only through the gateway, and sees its address
    assert client.route_dev(egress.ext_addr) == egress.clients[0].ifname
    assert client.ask(egress.ext_addr, EXT_PORT) == egress.gw_ext_addr
    # the gateway carried it: the client's tunnel peer has counted traffic
    (peer,) = egress.clients[0].peers().values()
    assert peer["handshake"] > 0 and peer["tx"] > 0 and peer["rx"] > 0


def test_egress_without_nat_external_host_sees_client_and_replies_route_back(egress: Egress):
    up(egress, nat=False)
    # the external network routes the overlay back to the gateway (as a VPC route would)
    egress.ext.ip("route", "add", "100.64.0.0/24", "via", egress.gw_ext_addr)
    assert egress.clients[0].host.ask(egress.ext_addr, EXT_PORT) == egress.overlay(0)
    nft = egress.gw.host.run("nft", "list", "table", "inet", "meshgate").stdout
    assert "masquerade" not in nft


def test_traffic_outside_egress_ranges_stays_out_of_the_tunnel(egress: Egress):
    up(egress)
    client = egress.clients[0]
    lan = egress.lans[0]
    lan.whoami_server("192.0.2.10", EXT_PORT)
    assert client.host.ask(egress.ext_addr, EXT_PORT) == egress.gw_ext_addr  # tunnel is up
    before = client.peers()
    # a LAN host: reached directly, from the client's own LAN address
    assert client.host.route_dev("192.0.2.10") == "eth-lan"
    assert client.host.ask("192.0.2.10", EXT_PORT) == "192.0.2.1"
    # the gateway's underlay address is not an egress range either
    egress.gw.host.whoami_server(egress.gw_underlay(0), EXT_PORT)
    assert client.host.ask(egress.gw_underlay(0), EXT_PORT) == egress.client_underlay(0)
    after = client.peers()
    key = egress.gw.public_key
    assert (after[key]["rx"], after[key]["tx"]) == (before[key]["rx"], before[key]["tx"])


def test_gateway_forwards_only_its_configured_ranges(egress: Egress):
    eg = egress
    # the client sends the whole /24 into the tunnel, the gateway egresses only the /25
    eg.gw.apply(eg.gateway_state(ranges=("198.51.100.0/25",)))
    eg.clients[0].apply(eg.client_state(0))
    eg.ext.ip("address", "add", "198.51.100.200/24", "dev", "eth0")
    eg.ext.whoami_server("0.0.0.0", EXT_PORT)
    client = eg.clients[0].host
    assert client.ask("198.51.100.10", EXT_PORT) == eg.gw_ext_addr
    assert client.route_dev("198.51.100.200") == eg.clients[0].ifname
    assert client.ask("198.51.100.200", EXT_PORT, timeout=1) is None
    # reachable from the gateway itself: it is the forward filter that says no
    assert eg.gw.host.ask("198.51.100.200", EXT_PORT) == eg.gw_ext_addr


def test_internet_gateway_keeps_the_underlay_path_to_the_gateway(egress: Egress):
    up(egress, internet_gateway=True)
    client = egress.clients[0]
    # everything else goes through the tunnel: the "internet" host sees the gateway
    assert client.host.route_dev(egress.ext_addr) == client.ifname
    assert client.host.route_dev("203.0.113.200") == client.ifname
    assert client.host.ask(egress.ext_addr, EXT_PORT) == egress.gw_ext_addr
    # the tunnel's own packets (fwmark) still leave by the underlay ...
    mark = json.loads(client.gatewayd("show").stdout)["device"]["fwmark"]
    assert mark
    assert client.host.route_dev(egress.gw_underlay(0), mark=mark) == "eth0"
    # ... and so does ordinary traffic to the gateway's underlay subnet (main table wins
    # over the default route through suppress_prefixlength 0)
    egress.gw.host.whoami_server(egress.gw_underlay(0), EXT_PORT)
    assert client.host.ask(egress.gw_underlay(0), EXT_PORT) == egress.client_underlay(0)
    rules = client.host.run("ip", "rule", "show").stdout
    assert "suppress_prefixlength 0" in rules and "not from all fwmark" in rules
    # the control plane's address never goes through the tunnel (`run` resolves it
    # into this setting): here 203.0.113.200 stands for it, reached by the underlay's
    # default route
    path = client.write(egress.client_state(0, internet_gateway=True), "bypass.json")
    from meshgate.gatewayd.lab import PY
    client.host.run("env", "MESHGATE_GATEWAYD_BYPASS=203.0.113.200", PY, "-m", "meshgate.gatewayd", "apply",
                    "--file", str(path), "--state-dir", str(client.state_dir), "--backend", client.backend)
    assert client.host.route_dev("203.0.113.200") == "eth0"
    assert client.host.route_dev(egress.ext_addr) == client.ifname
    assert "to 203.0.113.200 lookup main" in client.host.run("ip", "rule", "show").stdout
    # and the full pass reads that rule back as its own: nothing to change
    again = client.host.run("env", "MESHGATE_GATEWAYD_BYPASS=203.0.113.200", PY, "-m", "meshgate.gatewayd", "apply",
                            "--file", str(path), "--state-dir", str(client.state_dir), "--backend", client.backend)
    assert " 0 change(s)" in again.stdout, again.stdout


def _snapshot(node) -> dict:
    show = json.loads(node.gatewayd("show").stdout)
    for p in show.get("peers", {}).values():
        for k in ("last_handshake_sec", "rx_bytes", "tx_bytes"):
            p.pop(k)
    # IPv6 link-local addresses and their routes appear on the veths when the kernel
    # finishes duplicate address detection, on its own schedule; they are not ours
    noise = ("fe80", "ff00::/8", "tentative", "inet6 ", "valid_lft")
    show["ip"] = {
        args: "\n".join(line for line in node.host.run("ip", *args.split()).stdout.splitlines()
                        if not any(n in line for n in noise))
        for args in ("-4 rule", "-6 rule", "-4 route show table all", "-6 route show table all",
                     "address", "link")
    }
    show["ruleset"] = node.host.run("nft", "list", "ruleset").stdout
    return show


def test_idempotent_apply_changes_nothing_and_resets_no_session(egress2: Egress):
    eg = egress2
    up(eg)
    for i in range(2):
        assert eg.clients[i].host.ask(eg.ext_addr, EXT_PORT) == eg.gw_ext_addr
    before = _snapshot(eg.gw)
    peers_before = eg.gw.peers()
    r = eg.gw.apply(eg.gateway_state())
    assert "0 change(s)" in r.stdout
    after_snapshot = _snapshot(eg.gw)
    for k in before:
        assert after_snapshot[k] == before[k], k
    assert eg.gw.peers() == peers_before

    # change one peer: the other peer's session and counters survive, and the changed
    # peer is updated in place (its handshake survives too)
    c0, c1 = eg.clients[0].public_key, eg.clients[1].public_key
    r = eg.gw.apply(eg.gateway_state(revision=2, client0={"allowed_ips": ["100.64.1.0/24"],
                                                          "persistent_keepalive_seconds": 25}))
    assert "update peer" in r.stdout and r.stdout.count("peer") == 1
    after = eg.gw.peers()
    assert after[c1]["handshake"] == peers_before[c1]["handshake"]
    assert after[c1]["rx"] >= peers_before[c1]["rx"] and after[c1]["tx"] >= peers_before[c1]["tx"]
    assert after[c0]["handshake"] == peers_before[c0]["handshake"]
    assert after[c0]["allowed_ips"] == "100.64.0.2/32,100.64.1.0/24"
    assert eg.clients[1].host.ask(eg.ext_addr, EXT_PORT) == eg.gw_ext_addr


def test_drift_is_healed_and_foreign_objects_survive(egress: Egress):
    eg = egress
    client = eg.clients[0]
    h = client.host
    # foreign objects that exist before gatewayd starts
    h.run("nft", "add", "table", "inet", "foreign")
    h.run("nft", "add", "chain", "inet", "foreign", "c", "{ type filter hook input priority 10; }")
    h.ip("route", "add", "192.0.2.128/25", "via", "192.0.2.10")
    h.ip("route", "add", "192.0.2.64/26", "via", "192.0.2.10", "table", "51821")  # our table, not our proto
    eg.gw.apply(eg.gateway_state())
    # the periodic full pass (the safety net) alone: the drift watcher, which heals
    # these within moments, is off (test_system_drift.py tests it)
    client.start(eg.client_state(0), env={"MESHGATE_GATEWAYD_DRIFT_WATCH": "0"})
    client.wait_status(lambda s: s.get("state") == "applied")
    eg.ext.whoami_server(eg.ext_addr, EXT_PORT)
    assert h.ask(eg.ext_addr, EXT_PORT) == eg.gw_ext_addr

    def resync() -> None:
        n = client.status()["full_syncs"]
        client.signal(signal.SIGHUP)
        client.wait_status(lambda s: s["full_syncs"] > n)

    # 1. nft flush ruleset (and a foreign table created afterwards)
    h.run("nft", "flush", "ruleset")
    h.run("nft", "add", "table", "ip", "foreign2")
    resync()
    assert "table inet meshgate" in h.run("nft", "list", "tables").stdout
    assert "table ip foreign2" in h.run("nft", "list", "tables").stdout

    # 2. the peer removed behind gatewayd's back
    h.run("wg", "set", client.ifname, "peer", eg.gw.public_key, "remove")
    assert client.peers() == {}
    resync()
    assert eg.gw.public_key in client.peers()

    # 3. gatewayd's route deleted
    h.ip("route", "del", "198.51.100.0/24", "table", "51821")
    assert h.route_dev(eg.ext_addr) == "eth0"
    resync()
    assert h.route_dev(eg.ext_addr) == client.ifname
    assert h.ask(eg.ext_addr, EXT_PORT) == eg.gw_ext_addr

    # foreign objects survived every apply
    assert "192.0.2.128/25" in h.ip("route", "show").stdout
    assert "192.0.2.64/26" in h.ip("route", "show", "table", "51821").stdout
    assert "table ip foreign2" in h.run("nft", "list", "tables").stdout
    st = client.status()
    assert st["last_error"] is None and st["state"] == "applied"


def test_restart_keeps_the_data_plane_and_restores_from_disk(egress: Egress):
    eg = egress
    psk = base64.b64encode(os.urandom(32)).decode()  # made by the test, never logged
    eg.gw.start(eg.gateway_state(client0={"preshared_key": psk}))
    eg.gw.wait_status(lambda s: s.get("state") == "applied")
    eg.clients[0].apply(eg.client_state(0, preshared_key=psk))
    eg.ext.whoami_server(eg.ext_addr, EXT_PORT)
    ask = lambda: eg.clients[0].host.ask(eg.ext_addr, EXT_PORT)  # noqa: E731
    assert ask() == eg.gw_ext_addr
    wg_pid = eg.gw.wg_pid()
    handshake = eg.gw.peers()[eg.clients[0].public_key]["handshake"]

    # gatewayd dies hard: the kernel state stays and keeps carrying traffic
    eg.gw.stop(signal.SIGKILL)
    assert ask() == eg.gw_ext_addr

    # restarted with no control plane (no --file): nothing is torn down
    (eg.gw.state_dir / "status.json").unlink()
    eg.gw.start(None)
    st = eg.gw.wait_status(lambda s: s.get("state") == "applied")
    assert st["last_changes"] == 0 and st["applied_revision"] == 1
    assert eg.gw.wg_pid() == wg_pid
    assert eg.gw.peers()[eg.clients[0].public_key]["handshake"] == handshake
    assert ask() == eg.gw_ext_addr

    # the restarted gatewayd supervises the wireguard-go it adopted
    n = st["full_syncs"]
    eg.gw.host.run("kill", "-9", str(wg_pid))
    st = eg.gw.wait_status(lambda s: s["full_syncs"] > n and s["state"] == "applied")
    assert eg.gw.wg_pid() not in (None, wg_pid)
    wg_pid = eg.gw.wg_pid()

    # after a "reboot" (wireguard-go and the ruleset gone), the state on disk comes back
    eg.gw.stop(signal.SIGKILL)
    eg.gw.host.run("kill", str(wg_pid))
    eg.gw.host.run("nft", "flush", "ruleset")
    (eg.gw.state_dir / "status.json").unlink()
    eg.gw.start(None)
    st = eg.gw.wait_status(lambda s: s.get("state") == "applied")
    assert st["last_changes"] > 0
    assert eg.gw.wg_pid() != wg_pid
    assert eg.gw.public_key in eg.gw.gatewayd("show").stdout
    assert "masquerade" in eg.gw.host.run("nft", "list", "table", "inet", "meshgate").stdout
    # same node key, so the client's configuration still fits; its stale session is
    # replaced by a new handshake once WireGuard notices no answers (REKEY_TIMEOUT)
    assert eventually(ask, eg.gw_ext_addr)
    # the pre-shared key is on disk only in the 0600 state file, in no log or status
    log = eg.gw.state_dir.parent / f"{eg.gw.state_dir.name}-daemon.log"
    texts = [log.read_bytes(), (eg.gw.state_dir / "status.json").read_bytes()]
    assert b"applied revision" in texts[0] or b"pass applied" in texts[0]
    texts.append(eg.gw.gatewayd("show").stdout.encode())
    assert texts and not any(psk.encode() in t or base64.b64decode(psk).hex().encode() in t
                             for t in texts)
    assert (eg.gw.state_dir / "desired.pb").stat().st_mode & 0o077 == 0


def eventually(fn, want, attempts: int = 15):
    for _ in range(attempts):
        got = fn()
        if got == want:
            return True
    return False


@pytest.mark.parametrize("breakage", ["overlap", "bad_key", "bad_psk", "unknown_interface"])
def test_bad_desired_state_is_rejected_and_previous_state_kept(egress2: Egress, breakage: str):
    eg = egress2
    up(eg)
    before = _snapshot(eg.gw)
    on_disk = (eg.gw.state_dir / "desired.pb").read_bytes()
    bad = eg.gateway_state(revision=9)
    if breakage == "overlap":
        bad.peers[1].allowed_ips.append("100.64.0.2/32")  # client0's address
        field = "allowed_ips"
    elif breakage == "bad_key":
        bad.peers[0].public_key = "not-a-key"
        field = "peers[0].public_key"
    elif breakage == "bad_psk":
        bad.peers[0].preshared_key = "c2VjcmV0LXRoYXQtaXMtbm90LWEta2V5"
        field = "peers[0].preshared_key"
    else:
        bad.egress[0].egress_interface = "nosuchif0"
        field = "egress_interface"
    # a valid change elsewhere in the same state must not be applied either
    bad.peers[0].persistent_keepalive_seconds = 10
    r = eg.gw.apply(bad, check=False)
    assert r.returncode == 2, r.stderr
    assert field in r.stderr
    assert "c2VjcmV0" not in r.stderr + r.stdout  # a secret is never echoed
    assert _snapshot(eg.gw) == before
    assert (eg.gw.state_dir / "desired.pb").read_bytes() == on_disk
    assert eg.clients[0].host.ask(eg.ext_addr, EXT_PORT) == eg.gw_ext_addr


def test_agent_rejects_bad_update_and_keeps_running(egress: Egress):
    eg = egress
    eg.gw.start(eg.gateway_state())
    eg.gw.wait_status(lambda s: s.get("state") == "applied")
    eg.clients[0].apply(eg.client_state(0))
    eg.ext.whoami_server(eg.ext_addr, EXT_PORT)
    bad = eg.gateway_state(revision=2)
    bad.peers[0].allowed_ips.append("not-a-cidr")
    eg.gw.follow(bad)
    st = eg.gw.wait_status(lambda s: s["rejected"] >= 1)
    assert "allowed_ips" in st["last_error"] and st["applied_revision"] == 1
    assert eg.clients[0].host.ask(eg.ext_addr, EXT_PORT) == eg.gw_ext_addr
    # a good update afterwards goes through the delta path
    good = eg.gateway_state(revision=3, client0={"persistent_keepalive_seconds": 15})
    eg.gw.follow(good)
    st = eg.gw.wait_status(lambda s: s["applied_revision"] == 3)
    assert st["delta_syncs"] >= 1 and st["last_error"] is None
    assert eg.gw.peers()[eg.clients[0].public_key]["keepalive"] == "15"


def test_gatewayd_supervises_wireguard_go(egress: Egress):
    eg = egress
    eg.gw.start(eg.gateway_state())
    eg.gw.wait_status(lambda s: s.get("state") == "applied")
    eg.clients[0].apply(eg.client_state(0))
    eg.ext.whoami_server(eg.ext_addr, EXT_PORT)
    assert eg.clients[0].host.ask(eg.ext_addr, EXT_PORT) == eg.gw_ext_addr
    old = eg.gw.wg_pid()
    n = eg.gw.status()["full_syncs"]
    eg.gw.host.run("kill", "-9", str(old))  # wireguard-go crashes
    # A new wireguard-go, and a full pass applied after it: the pass that
    # restarted it, or a later one (drift watching or the periodic pass may
    # run in between, so the last pass's change count proves nothing).
    until(lambda: eg.gw.wg_pid() not in (None, old), "a new wireguard-go after the old one was killed")
    eg.gw.wait_status(lambda s: s["full_syncs"] > n and s["state"] == "applied")
    assert eventually(lambda: eg.clients[0].host.ask(eg.ext_addr, EXT_PORT), eg.gw_ext_addr)


def test_renamed_interface_replaces_the_old_one(egress: Egress):
    eg = egress
    up(eg)
    old_pid = eg.gw.wg_pid()
    msg = eg.gateway_state(revision=2)
    msg.interface.name = eg.gw.ifname + "x"
    r = eg.gw.apply(msg)
    assert f"remove interface {eg.gw.ifname}" in r.stdout
    links = eg.gw.host.ip("-o", "link", "show").stdout
    assert eg.gw.ifname + "x" in links and f" {eg.gw.ifname}:" not in links
    assert old_pid is not None and not _alive(old_pid)
    eg.gw.ifname += "x"  # so the lab cleans the new one up by its PID file
    # the nft table now names the new interface
    assert eg.gw.ifname in eg.gw.host.run("nft", "list", "table", "inet", "meshgate").stdout


def _alive(pid: int) -> bool:
    import os

    try:
        st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return st != "Z" and os.path.exists(f"/proc/{pid}")


def test_filter_rules_guard_the_node_from_the_overlay(egress: Egress):
    eg = egress
    msg = eg.gateway_state()
    msg.filter_rules.add(sources=["100.64.0.0/24"], destinations=["100.64.0.1/32"], protocol="tcp", ports=["8080"],
                         accept=True)
    msg.filter_rules.add(destinations=["198.51.100.0/24"], protocol="tcp", ports=[str(EXT_PORT)], accept=True)
    msg.filter_rules.add(accept=False)  # what a DENY network's list ends with
    eg.gw.apply(msg)
    eg.clients[0].apply(eg.client_state(0))
    eg.gw.host.whoami_server("100.64.0.1", 8080)
    eg.gw.host.whoami_server("100.64.0.1", 8081)
    eg.ext.whoami_server(eg.ext_addr, EXT_PORT)
    client = eg.clients[0].host
    assert client.ask("100.64.0.1", 8080) == eg.overlay(0)
    assert client.ask("100.64.0.1", 8081, timeout=1) is None
    assert client.ask(eg.ext_addr, EXT_PORT) == eg.gw_ext_addr  # forwarded, by its own rule
    assert client.run("ping", "-c", "1", "-W", "1", eg.ext_addr, check=False).returncode != 0  # not ICMP
    # traffic that does not arrive from the overlay is not affected
    assert eg.gw.host.ask("100.64.0.1", 8081) == "100.64.0.1"


def test_dual_stack_state_is_stable(egress: Egress):
    """IPv6 addresses, routes, rules and sets read back exactly as planned."""
    eg = egress
    gw = eg.gateway_state()
    gw.interface.addresses.append("fd00:64::1/64")
    gw.peers[0].allowed_ips.append("fd00:64::2/128")
    gw.egress[0].ranges.append("2001:db8:100::/48")
    gw.egress[0].source_ranges.append("fd00:64::/64")
    cl = eg.client_state(0)
    cl.interface.addresses.append("fd00:64::2/64")
    cl.peers[0].allowed_ips.extend(["fd00:64::1/128", "::/0"])
    cl.routes.add(destination="2001:db8:100::/48", via_peer=eg.gw.public_key)
    cl.default_route_via_peer = eg.gw.public_key
    eg.gw.apply(gw)
    r = eg.clients[0].apply(cl)
    assert "add route ::/0" in r.stdout and "add rule ipv6" in r.stdout
    for node, msg in ((eg.gw, gw), (eg.clients[0], cl)):
        assert "0 change(s)" in node.apply(msg).stdout
    assert eg.clients[0].host.route_dev("2001:db8:100::1") == eg.clients[0].ifname
    sysctl = eg.gw.host.run("sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip()
    assert sysctl == "1"
