"""IP address management: which overlay address a new node gets.

Pure selection only; the caller claims the address in etcd with a
compare-and-swap on `ipam/{network}/{family}/{address}` (create revision 0), so
two control-plane processes can never hand out one address twice. On a lost
race the caller picks again with `attempt` > 0, which spreads concurrent
callers over the lowest free addresses instead of all fighting for one.

The network address and the last address of the range (broadcast in IPv4) are
never handed out.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Collection, Iterator

SPREAD = 64


def usable(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Iterator[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    first = int(net.network_address) + 1
    last = int(net.broadcast_address) - 1
    cls = type(net.network_address)
    for i in range(first, last + 1):
        yield cls(i)


def pick(
    cidr: str, used: Collection[str], attempt: int = 0, rng: random.Random | None = None
) -> str | None:
    """A free address of `cidr`, or None when the range is full.

    attempt 0 gives the lowest free address; later attempts pick at random
    among the lowest `SPREAD` free ones.
    """
    net = ipaddress.ip_network(cidr)
    used_set = set(used)
    want = 1 if attempt == 0 else SPREAD
    free: list[str] = []
    for addr in usable(net):
        s = str(addr)
        if s not in used_set:
            free.append(s)
            if len(free) >= want:
                break
    if not free:
        return None
    if attempt == 0:
        return free[0]
    return (rng or random).choice(free)


def capacity(cidr: str) -> int:
    net = ipaddress.ip_network(cidr)
    return max(net.num_addresses - 2, 0)
