"""Relay benchmarks (issue 13); prints ``BENCH <name> <value> <unit>`` lines.

    sudo .venv/bin/python tests/bench/bench_relay.py [--quick]

- relay_fallback_s        a ping at 10 packets/s from X to Y over their direct tunnel; the
                          direct path is cut on the router between them (nft drop of their
                          underlay addresses): seconds from the cut to the first reply
                          after it, which can only have come through the relay R. The
                          control plane runs with its default --path-delay (goal < 10 s).
- relay_throughput_ratio  iperf3, one stream, X -> Y: through R over the direct tunnel,
                          same run, alternated rounds (medians; goal >= 0.8). After the
                          fallback figure the cut is lifted and the bench moves the pair
                          itself between rounds, by writing its relay mark in etcd
                          (``pathRoutes/lab/x~y``, as the control plane does), so that
                          the load of a shared machine hits both sides alike.

What the throughput figures model (``--pin``, the default): CPU pinning with
``taskset`` stands for separate machines. X's and Y's wireguard-go and both ends
of iperf3 run on CPU 0 in BOTH runs; R's wireguard-go runs on CPU 1. So the
endpoints have the same CPU in the direct and the relayed run, and the relay's
crypto (it decrypts and encrypts every packet again) runs on a CPU of its own,
as it would on another machine. It is still one host: the two endpoints share
one core between them (in both runs), and the three veth links and the router
are the same kernel. With ``--no-pin`` everything floats over the host's cores,
and on a 2-core machine the relay's crypto steals CPU from the endpoints (this
is the figure earlier runs reported: 0.46-0.59). Pinned, wireguard-go runs with
GOMAXPROCS=1 (it may use one CPU). The control plane, etcd and the agents are
not pinned; they are idle during the iperf3 rounds.

Topology (namespaces, real wireguard-go, a real control plane and etcd)::

    X 203.0.113.2 --\\
    Y 203.0.113.6 ---+-- router -- R 203.0.113.10 (relay)

Everything runs in namespaces the script makes and removes (also on error), with
etcd and the control plane on free loopback ports. Needs root, etcd, wireguard-go,
wg, nft, iperf3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from benchkit import bench, info

ROUTER_CUT = ("table ip m13cut {\n chain filt {\n  type filter hook forward priority 0; policy accept;\n"
              "  ip saddr 203.0.113.2 ip daddr 203.0.113.6 drop\n  ip saddr 203.0.113.6 ip daddr 203.0.113.2 drop\n"
              " }\n}\n")


def iperf(client, server, addr: str, seconds: int, cpu: str = "") -> float:
    pin = ["taskset", "-c", cpu] if cpu else []
    srv = server.spawn(*pin, "iperf3", "-s", "-1", "-B", addr, "-p", "5201")
    time.sleep(0.3)
    try:
        r = client.run(*pin, "iperf3", "-c", addr, "-p", "5201", "-t", str(seconds), "-J", timeout=seconds + 30)
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
    finally:
        srv.wait(10)


def relayed(node, relay_key: str, addr: str) -> bool:
    return f"{addr}/32" in node.peers().get(relay_key, {}).get("allowed_ips", "").split(",")


def pin_wireguard(node, cpu: str) -> None:
    """All threads of `node`'s wireguard-go on `cpu` (taskset -a)."""
    pid = node.wg_pid()
    if pid is None:
        raise RuntimeError(f"no wireguard-go process for {node}")
    subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(pid)], check=True, capture_output=True, timeout=10)


