"""The egress-gateway demonstration: ``python -m meshgate.gatewayd.demo``.

Everything goes through the real control plane. Hosts are network namespaces:
a client node, an egress gateway node and an "external service" (a managed
database stand-in on 198.51.100.0/24 that only the gateway's side reaches).
Through the API the demo creates a network and an enrollment key; gatewayd
joins on both nodes and streams its desired state; the demo declares the
egress gateway through the API and shows:

1. the client cannot reach the service on its own;
2. once the gateway is declared, the client reaches it and the service sees the
   gateway's address (NAT), each step confirmed by the network's convergence
   status;
   then the gateway also declares the name ``db.example.test`` (answered by a
   dnsmasq in the service's host, at an address outside the range): the client
   resolves it through the gateway node's overlay DNS server and reaches it by
   name, NATed;
3. with the network's default policy DENY and one access policy allowing the
   client to reach the service on TCP 5432, that port connects and another
   port of the same host (8080) is refused, by the gateway's nftables table;
   the network then goes back to ALLOW;
4. a laptop that runs no agent (an external client) gets a WireGuard
   configuration from the API, once, and with it reaches the service through
   the gateway too;
5. traffic to the client's own LAN never enters the tunnel;
6. with NAT turned off (an update with a field mask) the service sees the
   client's overlay address;
7. deleting the egress gateway through the API stops the traffic.

With ``--control-plane`` and ``--agent-socket`` it uses a running control
plane (``make run`` passes its own); without them it starts etcd and a control
plane of its own. With ``--keep SECONDS`` the network, its agents and the
namespaces stay that long after the result, with a few commands to explore them
(``make run`` keeps them until Ctrl-C). The demo's network is deleted through the
API at the end, and everything it made is removed on exit, also on Ctrl-C or
SIGTERM. Needs root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from meshgate.gatewayd.lab import PY, ControlPlaneView, Lab, build_egress, can_run

if TYPE_CHECKING:  # imported only when used: meshgate.common.testing imports pytest
    from meshgate.common.etcdproc import EtcdProcess
    from meshgate.common.testing import ServiceProcess

PORT = 5432  # the "database"
OTHER_PORT = 8080  # another service on the same host, which the policy does not allow
NETWORK_ID = "egress-demo"
CIDR = "100.64.10.0/24"
RANGE = "198.51.100.0/24"
DB_NAME = "db.example.test"
DB_ADDR = "203.0.113.100"  # the database by name: outside RANGE, routed only once the name resolves


def say(msg: str = "") -> None:
    print(msg, flush=True)


def step(n: int, msg: str) -> None:
    say(f"\n[{n}] {msg}")


def run(control_plane: str = "", agent_socket: str = "", keep_seconds: float = 0.0, token: str = "") -> int:
    reason = can_run()
    if reason:
        say(f"demo: cannot run here: {reason}")
        return 3

    def _term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)  # also when started with SIGINT ignored (nohup, &)
    own = None
    try:
        with Lab() as lab:
            if not control_plane:
                own = _OwnControlPlane(str(lab.dir))
                control_plane, agent_socket = own.start()
                assert own.cp is not None
                token = own.cp.admin_token
            cp = ControlPlaneView(control_plane, agent_socket, f"networks/{NETWORK_ID}", token=token)
            try:
                return _demo(lab, cp, keep_seconds)
            except KeyboardInterrupt:
                say("\ninterrupted; cleaning up")
                return 130
            finally:
                say("cleaning up: the demo network (through the API), namespaces, interfaces, processes …")
                for n in lab.nodes:
                    n.stop()
                _delete_network(cp)
                cp.close()
    finally:
        if own is not None:
            own.stop()


def _delete_network(cp: ControlPlaneView) -> None:
    import grpc

    from meshgate.api.v1 import network_pb2

    try:
        cp.networks.DeleteNetwork(network_pb2.DeleteNetworkRequest(name=cp.network, force=True), timeout=10)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            say(f"    could not delete {cp.network}: {e.code().name}")


def _demo(lab: Lab, cp: ControlPlaneView, keep_seconds: float) -> int:
    from google.protobuf import field_mask_pb2, timestamp_pb2

    from meshgate.api.v1 import egress_pb2, enrollment_pb2, network_pb2

    eg = build_egress(lab, clients=1)
    client, gw = eg.clients[0], eg.gw
    say("meshgate egress gateway demonstration, through the control plane at " + cp.target)
    say(f"  client   {client.host.name}: underlay {eg.client_underlay(0)}, LAN 192.0.2.1/24")
    say(f"  gateway  {gw.host.name}: underlay {eg.gw_underlay(0)}, external side {eg.gw_ext_addr}")
    say(f"  service  {eg.ext.name}: {eg.ext_addr}:{PORT} (reachable only from the gateway's side)")

    step(1, f"the API creates {cp.network} ({CIDR}) and a two-use enrollment key")
    _delete_network(cp)  # leftovers of an interrupted run
    cp.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
        network_id=NETWORK_ID, network=network_pb2.Network(ipv4_cidr=CIDR, display_name="egress demo")))
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(datetime.now(UTC) + timedelta(minutes=10))
    key = cp.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
        parent=cp.network, enrollment_key_id="demo",
        enrollment_key=enrollment_pb2.EnrollmentKey(max_uses=2, expire_time=expire, description="egress demo")))
    say(f"    enrollment key {key.name} (max 2 uses, expires in 10 minutes)")

    step(2, "gatewayd joins on both nodes (key pairs generated on the nodes) and streams its state")
    from meshgate.gatewayd.trust import pins_of_secret

    pins = pins_of_secret(key.secret)[1]
    if pins:
        say(f"    the enrollment key pins the key authority {', '.join(pins)}: agents accept only peers it signed")
    else:
        say("    this control plane has no key service: the agents join with --insecure-no-authority "
            "(development; peers' keys are not verified)")
    dns = _dns_server(lab, eg)
    for node, node_id, endpoint in ((gw, "gateway", f"{eg.gw_underlay(0)}:51820"), (client, "client", "")):
        out = node.join(cp.agent_target, key.secret, node_id, endpoint=endpoint,
                        insecure_no_authority=not pins).strip().splitlines()[0]
        say(f"    {node.host.name}: {out}")
        # the gateway resolves through the service side's DNS server (the demo's "corporate DNS")
        node.start(extra=("--dns-upstream", f"{eg.ext_addr}:53", "--dns-min-ttl", "1") if node is gw else ())
    _converged(cp, 2)
    eg.ext.whoami_server(eg.ext_addr, PORT)
    seen = client.host.ask(eg.ext_addr, PORT, timeout=2)
    say(f"    the client tries the service directly: {'reached (unexpected!)' if seen else 'unreachable, as it should be'}")
    if seen:
        return 1

    step(3, f"the API declares the gateway node an egress gateway for {RANGE}, NAT on")
    gateway = cp.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
        parent=cp.network, egress_gateway_id="database",
        egress_gateway=egress_pb2.EgressGateway(node=f"{cp.network}/nodes/gateway", ranges=[RANGE])))
    _converged(cp, 2, int(gateway.etag))
    seen = client.host.ask(eg.ext_addr, PORT)
    nat_ok = seen == eg.gw_ext_addr
    say(f"    the service sees the connection coming from {seen}: "
        f"{'OK, the gateway, not the client' if nat_ok else 'UNEXPECTED'}")
    peer = client.peers()[gw.public_key]
    say(f"    client tunnel to the gateway: {peer['tx']} bytes sent, {peer['rx']} received")
    name_ok, gateway = _by_name(cp, eg, gateway)  # (the updated gateway: its etag is current)
    dns.kill()

    step(4, f"an access policy: the network's default becomes DENY, and only the client may reach {RANGE} on TCP {PORT}")
    policy_ok = _policy(cp, eg)

    step(5, "a laptop with no agent: the API creates an external client and returns its WireGuard configuration once")
    laptop_ok = _laptop(lab, cp, eg)

    step(6, "traffic to the client's own LAN stays out of the tunnel")
    eg.lans[0].whoami_server("192.0.2.10", PORT)
    before = client.peers()[gw.public_key]
    lan_seen = client.host.ask("192.0.2.10", PORT)
    after = client.peers()[gw.public_key]
    lan_ok = lan_seen == "192.0.2.1" and (before["tx"], before["rx"]) == (after["tx"], after["rx"])
    say(f"    the LAN host sees {lan_seen}; tunnel counters unchanged: {lan_ok}")

    step(7, "the API turns NAT off (update with field mask `nat`); the service's network routes the overlay back")
    eg.ext.ip("route", "add", CIDR, "via", eg.gw_ext_addr)
    updated = cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
        egress_gateway=egress_pb2.EgressGateway(name=gateway.name, nat=False, etag=gateway.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["nat"])))
    _converged(cp, 2, int(updated.etag))
    seen2 = client.host.ask(eg.ext_addr, PORT)
    client_overlay = _address(cp, "client")
    nat_off_ok = seen2 == client_overlay
    say(f"    the service now sees {seen2}: {'OK, the client overlay address' if nat_off_ok else 'UNEXPECTED'}")

    step(8, "the API deletes the egress gateway; the traffic stops")
    cp.egress.DeleteEgressGateway(egress_pb2.DeleteEgressGatewayRequest(name=gateway.name))
    _converged(cp, 2, cp.status().revision)
    seen3 = client.host.ask(eg.ext_addr, PORT, timeout=2)
    stop_ok = seen3 is None
    say(f"    the client tries again: {'unreachable, as it should be' if stop_ok else f'reached as {seen3} (UNEXPECTED)'}")

    step(9, "the network's convergence status")
    for n in cp.status().nodes:
        say(f"    {n.node}: connected={n.connected} converged={n.converged} "
            f"applied revision {n.applied_revision} (desired {n.desired_revision})")
    good = nat_ok and name_ok and policy_ok and laptop_ok and lan_ok and nat_off_ok and stop_ok
    say("\nresult: " + ("the egress gateway works" if good else "something did not work"))
    if keep_seconds:
        # Something to explore: the network, its two agents and the namespaces stay (until the time is up or
        # SIGTERM/Ctrl-C); the last step deleted the egress gateway, which the API can declare again.
        say(f"left in place: {cp.network} with its agents gateway ({gw.host.name}) and client "
            f"({client.host.name}), and the service {eg.ext_addr}:{PORT} ({eg.ext.name})")
        say(f"  ip netns exec {client.host.name} ping -c 3 {_address(cp, 'gateway')}    # the overlay")
        say(f"  ip netns exec {gw.host.name} wg show")
        say(f"keeping everything for {keep_seconds:.0f}s" if keep_seconds < 86400 else "keeping everything until stopped")
        time.sleep(keep_seconds)
    return 0 if good else 1


def _dns_server(lab: Lab, eg):
    """dnsmasq in the service's host, answering DB_NAME with DB_ADDR (which the
    service's host also holds, and the gateway routes to)."""
    eg.ext.ip("address", "add", f"{DB_ADDR}/32", "dev", "eth0")
    eg.gw.host.ip("route", "add", f"{DB_ADDR}/32", "via", eg.ext_addr)
    return eg.ext.spawn(
        "/usr/sbin/dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts", f"--listen-address={eg.ext_addr}",
        "--bind-interfaces", "--port=53", f"--host-record={DB_NAME},{DB_ADDR}", "--local-ttl=1", "--user=root",
        f"--pid-file={lab.dir / 'dnsmasq.pid'}", "--log-facility=-")


