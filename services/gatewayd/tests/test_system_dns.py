"""Egress by domain name and names in the overlay, in namespaces with real traffic.

A real control plane, gatewayd agents (wireguard-go, nft), and a real DNS server
the test runs: Debian's dnsmasq in the external host, answering from a hosts
file the test rewrites (SIGHUP) with a 1 s TTL, and `*.wild.example.test`
through `--address`.

    client0 --203.0.113.0/28-- gateway --198.51.100.0/24-- ext (dnsmasq .10,
                                                               db .20/.21, wild .30)

client0 reaches `db.example.test` through the gateway, NATed; the record changes
and the new address routes while the old one stays for its grace period, then
goes; a stopped upstream keeps the addresses (traffic flows) and the gateway's
status shows the error; a wildcard domain routes once a name under it was
asked through the gateway's DNS server; node names resolve from another node,
and from an external client brought up by the real `wg-quick up` from the
configuration the API returned, through the `DNS =` it names.
The gateway is created through the CLI, as a user would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshgate.api.v1 import egress_pb2, enrollment_pb2, network_pb2
from meshgate.gatewayd.lab import PY, ControlPlaneView, Egress, Host
from test_system_controlplane import start_control_plane
from test_system_keys_e2e import keyed  # noqa: F401 - a fixture

pytestmark = pytest.mark.root

MESHGATE = str(Path(sys.executable).with_name("meshgate"))
DNS = "198.51.100.10"
DB_OLD, DB_NEW, WILD = "198.51.100.20", "198.51.100.21", "198.51.100.30"
PORT = 8080
ZONE = "lab.meshgate.internal"


def dnsmasq(eg: Egress, hosts: Path) -> subprocess.Popen:
    """dnsmasq in the external host: the hosts file with a 1 s TTL, a wildcard."""
    return eg.ext.spawn(
        "/usr/sbin/dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}",
        f"--listen-address={DNS}", "--bind-interfaces", "--port=53", "--local-ttl=1", "--user=root",
        f"--pid-file={hosts}.pid", f"--address=/wild.example.test/{WILD}", "--log-facility=-",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lookup(host: Host, server: str, name: str, rdtype: str = "A") -> list[str]:
    """The answer of `server` (from inside `host`): its rcode, then its addresses."""
    code = ("import dns.message, dns.query, dns.rcode\n"
            f"a = dns.query.udp(dns.message.make_query({name!r}, {rdtype!r}), {server!r}, timeout=3)\n"
            "print(dns.rcode.to_text(a.rcode()))\n"
            "for rr in a.answer:\n"
            "    for x in rr:\n"
            "        print(x.to_text())\n")
    r = host.run(PY, "-c", code, check=False)
    return r.stdout.split() if r.returncode == 0 else ["FAILED", r.stderr[-200:]]


def wait(pred, what: str, timeout: float = 45.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.2)


@pytest.fixture
def api(lab, etcd_server, etcd_prefix):
    socket = str(lab.dir / "cp.sock")
    cp = start_control_plane(etcd_server, etcd_prefix, socket)
    view = ControlPlaneView(cp.target, f"unix:{socket}", token=cp.admin_token)
    view.cp = cp  # type: ignore[attr-defined]
    try:
        yield view
    finally:
        view.close()
        cp.stop()


def cli(api, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MESHGATE_TOKEN": api.cp.admin_token}
    return subprocess.run([MESHGATE, "--target", api.cp.target, *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_egress_by_name_follows_dns_keeps_addresses_when_dns_fails_and_names_resolve(api, egress: Egress):
    eg = egress
    c0 = eg.clients[0]
    for a in (DB_OLD, DB_NEW, WILD):
        eg.ext.ip("address", "add", f"{a}/24", "dev", "eth0")
        eg.ext.whoami_server(a, PORT)
    hosts = eg.lab.dir / "m14-hosts"
    hosts.write_text(f"{DB_OLD} db.example.test\n")
    server = dnsmasq(eg, hosts)
    try:
        wait(lambda: lookup(eg.gw.host, DNS, "db.example.test") == ["NOERROR", DB_OLD], "dnsmasq answers")

        api.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
            network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
        key = api.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
            parent="networks/lab", enrollment_key_id="lab", enrollment_key=enrollment_pb2.EnrollmentKey(max_uses=2)))
        eg.gw.join(api.agent_target, key.secret, "gateway", endpoint=f"{eg.gw_underlay(0)}:51820",
                   insecure_no_authority=True)
        c0.join(api.agent_target, key.secret, "client0", insecure_no_authority=True)
        eg.gw.start(extra=("--dns-upstream", f"{DNS}:53", "--dns-min-ttl", "1", "--dns-max-ttl", "1",
                           "--dns-grace", "3"))
        c0.start()
        # The gateway, through the CLI: a name and a wildcard.
        r = cli(api, "egress-gateway", "create", "--parent", "networks/lab", "--egress-gateway-id", "db",
                "--egress-gateway.node", "networks/lab/nodes/gateway",
                "--egress-gateway.domains", "DB.example.test.", "--egress-gateway.domains", "*.wild.example.test")
        assert r.returncode == 0, r.stderr
        gw_name = "networks/lab/egressGateways/db"

        def routed(addr: str) -> bool:
            return c0.host.route_dev(addr) == c0.ifname

        wait(lambda: routed(DB_OLD), "the name's address routed into the tunnel")
        c0.host.wait_reachable("100.64.0.1")
        assert wait(lambda: c0.host.ask(DB_OLD, PORT, timeout=2), "db answers") == eg.gw_ext_addr, "NATed"
        got = api.egress.GetEgressGateway(egress_pb2.GetEgressGatewayRequest(name=gw_name))
        assert list(got.domains) == ["db.example.test", "*.wild.example.test"]
        (st,) = [s for s in got.domain_status if s.domain == "db.example.test"]
        assert list(st.addresses) == [DB_OLD] and not st.error and st.node == "networks/lab/nodes/gateway"

        # The record changes: the new address routes; the old one stays for its grace, then goes.
        hosts.write_text(f"{DB_NEW} db.example.test\n")
        server.send_signal(signal.SIGHUP)
        wait(lambda: routed(DB_NEW), "the new address routed")
        assert wait(lambda: c0.host.ask(DB_NEW, PORT, timeout=2), "new db answers") == eg.gw_ext_addr
        wait(lambda: not routed(DB_OLD), "the old address gone after its grace period")
        nft = eg.gw.host.run("nft", "list", "table", "inet", "meshgate").stdout
        assert DB_NEW in nft and DB_OLD not in nft, "the gateway's NAT/forward sets follow"

        # The upstream stops answering: addresses stay, traffic flows, the status says why.
        server.send_signal(signal.SIGSTOP)
        try:
            def failing():
                g = api.egress.GetEgressGateway(egress_pb2.GetEgressGatewayRequest(name=gw_name))
                return [s for s in g.domain_status if s.domain == "db.example.test" and s.error]
            (st,) = wait(failing, "the status shows the resolution error")
            assert list(st.addresses) == [DB_NEW] and "db.example.test" in st.error
            time.sleep(4)  # longer than TTL + grace
            assert routed(DB_NEW) and c0.host.ask(DB_NEW, PORT, timeout=3) == eg.gw_ext_addr
        finally:
            server.send_signal(signal.SIGCONT)

        # A wildcard: client0 asks the gateway's DNS server, which learns the answer's address.
        assert not routed(WILD)
        assert lookup(c0.host, "100.64.0.1", "api.wild.example.test") == ["NOERROR", WILD]
        wait(lambda: routed(WILD), "the wildcard name's address routed")
        assert wait(lambda: c0.host.ask(WILD, PORT, timeout=2), "wild answers") == eg.gw_ext_addr

        # Names in the overlay: from client0's own agent, and from the gateway's.
        assert lookup(c0.host, eg.overlay(0), f"gateway.{ZONE}") == ["NOERROR", "100.64.0.1"]
        assert lookup(c0.host, "100.64.0.1", f"client0.{ZONE}") == ["NOERROR", eg.overlay(0)]
        assert lookup(eg.gw.host, "100.64.0.1", f"nobody.{ZONE}")[0] == "NXDOMAIN"
    except BaseException:
        for n in (eg.gw, c0):  # shown with the failure
            if n.log_path.exists():
                print(f"--- {n.log_path.name}\n{n.log_path.read_text(errors='replace')[-6000:]}")
        raise
    finally:
        server.kill()
        server.wait(timeout=10)


RESOLVCONF = """#!/bin/sh
# What wg-quick hands resolvconf (its arguments, then the nameservers on stdin), recorded
echo "$@" >> "$(dirname "$0")/resolvconf.log"
cat >> "$(dirname "$0")/resolvconf.log"
"""


def test_an_external_client_brought_up_with_wg_quick_resolves_node_names(keyed, egress: Egress):  # noqa: F811
    """The configuration CreateExternalClient returns, brought up by the real
    `wg-quick up` (wireguard-go, the kernel has no WireGuard module here), names
    the gateway node as its DNS server and wg-quick hands it to resolvconf (a
    stub on PATH that records it: the host's own resolv.conf is not the test's to
    change); through that server the laptop resolves the nodes and itself, and
    the nodes resolve the laptop."""
    from test_system_external_clients import laptop_client

    eg, lab = egress, egress.lab
    laptop, c, conf = laptop_client(keyed, eg)
    assert conf["Interface"]["DNS"] == "100.64.0.1"
    keyed.wait_converged(2, at_least=keyed.status().revision)
    ifname = lab.ifname("lap")
    bindir = lab.dir / "wgq-bin"
    bindir.mkdir()
    (bindir / "resolvconf").write_text(RESOLVCONF)
    (bindir / "resolvconf").chmod(0o755)
    conf_path = lab.dir / f"{ifname}.conf"
    conf_path.touch(0o600)
    conf_path.write_text(c.config)
    env = ("env", "-u", "LOG_LEVEL", f"PATH={bindir}:{os.environ['PATH']}", "wg-quick")
    sock = Path(f"/var/run/wireguard/{ifname}.sock")
    try:
        r = laptop.run(*env, "up", str(conf_path), check=False)
        assert r.returncode == 0, r.stderr
        assert (bindir / "resolvconf.log").read_text().split("\n")[:2] == [f"-a {ifname} -m 0 -x",
                                                                          "nameserver 100.64.0.1"]
        assert laptop.route_dev("100.64.0.1") == ifname, "wg-quick routed the overlay into the tunnel"
        laptop.wait_reachable("100.64.0.1")
        assert lookup(laptop, "100.64.0.1", f"client0.{ZONE}") == ["NOERROR", eg.overlay(0)]
        assert lookup(laptop, "100.64.0.1", f"laptop.{ZONE}") == ["NOERROR", c.ipv4_address]
        assert lookup(eg.clients[0].host, eg.overlay(0), f"laptop.{ZONE}") == ["NOERROR", c.ipv4_address]
        r = laptop.run(*env, "down", str(conf_path), check=False)
        assert r.returncode == 0, r.stderr
        assert f"-d {ifname} -f" in (bindir / "resolvconf.log").read_text(), "wg-quick down removed the DNS"
    finally:
        conf_path.unlink(missing_ok=True)  # the laptop's private key
        if sock.exists():  # wg-quick up or down failed: end its wireguard-go (it exits when its socket goes)
            laptop.ip("link", "del", ifname, check=False)
            sock.unlink(missing_ok=True)
