"""Egress failover and drain benchmarks (issue 17); prints ``BENCH <name> <value> <unit>`` lines.

    sudo .venv/bin/python tests/bench/bench_failover.py [--rounds N]

- failover_underlay_pull_s  the primary gateway's underlay cable is pulled (its link to the
                            underlay router: tunnels and agent stream together): seconds to
                            the first answer from the service through the standby (a watcher
                            in the client asks every 0.1 s), median of N (goal < 5)
- failover_egress_link_s    the primary's egress-side cable is pulled (carrier lost): the
                            same, median of N (goal < 5)
- drain_lost_packets        packets lost of a ping (10 per second, --pps) while the primary is
                            drained through the CLI and undrained again, --moves moves
                            (default 20) two seconds apart (issue 17's goal 0)
- drain_lost_in_flight      of those, echoes a gateway answered but the client's tunnel refused:
                            the reply was on its way through the old gateway when the client
                            moved the range (WireGuard accepts a source only from the peer
                            holding it) and its copy through the new gateway (gatewayd's
                            handoff.py) did not arrive; every echo is traced through the three
                            tunnels
- drain_lost_other          the rest (a request that reached no gateway, or went unanswered):
                            what make-before-break must keep at 0
- drain_rtt_ms              the ping's mean round trip (the in-flight window of a move)

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


def run(rounds: int, moves: int, pps: float) -> int:
    sys.path.insert(0, TESTS)
    import test_system_failover_health as t
    from meshgate.common.etcdproc import EtcdProcess

    tmp = tempfile.mkdtemp(prefix="bench-failover-")
    etcd = EtcdProcess(os.path.join(tmp, "etcd")).start()
    try:
        # The test module's own notes (print) go to stderr: stdout is for BENCH lines.
        with contextlib.redirect_stdout(sys.stderr), t.failover_lab(etcd) as ha:
            underlay, egress = [], []
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
            echoes = t.Echoes(ha)
            count = int((moves * 2.2 + 3) * pps)
            pinger = t.Pinger(ha.c, count, interval=1 / pps)
            time.sleep(1.5)
            for i in range(moves):
                drain = i % 2 == 0
                t1 = time.monotonic()
                t.cli(ha, "egress-gateway", "update", t.PRIMARY_GW,
                      "--egress-gateway.drain" if drain else "--no-egress-gateway.drain")
                ha.watcher.wait_for(t.STANDBY_NAT if drain else t.PRIMARY_NAT, t1)
                time.sleep(max(0.0, 2 - (time.monotonic() - t1)))
            lost = pinger.lost_seqs(timeout=600)
            time.sleep(0.5)
            echoes.stop()
            why = [echoes.explain(seq) for seq in lost]
            for seq, w in zip(lost, why, strict=True):
                info(f"lost echo {seq}: {w}")
            in_flight = sum(w.startswith("in flight") for w in why)
            info(f"{moves} moves under {count} echoes at {pps:g} per second: {len(lost)} lost")
        bench("failover_underlay_pull_s", statistics.median(underlay), "s")
        bench("failover_egress_link_s", statistics.median(egress), "s")
        bench("drain_lost_packets", len(lost), "packets")
        bench("drain_lost_in_flight", in_flight, "packets")
        bench("drain_lost_other", len(lost) - in_flight, "packets")
        bench("drain_rtt_ms", pinger.rtt_ms(), "ms")
    finally:
        etcd.stop()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="pulls of each cable (default 3)")
    ap.add_argument("--moves", type=int, default=20, help="drains and undrains, alternating (default 20)")
    ap.add_argument("--pps", type=float, default=10.0, help="echoes per second during the moves (default 10)")
    args = ap.parse_args()
    from meshgate.gatewayd.lab import can_run

    reason = can_run()
    if reason is not None:
        info(f"skipped: {reason}")
        return 0
    return run(max(1, args.rounds), max(2, args.moves), max(1.0, args.pps))


if __name__ == "__main__":
    sys.exit(main())