def _by_name(cp: ControlPlaneView, eg, gateway):
    """The gateway also declares DB_NAME; the client resolves it through the
    gateway node's overlay DNS server and connects by name."""
    from google.protobuf import field_mask_pb2

    from meshgate.api.v1 import egress_pb2

    say(f"    the API adds the domain {DB_NAME} to the gateway; its agent resolves it and reports the addresses")
    updated = cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
        egress_gateway=egress_pb2.EgressGateway(name=gateway.name, domains=[DB_NAME]),
        update_mask=field_mask_pb2.FieldMask(paths=["domains"])))
    _converged(cp, 2, int(updated.etag))
    gw_overlay = _address(cp, "gateway")
    code = ("import dns.message, dns.query\n"
            f"a = dns.query.udp(dns.message.make_query({DB_NAME!r}, 'A'), {gw_overlay!r}, timeout=3)\n"
            "print(' '.join(x.to_text() for rr in a.answer for x in rr))\n")
    r = eg.clients[0].host.run(PY, "-c", code, check=False)
    addr = r.stdout.strip()
    say(f"    the client asks the gateway node's DNS server ({gw_overlay}) for {DB_NAME}: {addr or 'no answer'}")
    eg.ext.whoami_server(DB_ADDR, PORT)
    deadline = time.monotonic() + 30
    while eg.clients[0].host.route_dev(DB_ADDR) != eg.clients[0].ifname and time.monotonic() < deadline:
        time.sleep(0.2)
    seen = eg.clients[0].host.ask(addr or DB_ADDR, PORT) if addr == DB_ADDR else None
    ok = seen == eg.gw_ext_addr
    say(f"    the client connects to {DB_NAME}:{PORT} by name; the database sees {seen}: "
        f"{'OK, the gateway' if ok else 'UNEXPECTED'}")
    got = cp.egress.GetEgressGateway(egress_pb2.GetEgressGatewayRequest(name=gateway.name))
    for st in got.domain_status:
        say(f"    domain_status {st.domain}: {', '.join(st.addresses)} (from {st.node})")
    return ok, updated


