"""Egress failover and drain benchmarks (issue 17); prints ``BENCH <name> <value> <unit>`` lines.

    sudo .venv/bin/python tests/bench/bench_failover.py [--rounds N]

- failover_underlay_pull_s  the primary gateway's underlay cable is pulled (its link to the
                            underlay router: tunnels and agent stream together): seconds to
                            the first answer from the service through the standby (a watcher
                            in the client asks every 0.1 s), median of N (goal < 5)
- failover_egress_link_s    the primary's egress-side cable is pulled (carrier lost): the
                            same, median of N (goal < 5)
- drain_lost_packets        packets lost of a 10 pps ping while the primary is drained through
                            the CLI and undrained again, summed over N rounds (goal 0)

The topology, agents and control plane are those of
services/gatewayd/tests/test_system_failover_health.py (imported from there): the
control plane with its defaults but a 1 s failback hold. Everything runs in namespaces
the script makes and removes (also on error), with etcd on a free loopback port. Needs
root, etcd, wireguard-go, wg, nft.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

from benchkit import bench, info

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "services", "gatewayd", "tests")


def run(rounds: int) -> int:
    sys.path.insert(0, TESTS)
    import test_system_failover_health as t
    from meshgate.common.etcdproc import EtcdProcess

    tmp = tempfile.mkdtemp(prefix="bench-failover-")
    etcd = EtcdProcess(os.path.join(tmp, "etcd")).start()
    try:
        # The test module's own notes (print) go to stderr: stdout is for BENCH lines.
        with contextlib.redirect_stdout(sys.stderr), t.failover_lab(etcd) as ha:
            underlay, egress, lost = [], [], 0
            for i in range(rounds):
                for what, host, link, out in (("underlay", ha.u, "eth-p", underlay),
                                              ("egress link", ha.ext, "eth-p", egress)):
                    t0 = time.monotonic()
                    host.ip("link", "set", link, "down")
                    out.append(ha.watcher.wait_for(t.STANDBY_NAT, t0))
                    info(f"round {i + 1}: {what} pull -> standby after {out[-1]:.2f}s")
                    t1 = time.monotonic()
                    host.ip("link", "set", link, "up")
                    t.back_on_primary(ha, t1, f"round {i + 1}: {what} back")
                    time.sleep(1)
                pinger = t.Pinger(ha.c, 130)
                time.sleep(2)
                t.cli(ha, "egress-gateway", "update", t.PRIMARY_GW, "--egress-gateway.drain")
                ha.watcher.wait_for(t.STANDBY_NAT, time.monotonic() - 0.1)
                time.sleep(2)
                t1 = time.monotonic()
                t.cli(ha, "egress-gateway", "update", t.PRIMARY_GW, "--no-egress-gateway.drain")
                ha.watcher.wait_for(t.PRIMARY_NAT, t1)
                n = pinger.lost()
                lost += n
                info(f"round {i + 1}: drain and undrain lost {n} packet(s) of 130")
        bench("failover_underlay_pull_s", statistics.median(underlay), "s")
        bench("failover_egress_link_s", statistics.median(egress), "s")
        bench("drain_lost_packets", lost, "packets")
    finally:
        etcd.stop()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="pulls of each cable, and drains (default 3)")
    args = ap.parse_args()
    from meshgate.gatewayd.lab import can_run

    reason = can_run()
    if reason is not None:
        info(f"skipped: {reason}")
        return 0
    return run(max(1, args.rounds))


if __name__ == "__main__":
    sys.exit(main())