def run(quick: bool, pin: bool = True) -> int:
    from google.protobuf import field_mask_pb2

    from meshgate.api.v1 import enrollment_pb2, network_pb2, node_pb2, node_pb2_grpc
    from meshgate.common.etcdproc import EtcdProcess
    from meshgate.common.testing import ServiceProcess
    from meshgate.gatewayd.lab import ControlPlaneView, Lab

    tmp = tempfile.mkdtemp(prefix="bench-relay-")
    etcd = EtcdProcess(os.path.join(tmp, "etcd")).start()
    cp = view = None
    try:
        with Lab() as lab:
            router, x, y, r = (lab.host(n) for n in ("m13rt", "m13x", "m13y", "m13r"))
            router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            for i, h in enumerate((x, y, r)):
                lab.wire(router, f"eth{i}", f"203.0.113.{4 * i + 1}/30", h, "eth-up", f"203.0.113.{4 * i + 2}/30")
                h.ip("route", "add", "default", "via", f"203.0.113.{4 * i + 1}")
            socket = os.path.join(str(lab.dir), "cp.sock")
            prefix = f"/b-{uuid.uuid4().hex[:8]}"
            cp = ServiceProcess("meshgate-controlplane",
                                ["--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix],
                                listen=f"127.0.0.1:0,unix:{socket}").start()
            view = ControlPlaneView(cp.target, f"unix:{socket}", token=cp.admin_token)
            view.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
                network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
            key = view.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
                parent="networks/lab", enrollment_key_id="k", enrollment_key=enrollment_pb2.EnrollmentKey()))
            nodes = {}
            for i, (role, host) in enumerate((("x", x), ("y", y), ("r", r))):
                nodes[role] = lab.node(host, f"m13{role}")
                nodes[role].join(view.agent_target, key.secret, role, endpoint=f"203.0.113.{4 * i + 2}:51820",
                                 insecure_no_authority=True)
            node_pb2_grpc.NodeServiceStub(view.channel).UpdateNode(node_pb2.UpdateNodeRequest(
                node=node_pb2.Node(name="networks/lab/nodes/r", relay=True),
                update_mask=field_mask_pb2.FieldMask(paths=["relay"])))
            for n in nodes.values():
                # pinned to one CPU, a wireguard-go with one Go thread per CPU it may use (GOMAXPROCS)
                n.start(env={"GOMAXPROCS": "1"} if pin else None)
            view.wait_converged(3, at_least=view.status().revision)
            x.wait_reachable("100.64.0.2")  # Y's overlay address
            seconds, rounds = (2, 1) if quick else (3, 3)
            ends = ""
            if pin:  # see the module docstring: the endpoints on CPU 0, the relay on CPU 1, in both runs
                ends = "0"
                for role, cpu in (("x", "0"), ("y", "0"), ("r", "1")):
                    pin_wireguard(nodes[role], cpu)
            info(f"bench_relay: {'pinned: X, Y and iperf3 on CPU 0, R on CPU 1' if pin else 'not pinned'}")

            ping = x.spawn("ping", "-D", "-i", "0.1", "-W", "1", "100.64.0.2", stdout=open(lab.dir / "ping.txt", "w"))
            time.sleep(2)
            t_cut = time.time()
            router.run("nft", "-f", "-", input=ROUTER_CUT)
            deadline = time.monotonic() + 60
            first = None
            while time.monotonic() < deadline and first is None:
                time.sleep(0.2)
                for line in (lab.dir / "ping.txt").read_text().splitlines():
                    m = re.match(r"\[(\d+\.\d+)\].*bytes from", line)
                    if m and float(m.group(1)) > t_cut:
                        first = float(m.group(1))
                        break
            ping.terminate()
            ping.wait(5)
            if first is None:
                info("bench_relay: no reply through the relay within 60 s of the cut")
                return 1
            bench("relay_fallback_s", first - t_cut, "s")
            if not relayed(nodes["x"], nodes["r"].public_key, "100.64.0.2"):
                info("bench_relay: X does not route Y through R after the cut")
                return 1
            # Alternated rounds: the cut lifted, the pair moved by its mark (module docstring).
            router.run("nft", "delete", "table", "ip", "m13cut")

            def direct_up() -> bool:  # neither side lists the other as unhealthy any more
                st = view.status()
                return not any(p.state != network_pb2.PATH_UP for n in st.nodes for p in n.unreachable_peers)

            deadline = time.monotonic() + 60
            while not direct_up():
                if time.monotonic() > deadline:
                    info("bench_relay: the direct path did not come back within 60 s of lifting the cut")
                    return 1
                time.sleep(0.5)
            direct, through = [], []
            for _ in range(rounds):
                for mark, out in (("", direct), ("r", through)):
                    subprocess.run(["etcdctl", "--endpoints", etcd.endpoint, "put", f"{prefix}/pathRoutes/lab/x~y",
                                    json.dumps({"relay": mark, "moves": []})], check=True, capture_output=True,
                                   timeout=30)
                    want = bool(mark)
                    deadline = time.monotonic() + 30
                    while relayed(nodes["x"], nodes["r"].public_key, "100.64.0.2") != want or \
                            relayed(nodes["y"], nodes["r"].public_key, "100.64.0.1") != want:
                        if time.monotonic() > deadline:
                            info(f"bench_relay: the pair did not go {'relayed' if want else 'direct'} within 30 s")
                            return 1
                        time.sleep(0.2)
                    x.wait_reachable("100.64.0.2")
                    out.append(iperf(x, y, "100.64.0.2", seconds, ends))
            d, t = statistics.median(direct), statistics.median(through)
            bench("relay_direct_throughput_mbps", d / 1e6, "Mbit/s")
            bench("relay_relayed_throughput_mbps", t / 1e6, "Mbit/s")
            bench("relay_throughput_ratio", t / d, "x")
            return 0
    finally:
        if view is not None:
            view.close()
        if cp is not None:
            cp.stop()
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short iperf round each way")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="model separate machines with taskset: X, Y and iperf3 on CPU 0, R on CPU 1, "
                         "in both runs (default: on)")
    args = ap.parse_args()
    from meshgate.gatewayd.lab import can_run

    reason = can_run()
    if reason:
        print(f"bench_relay: cannot run: {reason}", file=sys.stderr)
        return 3
    return run(args.quick, args.pin)


if __name__ == "__main__":
    raise SystemExit(main())
