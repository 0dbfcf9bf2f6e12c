"""Access-policy benchmarks (issue 12); prints ``BENCH <name> <value> <unit>`` lines.

    sudo .venv/bin/python tests/bench/bench_policy.py [--quick]

The node measured is a gateway ``gw`` in a dual-stack DENY network of 1,001 nodes
and 1,000 access policies, every one with ``gw`` among its destinations (the node,
its tag, or one of its two egress gateways), with varied sources (one node, a tag,
``*``), protocols (tcp, udp, icmp, icmpv6, any), ports (one, a range, a list),
actions and priorities. Its desired state is compiled by the control plane's real
compiler (``compiler.compile_node``, with pre-shared keys), so it holds 1,000 peers
and the filter rules the control plane sends.

- policy_apply_1000_ms       gatewayd applying that state from empty (an existing,
                             empty wireguard-go interface, as in bench_gatewayd):
                             the agent's snapshot path (validate, plan) and the
                             reconciler (UAPI set of 1,000 peers, addresses, sysctls,
                             ``nft -f`` of the table), saved to disk (median of 5)
- raw_policy_apply_1000_ms   the hand-written baseline of the same content (see the
                             notes on stderr for what it includes; median of 5)
- policy_apply_vs_raw_ratio  the two above, same run (goal <= 1.5)
- policy_delta_ms            one policy's ports changed on that node: from the agent
                             receiving the control plane's delta (``compiler.diff``)
                             to the table loaded, through the agent's delta path
                             (median of 11; goal < 20)

Stderr also gets a profile of the delta (where its time goes) and what nft takes to
replace only the ``overlay_policy`` chain, or one rule, on a copy of the table.

Everything runs in a network namespace the script makes and removes (also on error).
Needs root, wireguard-go, wg, nft.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchkit import bench, info

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.api.v1 import egress_pb2, network_pb2, node_pb2, policy_pb2

NET = "networks/bench"
GW = f"{NET}/nodes/gw"
N = 1000


def rand_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _v4(i: int) -> str:
    return f"100.64.{(i + 2) >> 8}.{(i + 2) & 255}"


def network_state(gw_key: str, n: int = N):
    """1,001 nodes, two egress gateways on ``gw``, ``n`` policies towards ``gw``."""
    from meshgate.controlplane import compiler

    st = compiler.NetworkState(network_pb2.Network(
        name=NET, ipv4_cidr="100.64.0.0/16", ipv6_cidr="fd00:64::/64", listen_port=51820, mtu=1420,
        default_policy=network_pb2.DENY))
    st.nodes[GW] = node_pb2.Node(name=GW, ipv4_address="100.64.0.1", ipv6_address="fd00:64::1",
                                 public_key=gw_key, tags=["servers"], endpoint="192.0.2.1:51820")
    for i in range(n):
        name = f"{NET}/nodes/n{i}"
        st.nodes[name] = node_pb2.Node(
            name=name, ipv4_address=_v4(i), ipv6_address=f"fd00:64::{i + 2:x}", public_key=rand_key(),
            tags=[f"team{i % 25}"] + (["dev"] if i % 2 == 0 else []),
            endpoint=f"192.0.2.{i % 250 + 2}:{51820 + i}")
    for gid, ranges in (("lan", ["198.51.100.0/24"]), ("dc", ["203.0.113.0/25", "203.0.113.128/26"])):
        name = f"{NET}/egressGateways/{gid}"
        st.gateways[name] = egress_pb2.EgressGateway(name=name, node=GW, ranges=ranges, nat=True)
    for i in range(n):
        name = f"{NET}/accessPolicies/p{i:04d}"
        st.policies[name] = policy(name, i)
    return st


_DESTS = (["node:gw"], ["egress:lan"], ["egress:dc"], ["tag:servers", "egress:lan"])


def policy(name: str, i: int, bump: int = 0) -> policy_pb2.AccessPolicy:
    """Policy number ``i``; ``bump`` shifts its ports (the edit the delta makes)."""
    if i % 97 == 0:
        sources = ["*"]  # also makes every node a peer of gw
    elif i % 10 == 0:
        sources = [f"node:n{i}", f"tag:team{i % 25}"]
    else:
        sources = [f"node:n{i}"]
    kind = i % 5
    proto = {0: policy_pb2.TCP, 1: policy_pb2.UDP, 2: policy_pb2.ICMP if i % 2 else policy_pb2.ICMPV6,
             3: policy_pb2.PROTOCOL_UNSPECIFIED, 4: policy_pb2.TCP}[kind]
    ports = []
    if proto in (policy_pb2.TCP, policy_pb2.UDP):
        b = 1000 + (i * 7) % 50000 + bump
        shape = i % 3
        if shape == 0:
            ports = [policy_pb2.PortRange(first=b)]
        elif shape == 1:
            ports = [policy_pb2.PortRange(first=b, last=b + 10)]
        else:
            ports = [policy_pb2.PortRange(first=80), policy_pb2.PortRange(first=443),
                     policy_pb2.PortRange(first=b)]
    return policy_pb2.AccessPolicy(
        name=name, sources=sources, destinations=_DESTS[i % 4], protocol=proto, ports=ports,
        action=policy_pb2.DROP if i % 13 == 0 else policy_pb2.ACCEPT,
        priority=100 + i % 50, bidirectional=i % 31 == 0)


def compile_gw(st, revision: int, psks: dict) -> pb.DesiredState:
    from meshgate.controlplane import compiler

    def psk(a: str, b: str) -> str:
        pair = tuple(sorted((a, b)))
        if pair not in psks:
            psks[pair] = rand_key()
        return psks[pair]

    return compiler.compile_node(st, GW, revision, compiler.PeerIndex(st), psk)


# ---------------------------------------------------------------- the hand-written baseline


_KW = {4: "ip", 6: "ip6"}


def _fam(cidr: str) -> int:
    return 6 if ":" in cidr else 4


def _elems(nets: list[str]) -> str:
    return nets[0] if len(nets) == 1 else "{ " + ", ".join(nets) + " }"


def raw_nft(table: str, ifname: str, msg: pb.DesiredState) -> str:
    """The table someone would write by hand for this node: the same chains and
    hooks as gatewayd's, one rule per filter rule (and family) with anonymous sets."""
    wg = f'"{ifname}"'
    policy_rules = []
    for f in msg.filter_rules:
        l4 = ""
        if f.protocol in ("tcp", "udp"):
            l4 = f"{f.protocol} dport {{ {', '.join(f.ports)} }} " if f.ports else f"meta l4proto {f.protocol} "
        elif f.protocol == "icmp":
            l4 = "meta l4proto icmp "
        elif f.protocol == "icmpv6":
            l4 = "meta l4proto ipv6-icmp "
        verdict = "return" if f.accept else "drop"
        if not f.sources and not f.destinations:
            policy_rules.append(f"\t\t{l4}{verdict}")
            continue
        for fam in (4, 6):
            src = [c for c in f.sources if _fam(c) == fam]
            dst = [c for c in f.destinations if _fam(c) == fam]
            if (f.sources and not src) or (f.destinations and not dst):
                continue
            if (fam, f.protocol) in ((4, "icmpv6"), (6, "icmp")):
                continue
            kw = _KW[fam]
            m = (f"{kw} saddr {_elems(src)} " if src else "") + (f"{kw} daddr {_elems(dst)} " if dst else "")
            policy_rules.append(f"\t\t{m}{l4}{verdict}")
    forward, nat, lan = [], [], []
    for e in msg.egress:
        for fam in (4, 6):
            src = [c for c in e.source_ranges if _fam(c) == fam]
            dst = [c for c in e.ranges if _fam(c) == fam]
            if src and dst:
                m = f"iifname {wg} {_KW[fam]} saddr {_elems(src)} {_KW[fam]} daddr {_elems(dst)}"
                forward.append(f"\t\t{m} accept")
                nat.append(f"\t\t{m} masquerade")
                lan.append(f"\t\toifname {wg} {_KW[fam]} saddr {_elems(dst)} accept")
    return "\n".join([
        f"table inet {table} {{",
        "\tchain overlay_policy {", *policy_rules, "\t}",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        f"\t\tiifname {wg} ct state established,related accept",
        f"\t\tiifname {wg} oifname != {wg} jump overlay_policy",
        *forward,
        f"\t\tiifname {wg} drop",
        *lan,
        f"\t\toifname {wg} ct state established,related accept",
        f"\t\toifname {wg} drop",
        "\t}",
        "\tchain postrouting {", "\t\ttype nat hook postrouting priority srcnat; policy accept;", *nat, "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        f"\t\tiifname {wg} ct state established,related accept",
        f"\t\tiifname {wg} jump overlay_policy",
        "\t}",
        "}",
    ]) + "\n"


