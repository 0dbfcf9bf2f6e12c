"""Egress health: can this node's egress gateways carry their ranges?

For every egress gateway of the node's desired state (`EgressConfig` with a
`gateway` name) the agent checks, every `LINK_CHECK_S` (0.5 s), through
netlink (pyroute2):

- the egress interface, when one is named: it exists, is up and has carrier;
- each range (the first 16): of the main table's routes that carry it (the one
  `ip route get` would pick for its first host, and every route inside the
  range: a gateway may reach only part of it; for a default route, the default
  routes), one leaves outside the overlay (not via meshgate's own interface),
  is unicast, and goes out of an interface that is up and has carrier (a
  pulled cable leaves the route in place, marked linkdown);
- the operator's probes (EgressGateway.probes): ICMP echo (`ping -I <dev>`)
  or a TCP connection (SO_BINDTODEVICE), out of the egress interface (or the
  interface of the main table's route to the target), never through the
  overlay: once an unhealthy gateway's range has moved to a standby, its
  node's own traffic to the range goes through the tunnel, and a probe that
  followed it would report the standby's path as ours (and never fail). A probe turns the gateway unhealthy
  after `failure_threshold` consecutive failures (default 3) and healthy again
  after `success_threshold` consecutive successes (default 2).

A change of any gateway's health is sent at once
(`SyncRequest.EgressHealth`, through `send`), and the whole report again
every `REPORT_EVERY_S` (1 s) and after every reconnection (stream.py), so the
control plane's view (egresshealth.py there) heals on its own; the periodic
report is also the agent's heartbeat: the control plane ends a gateway's
stream that stops carrying them, even when something on the way keeps the
transport alive. The monitor
decides nothing: it reports, and the control plane moves ranges, with
hysteresis.

Hazards: the checks read the kernel in a worker thread (netlink dumps of
links and of the main table: about a millisecond on a small host, more with a
full routing table, hence only the first 16 ranges); probes are child
processes or sockets bound to an interface, so they need the privileges
gatewayd runs with anyway (CAP_NET_RAW, CAP_NET_ADMIN).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.api.v1 import egress_pb2

log = logging.getLogger(__name__)

LINK_CHECK_S = 0.5
REPORT_EVERY_S = 1.0
MAX_RANGES_CHECKED = 16
MAIN_TABLE = 254
RTN_UNICAST = 1
IFF_UP = 0x1
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


@dataclass(frozen=True)
class GatewayHealth:
    gateway: str
    healthy: bool
    reason: str = ""


# -- the kernel's view (netlink) ------------------------------------------------


@dataclass
class Links:
    """Links by index and name, and the main table's usable routes."""

    by_index: dict[int, Any] = field(default_factory=dict)  # pyroute2's link messages
    by_name: dict[str, Any] = field(default_factory=dict)
    routes: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int, list[int]]] = field(default_factory=list)
    """(destination, metric, output interfaces) of the main table's unicast routes."""

    def link_problem(self, name: str) -> str:
        """Why interface `name` cannot carry traffic, or '' when it can."""
        link = self.by_name.get(name)
        if link is None:
            return f"egress interface {name} does not exist"
        return _link_problem(link)

    def route_for(self, target: ipaddress.IPv4Network | ipaddress.IPv6Network,
                  exclude: set[int]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, list[int]] | None:
        """The most specific main-table route covering `target` that leaves
        through an interface other than `exclude`'s."""
        best = None
        for dst, metric, oifs in self.routes:
            if dst.version != target.version or dst.prefixlen > target.prefixlen:
                continue
            if not target.subnet_of(dst):  # type: ignore[arg-type]
                continue
            usable = [i for i in oifs if i not in exclude]
            if not usable:
                continue
            key = (dst.prefixlen, -metric)
            if best is None or key > best[0]:
                best = (key, dst, usable)
        return None if best is None else (best[1], best[2])

    def name_of(self, index: int) -> str:
        link = self.by_index.get(index)
        return link.get_attr("IFLA_IFNAME") if link is not None else f"if{index}"


def _link_problem(link) -> str:
    name = link.get_attr("IFLA_IFNAME")
    if not link["flags"] & IFF_UP:
        return f"{name} is down"
    carrier = link.get_attr("IFLA_CARRIER")
    oper = link.get_attr("IFLA_OPERSTATE")
    if carrier == 0 or oper in ("DOWN", "LOWERLAYERDOWN", "NOTPRESENT"):
        return f"{name} has no carrier"
    return ""


def read_links() -> Links:
    """Links and main-table routes of this network namespace."""
    from pyroute2 import IPRoute

    out = Links()
    with IPRoute() as ipr:
        for link in ipr.get_links():
            out.by_index[link["index"]] = link
            out.by_name[link.get_attr("IFLA_IFNAME")] = link
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=family, table=MAIN_TABLE):
                if r["type"] != RTN_UNICAST:
                    continue
                dst = r.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                try:
                    net = ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False)
                except ValueError:
                    continue
                oifs = [r.get_attr("RTA_OIF")] if r.get_attr("RTA_OIF") else []
                for hop in r.get_attr("RTA_MULTIPATH") or ():
                    oifs.append(hop["oif"])
                out.routes.append((net, r.get_attr("RTA_PRIORITY") or 0, [i for i in oifs if i]))
    return out


