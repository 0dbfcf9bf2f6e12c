"""gatewayd benchmarks; prints ``BENCH <name> <value> <unit>`` lines.

    sudo .venv/bin/python tests/bench/bench_gatewayd.py [--quick]

- gw_apply_1000_ms       apply from empty (an existing, empty wireguard-go interface) of
                         1,000 peers and 1,000 egress ranges: validate, observe, plan,
                         UAPI set, addresses, nftables, save to disk (median of 3)
- raw_apply_1000_ms      ``wg setconf`` + ``nft -f`` + ``ip`` of the same content (median of 3)
- gw_apply_vs_raw_ratio  the two above (goal <= 1.5)
- gw_delta_1peer_ms      one changed peer on the 1,000-peer interface through the agent's
                         delta path: merge, validate, plan, one UAPI set, save (median of 21;
                         goal < 5)
- gw_resync_noop_1000_ms a full resync that finds nothing to change (median of 5)
- egress_vs_tunnel_throughput_ratio  iperf3, one stream, 5 alternated 3 s rounds: client -> external host
                         through the gateway with NAT vs client -> gateway over the bare
                         tunnel, same run (goal >= 0.9)

Everything runs in network namespaces the script makes and removes (also on error).
Needs root, wireguard-go, wg, nft, iperf3.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchkit import bench

from meshgate.api.v1 import desired_state_pb2 as pb


def rand_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def big_state(ifname: str, n: int = 1000) -> pb.DesiredState:
    msg = pb.DesiredState(node="networks/bench/nodes/gw", revision=1)
    msg.interface.name = ifname
    msg.interface.addresses.append("100.64.0.1/16")
    msg.interface.listen_port = 0
    for i in range(n):
        p = msg.peers.add(public_key=rand_key())
        p.allowed_ips.append(f"100.64.{(i + 2) // 250}.{(i + 2) % 250 + 1}/32")
    e = msg.egress.add(nat=True)
    # non-adjacent /28s, so the set really holds 1,000 intervals
    e.ranges.extend(f"100.{96 + i // 256}.{i % 256}.0/28" for i in range(n))
    e.source_ranges.append("100.64.0.0/16")
    return msg


# ---------------------------------------------------------------- inside a namespace


def inner_apply(workdir: Path, token: str, reps: int) -> None:
    from meshgate.gatewayd.agent import Agent
    from meshgate.gatewayd.config import Settings
    from meshgate.gatewayd.reconciler import Reconciler
    from meshgate.gatewayd.sources import Delta

    gw_ms, raw_ms = [], []
    rec = None
    msg = None
    for rep in range(reps):
        # --- gatewayd
        ifname = f"mgb{token}g{rep}"
        settings = Settings(state_dir=workdir / f"gw{rep}", backend="userspace")
        rec = Reconciler.for_host(settings)
        rec.store.record_created(ifname)  # gatewayd's own interface (else: ForeignInterface)
        rec.backend.create(ifname)  # an existing, empty interface, like raw gets
        msg = big_state(ifname)
        t0 = time.perf_counter()
        desired = rec.compile(msg)
        res = rec.reconcile(desired, full=True)
        rec.store.save_desired(msg)
        gw_ms.append((time.perf_counter() - t0) * 1000)
        assert len(res.plan.peers) == 1000, len(res.plan.peers)
        if rep < reps - 1:
            rec.down(ifname)
        # --- raw tools, same content
        rifname = f"mgb{token}r{rep}"
        settings_r = Settings(state_dir=workdir / f"raw{rep}", backend="userspace")
        raw = Reconciler.for_host(settings_r)
        raw.backend.create(rifname)
        rmsg = big_state(rifname)
        rdesired = raw.compile(rmsg)
        conf = workdir / f"raw{rep}.conf"
        lines = ["[Interface]", f"PrivateKey = {raw.keys.current.private.reveal()}", ""]
        for p in rmsg.peers:
            lines += ["[Peer]", f"PublicKey = {p.public_key}", f"AllowedIPs = {', '.join(p.allowed_ips)}", ""]
        conf.write_text("\n".join(lines))
        os.chmod(conf, 0o600)
        nftf = workdir / f"raw{rep}.nft"
        # the same table, but a raw load cannot replace gatewayd's: give it its own name
        nftf.write_text(rdesired.nft.text.replace("table inet meshgate", "table inet meshraw", 1))
        t0 = time.perf_counter()
        for argv in (["wg", "setconf", rifname, str(conf)], ["nft", "-f", str(nftf)],
                     ["ip", "address", "add", "100.64.0.1/16", "dev", rifname],
                     ["ip", "link", "set", rifname, "mtu", "1420", "up"]):
            subprocess.run(argv, check=True, capture_output=True)
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        raw_ms.append((time.perf_counter() - t0) * 1000)
        subprocess.run(["nft", "delete", "table", "inet", "meshraw"], check=True)
        raw.backend.destroy(rifname)
    gw, rw = statistics.median(gw_ms), statistics.median(raw_ms)
    bench("gw_apply_1000_ms", gw, "ms")
    bench("raw_apply_1000_ms", rw, "ms")
    bench("gw_apply_vs_raw_ratio", gw / rw, "x")

    # --- delta path: one peer at a time, through the agent's own code
    assert rec is not None and msg is not None
    agent = Agent(rec, rec.settings)
    agent.target_msg, agent.target = msg, rec.applied
    delta_ms = []
    peers = list(msg.peers)
    for i in range(21):
        p = pb.Peer()
        p.CopyFrom(peers[i * 7])
        p.persistent_keepalive_seconds = 25 if i % 2 == 0 else 0
        p.allowed_ips.append(f"100.80.{i}.0/24")
        delta = pb.DesiredStateDelta(base_revision=agent.target_msg.revision)
        delta.upserted_peers.append(p)
        t0 = time.perf_counter()
        assert agent.accept(Delta(delta, revision=agent.target_msg.revision + 1))
        res = rec.reconcile(agent.target, full=False)
        rec.store.save_desired(agent.target_msg)
        delta_ms.append((time.perf_counter() - t0) * 1000)
        assert len(res.plan.peers) == 1 and not res.full
    bench("gw_delta_1peer_ms", statistics.median(delta_ms), "ms")

    noop = []
    for _ in range(5):
        t0 = time.perf_counter()
        res = rec.reconcile(agent.target, full=True)
        noop.append((time.perf_counter() - t0) * 1000)
        assert res.plan.empty, res.plan.changes()
    bench("gw_resync_noop_1000_ms", statistics.median(noop), "ms")
    rec.down(rec.applied.interface if rec.applied else "")


# ---------------------------------------------------------------- outside


def iperf(lab_host, server_host, addr: str, seconds: int) -> float:
    srv = server_host.spawn("iperf3", "-s", "-1", "-B", addr, "-p", "5201")
    time.sleep(0.3)
    try:
        r = lab_host.run("iperf3", "-c", addr, "-p", "5201", "-t", str(seconds), "-J",
                         timeout=seconds + 30)
        data = json.loads(r.stdout)
        return data["end"]["sum_received"]["bits_per_second"]
    finally:
        srv.wait(10)


def throughput(seconds: int, rounds: int) -> None:
    from meshgate.gatewayd.lab import Lab, build_egress

    with Lab() as lab:
        eg = build_egress(lab, clients=1)
        eg.gw.apply(eg.gateway_state(nat=True))
        eg.clients[0].apply(eg.client_state(0))
        client = eg.clients[0].host
        egress, tunnel = [], []
        for _ in range(rounds):
            egress.append(iperf(client, eg.ext, eg.ext_addr, seconds))
            tunnel.append(iperf(client, eg.gw.host, eg.overlay(None), seconds))
        e, t = statistics.median(egress), statistics.median(tunnel)
        bench("egress_throughput_mbps", e / 1e6, "Mbit/s")
        bench("tunnel_throughput_mbps", t / 1e6, "Mbit/s")
        bench("egress_vs_tunnel_throughput_ratio", e / t, "x")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, shorter iperf runs")
    ap.add_argument("--inner-apply", nargs=3, metavar=("WORKDIR", "TOKEN", "REPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner_apply:
        inner_apply(Path(args.inner_apply[0]), args.inner_apply[1], int(args.inner_apply[2]))
        return 0

    from meshgate.gatewayd.lab import Lab, can_run

    reason = can_run()
    if reason:
        print(f"bench_gatewayd: cannot run: {reason}", file=sys.stderr)
        return 3
    with Lab() as lab:
        host = lab.host("bench")
        reps = 1 if args.quick else 3
        proc = host.spawn(sys.executable, os.path.abspath(__file__), "--inner-apply",
                          str(lab.dir), lab.token, str(reps), stdout=None, stderr=None)
        rc = proc.wait(600)
        # wireguard-go processes the inner run started are recorded in its state dirs
        for d in lab.dir.iterdir():
            for pidf in d.glob("wireguard-go.*.pid") if d.is_dir() else []:
                from meshgate.gatewayd.lab import _is_wg, _kill_pid

                pid = int(pidf.read_text())
                if _is_wg(pid, pidf.name.split(".")[1]):
                    _kill_pid(pid)
        if rc != 0:
            print(f"bench_gatewayd: apply benchmarks failed ({rc})", file=sys.stderr)
            return 1
    # short runs, alternated, many rounds: on 2 shared cores the medians of interleaved
    # runs are steadier than a few long runs
    throughput(2 if args.quick else 3, 1 if args.quick else 5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
