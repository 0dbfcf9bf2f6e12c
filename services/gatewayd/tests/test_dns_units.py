"""The egress-domain resolver and the overlay DNS server against a real DNS server
built on dnslib in the test (on loopback, free ports): TTLs followed within bounds,
the grace period, a failing upstream, overlay addresses dropped, names answered,
questions forwarded, wildcard names learned from the answers that pass through."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import dns.asyncquery
import dns.message
import dns.rcode
import dnslib
import pytest
from dnslib.server import BaseResolver, DNSServer

from meshgate.gatewayd.dnsresolve import DomainResolver, matches, parse_nameserver
from meshgate.gatewayd.dnsserver import OverlayDnsServer


class Zone(BaseResolver):
    """A mutable zone: name -> (addresses, ttl); `fail` answers SERVFAIL."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[list[str], int]] = {}
        self.fail = False
        self.lock = threading.Lock()
        self.asked: dict[str, int] = {}  # name -> A questions answered

    def resolve(self, request, handler):
        reply = request.reply()
        if self.fail:
            reply.header.rcode = dnslib.RCODE.SERVFAIL
            return reply
        name = str(request.q.qname).rstrip(".").lower()
        with self.lock:
            if request.q.qtype == dnslib.QTYPE.A:
                self.asked[name] = self.asked.get(name, 0) + 1
            got = self.records.get(name)
            if got is None:
                for k, v in self.records.items():
                    if k.startswith("*.") and name.endswith(k[1:]):
                        got = v
        if got is None:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            return reply
        addrs, ttl = got
        for a in addrs:
            v6 = ":" in a
            if request.q.qtype == (dnslib.QTYPE.AAAA if v6 else dnslib.QTYPE.A):
                reply.add_answer(dnslib.RR(request.q.qname, dnslib.QTYPE.AAAA if v6 else dnslib.QTYPE.A,
                                           rdata=dnslib.AAAA(a) if v6 else dnslib.A(a), ttl=ttl))
        return reply


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def upstream():
    zone = Zone()
    port = free_port()
    servers = [DNSServer(zone, address="127.0.0.1", port=port), DNSServer(zone, address="127.0.0.1", port=port,
                                                                           tcp=True)]
    for s in servers:
        s.start_thread()
    zone.port = port  # type: ignore[attr-defined]
    try:
        yield zone
    finally:
        for s in servers:
            s.stop()
            s.server.server_close()


