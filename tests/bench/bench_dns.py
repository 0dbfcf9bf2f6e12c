"""DNS benchmark: egress by name following DNS, and the overlay DNS server's rate.

Run as root: `.venv/bin/python tests/bench/bench_dns.py`. It starts its own
etcd (temporary directory, free loopback ports), a real `meshgate-controlplane`
and, in network namespaces (meshgate.gatewayd.lab), a gateway and `--clients`
nodes running gatewayd, plus Debian's dnsmasq in the external host answering
`db.example.test` from a hosts file with a 1 s TTL. The gateway's egress
gateway declares that name, and its agent follows TTLs down to 1 s.

Figures:
- `dns_egress_follow_s` (median of `--reps`; goal < 3 s): from rewriting the
  hosts file and SIGHUP to dnsmasq until the new address is routed into the
  tunnel on every node that uses the gateway (`ip route get` in each node,
  polled every 20 ms). Within that: the record's TTL (1 s), the agent's next
  resolution, its report, the control plane's write and recompute, the deltas
  and the nodes' applies.
- `overlay_dns_qps` (a ratio; goal >= 0.5): overlay names answered per second by
  the gateway's gatewayd (on its overlay address) over what dnsmasq answers
  for the same names (the same hosts, in the same namespace, on loopback), with
  the same load generator: `--concurrency` UDP questions in flight for
  `--seconds`, names drawn from the nodes. The raw rates go to stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchkit import bench, info

DNS = "198.51.100.10"
ADDRS = [f"198.51.100.{20 + i}" for i in range(16)]

LOAD = r"""
import asyncio, socket, sys, time, random
import dnslib
server, port, seconds, conc = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
names = sys.argv[5].split(",")
queries = [dnslib.DNSRecord.question(n).pack() for n in names]

async def main():
    loop = asyncio.get_running_loop()
    done = 0
    stop = time.monotonic() + seconds
    async def worker():
        nonlocal done
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect((server, port))
        i = random.randrange(len(queries))
        while time.monotonic() < stop:
            q = bytearray(queries[i % len(queries)]); i += 1
            q[0:2] = (i & 0xffff).to_bytes(2, "big")
            await loop.sock_sendall(s, bytes(q))
            try:
                await asyncio.wait_for(loop.sock_recv(s, 4096), 1.0)
                done += 1
            except TimeoutError:
                pass
        s.close()
    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conc)))
    print(done / (time.monotonic() - t0))