def _policy(cp: ControlPlaneView, eg) -> bool:
    """Step 4: DENY plus one policy; the allowed port connects, another is refused."""
    from google.protobuf import field_mask_pb2

    from meshgate.api.v1 import network_pb2, policy_pb2, policy_pb2_grpc

    policies = policy_pb2_grpc.AccessPolicyServiceStub(cp.channel)
    eg.ext.whoami_server(eg.ext_addr, OTHER_PORT)
    client = eg.clients[0].host
    before = client.ask(eg.ext_addr, OTHER_PORT, timeout=2)
    say(f"    before: port {OTHER_PORT} {'connects' if before else 'is refused'} (the network's default is ALLOW)")
    policy = policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
        parent=cp.network, access_policy_id="client-db", access_policy=policy_pb2.AccessPolicy(
            sources=["node:client"], destinations=["egress:database"], protocol=policy_pb2.TCP,
            ports=[policy_pb2.PortRange(first=PORT)], description="the client may use the database")))
    say(f"    access policy {policy.name}: node:client -> egress:database, TCP {PORT}")
    net = cp.networks.UpdateNetwork(network_pb2.UpdateNetworkRequest(
        network=network_pb2.Network(name=cp.network, default_policy=network_pb2.DENY),
        update_mask=field_mask_pb2.FieldMask(paths=["default_policy"])))
    _converged(cp, 2, int(net.etag))
    allowed = client.ask(eg.ext_addr, PORT)
    refused = client.ask(eg.ext_addr, OTHER_PORT, timeout=2)
    ok = bool(before) and allowed == eg.gw_ext_addr and refused is None
    say(f"    TCP {PORT}: {'connects, as allowed' if allowed else 'REFUSED (unexpected)'}; "
        f"TCP {OTHER_PORT}: {'refused by the gateway, as it should be' if refused is None else 'connects (UNEXPECTED)'}")
    rule = next((line.strip() for line in eg.gw.host.run("nft", "list", "chain", "inet", "meshgate",
                                                          "overlay_policy").stdout.splitlines()
                 if "client-db" in line), "")
    say(f"    the gateway's rule: {rule}")
    net = cp.networks.UpdateNetwork(network_pb2.UpdateNetworkRequest(
        network=network_pb2.Network(name=cp.network, default_policy=network_pb2.ALLOW),
        update_mask=field_mask_pb2.FieldMask(paths=["default_policy"])))
    _converged(cp, 2, int(net.etag))
    say("    the network goes back to ALLOW for the next steps")
    return ok


