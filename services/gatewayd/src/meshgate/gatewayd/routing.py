"""Addresses, link settings, routes and policy rules, through iproute2's ``ip``.

gatewayd's routes live in a table of its own and carry its own rtnetlink protocol
id; its policy rules carry the same protocol id.  Only objects with both marks (or on
its own interface) are read, changed or deleted, so routes and rules of anyone else
are never touched.

Writes go through one ``ip -batch`` per address family: one process and one netlink
conversation for a thousand routes (pyroute2 builds each message in Python and is
about 35 times slower here).  Reads use ``ip -json``.
"""

from __future__ import annotations

import json
import subprocess

from meshgate.gatewayd.errors import ApplyError
from meshgate.gatewayd.model import MAIN_TABLE, ObservedLink, RouteSpec, RuleSpec
from meshgate.gatewayd.planner import Plan

TABLE_NAMES = {"main": 254, "local": 255, "default": 253}


def _ip(args: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise ApplyError("routing", f"ip {' '.join(args[:4])}: {r.stderr.strip()[:1000]}")
    return r


def link_names() -> set[str]:
    r = _ip(["-json", "link", "show"])
    return {link["ifname"] for link in json.loads(r.stdout or "[]")}


def observe_link(ifname: str) -> ObservedLink | None:
    r = _ip(["-json", "address", "show", "dev", ifname], check=False)
    if r.returncode != 0:
        return None
    data = json.loads(r.stdout or "[]")
    if not data:
        return None
    link = data[0]
    addrs = frozenset(
        f"{a['local']}/{a['prefixlen']}"
        for a in link.get("addr_info", [])
        if a.get("scope") != "link" and "local" in a
    )
    return ObservedLink(mtu=link.get("mtu", 0), up="UP" in link.get("flags", []), addresses=addrs)


def _dst(dst: str, family: int) -> str:
    if dst == "default":
        return "0.0.0.0/0" if family == 4 else "::/0"
    if "/" not in dst:
        return f"{dst}/{32 if family == 4 else 128}"
    return dst


def observe_routes(table: int, protocol: int) -> frozenset[RouteSpec]:
    out = set()
    for fam in (4, 6):
        r = _ip([f"-{fam}", "-json", "route", "show", "table", str(table), "proto", str(protocol)],
                check=False)
        if r.returncode != 0:
            continue  # the table does not exist yet
        for route in json.loads(r.stdout or "[]"):
            if route.get("type", "unicast") != "unicast":
                continue
            out.add(RouteSpec(_dst(route["dst"], fam), route.get("metric", 0)))
    return frozenset(out)


def observe_rules(protocol: int) -> frozenset[RuleSpec]:
    out = set()
    for fam in (4, 6):
        r = _ip([f"-{fam}", "-json", "rule", "show"], check=False)
        if r.returncode != 0:
            continue
        for rule in json.loads(r.stdout or "[]"):
            if str(rule.get("protocol")) != str(protocol):
                continue
            table = rule.get("table", "main")
            out.add(RuleSpec(
                family=fam,
                priority=rule.get("priority", 0),
                table=TABLE_NAMES.get(table) or int(table),
                fwmark=int(rule["fwmark"], 0) if "fwmark" in rule else 0,
                invert="not" in rule,
                suppress_prefixlength=rule.get("suppress_prefixlen"),
                dst=f"{rule['dst']}/{rule.get('dstlen', 32 if fam == 4 else 128)}"
                if rule.get("dst") not in (None, "all") else "",
                oif=rule.get("oif", ""),
            ))
    return frozenset(out)


def _rule_args(r: RuleSpec) -> str:
    s = f"to {r.dst} " if r.dst else ""
    if r.oif:
        s += f"oif {r.oif} "
    if r.fwmark:
        s += f"{'not ' if r.invert else ''}fwmark {r.fwmark:#x} "
    s += f"table {'main' if r.table == MAIN_TABLE else r.table} "
    if r.suppress_prefixlength is not None:
        s += f"suppress_prefixlength {r.suppress_prefixlength} "
    return s + f"priority {r.priority}"


def batch_for(plan: Plan, table: int, protocol: int) -> dict[int, list[str]]:
    """``ip -batch`` lines per family (``0`` = family-independent) that carry out the
    link, address, route and rule parts of ``plan``."""
    dev = plan.interface
    cmds: dict[int, list[str]] = {0: [], 4: [], 6: []}
    if plan.mtu:
        cmds[0].append(f"link set dev {dev} mtu {plan.mtu}")
    if plan.set_up:
        cmds[0].append(f"link set dev {dev} up")
    for a in plan.addr_del:
        cmds[0].append(f"address del {a} dev {dev}")
    for a in plan.addr_add:
        cmds[0].append(f"address replace {a} dev {dev}")
    for r in plan.route_del:
        cmds[r.family].append(f"route del {r.dst} table {table} proto {protocol} metric {r.metric}")
    for r in plan.route_add:
        cmds[r.family].append(
            f"route replace {r.dst} dev {dev} table {table} proto {protocol} metric {r.metric}")
    for rule in plan.rule_del:
        cmds[rule.family].append(f"rule del {_rule_args(rule)} protocol {protocol}")
    for rule in plan.rule_add:
        cmds[rule.family].append(f"rule add {_rule_args(rule)} protocol {protocol}")
    return cmds


def apply(plan: Plan, table: int, protocol: int) -> None:
    for fam, lines in batch_for(plan, table, protocol).items():
        if lines:
            _ip(([f"-{fam}"] if fam else []) + ["-batch", "-"], stdin="\n".join(lines) + "\n")


def remove_owned(table: int, protocol: int) -> None:
    """Delete every route and rule that carries gatewayd's marks (``gatewayd down``)."""
    for fam in (4, 6):
        _ip([f"-{fam}", "route", "flush", "table", str(table), "proto", str(protocol)], check=False)
        for r in observe_rules(protocol):
            if r.family == fam:
                _ip([f"-{fam}", "rule", "del", *(_rule_args(r).split()), "protocol", str(protocol)],
                    check=False)
