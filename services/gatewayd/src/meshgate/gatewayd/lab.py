"""Throwaway hosts made of network namespaces, for gatewayd's system tests, the egress
demonstration and the benchmarks.

A ``Lab`` owns everything it makes and removes it, by name and by PID, on ``close()``
(also when used as a context manager): the gatewayd and helper processes it spawned,
the wireguard-go processes its nodes' gatewayd started (PIDs from their state
directories, checked against ``/proc/<pid>/cmdline`` before any signal), its network
namespaces (which takes their veths with them) and its temporary directory.  Nothing
is ever found or killed by name pattern.

Names carry a random token: namespaces are ``mg-<token>-<role>``, WireGuard
interfaces ``mg<token><role>``; wireguard-go's UAPI sockets live in the global
``/var/run/wireguard``, so interface names must be unique across the whole host.

Addresses come only from the documentation ranges and 100.64.0.0/10.

Besides gatewayd nodes, a host can carry a plain WireGuard interface
(``Lab.plain_wireguard``: wireguard-go configured with ``wg`` from wg-quick style
text), standing in for an external client such as a laptop.

Also a tiny TCP "who am I" service (``python -m meshgate.gatewayd.lab whoami``) that
answers each connection with the peer address it sees, and its client (``ask``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.gatewayd.wireguard.uapi import socket_path

PY = sys.executable
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,15}")


class LabError(RuntimeError):
    pass


def _run(argv: list[str], check: bool = True, input: str | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout,
                       check=False)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def can_run() -> str | None:
    """None when this host can run lab tests, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, WireGuard, nftables)"
    for tool in ("ip", "nft", "wireguard-go", "wg"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun for wireguard-go"
    probe = f"mg-probe-{secrets.token_hex(3)}"
    r = _run(["ip", "netns", "add", probe], check=False)
    if r.returncode != 0:
        return f"cannot create network namespaces: {r.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


@dataclass
class Host:
    lab: Lab
    name: str

    def run(self, *argv: str, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", self.name, *argv], check=check, input=input,
                    timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "-n", self.name, *args], check=check)

    def spawn(self, *argv: str, **kw: Any) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], text=True, **kw)
        self.lab.procs.append(p)
        return p

    def forward(self, addr: str, port: int, unix_path: str) -> subprocess.Popen:
        """Relay TCP ``addr:port`` in this host to a Unix socket (``python -m
        meshgate.gatewayd.lab forward``); stopped by the lab."""
        p = self.spawn(PY, "-m", "meshgate.gatewayd.lab", "forward", addr, str(port), unix_path)
        line = p.stdout.readline() if p.stdout else ""
        if not line.startswith("ready"):
            raise LabError(f"forwarder in {self.name} did not start: {line!r} "
                           f"{p.stderr.read() if p.stderr else ''}")
        return p

    def whoami_server(self, addr: str, port: int) -> subprocess.Popen:
        p = self.spawn(PY, "-m", "meshgate.gatewayd.lab", "whoami", addr, str(port))
        line = p.stdout.readline() if p.stdout else ""
        if not line.startswith("ready"):
            raise LabError(f"whoami server in {self.name} did not start: {line!r} "
                           f"{p.stderr.read() if p.stderr else ''}")
        return p

    def ask(self, addr: str, port: int, timeout: float = 5.0) -> str | None:
        """The address the whoami server at addr:port sees us as; None if unreachable."""
        r = self.run(PY, "-m", "meshgate.gatewayd.lab", "ask", addr, str(port),
                     "--timeout", str(timeout), check=False, timeout=timeout + 30)
        return r.stdout.strip() if r.returncode == 0 else None

    def wait_reachable(self, addr: str, timeout: float = 30) -> None:
        """Until a ping to `addr` is answered. Across a tunnel, the first
        handshake after the agents converge can race one side's first apply,
        and WireGuard then retries after 5 s: loss measurements start here."""
        deadline = time.monotonic() + timeout
        while self.run("ping", "-n", "-c", "1", "-W", "1", addr, check=False).returncode != 0:
            if time.monotonic() >= deadline:
                raise LabError(f"{addr} never answered a ping from {self.name} within {timeout:.0f}s")

    def route_dev(self, dst: str, mark: int | None = None) -> str:
        args = ["-json", "route", "get", dst] + (["mark", str(mark)] if mark else [])
        return json.loads(self.ip(*args).stdout)[0].get("dev", "")