def _laptop(lab: Lab, cp: ControlPlaneView, eg) -> bool:
    """An external client through the gateway node: created through the API,
    brought up from the returned configuration the way wg-quick would."""
    from meshgate.api.v1 import external_client_pb2 as ec
    from meshgate.api.v1 import external_client_pb2_grpc

    laptop = lab.host("laptop")
    lab.wire(eg.gw.host, "eth-lap", "203.0.113.49/28", laptop, "eth0", "203.0.113.50/28")
    laptop.ip("route", "add", "default", "via", "203.0.113.49")  # its ISP: everything via the gateway's side
    client = external_client_pb2_grpc.ExternalClientServiceStub(cp.channel).CreateExternalClient(
        ec.CreateExternalClientRequest(parent=cp.network, external_client_id="laptop",
                                       external_client=ec.ExternalClient(gateway_node=f"{cp.network}/nodes/gateway")),
        timeout=30)
    shown = [line if not line.startswith(("PrivateKey", "PresharedKey")) else line.split("=")[0] + "= (secret)"
             for line in client.config.splitlines()]
    say(f"    {client.name}: {client.ipv4_address}; its configuration (secrets elided here):")
    for line in shown:
        say(f"      {line}")
    _converged(cp, 2, int(client.etag))
    lab.plain_wireguard(laptop, lab.ifname("lap"), client.config)
    laptop.wait_reachable(_address(cp, "gateway"))
    seen = laptop.ask(eg.ext_addr, PORT)
    ok = seen == eg.gw_ext_addr
    say(f"    the laptop reaches the service, which sees {seen}: {'OK, the gateway' if ok else 'UNEXPECTED'}")
    return ok


