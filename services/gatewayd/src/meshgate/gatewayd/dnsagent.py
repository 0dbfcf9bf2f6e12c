"""The DNS side of the agent: egress-domain resolution and the overlay DNS server, fed by the desired state.

``DnsSource`` sits between the agent and its desired-state source: it passes
every update through unchanged, keeps the state the updates add up to, and
from it configures ``dnsresolve.DomainResolver`` (the domains of the node's
egress gateways, the overlay's networks) and ``dnsserver.OverlayDnsServer``
(the zone, its records, the overlay addresses to answer on). What the
resolver learns goes to the control plane over the stream
(``SyncRequest.Domains``), again after every reconnect.

Configuring the host's own resolver to ask the overlay server is opt-in
(``--dns-configure-resolver``): with systemd-resolved, ``resolvectl dns`` and
``resolvectl domain ~{zone}`` on the WireGuard interface (only the overlay's
names go there); without it nothing is changed and the log says what to add
(docs/gatewayd.md, "Names in the overlay").

Hazard: the source wraps the agent's one and delegates every other attribute
to it (``report``, ``announce_key``, ``send_health``...), so the agent sees no
difference; nothing here may block the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import shutil
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.common.desired import apply_delta
from meshgate.gatewayd.dnsresolve import DomainResolver, parse_nameserver
from meshgate.gatewayd.dnsserver import OverlayDnsServer
from meshgate.gatewayd.sources import Delta, Snapshot, Update

log = logging.getLogger(__name__)
ENV_PREFIX = "MESHGATE_GATEWAYD_"


@dataclass(frozen=True)
class DnsSettings:
    """Flags ``--dns-*`` of ``gatewayd run``, or env ``MESHGATE_GATEWAYD_DNS_*``."""

    dns: bool = True
    """Answer the overlay's names on the overlay addresses (``--no-dns``: off)."""

    dns_port: int = 53
    """Port of the overlay DNS server."""

    dns_upstream: tuple[str, ...] = ()
    """Resolvers (``host[:port]``) for forwarded questions and egress domains;
    empty: the host's, from /etc/resolv.conf."""

    dns_min_ttl: float = 5.0
    """Lower bound of the TTL followed for egress domains, seconds."""

    dns_max_ttl: float = 300.0
    """Upper bound of the TTL followed for egress domains, seconds."""

    dns_grace: float = 300.0
    """Seconds an egress-domain address stays routed after it left the answer
    (and a wildcard's name stays resolved after its last question)."""

    dns_configure_resolver: bool = False
    """Point the host's resolver at the overlay server for the overlay zone
    (resolvectl, where systemd-resolved runs)."""

    origins: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> DnsSettings:
        env = os.environ if env is None else env
        flags = flags or {}
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for f in dataclasses.fields(cls):
            if f.name == "origins":
                continue
            raw, origin = flags.get(f.name), "flag"
            if raw is None and ENV_PREFIX + f.name.upper() in env:
                raw, origin = env[ENV_PREFIX + f.name.upper()], "env"
            if raw is None:
                origins[f.name] = "default"
                continue
            values[f.name] = _convert(f.default, raw)
            origins[f.name] = origin
        s = cls(**values, origins=origins)
        if not 0 < s.dns_min_ttl <= s.dns_max_ttl:
            raise ValueError(f"need 0 < dns_min_ttl <= dns_max_ttl, not {s.dns_min_ttl} and {s.dns_max_ttl}")
        if s.dns_grace < 0:
            raise ValueError("dns_grace must not be negative")
        for u in s.dns_upstream:
            parse_nameserver(u)
        return s

    def nameservers(self) -> list[tuple[str, int]]:
        if self.dns_upstream:
            return [parse_nameserver(u) for u in self.dns_upstream]
        return host_nameservers()


def _convert(default: Any, raw: Any) -> Any:
    if isinstance(default, bool):
        return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        return tuple(raw) if isinstance(raw, (list, tuple)) else tuple(p.strip() for p in str(raw).split(",") if p.strip())
    return type(default)(raw)