async def until(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def addrs(r: DomainResolver, name: str) -> list[str]:
    for st in r.report().domains:
        if st.domain == name:
            return list(st.addresses)
    return []


def err(r: DomainResolver, name: str) -> str:
    return next((st.error for st in r.report().domains if st.domain == name), "")


def test_names_and_wildcards():
    assert matches("*.example.test", "a.example.test") and matches("*.example.test", "a.b.example.test")
    assert not matches("*.example.test", "example.test") and not matches("db.example.test", "x.db.example.test")
    assert parse_nameserver("192.0.2.53:5353") == ("192.0.2.53", 5353)
    assert parse_nameserver("[2001:db8::53]:53") == ("2001:db8::53", 53)
    assert parse_nameserver("2001:db8::53") == ("2001:db8::53", 53)


def test_resolver_follows_ttl_keeps_old_addresses_for_grace_and_survives_failures(upstream):
    async def main():
        changes = []
        upstream.records["db.example.test"] = (["198.51.100.20"], 1)
        r = DomainResolver([("127.0.0.1", upstream.port)], min_ttl=0.2, max_ttl=1, grace=1.5,
                           on_change=lambda: changes.append(1), timeout=1)
        r.configure(["db.example.test"], ["100.64.0.0/24"])
        task = asyncio.create_task(r.run())
        try:
            await until(lambda: addrs(r, "db.example.test") == ["198.51.100.20"])
            assert changes
            upstream.records["db.example.test"] = (["198.51.100.21"], 1)
            # the new address within the TTL; the old one stays for its grace period...
            await until(lambda: "198.51.100.21" in addrs(r, "db.example.test"))
            assert "198.51.100.20" in addrs(r, "db.example.test")
            # ...and then goes
            await until(lambda: addrs(r, "db.example.test") == ["198.51.100.21"])
            # an answer into the overlay is dropped and said
            upstream.records["db.example.test"] = (["198.51.100.21", "100.64.0.7"], 1)
            await until(lambda: "100.64.0.7" in err(r, "db.example.test"))
            assert addrs(r, "db.example.test") == ["198.51.100.21"]
            # a failing upstream keeps what is known, well past the grace period
            upstream.fail = True
            await until(lambda: "SERVFAIL" in err(r, "db.example.test") or "NoNameservers" in err(r, "db.example.test"))
            await asyncio.sleep(2.5)
            assert addrs(r, "db.example.test") == ["198.51.100.21"]
            upstream.fail = False
            await until(lambda: err(r, "db.example.test") == "" or "100.64.0.7" in err(r, "db.example.test"))
        finally:
            task.cancel()

    asyncio.run(main())


def test_ttls_are_held_within_the_operators_bounds(upstream):
    """A record's TTL above --dns-max-ttl is followed at the bound (a change shows
    up long before the record's hour), one below --dns-min-ttl is not asked
    again sooner than the bound (a TTL of 0 does not turn into a query storm)."""
    async def main():
        upstream.records["long.example.test"] = (["198.51.100.40"], 3600)
        upstream.records["short.example.test"] = (["198.51.100.50"], 0)
        r = DomainResolver([("127.0.0.1", upstream.port)], min_ttl=1.0, max_ttl=1.0, grace=0, timeout=1)
        r.configure(["long.example.test", "short.example.test"], ["100.64.0.0/24"])
        task = asyncio.create_task(r.run())
        try:
            await until(lambda: addrs(r, "long.example.test") == ["198.51.100.40"]
                        and addrs(r, "short.example.test") == ["198.51.100.50"])
            upstream.records["long.example.test"] = (["198.51.100.41"], 3600)
            await until(lambda: addrs(r, "long.example.test") == ["198.51.100.41"])
            first = upstream.asked["short.example.test"]
            await asyncio.sleep(2.5)
            # at most one question per second (min_ttl) in 2.5 s: 3 more, with a tick of slack
            assert upstream.asked["short.example.test"] - first <= 3, upstream.asked
            assert upstream.asked["short.example.test"] - first >= 1, "re-resolved at the bound"
        finally:
            task.cancel()

    asyncio.run(main())


def test_overlay_server_answers_names_forwards_the_rest_and_learns_wildcards(upstream):
    upstream.records["*.wild.example.test"] = (["198.51.100.30"], 1)
    upstream.records["other.example.org"] = (["203.0.113.99"], 60)

    async def main():
        r = DomainResolver([("127.0.0.1", upstream.port)], min_ttl=0.2, max_ttl=2, grace=2)
        r.configure(["*.wild.example.test"], ["100.64.0.0/24"])
        port = free_port()
        srv = OverlayDnsServer([("127.0.0.1", upstream.port)], r, port=port)
        srv.set_zone("lab.meshgate.internal", {"gateway": ["100.64.0.1", "fd00:64::1"], "laptop": ["100.64.0.9"]})
        await srv.listen_on(["127.0.0.1"])
        task = asyncio.create_task(r.run())
        try:
            async def ask(name, rdtype="A", tcp=False):
                q = dns.message.make_query(name, rdtype)
                if tcp:
                    return await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=5)
                return await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=5)

            a = await ask("gateway.lab.meshgate.internal")
            assert [x.to_text() for x in a.answer[0]] == ["100.64.0.1"] and a.flags & dns.flags.AA
            a = await ask("Gateway.lab.meshgate.internal", "AAAA", tcp=True)
            assert [x.to_text() for x in a.answer[0]] == ["fd00:64::1"]
            a = await ask("laptop.lab.meshgate.internal")  # twice: the second from the cache
            a = await ask("laptop.lab.meshgate.internal")
            assert [x.to_text() for x in a.answer[0]] == ["100.64.0.9"]
            assert (await ask("nobody.lab.meshgate.internal")).rcode() == dns.rcode.NXDOMAIN
            # forwarded, over UDP and TCP
            a = await ask("other.example.org")
            assert [x.to_text() for x in a.answer[0]] == ["203.0.113.99"]
            a = await ask("other.example.org", tcp=True)
            assert [x.to_text() for x in a.answer[0]] == ["203.0.113.99"]
            assert addrs(r, "other.example.org") == []  # not an egress domain: nothing learned
            # a wildcard egress domain: learned from the answer that passed through
            a = await ask("api.wild.example.test")
            assert [x.to_text() for x in a.answer[0]] == ["198.51.100.30"]
            assert addrs(r, "api.wild.example.test") == ["198.51.100.30"]
            # the zone changes: answers follow at once
            srv.set_zone("lab.meshgate.internal", {"gateway": ["100.64.0.1"]})
            assert (await ask("laptop.lab.meshgate.internal")).rcode() == dns.rcode.NXDOMAIN
            # no upstream: SERVFAIL for forwarded questions, names still answered
            upstream.fail = True
            assert (await ask("other.example.org")).rcode() == dns.rcode.SERVFAIL
            assert (await ask("gateway.lab.meshgate.internal")).rcode() == dns.rcode.NOERROR
        finally:
            task.cancel()
            await srv.close()

    asyncio.run(main())


def test_dns_settings_from_flags_and_env_and_bad_values_refused(tmp_path):
    import subprocess
    import sys

    from meshgate.gatewayd.dnsagent import DnsSettings

    s = DnsSettings.load({"dns_upstream": ["192.0.2.53:5353"], "dns": False},
                         env={"MESHGATE_GATEWAYD_DNS_MIN_TTL": "2", "MESHGATE_GATEWAYD_DNS_GRACE": "10"})
    assert (s.dns, s.dns_min_ttl, s.dns_grace, s.nameservers()) == (False, 2.0, 10.0, [("192.0.2.53", 5353)])
    assert s.origins["dns_upstream"] == "flag" and s.origins["dns_min_ttl"] == "env"
    assert s.origins["dns_max_ttl"] == "default"
    for flags in ({"dns_min_ttl": 10, "dns_max_ttl": 5}, {"dns_grace": -1}, {"dns_upstream": ["192.0.2.1:notaport"]}):
        with pytest.raises(ValueError):
            DnsSettings.load(flags, env={})
    # `gatewayd run` refuses them as bad flags (exit 2), before touching anything
    (tmp_path / "desired.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "meshgate.gatewayd", "run", "--state-dir", str(tmp_path / "st"),
                        "--file", str(tmp_path / "desired.json"), "--dns-min-ttl", "10", "--dns-max-ttl", "5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "dns_min_ttl" in r.stderr, r.stderr