def check_paths(configs: Sequence[pb.EgressConfig], overlay_ifname: str, links: Links) -> dict[str, str]:
    """Gateway name -> why its egress path is broken ('' when it is not), from `links`."""
    exclude = {idx for idx, link in links.by_index.items() if link.get_attr("IFLA_IFNAME") == overlay_ifname}
    out: dict[str, str] = {}
    for cfg in configs:
        if not cfg.gateway:
            continue
        problem = links.link_problem(cfg.egress_interface) if cfg.egress_interface else ""
        ranges = list(cfg.ranges)[:MAX_RANGES_CHECKED]
        if cfg.internet_gateway:
            ranges.append("0.0.0.0/0")
        for r in ranges if not problem else ():
            try:
                net = ipaddress.ip_network(r, strict=False)
            except ValueError:
                continue
            # The routes that carry (part of) the range: the one the kernel picks
            # for its first host (as `ip route get` would), and every route inside
            # it (a gateway may reach only part of a range, a host or a subnet).
            first = net.network_address + (1 if net.num_addresses > 2 else 0)
            candidates = []
            found = links.route_for(ipaddress.ip_network(first), exclude) if net.prefixlen else None
            if found is not None:
                candidates.append(found)
            for dst, _, oifs in links.routes:
                usable = [i for i in oifs if i not in exclude]
                if not usable or dst.version != net.version or (found is not None and dst == found[0]):
                    continue
                if (dst.prefixlen == 0) if net.prefixlen == 0 else dst.subnet_of(net):  # type: ignore[arg-type]
                    candidates.append((dst, usable))
            if not candidates:
                problem = f"no route to {r} outside the overlay"
                break
            problems = []
            for dst, oifs in candidates:
                why = [_link_problem(links.by_index[i]) if i in links.by_index else f"interface {i} is gone"
                       for i in oifs]
                problems.append("" if not all(why) else f"route to {r} (via {dst}): {why[0]}")
            if all(problems):
                problem = problems[0]
                break
        out[cfg.gateway] = problem
    return out


# -- probes -----------------------------------------------------------------------


def _seconds(d, default: float) -> float:
    s = d.seconds + d.nanos / 1e9
    return s if s > 0 else default


@dataclass
class Probe:
    """One probe's settings and its hysteresis state."""

    gateway: str
    protocol: int
    target: str
    port: int
    interval: float
    timeout: float
    failures_to_fail: int
    successes_to_heal: int
    egress_interface: str = ""
    healthy: bool = True
    failures: int = 0
    successes: int = 0
    last_error: str = ""

    @classmethod
    def of(cls, gateway: str, egress_interface: str, p: egress_pb2.EgressProbe) -> Probe:
        interval = _seconds(p.interval, 1.0)
        return cls(gateway, p.protocol, p.target, p.port, interval,
                   _seconds(p.timeout, min(interval, 1.0)), p.failure_threshold or 3, p.success_threshold or 2,
                   egress_interface)

    def key(self) -> tuple:
        return (self.gateway, self.protocol, self.target, self.port, self.interval, self.timeout,
                self.failures_to_fail, self.successes_to_heal, self.egress_interface)

    @property
    def label(self) -> str:
        proto = "icmp" if self.protocol == egress_pb2.EgressProbe.ICMP else "tcp"
        return f"probe {proto} {self.target}" + (f":{self.port}" if self.port else "")

    def record(self, ok: bool, error: str = "") -> bool:
        """Count one result; True when the probe's health changed."""
        if ok:
            self.failures, self.successes = 0, self.successes + 1
            if not self.healthy and self.successes >= self.successes_to_heal:
                self.healthy = True
                return True
        else:
            self.successes, self.failures, self.last_error = 0, self.failures + 1, error
            if self.healthy and self.failures >= self.failures_to_fail:
                self.healthy = False
                return True
        return False

    @property
    def reason(self) -> str:
        return f"{self.label}: {self.failures_to_fail} failures in a row ({self.last_error})"


