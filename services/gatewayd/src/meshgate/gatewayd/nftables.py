"""gatewayd's nftables table, ``inet meshgate``: rendering (pure) and loading (adapter).

The table is the only nftables object gatewayd owns.  It is always replaced whole, in
one ``nft -f`` transaction (``add table; delete table; table {...}``), so the kernel
never holds half a ruleset and other tables are never touched.  Ranges live in
interval sets, not one rule per range, so 1,000 egress ranges cost one set load.

Verifying the live table: ``nft list`` prints a canonical form that differs from what
we render, so after each load gatewayd reads the table back and remembers the listing
under the table's digest (kept in the state directory).  A later full pass that lists
the same text knows the table is intact; any difference (a flushed ruleset, an edited
rule) makes the planner replace the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from meshgate.gatewayd.errors import ApplyError

FAMILY = "inet"
TABLE = "meshgate"
class Net(Protocol):
    """A network: ``model.Cidr`` or an ``ipaddress`` network (``str()`` is canonical)."""

    @property
    def version(self) -> int: ...


@dataclass(frozen=True)
class Egress:
    ranges: tuple[Net, ...]
    sources: tuple[Net, ...]
    nat: bool
    egress_interface: str | None
    internet_gateway: bool


@dataclass(frozen=True)
class Filter:
    sources: tuple[Net, ...]
    destinations: tuple[Net, ...]
    protocol: str
    ports: tuple[str, ...]
    accept: bool


@dataclass(frozen=True)
class Table:
    text: str
    digest: str

    def __repr__(self) -> str:
        return f"Table(digest={self.digest!r}, {len(self.text)} chars)"


def _q(name: str) -> str:
    return '"' + name + '"'


def _set(name: str, nets: list[Net]) -> list[str]:
    typ = "ipv4_addr" if name.endswith("4") else "ipv6_addr"
    elems = ", ".join(str(n) for n in nets)
    return [
        f"\tset {name} {{",
        f"\t\ttype {typ}",
        "\t\tflags interval",
        "\t\tauto-merge",
        f"\t\telements = {{ {elems} }}",
        "\t}",
    ]


def render(iface: str, egress: list[Egress], filters: list[Filter],
           relayed: Sequence[Net] = ()) -> Table:
    """The whole ``inet meshgate`` table for this node, as ``nft -f`` input.

    ``relayed`` are the overlay ranges this node relays for (its external clients):
    traffic from or to them that enters and leaves the WireGuard interface is
    accepted (sets ``relay4``/``relay6``), ahead of the drops of overlay traffic.
    The caller passes them sorted and deduplicated: the text, hence the digest,
    depends on their order.
    """
    sets: list[str] = []
    forward: list[str] = []
    nat: list[str] = []
    wg = _q(iface)
    for i, e in enumerate(egress):
        for fam, kw in ((4, "ip"), (6, "ip6")):
            src = [n for n in e.sources if n.version == fam]
            dst = [n for n in e.ranges if n.version == fam]
            if not src or not (dst or e.internet_gateway):
                continue
            sname, dname = f"e{i}_src{fam}", f"e{i}_dst{fam}"
            sets += _set(sname, src)
            match = f"iifname {wg} {kw} saddr @{sname}"
            if e.internet_gateway:
                match += f" oifname != {wg}"
            else:
                sets += _set(dname, dst)
                match += f" {kw} daddr @{dname}"
            if e.egress_interface:
                match += f" oifname {_q(e.egress_interface)}"
            forward.append(f"\t\t{match} accept")
            if e.nat:
                nat.append(f"\t\t{match} masquerade")
    for fam, kw in ((4, "ip"), (6, "ip6")):
        nets = [n for n in relayed if n.version == fam]
        if not nets:
            continue
        sets += _set(f"relay{fam}", nets)
        forward += [f"\t\tiifname {wg} oifname {wg} {kw} {d}addr @relay{fam} accept"
                    for d in ("s", "d")]
    lines = [f"table {FAMILY} {TABLE} {{", "\tcomment \"meshgate:@DIGEST@\""]
    lines += sets
    lines += [
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        *forward,
        f"\t\tiifname {wg} drop",
        f"\t\toifname {wg} ct state established,related accept",
        f"\t\toifname {wg} drop",
        "\t}",
    ]
    if nat:
        lines += [
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            *nat,
            "\t}",
        ]
    if filters:
        lines += [
            "\tchain input {",
            "\t\ttype filter hook input priority filter; policy accept;",
            f"\t\tiifname {wg} ct state established,related accept",
        ]
        for f in filters:
            lines += [f"\t\tiifname {wg} {m} {'accept' if f.accept else 'drop'}" for m in _filter_matches(f)]
        lines += [f"\t\tiifname {wg} drop", "\t}"]
    lines.append("}")
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    return Table(text=body.replace("@DIGEST@", digest), digest=digest)


def _anon(nets: list[Net]) -> str:
    return "{ " + ", ".join(str(n) for n in nets) + " }"


def _filter_matches(f: Filter) -> list[str]:
    l4 = ""
    if f.protocol in ("tcp", "udp"):
        l4 = f"meta l4proto {f.protocol}"
        if f.ports:
            l4 += f" th dport {{ {', '.join(f.ports)} }}"
    elif f.protocol:
        l4 = f"meta l4proto {f.protocol}"
    out = []
    fams = {n.version for n in (*f.sources, *f.destinations)} or {0}
    for fam in sorted(fams):
        kw = "ip" if fam == 4 else "ip6"
        parts = []
        src = [n for n in f.sources if n.version == fam]
        dst = [n for n in f.destinations if n.version == fam]
        if fam and f.sources and not src or fam and f.destinations and not dst:
            continue  # this family cannot match both sides
        if src:
            parts.append(f"{kw} saddr {_anon(src)}")
        if dst:
            parts.append(f"{kw} daddr {_anon(dst)}")
        if l4:
            parts.append(l4)
        out.append(" ".join(parts) if parts else "meta nfproto { ipv4, ipv6 }")
    return out


_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nft-readback")
    return _EXECUTOR


_DIGEST_RE = re.compile(r'comment "meshgate:([0-9a-f]{16})"')


class NftTables:
    """Loads, reads back and removes ``table inet meshgate`` with the ``nft`` tool."""

    def __init__(self, cache_file: Path | None = None, nft: str = "nft"):
        self._nft = nft
        self._cache_file = cache_file
        self._canonical: dict[str, str] = {}
        self._pending: Future | None = None
        if cache_file is not None and cache_file.exists():
            try:
                self._canonical = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                self._canonical = {}

    def _run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self._nft, *args], input=stdin, capture_output=True, text=True, check=False
        )

    def listing(self) -> str | None:
        r = self._run(["list", "table", FAMILY, TABLE])
        if r.returncode != 0:
            if "No such file or directory" in r.stderr:
                return None
            raise ApplyError("nftables", f"nft list failed: {r.stderr.strip()}")
        return r.stdout

    def observe(self) -> str | None:
        """The digest of the live table when its content is verified, else None."""
        self.settle()
        text = self.listing()
        if text is None:
            return None
        m = _DIGEST_RE.search(text)
        if not m:
            return None
        digest = m.group(1)
        return digest if self._canonical.get(digest) == text else None

    def load(self, table: Table) -> None:
        self.settle()
        script = f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n{table.text}"
        r = self._run(["-f", "-"], stdin=script)
        if r.returncode != 0:
            raise ApplyError("nftables", f"nft -f failed: {r.stderr.strip()[:2000]}")
        # Reading the table back (nft's canonical listing, for later verification) is
        # not part of applying it: it runs beside the rest of the pass and is awaited
        # before the next nft operation (``settle``).
        self._canonical = {}
        self._pending = _executor().submit(self._remember, table.digest)

    def _remember(self, digest: str) -> None:
        listing = self.listing()
        if listing is not None and f'"meshgate:{digest}"' in listing:
            self._canonical = {digest: listing}
        self._save()

    def settle(self) -> None:
        """Wait for the read-back of the last load (call before exiting)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def delete(self) -> None:
        self.settle()
        r = self._run(["delete", "table", FAMILY, TABLE])
        if r.returncode != 0 and "No such file or directory" not in r.stderr:
            raise ApplyError("nftables", f"nft delete failed: {r.stderr.strip()}")
        self._canonical = {}
        self._save()

    def _save(self) -> None:
        if self._cache_file is None:
            return
        tmp = self._cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._canonical))
        os.replace(tmp, self._cache_file)
