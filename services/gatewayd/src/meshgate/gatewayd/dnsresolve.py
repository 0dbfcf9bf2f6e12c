"""Resolving an egress gateway's domains, and keeping what was learned (dnspython).

The gateway's agent is told its gateways' domains (``EgressConfig.domains``).
Exact names it resolves itself (A and AAAA) and re-resolves when their TTL runs
out, the TTL held within the operator's bounds (``--dns-min-ttl``,
``--dns-max-ttl``); names under a ``*.`` wildcard are learned from the answers
its DNS server forwards (``dnsserver.py`` calls ``learn``), and then re-resolved
the same way for as long as clients keep asking for them (a grace period after
the last question). What it knows goes to the control plane as a whole
(``report``, sent whenever it changes), which routes the addresses through the
gateway.

- An address that leaves the answer stays for ``grace`` seconds after it was
  last seen (plus its TTL), so open connections are not cut when DNS rotates.
- A failing resolution (timeout, SERVFAIL, refused, an unreachable upstream)
  keeps every address of the name, however old, and the report carries the
  error; a name that does not exist (NXDOMAIN) or has no address is an answer:
  its addresses then age out.
- Addresses in the overlay (the interface's networks), loopback, link-local,
  multicast and unspecified ones are dropped and named in the error: an answer
  must not steer other nodes' traffic for the overlay into the gateway.

Hazard: resolution runs in the agent's event loop; each query has a deadline
(``timeout``) so a black-holed upstream never holds the loop, and names are
resolved concurrently.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
from google.protobuf.timestamp_pb2 import Timestamp

from meshgate.api.v1 import agent_pb2, egress_pb2

log = logging.getLogger(__name__)

FAILURE_RETRY_S = 2.0
MAX_NAMES = 1024  # names kept (exact plus learned), as the control plane accepts
MAX_ADDRESSES = 64


def canonical(name: str) -> str:
    return name.strip().rstrip(".").lower()


def matches(domain: str, name: str) -> bool:
    """Whether `name` falls under declared `domain` (`*.x` covers names below x)."""
    if domain.startswith("*."):
        return name.endswith(domain[1:]) and len(name) > len(domain) - 1
    return name == domain


def parse_nameserver(text: str) -> tuple[str, int]:
    """`192.0.2.53`, `192.0.2.53:5353`, `[2001:db8::53]:53`, `2001:db8::53`."""
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        return host, int(port.lstrip(":") or 53)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


def refused(addr: str, overlay: Iterable[str]) -> str | None:
    """Why a learned address is dropped, or None."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return "not an IP address"
    for cidr in overlay:
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version == ip.version and ip in net:
            return f"in the overlay ({net})"
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local or (
            ip.version == 4 and ip in ipaddress.ip_network("0.0.0.0/8")):
        return "not a routable unicast address"
    return None


@dataclass
class Name:
    """What is known of one name."""

    exact: bool  # declared as such (else learned under a wildcard)
    addresses: dict[str, float] = field(default_factory=dict)  # address -> expiry (monotonic)
    error: str = ""
    dropped: str = ""
    resolve_time: float = 0.0  # wall clock of the last good answer
    next_at: float = 0.0  # monotonic: when to resolve again
    asked_at: float = 0.0  # monotonic: the last client question (learned names)