def raw_wg(private: str, listen_port: int, msg: pb.DesiredState) -> str:
    lines = ["[Interface]", f"PrivateKey = {private}", f"ListenPort = {listen_port}", ""]
    for p in msg.peers:
        lines += ["[Peer]", f"PublicKey = {p.public_key}"]
        if p.preshared_key:
            lines.append(f"PresharedKey = {p.preshared_key}")
        if p.endpoint:
            lines.append(f"Endpoint = {p.endpoint}")
        lines += [f"AllowedIPs = {', '.join(p.allowed_ips)}", ""]
    return "\n".join(lines)


def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, input=stdin)


def raw_apply(ifname: str, conf: Path, nftf: Path, msg: pb.DesiredState) -> dict[str, float]:
    """The baseline's commands, timed each (ms)."""
    out: dict[str, float] = {}

    def step(label: str, *argv: str) -> None:
        t0 = time.perf_counter()
        run(*argv)
        out[label] = out.get(label, 0.0) + (time.perf_counter() - t0) * 1000

    step("wg setconf", "wg", "setconf", ifname, str(conf))
    step("nft -f", "nft", "-f", str(nftf))
    for a in msg.interface.addresses:
        step("ip", "ip", "address", "add", a, "dev", ifname)
    step("ip", "ip", "link", "set", ifname, "mtu", str(msg.interface.mtu or 1420), "up")
    t0 = time.perf_counter()
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    out["sysctl"] = (time.perf_counter() - t0) * 1000
    return out