@dataclass
class Node:
    """A gatewayd node: a host, its WireGuard interface name and its state directory."""

    host: Host
    ifname: str
    state_dir: Path
    public_key: str = ""
    daemon: subprocess.Popen | None = None
    backend: str = "userspace"
    _n: int = 0

    def gatewayd(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return self.host.run(PY, "-m", "meshgate.gatewayd", *args, "--state-dir",
                             str(self.state_dir), "--backend", self.backend, check=check)

    def write(self, msg: pb.DesiredState, name: str = "desired.json") -> Path:
        path = self.state_dir.parent / f"{self.state_dir.name}-{name}"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json_format.MessageToJson(msg))
        os.replace(tmp, path)
        return path

    def apply(self, msg: pb.DesiredState, check: bool = True) -> subprocess.CompletedProcess:
        self._n += 1
        path = self.write(msg, f"apply{self._n}.json")
        r = self.gatewayd("apply", "--file", str(path))
        if check and r.returncode != 0:
            raise LabError(f"gatewayd apply in {self.host.name} failed ({r.returncode}):\n"
                           f"{r.stdout}\n{r.stderr}")
        return r

    def start(self, msg: pb.DesiredState | None = None, resync: float = 3600.0,
              env: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        """``gatewayd run``: following ``msg`` through a file when given, else the
        control plane it joined (or the state on disk); ``extra`` flags appended."""
        args = [PY, "-m", "meshgate.gatewayd", "run", "--state-dir", str(self.state_dir),
                "--backend", self.backend, "--resync-interval", str(resync),
                "--interface", self.ifname, *extra]
        if msg is not None:
            args += ["--file", str(self.write(msg))]
        log = open(self.log_path, "a")
        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        self.daemon = self.host.spawn(*args, stdout=log, stderr=log, env=full_env)
        log.close()
        return self.daemon

    @property
    def log_path(self) -> Path:
        return self.state_dir.parent / f"{self.state_dir.name}-daemon.log"

    def join(self, control_plane: str, secret: str, node_id: str, endpoint: str = "", *,
             authority_keys: tuple[bytes, ...] = (), insecure_no_authority: bool = False,
             insecure: bool = False, accept_default_route: bool = False, extra: tuple[str, ...] = ()) -> str:
        """``gatewayd join``; returns its output (the node name and addresses).
        ``insecure_no_authority`` is needed against a control plane without a key
        service (its enrollment secrets pin no authority); ``extra`` flags appended."""
        r = self.join_result(control_plane, secret, node_id, endpoint, authority_keys=authority_keys,
                             insecure_no_authority=insecure_no_authority, insecure=insecure,
                             accept_default_route=accept_default_route, extra=extra)
        if r.returncode != 0:
            raise LabError(f"gatewayd join in {self.host.name} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def join_result(self, control_plane: str, secret: str, node_id: str, endpoint: str = "", *,
                    authority_keys: tuple[bytes, ...] = (), insecure_no_authority: bool = False,
                    insecure: bool = False, accept_default_route: bool = False,
                    extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """``gatewayd join`` as it ran (for tests of a refused join)."""
        import base64

        args = [PY, "-m", "meshgate.gatewayd", "join", "--key-file", str(self._secret_file(secret)),
                "--control-plane", control_plane, "--node-id", node_id, "--endpoint", endpoint,
                "--state-dir", str(self.state_dir), "--backend", self.backend]
        for k in authority_keys:
            args += ["--authority-key", base64.b64encode(k).decode()]
        args += ["--insecure-no-authority"] if insecure_no_authority else []
        args += ["--insecure"] if insecure else []
        args += ["--accept-default-route"] if accept_default_route else []
        return self.host.run(*args, *extra, check=False)

    def _secret_file(self, secret: str) -> Path:
        path = self.state_dir.parent / f"{self.state_dir.name}-enroll.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secret.encode())
        finally:
            os.close(fd)
        return path

    def follow(self, msg: pb.DesiredState) -> None:
        """Change the desired state a running ``gatewayd run --file`` follows."""
        self.write(msg)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(sig)
            self.daemon.wait(10)
        self.daemon = None

    def signal(self, sig: int) -> None:
        assert self.daemon is not None
        self.daemon.send_signal(sig)

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_status(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st and pred(st):
                return st
            if self.daemon is not None and self.daemon.poll() is not None:
                raise LabError(f"gatewayd in {self.host.name} exited with {self.daemon.returncode}")
            time.sleep(0.05)
        raise LabError(f"gatewayd status never matched; last: {self.status()}")

    def wait_applied(self, revision: int, timeout: float = 30) -> dict[str, Any]:
        """Until the agent's status says it applied ``revision`` (or a later one)."""
        return self.wait_status(lambda st: st.get("state") == "applied"
                                and (st.get("applied_revision") or 0) >= revision, timeout)

    def wg_public_key(self) -> str:
        """The public key the WireGuard interface uses now (``wg show <if> public-key``)."""
        return self.host.run("wg", "show", self.ifname, "public-key").stdout.strip()

    def wg_pid(self) -> int | None:
        try:
            return int((self.state_dir / f"wireguard-go.{self.ifname}.pid").read_text())
        except (OSError, ValueError):
            return None

    def peers(self) -> dict[str, dict[str, Any]]:
        """``wg show dump`` per peer: handshake time, transfer counters, allowed IPs."""
        return wg_dump_peers(self.host.run("wg", "show", self.ifname, "dump").stdout)


def wg_dump_peers(dump: str) -> dict[str, dict[str, Any]]:
    """The peers of ``wg show <if> dump`` output, by public key."""
    out = {}
    for line in dump.splitlines()[1:]:
        f = line.split("\t")
        out[f[0]] = {"endpoint": f[2], "allowed_ips": f[3], "handshake": int(f[4]),
                     "rx": int(f[5]), "tx": int(f[6]), "keepalive": f[7]}
    return out


# ---------------------------------------------------------------- plain WireGuard hosts

# keys of a wg-quick file that `wg setconf` does not know ([Interface] only)
_WG_QUICK_ONLY = {"address", "dns", "mtu", "table", "saveconfig"}
_WG_QUICK_HOOKS = {"preup", "postup", "predown", "postdown"}


@dataclass(frozen=True)
class WgQuickConfig:
    """A wg-quick style configuration, split into what ``wg setconf`` takes and what
    wg-quick itself does (addresses, DNS, MTU, routing table)."""

    wg_text: str
    """The configuration without the wg-quick-only keys: input for ``wg setconf``."""
    addresses: tuple[str, ...]
    dns: tuple[str, ...]
    mtu: int | None
    table: str
    """``auto`` (routes for the allowed IPs; a /0 with wg-quick's fwmark rules),
    ``off`` (no routes) or a table number."""
    allowed_ips: tuple[str, ...]
    """Every peer's allowed IPs as written (routes use ``wg show``'s canonical form)."""


def parse_wg_quick(text: str) -> WgQuickConfig:
    """Split a wg-quick configuration (``[Interface]`` PrivateKey/Address/DNS/...,
    ``[Peer]`` PublicKey/PresharedKey/Endpoint/AllowedIPs/PersistentKeepalive).

    Keys are matched case-insensitively, ``#`` starts a comment, and list values are
    comma separated, as in wg(8) and wg-quick(8).  PreUp/PostUp/PreDown/PostDown are
    refused: the lab never runs commands a configuration names.
    """
    out: list[str] = []
    addresses: list[str] = []
    dns: list[str] = []
    allowed: list[str] = []
    mtu: int | None = None
    table = "auto"
    section = ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            if section not in ("interface", "peer"):
                raise LabError(f"wg-quick config line {n}: unknown section {line}")
            out.append(f"[{'Interface' if section == 'interface' else 'Peer'}]")
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not section:
            raise LabError(f"wg-quick config line {n}: expected `Key = value` inside a section")
        lkey = key.lower()
        values = [x.strip() for x in value.split(",") if x.strip()]
        if section == "interface" and lkey in _WG_QUICK_HOOKS:
            raise LabError(f"wg-quick config line {n}: {key} is not supported (no commands are run)")
        if section == "interface" and lkey in _WG_QUICK_ONLY:
            if lkey == "address":
                addresses += values
            elif lkey == "dns":
                dns += values
            elif lkey == "mtu":
                if not value.isdigit():
                    raise LabError(f"wg-quick config line {n}: MTU {value!r} is not a number")
                mtu = int(value)
            elif lkey == "table":
                table = value.lower()
                if table not in ("auto", "off") and not table.isdigit():
                    raise LabError(f"wg-quick config line {n}: Table {value!r} is not auto, off or a number")
            continue  # SaveConfig: nothing to save
        if section == "peer" and lkey == "allowedips":
            allowed += values
        out.append(f"{key} = {value}")
    return WgQuickConfig("\n".join(out) + "\n", tuple(addresses), tuple(dns), mtu, table,
                         tuple(allowed))


@dataclass
class PlainWireGuard:
    """A WireGuard interface that no gatewayd manages: ``wireguard-go`` configured
    with ``wg``, the way wg-quick brings up a configuration file (an external
    client such as a laptop).  Made by ``Lab.plain_wireguard``."""

    host: Host
    ifname: str
    config: WgQuickConfig
    process: subprocess.Popen
    rules: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.config.addresses

    def wg(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return self.host.run("wg", *args, input=input)

    def public_key(self) -> str:
        return self.wg("show", self.ifname, "public-key").stdout.strip()

    def syncconf(self, text: str) -> None:
        """``wg syncconf`` with a new configuration's WireGuard part (keys, peers):
        changed peers only, sessions of the others kept.  Addresses, DNS and routes
        stay as they were brought up."""
        self.wg("syncconf", self.ifname, "/dev/stdin", input=parse_wg_quick(text).wg_text)

    def peers(self) -> dict[str, dict[str, Any]]:
        """``wg show dump`` per peer: handshake time, transfer counters, allowed IPs."""
        return wg_dump_peers(self.wg("show", self.ifname, "dump").stdout)

    def down(self) -> None:
        """Remove the interface (its addresses and routes go with it) and the policy
        rules ``up`` added."""
        for rule in reversed(self.rules):
            self.host.ip(*rule[:1], "rule", "del", *rule[1:], check=False)
        self.rules.clear()
        _stop(self.process)

    def _up(self) -> None:
        cfg = self.config
        self.wg("setconf", self.ifname, "/dev/stdin", input=cfg.wg_text)
        for a in cfg.addresses:
            self.host.ip("-6" if ":" in a else "-4", "address", "add", a, "dev", self.ifname)
        self.host.ip("link", "set", self.ifname, "mtu", str(cfg.mtu or 1420), "up")
        if cfg.table == "off":
            return
        # as wg-quick: the canonical allowed IPs, most specific first
        shown = self.wg("show", self.ifname, "allowed-ips").stdout
        nets = sorted({x for line in shown.splitlines() for x in line.split()[1:] if x != "(none)"},
                      key=lambda x: (-int(x.rsplit("/", 1)[1]), x))
        for net in nets:
            fam = "-6" if ":" in net else "-4"
            if cfg.table != "auto":
                self.host.ip(fam, "route", "add", net, "dev", self.ifname, "table", cfg.table)
            elif net.endswith("/0"):
                self._add_default(fam, net)
            elif not self.host.ip(fam, "route", "show", "dev", self.ifname, "match", net).stdout.strip():
                self.host.ip(fam, "route", "add", net, "dev", self.ifname)

    def _add_default(self, fam: str, net: str) -> None:
        """wg-quick's default route: the tunnel's own packets carry a fwmark and keep
        the main table; everything else uses a table with the default route, except
        where the main table has something more specific than its default."""
        mark = self.wg("show", self.ifname, "fwmark").stdout.strip()
        if mark in ("", "off"):
            table = 51820
            while any(self.host.ip(f, "route", "show", "table", str(table), check=False).stdout.strip()
                      for f in ("-4", "-6")):
                table += 1
            self.wg("set", self.ifname, "fwmark", str(table))
        else:
            table = int(mark, 0)
        for rule in ((fam, "not", "fwmark", str(table), "table", str(table)),
                     (fam, "table", "main", "suppress_prefixlength", "0")):
            self.host.ip(rule[0], "rule", "add", *rule[1:])
            self.rules.append(rule)
        self.host.ip(fam, "route", "add", net, "dev", self.ifname, "table", str(table))
        if fam == "-4":
            self.host.run("sysctl", "-q", "net.ipv4.conf.all.src_valid_mark=1")


class Lab:
    def __init__(self, workdir: Path | None = None, prefix: str = "mg"):
        """`prefix` starts every name the lab makes (``mg``: namespaces
        ``mg-<token>-<role>``, interfaces ``mg<token><role>``), so a suite can
        keep its own apart from others running at the same time."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", prefix):
            raise LabError(f"lab prefix {prefix!r}: 1-6 lowercase letters and digits, a letter first")
        self.prefix = prefix
        self.token = self._fresh_token()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{prefix}lab-{self.token}-", dir=workdir))
        self.hosts: list[Host] = []
        self.nodes: list[Node] = []
        self.procs: list[subprocess.Popen] = []
        self.plain: list[PlainWireGuard] = []
        self._wg_seen: dict[str, int] = {}
        self._closed = False

    def _fresh_token(self) -> str:
        existing = _run(["ip", "netns", "list"], check=False).stdout
        while True:
            t = secrets.token_hex(2)
            if f"{self.prefix}-{t}-" not in existing and not any(
                    p.name.startswith(f"{self.prefix}{t}") for p in socket_path("x").parent.glob("*.sock")):
                return t

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, role: str) -> Host:
        h = Host(self, f"{self.prefix}-{self.token}-{role}")
        _run(["ip", "netns", "add", h.name])
        self.hosts.append(h)
        h.ip("link", "set", "lo", "up")
        return h

    def wire(self, a: Host, a_if: str, a_addr: str, b: Host, b_if: str, b_addr: str) -> None:
        """A veth pair between two hosts, addressed (``addr/prefix``) and up."""
        a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
        for h, ifn, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            h.ip("address", "add", addr, "dev", ifn)
            h.ip("link", "set", ifn, "up")

    def node(self, host: Host, role: str) -> Node:
        from meshgate.gatewayd.keys import load_or_create

        state = self.dir / f"{role}-state"
        n = Node(host, f"{self.prefix}{self.token}{role}"[:15], state)
        n.public_key = load_or_create(state)[1]
        self.nodes.append(n)
        return n

    def ifname(self, role: str) -> str:
        """A WireGuard interface name unique on this host (``<prefix><token><role>``, at
        most 15 characters): wireguard-go's UAPI sockets are not per namespace."""
        name = f"{self.prefix}{self.token}{role}"[:15]
        used = {n.ifname for n in self.nodes} | set(self._wg_seen) | {w.ifname for w in self.plain}
        if name in used or socket_path(name).exists():
            raise LabError(f"interface name {name!r} (role {role!r}) is already in use")
        return name

    def plain_wireguard(self, host: Host, ifname: str, config: str) -> PlainWireGuard:
        """Bring up a WireGuard interface in ``host`` the way ``wg-quick up`` would, with
        no gatewayd: ``wireguard-go -f <ifname>``, then ``wg setconf`` with ``config``
        minus the wg-quick-only keys (Address, DNS, MTU, Table, SaveConfig), the
        addresses added, the link up (MTU 1420 unless given), and a route via the
        interface for every peer's allowed IPs (a /0 the wg-quick way: fwmark,
        ``not fwmark`` rule and ``suppress_prefixlength 0``).

        ``config`` is wg-quick text, e.g. an external client's configuration file.  DNS
        is kept in ``.config.dns``, not applied; PreUp/PostUp/... are refused.
        ``ifname`` must be unique on the host (see ``ifname``).  The process is the
        lab's: ``close`` stops it and checks that its UAPI socket is gone.
        """
        if not _IFNAME_RE.fullmatch(ifname):
            raise LabError(f"{ifname!r} is not a valid interface name")
        if socket_path(ifname).exists():
            raise LabError(f"{socket_path(ifname)} exists: {ifname} is in use on this host")
        cfg = parse_wg_quick(config)
        log = open(self.dir / f"wireguard-go.{ifname}.log", "ab")
        try:
            proc = host.spawn("wireguard-go", "-f", ifname, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error"))
        finally:
            log.close()
        w = PlainWireGuard(host, ifname, cfg, proc)
        self.plain.append(w)
        deadline = time.monotonic() + 15
        while host.run("wg", "show", ifname, check=False).returncode != 0:
            if proc.poll() is not None:
                raise LabError(f"wireguard-go {ifname} in {host.name} exited with {proc.returncode}: "
                               f"{(self.dir / f'wireguard-go.{ifname}.log').read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise LabError(f"wireguard-go {ifname} in {host.name} did not open its UAPI socket")
            time.sleep(0.02)
        w._up()
        return w

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for n in self.nodes:
            try:
                n.stop(signal.SIGTERM)
            except Exception:  # noqa: BLE001 - teardown: one node's failure must not leak the rest
                pass
        for p in self.procs:
            _stop(p)
        for ifname, pid in self._recorded_wg():
            if _is_wg(pid, ifname):
                _kill_pid(pid)
        for h in reversed(self.hosts):
            _run(["ip", "netns", "del", h.name], check=False)
        for ifname in [i for i, _ in self._recorded_wg()] + [w.ifname for w in self.plain]:
            # wireguard-go removes its socket on SIGTERM; a SIGKILLed one leaves it
            sock = socket_path(ifname)
            if sock.exists():
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(str(sock))
                    s.close()
                except OSError:
                    sock.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of this lab still exists (should be nothing after ``close``)."""
        out = []
        ns = _run(["ip", "netns", "list"], check=False).stdout
        out += [h.name for h in self.hosts if h.name in ns]
        out += [f"pid {p.pid}" for p in self.procs if p.poll() is None]
        for ifname, pid in self._recorded_wg():
            if socket_path(ifname).exists():
                out.append(str(socket_path(ifname)))
            if _is_wg(pid, ifname):
                out.append(f"wireguard-go pid {pid}")
        out += [str(socket_path(w.ifname)) for w in self.plain if socket_path(w.ifname).exists()]
        return out

    def _recorded_wg(self) -> list[tuple[str, int]]:
        """(interface, PID) of every wireguard-go any of this lab's gatewayds started,
        whatever interface names the tests switched to (records survive in memory
        after the state directories are removed)."""
        for n in self.nodes:
            for f in n.state_dir.glob("wireguard-go.*.pid") if n.state_dir.exists() else []:
                try:
                    self._wg_seen[f.name[len("wireguard-go."):-len(".pid")]] = int(f.read_text())
                except (OSError, ValueError):
                    pass
        return sorted(self._wg_seen.items())


def _is_wg(pid: int, ifname: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and argv[0].endswith(b"wireguard-go") and ifname.encode() in argv


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(200):
        if not Path(f"/proc/{pid}").exists():
            return
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    for f in (p.stdout, p.stderr):
        if f:
            f.close()


# ---------------------------------------------------------------- the egress topology


@dataclass
class Egress:
    """client(s) --203.0.113.0/24-- gateway --198.51.100.0/24-- external service host.

    Each client also has a LAN host on 192.0.2.0/24 that must be reached directly.
    The external host has no route to the clients' underlay or overlay, so it is
    reachable only through the gateway.
    """

    lab: Lab
    gw: Node
    ext: Host
    clients: list[Node]
    lans: list[Host]
    listen_port: int = 51820
    ext_addr: str = "198.51.100.10"
    gw_ext_addr: str = "198.51.100.1"
    extra: dict[str, Any] = field(default_factory=dict)

    def gw_underlay(self, i: int) -> str:
        return f"203.0.113.{16 * i + 1}"

    def client_underlay(self, i: int) -> str:
        return f"203.0.113.{16 * i + 2}"

    @staticmethod
    def overlay(i: int | None) -> str:
        """The overlay address of client ``i`` (the gateway for None)."""
        return "100.64.0.1" if i is None else f"100.64.0.{i + 2}"

    def gateway_state(self, nat: bool = True, internet_gateway: bool = False,
                      ranges: tuple[str, ...] = ("198.51.100.0/24",), revision: int = 1,
                      **client_overrides: Any) -> pb.DesiredState:
        msg = pb.DesiredState(node="networks/lab/nodes/gateway", revision=revision)
        msg.interface.name = self.gw.ifname
        msg.interface.addresses.append("100.64.0.1/24")
        msg.interface.listen_port = self.listen_port
        for i, c in enumerate(self.clients):
            p = msg.peers.add(public_key=c.public_key, resource=f"networks/lab/nodes/client{i}")
            p.allowed_ips.append(f"{self.overlay(i)}/32")
            for k, v in client_overrides.get(f"client{i}", {}).items():
                if k == "allowed_ips":
                    p.allowed_ips.extend(v)
                else:
                    setattr(p, k, v)
        e = msg.egress.add(nat=nat, internet_gateway=internet_gateway)
        if not internet_gateway:
            e.ranges.extend(ranges)
        e.source_ranges.append("100.64.0.0/24")
        return msg

    def client_state(self, i: int, internet_gateway: bool = False,
                     ranges: tuple[str, ...] = ("198.51.100.0/24",), revision: int = 1,
                     preshared_key: str = "") -> pb.DesiredState:
        c = self.clients[i]
        msg = pb.DesiredState(node=f"networks/lab/nodes/client{i}", revision=revision)
        msg.interface.name = c.ifname
        msg.interface.addresses.append(f"{self.overlay(i)}/24")
        p = msg.peers.add(public_key=self.gw.public_key, resource="networks/lab/nodes/gateway",
                          endpoint=f"{self.gw_underlay(i)}:{self.listen_port}",
                          preshared_key=preshared_key)
        p.allowed_ips.append("100.64.0.1/32")
        if internet_gateway:
            p.allowed_ips.append("0.0.0.0/0")
            msg.default_route_via_peer = self.gw.public_key
        else:
            p.allowed_ips.extend(ranges)
            for r in ranges:
                msg.routes.add(destination=r, via_peer=self.gw.public_key)
        return msg


def build_egress(lab: Lab, clients: int = 1) -> Egress:
    gwh = lab.host("gw")
    ext = lab.host("ext")
    lab.wire(gwh, "eth-ext", "198.51.100.1/24", ext, "eth0", "198.51.100.10/24")
    cl_nodes, lans = [], []
    for i in range(clients):
        ch = lab.host(f"c{i}")
        lab.wire(gwh, f"eth-c{i}", f"203.0.113.{16 * i + 1}/28", ch, "eth0", f"203.0.113.{16 * i + 2}/28")
        # the client's ISP path: everything else goes to the gateway's underlay address
        ch.ip("route", "add", "default", "via", f"203.0.113.{16 * i + 1}")
        lan = lab.host(f"l{i}")
        lab.wire(ch, "eth-lan", "192.0.2.1/24", lan, "eth0", "192.0.2.10/24")
        lan.ip("route", "add", "default", "via", "192.0.2.1")
        cl_nodes.append(lab.node(ch, f"c{i}"))
        lans.append(lan)
    return Egress(lab, lab.node(gwh, "gw"), ext, cl_nodes, lans)


# ---------------------------------------------------------------- whoami service


def _whoami(addr: str, port: int) -> None:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    print("ready", flush=True)
    while True:
        conn, peer = s.accept()
        with conn:
            try:
                conn.sendall(f"{peer[0]}\n".encode())
            except OSError:
                pass


def _ask(addr: str, port: int, timeout: float) -> int:
    try:
        with socket.create_connection((addr, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = s.recv(256).decode().strip()
    except OSError as e:
        print(f"unreachable: {e}", file=sys.stderr)
        return 1
    print(data)
    return 0


def _forward(addr: str, port: int, unix_path: str) -> None:
    """Accept TCP on addr:port and relay each connection to a Unix socket (a
    control plane on a Unix socket, reached as a non-loopback TCP address from a
    lab host)."""
    import asyncio

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_unix_connection(unix_path)
        except OSError:
            w.close()
            return
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    async def serve() -> None:
        server = await asyncio.start_server(handle, addr, port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshgate.gatewayd.lab")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("whoami", help="answer each TCP connection with the peer's address")
    w.add_argument("addr")
    w.add_argument("port", type=int)
    a = sub.add_parser("ask", help="print what a whoami server sees us as")
    a.add_argument("addr")
    a.add_argument("port", type=int)
    a.add_argument("--timeout", type=float, default=5.0)
    f = sub.add_parser("forward", help="relay TCP connections on addr:port to a Unix socket")
    f.add_argument("addr")
    f.add_argument("port", type=int)
    f.add_argument("unix_path")
    args = p.parse_args(argv)
    if args.cmd == "whoami":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _whoami(args.addr, args.port)
        return 0
    if args.cmd == "forward":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _forward(args.addr, args.port, args.unix_path)
        return 0
    return _ask(args.addr, args.port, args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())


# ---------------------------------------------------------------- a control plane to drive


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends an API token with every call (the admin API requires one)."""

    def __init__(self, token: str) -> None:
        self.md = ("authorization", f"Bearer {token}")

    def _with(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self.md])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with(details), request)


class ControlPlaneView:
    """The API of a running control plane, as the demo and the system tests use
    it: `target` for calls from this process, `agent_target` (a Unix socket,
    which crosses network namespaces) for agents in the lab's hosts."""

    def __init__(self, target: str, agent_target: str, network: str = "networks/lab", token: str = ""):
        import grpc

        from meshgate.api.v1 import egress_pb2_grpc, enrollment_pb2_grpc, network_pb2_grpc

        self.target, self.agent_target, self.network = target, agent_target, network
        self.channel = grpc.insecure_channel(target)
        if token:
            self.channel = grpc.intercept_channel(self.channel, _BearerToken(token))
        self.networks = network_pb2_grpc.NetworkServiceStub(self.channel)
        self.keys = enrollment_pb2_grpc.EnrollmentKeyServiceStub(self.channel)
        self.egress = egress_pb2_grpc.EgressGatewayServiceStub(self.channel)

    def status(self):
        from meshgate.api.v1 import network_pb2

        return self.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name=self.network), timeout=15)

    def wait_converged(self, nodes: int, at_least: int = 0, timeout: float = 60):
        """Until every node is connected and has applied its current desired
        state; a node whose state changed at revision `at_least` or later must
        have applied that revision. (A node a change did not affect keeps its
        older revision: GetNetworkStatus reads its own writes, so "converged"
        already accounts for the change.) Returns the status."""
        import grpc

        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            try:
                st = self.status()
            except grpc.RpcError:
                st = None
            if st is not None and st.total_nodes == nodes and all(
                    n.connected and n.converged and n.applied_revision >= min(at_least, n.desired_revision)
                    for n in st.nodes):
                return st
            time.sleep(0.1)
        raise LabError(f"not converged (revision >= {at_least}) within {timeout}s: {st}")

    def close(self) -> None:
        self.channel.close()


# ---------------------------------------------------------------- a scripted control plane


class ScriptedControlPlane:
    """A real gRPC ``AgentService`` server whose messages the test writes.

    Agents ``join`` it (``Enroll`` returns the node name, a token and the key
    authority keys in ``presented``: by default the public key of the server's
    authority, if it has one; ``enrollment_secret`` makes a secret that pins it)
    and open ``Sync`` streams
    as they would with the real control plane; the test sends crafted
    ``SyncResponse``s with ``send`` and reads what the agents answered (``acks``,
    ``new_keys``).  It serves on a Unix socket (``target``), which crosses network
    namespaces.  Runs its own event loop in a thread; every method here is called
    from the test's thread.
    """

    def __init__(self, socket_path: Path, authority: Any = None, network: str = "networks/lab"):
        import asyncio
        import threading

        from meshgate.common import signing

        self.socket_path, self.authority, self.network = Path(socket_path), authority, network
        self.presented: list[bytes] = [signing.public_bytes(authority)] if authority is not None else []
        """The key authority keys ``Enroll`` answers with (a test may present others)."""
        self.target = f"unix:{self.socket_path}"
        self.tokens: dict[str, str] = {}
        self.acks: dict[str, list] = {}
        self.new_keys: dict[str, list[str]] = {}
        self.hellos: dict[str, list] = {}
        self._queues: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: Any = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._server is None:
            raise LabError("scripted control plane did not start")

    # -- the server (its own thread and loop)

    def _serve(self) -> None:
        import asyncio

        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        import grpc

        from meshgate.api.v1 import agent_pb2_grpc

        outer = self

        class Servicer(agent_pb2_grpc.AgentServiceServicer):
            async def Enroll(self, request, context):
                return await outer._enroll(request, context)

            async def Sync(self, request_iterator, context):
                async for msg in outer._sync(request_iterator, context):
                    yield msg

        server = grpc.aio.server()
        agent_pb2_grpc.add_AgentServiceServicer_to_server(Servicer(), server)
        server.add_insecure_port(self.target)
        await server.start()
        self._server = server

    async def _enroll(self, request, context):
        from meshgate.api.v1 import agent_pb2, node_pb2

        node = f"{self.network}/nodes/{request.node_id}"
        token = f"mgat_test.{secrets.token_urlsafe(16)}"
        self.tokens[token] = node
        resp = agent_pb2.EnrollResponse(
            node=node_pb2.Node(name=node, public_key=request.public_key, ipv4_address="100.64.0.254"),
            credential=agent_pb2.AgentCredential(token=token),
        )
        resp.key_authority_public_keys.extend(self.presented)
        return resp

    async def _sync(self, request_iterator, context):
        import asyncio

        import grpc

        md = dict(context.invocation_metadata())
        node = self.tokens.get(md.get("authorization", "").removeprefix("Bearer "))
        if node is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
            return
        it = request_iterator.__aiter__()
        first = await it.__anext__()
        with self._cond:
            self.hellos.setdefault(node, []).append(first.hello)
            self._cond.notify_all()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[node] = queue

        async def read() -> None:
            async for req in it:
                kind = req.WhichOneof("message")
                with self._cond:
                    if kind == "ack":
                        self.acks.setdefault(node, []).append(req.ack)
                    elif kind == "new_key":
                        self.new_keys.setdefault(node, []).append(req.new_key.public_key)
                    self._cond.notify_all()

        reader = asyncio.create_task(read())
        try:
            while True:
                msg = await queue.get()
                if msg is None:
                    return
                yield msg
        finally:
            reader.cancel()
            if self._queues.get(node) is queue:
                del self._queues[node]

    # -- the test's side

    def enrollment_secret(self, pinned: Any = "authority") -> str:
        """A secret in the control plane's format (``Enroll`` here accepts any),
        pinning ``pinned`` (an Ed25519 private key; by default this server's
        authority, none when it has none or ``pinned`` is None) the way a control
        plane with a key service does."""
        from meshgate.common import signing
        from meshgate.common.signing import PIN_PREFIX
        from meshgate.gatewayd.trust import fingerprint

        base = f"mgek_{self.network.split('/')[1]}.scripted.{secrets.token_urlsafe(32)[:43]}"
        key = self.authority if pinned == "authority" else pinned
        return base + (f".{PIN_PREFIX}{fingerprint(signing.public_bytes(key))}" if key is not None else "")

    def sign(self, peer: Any) -> Any:
        """Give ``peer`` (a ``Peer``) a valid signature for its resource and key."""
        from meshgate.common import signing

        peer.public_key_signature = signing.sign(self.authority, peer.resource, peer.public_key)
        return peer

    def sign_all(self, state: pb.DesiredState) -> pb.DesiredState:
        for p in state.peers:
            self.sign(p)
        return state

    def wait_connected(self, node: str, timeout: float = 30) -> None:
        self._wait(lambda: node in self._queues, timeout, f"{node} never connected")

    def send(self, node: str, msg: Any) -> None:
        """Queue a ``SyncResponse`` on ``node``'s stream."""
        self.wait_connected(node)
        queue = self._queues[node]
        self._loop.call_soon_threadsafe(queue.put_nowait, msg)

    def snapshot(self, state: pb.DesiredState) -> None:
        from meshgate.api.v1 import agent_pb2

        self.send(state.node, agent_pb2.SyncResponse(
            revision=state.revision, snapshot=agent_pb2.SyncResponse.Snapshot(state=state)))

    def delta(self, node: str, delta: Any, revision: int) -> None:
        from meshgate.api.v1 import agent_pb2

        delta.revision = revision
        self.send(node, agent_pb2.SyncResponse(
            revision=revision, delta=agent_pb2.SyncResponse.Delta(delta=delta)))

    def rotate_key(self, node: str, reason: str = "test") -> None:
        from meshgate.api.v1 import agent_pb2

        self.send(node, agent_pb2.SyncResponse(rotate_key=agent_pb2.SyncResponse.RotateKey(reason=reason)))

    def wait_ack(self, node: str, revision: int, timeout: float = 30) -> Any:
        """The first ack of ``revision`` (or a later one) from ``node``."""
        found: list = []

        def done() -> bool:
            found[:] = [a for a in self.acks.get(node, []) if a.revision >= revision]
            return bool(found)

        self._wait(done, timeout, f"{node} never acked revision {revision}: {self.acks.get(node)}")
        return found[0]

    def wait_new_key(self, node: str, count: int = 1, timeout: float = 30) -> str:
        """The public key of ``node``'s ``count``-th NewKey."""
        self._wait(lambda: len(self.new_keys.get(node, [])) >= count, timeout,
                   f"{node} sent {len(self.new_keys.get(node, []))} NewKey, expected {count}")
        return self.new_keys[node][count - 1]

    def _wait(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LabError(what)
                self._cond.wait(min(left, 0.1))

    def close(self) -> None:
        import asyncio

        async def stop() -> None:
            for q in list(self._queues.values()):
                q.put_nowait(None)
            await self._server.stop(1)

        if self._server is not None:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(15)
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(15)
        self._loop.close()