async def ping(target: str, device: str, timeout: float) -> str:
    """One ICMP echo out of `device`: '' when answered, else why not."""
    proc = await asyncio.create_subprocess_exec(
        "ping", "-n", "-q", "-c", "1", "-W", f"{max(timeout, 0.01):.3f}", "-I", device, target,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        code = await asyncio.wait_for(proc.wait(), timeout + 2)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return "no answer"
    return "" if code == 0 else "no answer"


async def tcp_connect(target: str, port: int, device: str, timeout: float) -> str:
    """One TCP connection out of `device`: '' when established, else why not."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, device.encode())
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (target, port)), timeout)
        return ""
    except TimeoutError:
        return "timed out"
    except OSError as e:
        return e.strerror or type(e).__name__
    finally:
        s.close()


# -- the monitor --------------------------------------------------------------------


Sender = Callable[[list[GatewayHealth]], Awaitable[None]]


class EgressHealthMonitor:
    """Checks the egress paths of the gateways in `current()`'s state and reports changes."""

    def __init__(self, send: Sender, current: Callable[[], tuple[pb.DesiredState | None, str]],
                 link_check_s: float = LINK_CHECK_S, report_every_s: float = REPORT_EVERY_S,
                 reader: Callable[[], Links] = read_links) -> None:
        self.send = send
        self.current = current
        self.link_check_s = link_check_s
        self.report_every_s = report_every_s
        self.reader = reader
        self.paths: dict[str, str] = {}
        self.probes: dict[tuple, Probe] = {}
        self._probe_tasks: dict[tuple, asyncio.Task] = {}
        self._links = Links()
        self._changed = asyncio.Event()
        self.last: list[GatewayHealth] = []
        self.reports_sent = 0

    def health(self, configs: Sequence[pb.EgressConfig]) -> list[GatewayHealth]:
        out = []
        for cfg in configs:
            if not cfg.gateway:
                continue
            reason = self.paths.get(cfg.gateway, "")
            if not reason:
                failing = [p for p in self.probes.values() if p.gateway == cfg.gateway and not p.healthy]
                reason = "; ".join(p.reason for p in failing)
            out.append(GatewayHealth(cfg.gateway, not reason, reason[:256]))
        return sorted(out, key=lambda g: g.gateway)

    async def run(self) -> None:
        last_sent = -1e9
        try:
            while True:
                msg, ifname = self.current()
                configs = [c for c in msg.egress if c.gateway] if msg is not None else []
                self._configure(configs)
                if configs:
                    try:
                        self._links = await asyncio.to_thread(self.reader)
                        self.paths = check_paths(configs, ifname, self._links)
                    except Exception as e:  # noqa: BLE001 - a failed read says nothing about the path
                        log.warning("could not read links and routes for egress health: %s", e)
                now = time.monotonic()
                report = self.health(configs)
                if report != self.last or (report and now - last_sent >= self.report_every_s):
                    for g in report:
                        if g not in self.last:
                            (log.info if g.healthy else log.warning)(
                                "egress %s: %s", g.gateway, "healthy" if g.healthy else f"UNHEALTHY: {g.reason}")
                    self.last = report
                    last_sent = now
                    try:
                        await self.send(report)
                        self.reports_sent += 1
                    except Exception as e:  # noqa: BLE001 - the next report follows
                        log.warning("could not report egress health: %s", e)
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), self.link_check_s)
                except TimeoutError:
                    pass
        finally:
            for t in self._probe_tasks.values():
                t.cancel()
            await asyncio.gather(*self._probe_tasks.values(), return_exceptions=True)

    def _configure(self, configs: Sequence[pb.EgressConfig]) -> None:
        wanted = {}
        for cfg in configs:
            for p in cfg.probes:
                probe = Probe.of(cfg.gateway, cfg.egress_interface, p)
                wanted[probe.key()] = probe
        for key in [k for k in self._probe_tasks if k not in wanted]:
            self._probe_tasks.pop(key).cancel()
            self.probes.pop(key, None)
        for key, probe in wanted.items():
            if key not in self._probe_tasks:
                self.probes[key] = probe
                self._probe_tasks[key] = asyncio.create_task(self._probe_loop(probe), name=f"probe {probe.label}")

    def _device_for(self, probe: Probe) -> str:
        if probe.egress_interface:
            return probe.egress_interface
        msg, ifname = self.current()
        exclude = {i for i, link in self._links.by_index.items() if link.get_attr("IFLA_IFNAME") == ifname}
        found = self._links.route_for(ipaddress.ip_network(probe.target), exclude)
        return self._links.name_of(found[1][0]) if found else ""

    async def _probe_loop(self, probe: Probe) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            device = self._device_for(probe)
            if not device:
                error = "no route outside the overlay"
            elif probe.protocol == egress_pb2.EgressProbe.ICMP:
                error = await ping(probe.target, device, probe.timeout)
            else:
                error = await tcp_connect(probe.target, probe.port, device, probe.timeout)
            if probe.record(not error, error):
                self._changed.set()
            await asyncio.sleep(max(0.0, probe.interval - (loop.time() - started)))


def start(source, current: Callable[[], tuple[pb.DesiredState | None, str]]) -> asyncio.Task | None:
    """The monitor's task, reporting through `source.send_egress_health`; None
    for a source that takes no reports (a file)."""
    send = getattr(source, "send_egress_health", None)
    if send is None:
        return None
    return asyncio.create_task(EgressHealthMonitor(send, current).run(), name="egress-health")