# ---------------------------------------------------------------- timing helpers


class Timers:
    """Wall time spent in wrapped functions, per label, for one profiled run."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self._undo: list = []

    def wrap(self, obj, attr: str, label: str, when=None) -> None:
        orig = getattr(obj, attr)

        def timed(*a, **kw):
            if when is not None and not when(*a, **kw):
                return orig(*a, **kw)
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                self.t[label] = self.t.get(label, 0.0) + (time.perf_counter() - t0) * 1000

        setattr(obj, attr, timed)
        self._undo.append((obj, attr, orig))

    def undo(self) -> None:
        for obj, attr, orig in reversed(self._undo):
            setattr(obj, attr, orig)
        self._undo.clear()


def nft_ms(script: str, reps: int = 5) -> float:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run("nft", "-f", "-", stdin=script)
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def libnft_ms(script: str, reps: int = 5) -> float | None:
    """``nft_ms`` through libnftables in this process (no ``nft`` process, its cache
    kept between runs), for comparison; None without the library."""
    import ctypes
    import ctypes.util

    path = ctypes.util.find_library("nftables")
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ctx = lib.nft_ctx_new(0)
    lib.nft_ctx_buffer_output(ctx)
    lib.nft_ctx_buffer_error(ctx)
    out = []
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            if lib.nft_run_cmd_from_buffer(ctx, script.encode()) != 0:
                return None
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        lib.nft_ctx_free(ctx)
    return statistics.median(out)


# ---------------------------------------------------------------- inside a namespace


def profile_stages(tm: Timers, rec, agent_mod, reconciler, routing, model, nftables, fine: bool = False) -> None:
    """Timers around the stages of a pass (nested ones are indented). Each coarse
    stage runs once or twice a pass, so its timer costs microseconds; ``fine`` also
    times the 13,000 ``parse_cidr`` calls, which the timer slows (not in a figure)."""
    tm.wrap(agent_mod, "merge_delta", "merge the delta into the last state")
    tm.wrap(agent_mod, "without", "trust: leave refused peers out")
    tm.wrap(agent_mod.consent, "declined_routes", "consent: routes declined")
    tm.wrap(routing, "link_names", "host links (ip -json link)")
    tm.wrap(reconciler, "compile_desired", "compile_desired (validate + render)")
    if fine:
        tm.wrap(model, "parse_cidr", "  of which parse_cidr (timer included)")
    tm.wrap(nftables, "render", "  of which nftables.render")
    tm.wrap(rec, "observe", "observe the kernel (full pass)")
    tm.wrap(reconciler, "plan", "plan")
    tm.wrap(rec.backend, "configure", "WireGuard UAPI set")
    tm.wrap(routing, "apply", "links, addresses, routes")
    tm.wrap(rec.nft, "_run", "nft -f", when=lambda args, stdin=None: args[0] == "-f")
    tm.wrap(rec.store, "save_desired", "save desired.pb")


def report_stages(title: str, runs: list[dict[str, float]], total: list[float]) -> None:
    """The stages of the run whose total is the median (so its parts add up)."""
    k = sorted(range(len(total)), key=total.__getitem__)[len(total) // 2]
    top = sum(v for lb, v in runs[k].items() if not lb.startswith("  "))
    info(f"bench_policy: {title} (the median of {len(runs)} runs, ms):")
    for lb, v in runs[k].items():
        info(f"    {lb:<44} {v:7.1f}")
    info(f"    {'the rest (agent, reconciler bookkeeping)':<44} {total[k] - top:7.1f}")
    info(f"    {'total':<44} {total[k]:7.1f}")


def inner(workdir: Path, token: str, reps: int, delta_reps: int) -> None:
    from meshgate.controlplane import compiler
    from meshgate.gatewayd import agent as agent_mod
    from meshgate.gatewayd import model, reconciler, routing
    from meshgate.gatewayd import nftrules as nftables
    from meshgate.gatewayd.agent import Agent
    from meshgate.gatewayd.config import Settings
    from meshgate.gatewayd.reconciler import Reconciler
    from meshgate.gatewayd.sources import Delta, Snapshot

    info("bench_policy: the baseline (raw_policy_apply_1000_ms) is what an operator would run by "
         "hand for the same content, on an existing empty wireguard-go interface like gatewayd's: "
         "`wg setconf` of the 1,000 peers (keys, pre-shared keys, endpoints, allowed IPs), `nft -f` "
         "of a hand-written `inet` table (the same hooks and chains; one rule per filter rule and "
         "address family in one overlay_policy chain, sources/destinations/ports as anonymous sets; "
         "egress accept, masquerade, site rules), `ip address add` x2, `ip link set mtu up`, "
         "ip_forward=1. Not in it: compiling the state (the control plane's work, in neither figure), "
         "validation, planning, saving to disk. Not in either figure: gatewayd's read-back of the "
         "table, which runs after the load, beside the pass (timed separately below)")
    gw_ms, raw_ms, readback_ms = [], [], []
    raw_parts: list[dict[str, float]] = []
    apply_runs: list[dict[str, float]] = []
    rec = agent = msg = st = None
    psks: dict = {}
    for rep in range(reps):
        ifname = f"mgp{token}g{rep}"
        settings = Settings(state_dir=workdir / f"gw{rep}", backend="userspace", default_interface=ifname)
        rec = Reconciler.for_host(settings)
        rec.store.record_created(ifname)  # gatewayd's own interface, existing and empty, like raw gets
        rec.backend.create(ifname)
        psks = {}
        st = network_state(rec.public_key)
        msg = compile_gw(st, 1, psks)
        agent = Agent(rec, settings)
        if rep == 0:
            info(f"bench_policy: gw's desired state: {len(msg.peers)} peers, {len(msg.filter_rules)} filter "
                 f"rules, {len(msg.egress)} egress configs, {msg.ByteSize() / 1024:.0f} KiB")
        tm = Timers()
        profile_stages(tm, rec, agent_mod, reconciler, routing, model, nftables)
        t0 = time.perf_counter()
        assert agent.accept(Snapshot(msg))
        res = rec.reconcile(agent.target, full=True)
        rec.store.save_desired(agent.target_msg)
        gw_ms.append((time.perf_counter() - t0) * 1000)
        tm.undo()
        apply_runs.append(tm.t)
        assert len(res.plan.peers) == len(msg.peers) >= N and res.plan.nft is not None, res.plan.changes()
        t0 = time.perf_counter()
        rec.nft.settle()
        readback_ms.append((time.perf_counter() - t0) * 1000)
        if rep == 0:
            text = agent.target.nft.text
            info(f"bench_policy: gatewayd's table: {len(text) / 1024:.0f} KiB of nft text, "
                 f"{text.count(chr(10) + chr(9) + 'chain ')} chains, {text.count(chr(10) + chr(9) + 'set ')} "
                 f"named sets, {text.count(' comment ' + chr(34) + 'p')} policy rules")
        # --- the hand-written baseline, same content
        rifname = f"mgp{token}r{rep}"
        raw = Reconciler.for_host(Settings(state_dir=workdir / f"raw{rep}", backend="userspace",
                                           default_interface=rifname))
        raw.backend.create(rifname)
        conf = workdir / f"raw{rep}.conf"
        conf.write_text(raw_wg(raw.keys.current.private.reveal(), 51821, msg))
        os.chmod(conf, 0o600)
        nftf = workdir / f"raw{rep}.nft"
        nftf.write_text(raw_nft("meshraw", rifname, msg))
        if rep == 0:
            body = nftf.read_text().split("\tchain overlay_policy {\n", 1)[1].split("\n\t}", 1)[0]
            info(f"bench_policy: the hand-written table: {nftf.stat().st_size / 1024:.0f} KiB, "
                 f"{body.count(chr(10)) + 1} rules in one overlay_policy chain, no named sets")
        parts = raw_apply(rifname, conf, nftf, msg)
        raw_ms.append(sum(parts.values()))
        raw_parts.append(parts)
        run("nft", "delete", "table", "inet", "meshraw")
        raw.backend.destroy(rifname)
        if rep < reps - 1:
            rec.down(ifname)
    gw, rw = statistics.median(gw_ms), statistics.median(raw_ms)
    info(f"bench_policy: apply runs (ms): gatewayd {[round(x) for x in gw_ms]}, raw {[round(x) for x in raw_ms]}; "
         f"gatewayd's read-back of the table after a load: {statistics.median(readback_ms):.0f} ms")
    report_stages("where policy_apply_1000_ms goes", apply_runs, gw_ms)
    info("bench_policy: the raw baseline's parts (median, ms): " + ", ".join(
        f"{k} {statistics.median(p[k] for p in raw_parts):.1f}" for k in raw_parts[0]))
    bench("policy_apply_1000_ms", gw, "ms")
    bench("raw_policy_apply_1000_ms", rw, "ms")
    bench("policy_apply_vs_raw_ratio", gw / rw, "x")

    # --- one policy changed: the control plane compiles and diffs (not timed), the agent
    # takes the delta and reconciles (timed, up to the table loaded and the state saved)
    assert rec is not None and agent is not None and msg is not None and st is not None
    old = agent.target_msg
    # tcp/udp ACCEPT policies with their own rules on gw; one changed per run, ports moved
    changed: list[int] = [i for i in range(1, N) if i % 5 in (0, 1, 4) and i % 13 and i % 97][::37]

    def next_delta(k: int) -> Delta:
        nonlocal old
        i = changed[k % len(changed)]
        name = f"{NET}/accessPolicies/p{i:04d}"
        st.policies[name] = policy(name, i, bump=k + 1)
        new = compile_gw(st, old.revision + 1, psks)
        d = compiler.diff(old, new)
        assert d is not None and d.filter_rules_changed and not d.upserted_peers and not d.removed_peers, d
        old = new
        return Delta(d, revision=new.revision)

    def apply_delta(delta: Delta) -> float:
        t0 = time.perf_counter()
        assert agent.accept(delta)
        res = rec.reconcile(agent.target, full=False)
        rec.store.save_desired(agent.target_msg)
        ms = (time.perf_counter() - t0) * 1000
        assert not res.full and not res.plan.peers and res.plan.nft is not None, res.plan.changes()
        rec.nft.settle()  # the read-back of the load: beside the pass, waited for outside the figure
        return ms

    delta_ms = [apply_delta(next_delta(k)) for k in range(delta_reps)]
    info(f"bench_policy: delta runs (ms): {[round(x, 1) for x in delta_ms]}")
    bench("policy_delta_ms", statistics.median(delta_ms), "ms")
    # the live table must be the one a fresh render of the last state gives
    assert f'"meshgate:{agent.target.nft.digest}"' in (rec.nft.listing() or "")

    # --- where the delta's time goes (separate runs, with timers around the stages)
    runs, totals = [], []
    scripts: list[str] = []
    for k in range(delta_reps, delta_reps + 5):
        delta = next_delta(k)
        orig_run = rec.nft._run

        def capture(args, stdin=None, orig_run=orig_run):
            if args[0] == "-f":
                scripts.append(stdin or "")
            return orig_run(args, stdin)

        rec.nft._run = capture  # type: ignore[method-assign]
        tm = Timers()
        profile_stages(tm, rec, agent_mod, reconciler, routing, model, nftables, fine=True)
        totals.append(apply_delta(delta))
        tm.undo()
        del rec.nft._run
        runs.append(tm.t)
    report_stages("where policy_delta_ms goes", runs, totals)
    info(f"bench_policy: the delta's nft -f scripts: {[f'{len(s) / 1024:.1f} KiB' for s in scripts]}")

    # --- what nft alone takes, on a copy of gatewayd's table
    probe(agent.target.nft.text, nftables.TABLE)
    t0 = time.perf_counter()
    for _ in range(5):
        model.compile_desired(agent.target_msg, settings=rec.settings, public_key=rec.public_key)
    info(f"bench_policy: compile_desired of the whole state alone: {(time.perf_counter() - t0) * 200:.1f} ms")
    rec.down(rec.applied.interface if rec.applied else "")


def probe(text: str, table: str) -> None:
    """nft's own cost, on a copy of the table, of: replacing it whole; the smallest
    transaction that touches it (its fixed cost: nft reads the table's chains and
    sets first); flushing and refilling the chain of the first policy rule; listing it."""
    text = text.replace(f"table inet {table} ", "table inet meshprobe ", 1)
    t = "inet meshprobe"
    run("nft", "-f", "-", stdin=text)
    try:
        out = {
            "replace the whole table": nft_ms(f"add table {t}\ndelete table {t}\n{text}", 3),
            "floor: add+delete an empty chain": nft_ms(f"add chain {t} zz\ndelete chain {t} zz\n"),
        }
        run("nft", "add", "chain", *t.split(), "zz")
        out["floor: add one rule"] = nft_ms(f"add rule {t} zz counter\n")
        for m in re.finditer(r"\n\tchain (\S+) \{\n((?:\t\t[^\n]*\n)*?)\t\}", text):
            if ' comment "p' in m.group(2):
                body = m.group(2).rstrip("\n")
                script = f"flush chain {t} {m.group(1)}\ntable {t} {{\n\tchain {m.group(1)} {{\n{body}\n\t}}\n}}\n"
                label = f"flush+refill chain {m.group(1)} ({body.count(chr(10)) + 1} rules)"
                out[label] = nft_ms(script)
                lib = libnft_ms(script)
                if lib is not None:
                    out[label + " in-process (libnftables)"] = lib
                break
        t0 = time.perf_counter()
        run("nft", "list", "table", *t.split())
        out["nft list table"] = (time.perf_counter() - t0) * 1000
    finally:
        run("nft", "delete", "table", *t.split())
    info("bench_policy: nft alone on a copy of gatewayd's table (medians, ms): "
         + "; ".join(f"{k} {v:.1f}" for k, v in out.items()))


# ---------------------------------------------------------------- outside


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--inner", nargs=4, metavar=("WORKDIR", "TOKEN", "REPS", "DELTA_REPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(Path(args.inner[0]), args.inner[1], int(args.inner[2]), int(args.inner[3]))
        return 0

    from meshgate.gatewayd.lab import Lab, _is_wg, _kill_pid, can_run

    reason = can_run()
    if reason:
        print(f"bench_policy: cannot run: {reason}", file=sys.stderr)
        return 3
    with Lab() as lab:
        host = lab.host("policy")
        reps, delta_reps = (1, 5) if args.quick else (5, 11)
        proc = host.spawn(sys.executable, os.path.abspath(__file__), "--inner", str(lab.dir), lab.token,
                          str(reps), str(delta_reps), stdout=None, stderr=None)
        rc = proc.wait(900)
        # wireguard-go processes the inner run started are recorded in its state dirs
        for d in lab.dir.iterdir():
            for pidf in d.glob("wireguard-go.*.pid") if d.is_dir() else []:
                pid = int(pidf.read_text())
                if _is_wg(pid, pidf.name.split(".")[1]):
                    _kill_pid(pid)
        if rc != 0:
            print(f"bench_policy: failed ({rc})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
