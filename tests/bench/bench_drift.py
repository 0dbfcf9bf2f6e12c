"""How fast gatewayd heals drift (issue 17); prints ``BENCH <name> <value> <unit>`` lines.

    sudo .venv/bin/python tests/bench/bench_drift.py [--runs N]

- drift_heal_nft_flush_s     ``nft flush ruleset`` on an egress gateway (its NAT goes with
                             it) until a ping from the client through the gateway to the
                             external host is answered again (median of N; goal < 2)
- drift_heal_peer_removed_s  the client's peer removed from the gateway's device with
                             ``wg set ... remove`` until the ping is answered again (median
                             of N; goal < 2)

The notes on stderr also give when the object itself was back (the table listed, the
peer in ``wg show``).  Both agents run ``gatewayd run`` with the periodic full pass an
hour away, so the drift watcher (drift.py) alone heals.  Traffic is probed by a ping
every 50 ms with a 0.2 s timeout, so a figure is at most about 0.25 s late.

Everything runs in network namespaces (``m17d-<token>-<role>``) the script makes and
removes (also on error).  Needs root, wireguard-go, wg, nft.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from benchkit import bench, info

EXT = "198.51.100.10"


def until(cond: Callable[[], bool], timeout: float = 60.0, every: float = 0.05) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"not healed within {timeout:.0f}s")
        time.sleep(every)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description="time until gatewayd's drift watcher heals a flushed ruleset "
                                             "and a removed peer")
    ap.add_argument("--runs", type=int, default=5, help="repetitions of each drift (default 5)")
    args = ap.parse_args()

    from meshgate.gatewayd.lab import build_egress, can_run

    reason = can_run()
    if reason:
        print(f"bench_drift: cannot run: {reason}", file=sys.stderr)
        return 3
    from meshgate.gatewayd.lab import Lab

    with Lab(prefix="m17d") as lab:
        eg = build_egress(lab, clients=1)
        gw, client = eg.gw, eg.clients[0]
        h, g = client.host, gw.host
        gw.start(eg.gateway_state())
        client.start(eg.client_state(0))
        for n in (gw, client):
            n.wait_status(lambda s: s.get("state") == "applied" and len(s.get("drift", {}).get("watching", [])) == 3)
        h.wait_reachable(EXT)

        def pings() -> bool:
            return h.run("ping", "-n", "-c", "1", "-W", "0.2", EXT, check=False).returncode == 0

        def table_back() -> bool:
            return g.run("nft", "list", "table", "inet", "meshgate", check=False).returncode == 0

        flush, flush_obj, peer, peer_obj = [], [], [], []
        for i in range(args.runs):
            g.run("nft", "flush", "ruleset")
            t0 = time.monotonic()
            flush_obj.append(until(table_back, every=0.01))
            until(pings)
            flush.append(time.monotonic() - t0)
            time.sleep(2.0)  # a repair token back (drift_refill), so no run meets the rate limit
            g.run("wg", "set", gw.ifname, "peer", client.public_key, "remove")
            t0 = time.monotonic()
            peer_obj.append(until(lambda: client.public_key in gw.peers(), every=0.01))
            until(pings)
            peer.append(time.monotonic() - t0)
            info(f"run {i + 1}: nft flush healed in {flush[-1]:.2f}s (table back after {flush_obj[-1]:.2f}s), "
                 f"peer removal in {peer[-1]:.2f}s (peer back after {peer_obj[-1]:.2f}s)")
            time.sleep(2.0)  # a repair token back (drift_refill), so no run meets the rate limit
        st = gw.status().get("drift", {})
        info(f"gateway's drift watcher: {st.get('repairs')} repairs, fighting={st.get('fighting')}")
    bench("drift_heal_nft_flush_s", statistics.median(flush), "s")
    bench("drift_heal_peer_removed_s", statistics.median(peer), "s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
