"""The egress-gateway demonstration: ``python -m meshgate.gatewayd.demo``.

It builds three hosts from network namespaces — a client node, an egress gateway node
and an "external service" (a managed-database stand-in on 198.51.100.0/24 that only
the gateway's underlay can reach) — computes each node's desired state (until the
control-plane stream exists), runs gatewayd's reconciler on both nodes, and shows:

1. the client cannot reach the service on its own;
2. through the gateway it can, and the service sees the gateway's address, not the
   client's (NAT);
3. with NAT turned off for the gateway the service sees the client's overlay address;
4. traffic to the client's own LAN never enters the tunnel.

Everything it made is removed on exit, also on Ctrl-C or SIGTERM.  Needs root.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from meshgate.gatewayd.lab import Egress, Lab, build_egress, can_run

PORT = 5432  # the "database"


def say(msg: str = "") -> None:
    print(msg, flush=True)


def step(n: int, msg: str) -> None:
    say(f"\n[{n}] {msg}")


def run(keep_seconds: float = 0.0) -> int:
    reason = can_run()
    if reason:
        say(f"demo: cannot run here: {reason}")
        return 3
    with Lab() as lab:
        def _term(*_: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _term)
        signal.signal(signal.SIGINT, _term)  # also when started with SIGINT ignored (nohup, &)
        try:
            return _demo(lab, keep_seconds)
        except KeyboardInterrupt:
            say("\ninterrupted; cleaning up")
            return 130
        finally:
            say("cleaning up namespaces, interfaces and processes …")


def _demo(lab: Lab, keep_seconds: float) -> int:
    eg: Egress = build_egress(lab, clients=1)
    client, gw = eg.clients[0], eg.gw
    say("meshgate egress gateway demonstration")
    say(f"  client   {client.host.name}: underlay {eg.client_underlay(0)}, overlay {eg.overlay(0)}, "
        f"LAN 192.0.2.1/24")
    say(f"  gateway  {gw.host.name}: underlay {eg.gw_underlay(0)}, overlay {eg.overlay(None)}, "
        f"external side {eg.gw_ext_addr}")
    say(f"  service  {eg.ext.name}: {eg.ext_addr}:{PORT} (reachable only from the gateway's side)")

    eg.ext.whoami_server(eg.ext_addr, PORT)
    step(1, "before gatewayd: the client tries the service directly")
    seen = client.host.ask(eg.ext_addr, PORT, timeout=2)
    say(f"    {'reached, which should not happen' if seen else 'unreachable (as it should be)'}")
    if seen:
        return 1

    step(2, "gatewayd reconciles the gateway (egress 198.51.100.0/24, NAT on) and the client")
    for node, msg in ((gw, eg.gateway_state(nat=True)), (client, eg.client_state(0))):
        out = node.apply(msg).stdout.strip().splitlines()
        say(f"    {node.host.name}: {out[0]}")
        for line in out[1:]:
            say(f"      {line.strip()}")

    step(3, "the client connects to the service again")
    seen = client.host.ask(eg.ext_addr, PORT)
    say(f"    the service sees the connection coming from {seen}")
    ok = seen == eg.gw_ext_addr
    say(f"    {'OK: the gateway address, not the client' if ok else 'UNEXPECTED'} "
        f"(client overlay {eg.overlay(0)}, gateway {eg.gw_ext_addr})")
    peer = client.peers()[gw.public_key]
    say(f"    client tunnel to gateway: handshake done, {peer['tx']} bytes sent, {peer['rx']} received")

    step(4, "traffic to the client's own LAN stays out of the tunnel")
    eg.lans[0].whoami_server("192.0.2.10", PORT)
    before = client.peers()[gw.public_key]
    lan_seen = client.host.ask("192.0.2.10", PORT)
    after = client.peers()[gw.public_key]
    lan_ok = lan_seen == "192.0.2.1" and (before["tx"], before["rx"]) == (after["tx"], after["rx"])
    say(f"    LAN host sees {lan_seen}; tunnel counters unchanged: {lan_ok}")

    step(5, "turn NAT off on the gateway (the service's network routes the overlay back)")
    eg.ext.ip("route", "add", "100.64.0.0/24", "via", eg.gw_ext_addr)
    out = gw.apply(eg.gateway_state(nat=False, revision=2)).stdout.strip().splitlines()
    say(f"    {gw.host.name}: {out[0]}")
    seen2 = client.host.ask(eg.ext_addr, PORT)
    nat_off_ok = seen2 == eg.overlay(0)
    say(f"    the service now sees {seen2} ({'OK: the client overlay address' if nat_off_ok else 'UNEXPECTED'})")

    step(6, "what gatewayd owns on the gateway")
    say("    " + gw.host.run("nft", "list", "table", "inet", "meshgate").stdout.replace("\n", "\n    "))
    if keep_seconds:
        say(f"keeping the namespaces for {keep_seconds:.0f}s (try: ip netns exec {client.host.name} "
            f"python -m meshgate.gatewayd.lab ask {eg.ext_addr} {PORT})")
        time.sleep(keep_seconds)
    good = ok and lan_ok and nat_off_ok
    say("\nresult: " + ("the egress gateway works" if good else "something did not work"))
    return 0 if good else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshgate.gatewayd.demo", description=__doc__.split("\n")[0])
    p.add_argument("--keep", type=float, default=0.0, metavar="SECONDS",
                   help="keep the namespaces this long before cleaning up")
    args = p.parse_args(argv)
    return run(args.keep)


if __name__ == "__main__":
    sys.exit(main())
