"""Metrics overhead: the convergence benchmark's change with metrics on and off, same run.

Run as `.venv/bin/python tests/bench/bench_metrics.py`. It starts its own etcd
and two `meshgate-controlplane` processes on it (separate prefixes), one with
`--metrics-listen` (scraped every second by this process, as a Prometheus
would) and one without, and gives each `--agents` simulated agents and the
network of tests/bench/bench_convergence.py (whose harness it imports: the
same agents, enrolment and egress gateway on hub0). Then it alternates the
benchmark's change, UpdateEgressGateway toggling a second range on hub0 (every
node's desired state changes: N messages, N acks), between the two, the order
swapped every round so that drift in the machine's load falls on both.

stdout: `BENCH metrics_overhead_ratio <p50 on / p50 off>` (goal at most 1.05),
the two p50s, and `metrics_cpu_per_change_ratio`: the control plane's CPU per
change, on over off (steadier than latency when other work shares the cores);
stderr: the rest, including a 95% bootstrap interval of the ratio (how much
of it this run's noise can explain) and the series the metrics endpoint
served at the end. No key service (its metrics are not on this path).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import bench_convergence as bc
from benchkit import bench, info, percentile

from meshgate.common.etcdproc import EtcdProcess
from meshgate.common.testing import ServiceProcess


def scrape_forever(url: str, stop: threading.Event, seen: list[int]) -> None:
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = r.read().decode()
            seen.append(sum(1 for line in body.splitlines() if line and not line.startswith("#")))
        except OSError as e:
            info(f"scrape failed: {e}")


async def one_change(r: bc.Run, rep: int) -> float:
    """The benchmark's change on `r`; ms until the last agent acked it."""
    ranges = [bc.RANGE_A, bc.RANGE_B] if rep % 2 == 0 else [bc.RANGE_A]
    r.tracker.reset()
    t0 = time.perf_counter()
    gw = await r.gateways.UpdateEgressGateway(bc.egress_pb2.UpdateEgressGatewayRequest(
        egress_gateway=bc.egress_pb2.EgressGateway(name=f"{r.parent}/egressGateways/hub0", ranges=ranges),
        update_mask=bc.field_mask_pb2.FieldMask(paths=["ranges"])), timeout=30)
    r.tracker.arm(int(gw.etag), r.agents)
    await asyncio.wait_for(r.tracker.done.wait(), 120)
    return (max(a.ack_time for a in r.agents) - t0) * 1000


