"""The overlay's DNS server: names for nodes, everything else forwarded (dnslib, asyncio UDP and TCP).

Each gatewayd answers on its overlay addresses (port 53 by default):

- ``{name}.{zone}`` (the zone is ``{network}.meshgate.internal``, from the
  desired state's ``dns``) with the A and AAAA records of the node or external
  client ``name``, authoritatively; an unknown name in the zone is NXDOMAIN;
- every other question is forwarded, as it came, to the upstream resolvers
  (the host's, or ``--dns-upstream``), over the transport it came on, and the
  answer relayed back; when no upstream answers, SERVFAIL. Answers that pass
  through for a name under one of the gateway's ``*.`` egress domains teach
  ``dnsresolve.DomainResolver`` its addresses (``learn``), so wildcard
  domains route.

The sockets are bound with IP_FREEBIND, so the server can start before the
overlay address is on the interface (it is, once the first apply ran).

Hazard: the server runs in the agent's event loop; every forward has a
deadline, and authoritative answers are cached as wire bytes keyed by the
query without its id (a repeated question costs a dict lookup), cleared
whenever the zone changes. The wire format is dnslib's: nothing here parses
DNS by hand beyond the two-byte id and the TCP length prefix.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable, Mapping

import dnslib  # type: ignore[import-untyped]

from meshgate.gatewayd.dnsresolve import DomainResolver

log = logging.getLogger(__name__)

IP_FREEBIND = 15
IPV6_FREEBIND = 78
RECORD_TTL = 30
FORWARD_TIMEOUT_S = 3.0
MAX_CACHE = 4096
MAX_PENDING = 1024  # forwarded UDP questions in flight at once


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: OverlayDnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task] = set()  # answers in flight (the loop keeps only weak references)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        fast = self.server.cached(data)
        if fast is not None:
            assert self.transport is not None
            self.transport.sendto(fast, addr)
            return
        if len(self.pending) >= MAX_PENDING:
            return  # shed load: the client retries
        task = asyncio.get_running_loop().create_task(self._answer(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _answer(self, data: bytes, addr) -> None:
        reply = await self.server.answer(data, tcp=False)
        if reply and self.transport is not None:
            self.transport.sendto(reply, addr)


class _ForwardUdp(asyncio.DatagramProtocol):
    def __init__(self, fut: asyncio.Future) -> None:
        self.fut = fut

    def datagram_received(self, data: bytes, addr) -> None:
        if not self.fut.done():
            self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


class OverlayDnsServer:
    """See the module docstring."""

    def __init__(self, upstream: list[tuple[str, int]], resolver: DomainResolver | None = None,
                 port: int = 53) -> None:
        self.upstream = upstream
        self.resolver = resolver
        self.port = port
        self.zone = ""
        self.records: dict[str, list[str]] = {}
        self.listen: tuple[str, ...] = ()
        self._transports: list[asyncio.BaseTransport] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._cache: dict[bytes, bytes] = {}
        self.questions = 0

    # configuration --------------------------------------------------------

    def set_zone(self, zone: str, records: Mapping[str, Iterable[str]]) -> None:
        zone = zone.rstrip(".").lower()
        recs = {k.lower(): list(v) for k, v in records.items()}
        if (zone, recs) != (self.zone, self.records):
            self.zone, self.records = zone, recs
            self._cache.clear()

    async def listen_on(self, addresses: Iterable[str]) -> None:
        """(Re)bind to `addresses` (IP literals) when they changed."""
        want = tuple(sorted(set(addresses)))
        if want == self.listen:
            return
        await self.close()
        self.listen = want
        loop = asyncio.get_running_loop()
        for a in want:
            fam = socket.AF_INET6 if ipaddress.ip_address(a).version == 6 else socket.AF_INET
            try:
                u = _bound(fam, socket.SOCK_DGRAM, a, self.port)
                transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=u)
                self._transports.append(transport)
                t = _bound(fam, socket.SOCK_STREAM, a, self.port)
                t.listen(128)
                self._servers.append(await asyncio.start_server(self._tcp, sock=t))
                log.info("overlay DNS for %s answering on %s port %d", self.zone or "(no zone yet)", a, self.port)
            except OSError as e:
                log.error("overlay DNS cannot listen on %s port %d: %s", a, self.port, e)

    async def close(self) -> None:
        for t in self._transports:
            t.close()
        for s in self._servers:
            s.close()
            await s.wait_closed()
        self._transports, self._servers, self.listen = [], [], ()

    # answering ------------------------------------------------------------

    def cached(self, data: bytes) -> bytes | None:
        body = self._cache.get(data[2:])
        if body is None:
            return None
        self.questions += 1
        return data[:2] + body

    async def answer(self, data: bytes, tcp: bool) -> bytes | None:
        self.questions += 1
        try:
            q = dnslib.DNSRecord.parse(data)
        except (dnslib.DNSError, struct.error, IndexError, ValueError):
            return None  # not DNS: no answer, like any resolver
        if q.header.qr or not q.questions:
            return None
        qname = str(q.q.qname).rstrip(".").lower()
        if self.zone and (qname == self.zone or qname.endswith("." + self.zone)):
            reply = self._authoritative(q, qname)
            wire = reply.pack()
            if len(self._cache) < MAX_CACHE and not tcp:
                self._cache[data[2:]] = wire[2:]
            return wire
        return await self._forward(q, data, qname, tcp)

    def _authoritative(self, q: dnslib.DNSRecord, qname: str) -> dnslib.DNSRecord:
        reply = q.reply()
        reply.header.aa = 1
        reply.header.ra = 1
        label = qname[: -len(self.zone) - 1] if qname != self.zone else ""
        if qname == self.zone:
            return reply
        addrs = self.records.get(label)
        if addrs is None:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            return reply
        for a in addrs:
            v6 = ipaddress.ip_address(a).version == 6
            if q.q.qtype == (dnslib.QTYPE.AAAA if v6 else dnslib.QTYPE.A) or q.q.qtype == dnslib.QTYPE.ANY:
                rdata = dnslib.AAAA(a) if v6 else dnslib.A(a)
                reply.add_answer(dnslib.RR(q.q.qname, dnslib.QTYPE.AAAA if v6 else dnslib.QTYPE.A,
                                           rdata=rdata, ttl=RECORD_TTL))
        return reply

    async def _forward(self, q: dnslib.DNSRecord, data: bytes, qname: str, tcp: bool) -> bytes:
        for host, port in self.upstream:
            try:
                wire = await asyncio.wait_for(
                    _ask_tcp(data, host, port) if tcp else _ask_udp(data, host, port), FORWARD_TIMEOUT_S)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                log.debug("upstream %s:%d did not answer %s: %s", host, port, qname, e)
                continue
            self._learn(qname, wire)
            return wire
        reply = q.reply()
        reply.header.rcode = dnslib.RCODE.SERVFAIL
        reply.header.ra = 1
        return reply.pack()

    def _learn(self, qname: str, wire: bytes) -> None:
        if self.resolver is None or not self.resolver.wildcard_for(qname):
            return
        try:
            r = dnslib.DNSRecord.parse(wire)
        except (dnslib.DNSError, struct.error, IndexError, ValueError):
            return
        got = [(str(rr.rdata), rr.ttl) for rr in r.rr if rr.rtype in (dnslib.QTYPE.A, dnslib.QTYPE.AAAA)]
        if got:
            self.resolver.learn(qname, got)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), 10)
                data = await reader.readexactly(struct.unpack("!H", head)[0])
                reply = await self.answer(data, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def _bound(fam: int, kind: int, addr: str, port: int) -> socket.socket:
    s = socket.socket(fam, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        else:
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        s.setblocking(False)
        s.bind((addr, port))
    except OSError:
        s.close()
        raise
    return s


async def _ask_udp(data: bytes, host: str, port: int) -> bytes:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(lambda: _ForwardUdp(fut), remote_addr=(host, port))
    try:
        transport.sendto(data)
        while True:
            reply = await fut
            if reply[:2] == data[:2]:
                return reply
            fut = loop.create_future()  # a stray datagram: keep waiting
            transport.get_protocol().fut = fut  # type: ignore[attr-defined]
    finally:
        transport.close()


async def _ask_tcp(data: bytes, host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(struct.pack("!H", len(data)) + data)
        await writer.drain()
        head = await reader.readexactly(2)
        return await reader.readexactly(struct.unpack("!H", head)[0])
    finally:
        writer.close()