class DomainResolver:
    """Resolves and learns the addresses of the declared domains; see the module."""

    def __init__(self, nameservers: list[tuple[str, int]] | None = None, *, min_ttl: float = 5.0,
                 max_ttl: float = 300.0, grace: float = 300.0, timeout: float = 3.0,
                 on_change: Callable[[], None] | None = None, node: str = "") -> None:
        self.min_ttl, self.max_ttl, self.grace, self.timeout = min_ttl, max_ttl, grace, timeout
        self.on_change = on_change
        self.node = node
        self.resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            self.resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in nameservers]
        self.resolver.lifetime = timeout
        self.resolver.timeout = timeout
        self.resolver.cache = None  # TTLs are followed here, not cached behind our back
        self.domains: tuple[str, ...] = ()
        self.overlay: tuple[str, ...] = ()
        self.names: dict[str, Name] = {}
        self._wake = asyncio.Event()
        self._last_report = b""

    # inputs ---------------------------------------------------------------

    def configure(self, domains: Iterable[str], overlay: Iterable[str] = ()) -> None:
        """The declared domains (from the desired state) and the overlay's networks."""
        doms = tuple(sorted({canonical(d) for d in domains}))
        self.overlay = tuple(overlay)
        if doms == self.domains:
            return
        self.domains = doms
        for d in doms:
            if not d.startswith("*.") and d not in self.names:
                self.names[d] = Name(exact=True)
        for n in list(self.names):
            if not any(matches(d, n) for d in doms):
                del self.names[n]
            elif n in doms:
                self.names[n].exact = True
            else:
                self.names[n].exact = False
        self._wake.set()
        self._changed()

    def wildcard_for(self, name: str) -> bool:
        return any(d.startswith("*.") and matches(d, name) for d in self.domains)

    def learn(self, name: str, answers: Iterable[tuple[str, int]]) -> None:
        """Addresses (with TTLs) a forwarded answer for `name` carried; kept when a
        declared wildcard covers the name."""
        name = canonical(name)
        if name in self.names and self.names[name].exact:
            return  # resolved on its own schedule
        if not self.wildcard_for(name):
            return
        entry = self.names.get(name)
        if entry is None:
            if len(self.names) >= MAX_NAMES:
                return
            entry = self.names[name] = Name(exact=False)
        now = time.monotonic()
        entry.asked_at = now
        ttl = self._ttl(min((t for _, t in answers), default=self.min_ttl))
        self._absorb(entry, [a for a, _ in answers], ttl, now)
        entry.next_at = now + ttl
        self._wake.set()
        self._changed()

    # the loop -------------------------------------------------------------

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            due = [n for n, e in self.names.items() if e.next_at <= now and self._keep_resolving(e, now)]
            if due:
                await asyncio.gather(*(self._resolve(n) for n in due))
            self._expire(time.monotonic())
            self._changed()
            now = time.monotonic()
            wakes = [e.next_at for e in self.names.values() if self._keep_resolving(e, now)]
            wakes += [t for e in self.names.values() if not e.error for t in e.addresses.values()]
            wakes += [e.asked_at + self.grace for e in self.names.values() if not e.exact]
            delay = max(0.05, min(wakes, default=now + 60) - now)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(delay, 60))
            except TimeoutError:
                pass

    def _keep_resolving(self, e: Name, now: float) -> bool:
        return e.exact or now - e.asked_at < self.grace

    def _ttl(self, ttl: float) -> float:
        return max(self.min_ttl, min(self.max_ttl, ttl))

    async def _query(self, name: str, rdtype) -> tuple[list[str], int | None]:
        try:
            ans = await self.resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return [], None
        if ans.rrset is None:
            return [], None
        return [r.to_text() for r in ans.rrset], ans.rrset.ttl

    async def _resolve(self, name: str) -> None:
        e = self.names.get(name)
        if e is None:
            return
        now = time.monotonic()
        got = await asyncio.gather(self._query(name, dns.rdatatype.A), self._query(name, dns.rdatatype.AAAA),
                                   return_exceptions=True)
        failed = [g for g in got if isinstance(g, BaseException)]
        for g in failed:
            if not isinstance(g, (dns.exception.DNSException, OSError)):
                raise g
        if len(failed) == len(got):  # an answer for one family is an answer (some servers refuse AAAA)
            exc = failed[0]
            msg = f"resolving {name}: {type(exc).__name__}: {str(exc)[:200]}"
            if e.error != msg:
                log.warning("%s; keeping its %d known address(es)", msg, len(e.addresses))
            e.error = msg
            e.next_at = now + min(FAILURE_RETRY_S, self.max_ttl)
            return
        if e.error:
            log.info("resolving %s works again", name)
        e.error = ""
        answers = [g for g in got if not isinstance(g, BaseException)]
        ttls = [t for _, t in answers if t is not None]
        ttl = self._ttl(min(ttls) if ttls else self.min_ttl)
        self._absorb(e, [a for addrs, _ in answers for a in addrs], ttl, now)
        e.resolve_time = time.time()
        e.next_at = now + ttl

    def _absorb(self, e: Name, addrs: list[str], ttl: float, now: float) -> None:
        kept, dropped = [], []
        for a in addrs:
            why = refused(a, self.overlay)
            if why is None:
                kept.append(str(ipaddress.ip_address(a)))
            else:
                dropped.append(f"{a} ({why})")
        e.dropped = ("dropped " + ", ".join(dropped)) if dropped else ""
        if dropped:
            log.warning("egress domain answer: %s", e.dropped)
        for a in kept[:MAX_ADDRESSES]:
            e.addresses[a] = now + ttl + self.grace
        e.resolve_time = time.time()

    def _expire(self, now: float) -> None:
        for n in list(self.names):
            e = self.names[n]
            if not e.error:  # a failing upstream keeps everything
                for a in [a for a, t in e.addresses.items() if t <= now]:
                    del e.addresses[a]
            if not e.exact and not e.addresses and now - e.asked_at >= self.grace:
                del self.names[n]

    # output ---------------------------------------------------------------

    def report(self) -> agent_pb2.SyncRequest.Domains:
        out = agent_pb2.SyncRequest.Domains()
        for n in sorted(self.names):
            e = self.names[n]
            st = egress_pb2.DomainStatus(domain=n, addresses=sorted(e.addresses), node=self.node,
                                         error="; ".join(x for x in (e.error, e.dropped) if x))
            if e.resolve_time:
                ts = Timestamp()
                ts.FromNanoseconds(int(e.resolve_time * 1e9))
                st.resolve_time.CopyFrom(ts)
            out.domains.append(st)
        return out

    def _changed(self) -> None:
        """Tell the listener when the report differs from the last (resolve times aside)."""
        rep = self.report()
        for st in rep.domains:
            st.ClearField("resolve_time")
        blob = rep.SerializeToString(deterministic=True)
        if blob != self._last_report:
            self._last_report = blob
            if self.on_change is not None:
                self.on_change()