def host_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append((parts[1].split("%")[0], 53))
    except OSError:
        pass
    return out or [("127.0.0.1", 53)]


def _interfaces(state: pb.DesiredState) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """The interface's addresses that parse. This wrapper sees a state before
    the agent validates it: an invalid one must reach the agent (which rejects
    it and reports why), not end the desired-state feed here."""
    out = []
    for a in state.interface.addresses:
        try:
            out.append(ipaddress.ip_interface(a))
        except ValueError:
            continue
    return out


def overlay_networks(state: pb.DesiredState) -> list[str]:
    return [str(i.network) for i in _interfaces(state)]


class DnsSource:
    """Wraps a desired-state source; see the module docstring."""

    def __init__(self, source: Any, settings: DnsSettings, node: str = "", interface: str = "mg0",
                 initial: pb.DesiredState | None = None) -> None:
        self.source = source
        self.settings = settings
        self.default_interface = interface
        self.state = initial
        self.resolver = DomainResolver(settings.nameservers(), min_ttl=settings.dns_min_ttl,
                                       max_ttl=settings.dns_max_ttl, grace=settings.dns_grace,
                                       on_change=self._send, node=node)
        self.server = OverlayDnsServer(settings.nameservers(), self.resolver, settings.dns_port) \
            if settings.dns else None
        self._tasks: list[asyncio.Task] = []
        self._configured_resolver: tuple[str, str, tuple[str, ...]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    async def updates(self) -> AsyncIterator[Update]:
        self._tasks.append(asyncio.create_task(self.resolver.run(), name="egress-domains"))
        try:
            if self.state is not None:
                await self._configure(self.state)
            async for u in self.source.updates():
                if isinstance(u, Snapshot):
                    self.state = u.state
                    await self._configure(u.state)
                    self._send()  # a new stream: the control plane hears it all again
                elif isinstance(u, Delta) and self.state is not None:
                    self.state = apply_delta(self.state, u.delta, u.revision)
                    await self._configure(self.state)
                yield u
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.server is not None:
                await self.server.close()

    async def _configure(self, state: pb.DesiredState) -> None:
        self.resolver.configure([d for e in state.egress for d in e.domains], overlay_networks(state))
        if self.server is None:
            return
        self.server.set_zone(state.dns.zone, {r.name: list(r.addresses) for r in state.dns.records})
        listen = [str(i.ip) for i in _interfaces(state)]
        await self.server.listen_on(listen)
        if self.settings.dns_configure_resolver and state.dns.zone:
            await self._configure_host_resolver(state.interface.name or self.default_interface, state.dns.zone, listen)

    def _send(self) -> None:
        send = getattr(self.source, "send_domains", None)
        if send is not None:
            send(self.resolver.report())

    async def _configure_host_resolver(self, ifname: str, zone: str, addrs: list[str]) -> None:
        want = (ifname, zone, tuple(addrs))
        if want == self._configured_resolver:
            return
        resolvectl = shutil.which("resolvectl")
        if resolvectl is None or not os.path.isdir("/run/systemd/resolve"):  # noqa: ASYNC240 - a stat, once
            log.warning("--dns-configure-resolver: systemd-resolved is not running here; to resolve the overlay's "
                        "names, send the zone %s to %s (see docs/gatewayd.md)", zone, ", ".join(addrs))
            self._configured_resolver = want
            return
        for argv in ([resolvectl, "dns", ifname, *addrs], [resolvectl, "domain", ifname, f"~{zone}"]):
            # (the interface may not exist before the first apply: the next update tries again)
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.PIPE)
            try:
                _, err = await asyncio.wait_for(proc.communicate(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                log.warning("%s did not finish within 10 s", " ".join(argv))
                return
            if proc.returncode != 0:
                log.warning("%s failed: %s", " ".join(argv), err.decode(errors="replace").strip()[:200])
                return
        log.info("systemd-resolved sends %s to %s on %s", zone, ", ".join(addrs), ifname)
        self._configured_resolver = want