def _address(cp: ControlPlaneView, node_id: str) -> str:
    from meshgate.api.v1 import node_pb2, node_pb2_grpc

    return node_pb2_grpc.NodeServiceStub(cp.channel).GetNode(
        node_pb2.GetNodeRequest(name=f"{cp.network}/nodes/{node_id}")).ipv4_address


def _converged(cp: ControlPlaneView, nodes: int, revision: int = 0) -> None:
    st = cp.wait_converged(nodes, revision)
    say(f"    converged: {st.converged_nodes}/{st.total_nodes} nodes applied revision >= {revision or 'current'}")


class _OwnControlPlane:
    """etcd and a control plane for a standalone run, stopped by PID."""

    def __init__(self, workdir: str):
        self.dir = tempfile.mkdtemp(prefix="etcd-", dir=workdir)
        self.etcd: EtcdProcess | None = None
        self.cp: ServiceProcess | None = None

    def start(self) -> tuple[str, str]:
        from meshgate.common.etcdproc import EtcdProcess
        from meshgate.common.testing import ServiceProcess

        etcd = self.etcd = EtcdProcess(self.dir).start()
        sock = f"{self.dir}/controlplane.sock"
        cp = self.cp = ServiceProcess("meshgate-controlplane", ["--etcd-endpoints", etcd.endpoint],
                                      listen=f"127.0.0.1:0,unix:{sock}").start()
        return cp.target, f"unix:{sock}"

    def stop(self) -> None:
        if self.cp is not None:
            self.cp.stop()
        if self.etcd is not None:
            self.etcd.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshgate.gatewayd.demo", description=__doc__.split("\n")[0])
    p.add_argument("--control-plane", default="", help="API address of a running control plane (host:port); "
                   "without it the demo starts etcd and a control plane of its own")
    p.add_argument("--agent-socket", default="", help="unix:/path the control plane also listens on, for the "
                   "agents in the namespaces (needed with --control-plane)")
    p.add_argument("--token-file", default="", help="file holding an API token for --control-plane (default: "
                   "the MESHGATE_TOKEN variable); it needs to create and delete a network")
    p.add_argument("--keep", type=float, default=0.0, metavar="SECONDS",
                   help="after the result, keep the network, its agents and namespaces this long (or until "
                        "SIGTERM/Ctrl-C) before cleaning up")
    args = p.parse_args(argv)
    if bool(args.control_plane) != bool(args.agent_socket):
        p.error("--control-plane and --agent-socket go together")
    token = os.environ.get("MESHGATE_TOKEN", "")
    if args.token_file:
        try:
            token = open(args.token_file).read().strip()
        except OSError as e:
            p.error(f"--token-file: {e.strerror}")
    if args.control_plane and not token:
        p.error("--control-plane needs an API token: --token-file or MESHGATE_TOKEN")
    return run(args.control_plane, args.agent_socket, args.keep, token)


if __name__ == "__main__":
    sys.exit(main())
