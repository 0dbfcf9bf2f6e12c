"""gatewayd's nftables table, ``inet meshgate``: loading, reading back, removing (adapter).

What is loaded is rendered by nftrules.py (pure). The table is replaced whole, in one
``nft -f`` transaction (``add table; delete table; table {...}``), so the kernel never
holds half a ruleset and other tables are never touched; when the live table is the
last one loaded and the new one differs only inside policy chains, just those are
replaced, also in one transaction (``nftrules.patch_script``). Commands run
in-process through libnftables (libnft.py) when the library is there, else through
the ``nft`` command.

Verifying the live table: ``nft list`` prints a canonical form that differs from what
we render, so after each load gatewayd reads the table back and remembers the listing
under the table's digest (kept in the state directory).  A later full pass that lists
the same text knows the table is intact; any difference (a flushed ruleset, an edited
rule) makes the planner replace the table.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from meshgate.gatewayd import libnft
from meshgate.gatewayd.errors import ApplyError
from meshgate.gatewayd.nftrules import DIGEST_RE, FAMILY, TABLE, Table, patch_script

__all__ = ["NftTables", "Table"]

log = logging.getLogger(__name__)


_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nft-readback")
    return _EXECUTOR




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
        """``nft <args>`` (``-f -`` reads `stdin`): in-process through libnftables when
        the library is there and the default ``nft`` is asked for, else the command."""
        lib = libnft.shared() if self._nft == "nft" else None
        if lib is not None:
            commands = stdin if args == ["-f", "-"] else " ".join(args)
            rc, out, err = lib.run(commands or "")
            return subprocess.CompletedProcess([self._nft, *args], rc, out, err)
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
        m = DIGEST_RE.search(text)
        if not m:
            return None
        digest = m.group(1)
        return digest if self._canonical.get(digest) == text else None

    def load(self, table: Table, base: Table | None = None) -> None:
        """Make the live table `table`. `base`: the table known to be live (the
        last one loaded, verified or not touched since); when the two differ only in
        some policy chains, just those are replaced (``patch_script``), else the
        whole table is, both in one transaction."""
        self.settle()
        patch = patch_script(base, table) if base is not None else None
        if patch is not None:
            r = self._run(["-f", "-"], stdin=patch)
            if r.returncode != 0:
                log.warning("nftables: replacing policy chains failed (%s); replacing the table",
                            r.stderr.strip()[:500])
                patch = None
        if patch is None:
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