asyncio.run(main())
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=2, help="nodes that use the gateway (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="record changes measured (default 5)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each rate measurement (default 5)")
    ap.add_argument("--concurrency", type=int, default=32, help="questions in flight (default 32)")
    args = ap.parse_args()

    from meshgate.api.v1 import egress_pb2, enrollment_pb2, network_pb2
    from meshgate.common.etcdproc import EtcdProcess
    from meshgate.common.testing import ServiceProcess
    from meshgate.gatewayd.lab import PY, ControlPlaneView, Lab, build_egress, can_run

    why = can_run()
    if why:
        info(f"bench_dns: cannot run here: {why}")
        return 1
    data = tempfile.mkdtemp(prefix="meshgate-bench-dns-")
    etcd = EtcdProcess(data).start()
    try:
        with Lab() as lab:
            eg = build_egress(lab, clients=args.clients)
            socket = str(lab.dir / "cp.sock")
            cp = ServiceProcess("meshgate-controlplane", ["--etcd-endpoints", etcd.endpoint, "--etcd-prefix", "/bench"],
                                listen=f"127.0.0.1:0,unix:{socket}").start()
            api = ControlPlaneView(cp.target, f"unix:{socket}", token=cp.admin_token)
            hosts = lab.dir / "hosts"
            hosts.write_text(f"{ADDRS[0]} db.example.test\n")
            for a in ADDRS:
                eg.ext.ip("address", "add", f"{a}/24", "dev", "eth0")
            server = eg.ext.spawn(
                "/usr/sbin/dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}",
                f"--listen-address={DNS}", "--bind-interfaces", "--port=53", "--local-ttl=1", "--user=root",
                f"--pid-file={hosts}.pid", "--log-facility=-", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                api.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
                    network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
                key = api.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
                    parent="networks/lab", enrollment_key_id="lab",
                    enrollment_key=enrollment_pb2.EnrollmentKey(max_uses=1 + args.clients)))
                eg.gw.join(api.agent_target, key.secret, "gateway", endpoint=f"{eg.gw_underlay(0)}:51820",
                           insecure_no_authority=True)
                for i, c in enumerate(eg.clients):
                    c.join(api.agent_target, key.secret, f"client{i}", insecure_no_authority=True)
                eg.gw.start(extra=("--dns-upstream", f"{DNS}:53", "--dns-min-ttl", "1", "--dns-max-ttl", "1",
                                   "--dns-grace", "1"))
                for c in eg.clients:
                    c.start()
                api.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
                    parent="networks/lab", egress_gateway_id="db", egress_gateway=egress_pb2.EgressGateway(
                        node="networks/lab/nodes/gateway", domains=["db.example.test"])))

                def routed_everywhere(addr: str) -> bool:
                    return all(c.host.route_dev(addr) == c.ifname for c in eg.clients)

                def wait(pred, timeout: float = 60.0) -> None:
                    deadline = time.monotonic() + timeout
                    while not pred():
                        if time.monotonic() > deadline:
                            raise SystemExit("bench_dns: timed out waiting for a route")
                        time.sleep(0.02)

                wait(lambda: routed_everywhere(ADDRS[0]))
                follow = []
                for rep in range(1, args.reps + 1):
                    new = ADDRS[rep % len(ADDRS)]
                    hosts.write_text(f"{new} db.example.test\n")
                    t0 = time.monotonic()
                    server.send_signal(signal.SIGHUP)
                    wait(lambda n=new: routed_everywhere(n))
                    follow.append(time.monotonic() - t0)
                    info(f"record change {rep}: routed on {args.clients} node(s) after {follow[-1]:.2f} s")
                    time.sleep(1.5)  # past the TTL, so the next change starts from a settled state
                bench("dns_egress_follow_s", statistics.median(follow), "s")

                # The same names from gatewayd (overlay zone) and from dnsmasq (a hosts file), same namespace.
                zone = "lab.meshgate.internal"
                labels = ["gateway", *(f"client{i}" for i in range(args.clients))]
                wait(lambda: eg.gw.host.run(PY, "-c", (
                    "import dns.message,dns.query,sys;"
                    f"a=dns.query.udp(dns.message.make_query('client0.{zone}','A'),'100.64.0.1',timeout=2);"
                    "sys.exit(0 if a.answer else 1)"), check=False).returncode == 0)
                names_hosts = lab.dir / "names"
                names_hosts.write_text("".join(f"100.64.0.{i + 1} {n}.{zone}\n" for i, n in enumerate(labels)))
                ref = eg.gw.host.spawn(
                    "/usr/sbin/dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts",
                    f"--addn-hosts={names_hosts}", "--listen-address=127.0.0.1", "--bind-interfaces", "--port=5353",
                    "--user=root", f"--pid-file={names_hosts}.pid", "--log-facility=-", "--cache-size=0",
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    time.sleep(0.5)
                    script = lab.dir / "load.py"
                    script.write_text(LOAD)
                    names = ",".join(f"{n}.{zone}" for n in labels)

                    def rate(addr: str, port: int) -> float:
                        r = eg.gw.host.run(PY, str(script), addr, str(port), str(args.seconds),
                                           str(args.concurrency), names, timeout=args.seconds + 60)
                        return float(r.stdout.strip())

                    ours = rate("100.64.0.1", 53)
                    theirs = rate("127.0.0.1", 5353)
                finally:
                    ref.kill()
                    ref.wait(timeout=10)
                info(f"overlay names answered: gatewayd {ours:.0f}/s, dnsmasq {theirs:.0f}/s "
                     f"({args.concurrency} in flight, {args.seconds:.0f} s each)")
                bench("overlay_dns_qps", ours / theirs if theirs else 0.0, "ratio")
            finally:
                server.kill()
                server.wait(timeout=10)
                api.close()
                for n in lab.nodes:
                    n.stop()
                cp.stop()
    finally:
        etcd.stop()
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