def ratio_interval(on: list[float], off: list[float], n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of median(on) / median(off): how far this run's
    noise alone moves the ratio (a fixed seed: the same rounds give the same interval)."""
    import random

    rnd = random.Random(16)
    ratios = sorted(statistics.median(rnd.choices(on, k=len(on))) / statistics.median(rnd.choices(off, k=len(off)))
                    for _ in range(n))
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


def paired_median(on: list[float], off: list[float]) -> float:
    """Median of each round's on/off ratio (the two changes of a round run back to back)."""
    return statistics.median(a / b for a, b in zip(on, off, strict=True))


async def prepare(r: bc.Run, n: int) -> None:
    hub, spoke = await r.setup_network()
    await r.enroll_all(hub, spoke, n)
    await r.gateways.CreateEgressGateway(bc.egress_pb2.CreateEgressGatewayRequest(
        parent=r.parent, egress_gateway_id="hub0",
        egress_gateway=bc.egress_pb2.EgressGateway(node=f"{r.parent}/nodes/hub0", ranges=[bc.RANGE_A])), timeout=30)
    await r.connect_all()
    await r.check_converged(n)


async def run(cps: dict[str, ServiceProcess], args, out: dict[str, float]) -> None:
    runs = {k: bc.Run(cp.target, cp.proc.pid, args, admin_token=cp.admin_token) for k, cp in cps.items()}
    try:
        for k, r in runs.items():
            info(f"== control plane with metrics {k}: {args.agents} agents")
            await prepare(r, args.agents)
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 10, 10)  # as bench_convergence: the agents stand in for other machines
        lat: dict[str, list[float]] = {"on": [], "off": []}
        cpu: dict[str, float] = {"on": 0.0, "off": 0.0}
        for rep in range(args.reps):
            order = ("off", "on") if rep % 2 == 0 else ("on", "off")
            for k in order:
                c0 = bc.cpu_s(cps[k].proc.pid)
                ms = await one_change(runs[k], rep)
                lat[k].append(ms)
                await asyncio.sleep(args.pause)  # the acks' status writes land in it
                cpu[k] += bc.cpu_s(cps[k].proc.pid) - c0
            info(f"  round {rep}: off {lat['off'][-1]:.0f} ms, on {lat['on'][-1]:.0f} ms")
        for k in ("off", "on"):
            out[f"p50_{k}"] = statistics.median(lat[k])
            info(f"metrics {k}: p50 {statistics.median(lat[k]):.0f} ms, p99 {percentile(lat[k], 99):.0f} ms")
        out["ratio"] = out["p50_on"] / out["p50_off"]
        lo, hi = ratio_interval(lat["on"], lat["off"])
        info(f"p50 ratio {out['ratio']:.3f}, 95% bootstrap interval {lo:.3f}-{hi:.3f} (how far this run's noise "
             f"alone moves it); paired per-round median {paired_median(lat['on'], lat['off']):.3f}")
        for k in ("off", "on"):
            out[f"cpu_{k}"] = cpu[k] / args.reps * 1000
        out["cpu_ratio"] = cpu["on"] / cpu["off"]
        info(f"control-plane CPU per change (with its pause): off {out['cpu_off']:.0f} ms, on {out['cpu_on']:.0f} ms "
             f"(ratio {out['cpu_ratio']:.3f}; less noisy than latency on a shared machine)")
    finally:
        for r in runs.values():
            await r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=1000, help="simulated agents per control plane")
    ap.add_argument("--channels", type=int, default=1000, help="gRPC channels the agents of one control plane share")
    ap.add_argument("--reps", type=int, default=30, help="changes on each control plane")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds after each change")
    ap.add_argument("--enroll-concurrency", type=int, default=4)
    args = ap.parse_args()

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    tmp = tempfile.mkdtemp(prefix="meshgate-bench-metrics-")
    etcd: EtcdProcess | None = None
    cps: dict[str, ServiceProcess] = {}
    stop = threading.Event()
    seen: list[int] = []
    out: dict[str, float] = {}
    ok = False
    saved_env = dict(os.environ)
    try:
        etcd = EtcdProcess(os.path.join(tmp, "etcd")).start()
        os.environ.clear()
        os.environ.update({k: v for k, v in saved_env.items() if not k.startswith(("OTEL_", "MESHGATE_"))})
        for k in ("off", "on"):
            extra = ["--metrics-listen", "0"] if k == "on" else []
            cps[k] = ServiceProcess("meshgate-controlplane", args=[
                "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", f"/bench-{k}", *extra]).start()
            info(f"control plane, metrics {k}, on {cps[k].target} (pid {cps[k].proc.pid})")
        os.environ.clear()
        os.environ.update(saved_env)
        m = re.search(r"metrics served at (http://\S+/metrics)", cps["on"].log(tail=0))
        if not m:
            raise RuntimeError("the control plane with --metrics-listen logged no URL")
        threading.Thread(target=scrape_forever, args=(m.group(1), stop, seen), daemon=True).start()
        asyncio.run(run(cps, args, out))
        info(f"series served with metrics on: {seen[-1] if seen else '?'} ({len(seen)} scrapes)")
        ok = True
    except Exception as e:  # report, then clean up below
        info(f"benchmark failed: {type(e).__name__}: {e}")
        for k, cp in cps.items():
            info(f"control plane ({k}) log tail:\n{cp.log()}")
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        stop.set()
        if "ratio" in out:
            bench("metrics_overhead_ratio", out["ratio"], "ratio")
            bench(f"converge_all_{args.agents}_p50_metrics_off_ms", out["p50_off"], "ms")
            bench(f"converge_all_{args.agents}_p50_metrics_on_ms", out["p50_on"], "ms")
            bench("metrics_cpu_per_change_ratio", out["cpu_ratio"], "ratio")
        for cp in cps.values():
            cp.stop()
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
