"""What every benchmark script shares: the BENCH line, stderr notes, percentiles.

Benchmarks run as scripts (`python tests/bench/bench_x.py`), so this folder is
on `sys.path` and they import this module by name. Only `bench()` writes to
stdout: `make bench` output is one `BENCH <name> <value> <unit>` line per figure.
"""

from __future__ import annotations

import math
import sys

import grpc


def info(msg: str) -> None:
    """A note for the person running the benchmark (stderr)."""
    print(msg, file=sys.stderr, flush=True)


def bench(name: str, value: float, unit: str) -> None:
    """One figure (stdout)."""
    print(f"BENCH {name} {value:.3f} {unit}", flush=True)


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of non-empty `samples`."""
    s = sorted(samples)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


class AdminToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Sends a control plane's admin token (`ServiceProcess.admin_token`, the
    bootstrap token) on every unary call of a channel: the admin API refuses
    anonymous callers."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        details = client_call_details._replace(metadata=[*(client_call_details.metadata or ()), *self.metadata])
        return await continuation(details, request)


_ROOT_FRAMES = ("<module> (", "run_service (", "main (")


class Profiler:
    """Where a process spent its CPU during one phase of a benchmark: py-spy
    (not a dependency: `pip install py-spy`) samples it while the phase runs,
    and the phase's busiest functions go to stderr. Off (a no-op) unless the
    benchmark was asked to profile."""

    def __init__(self, pid: int, enabled: bool, top: int = 8) -> None:
        import os
        import shutil

        self.pid, self.top = pid, top
        exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        self.exe = exe if enabled and os.path.exists(exe) else ""
        if enabled and not self.exe:
            info("--profile: py-spy is not installed (pip install py-spy); no profiles")

    def phase(self, name: str):
        import contextlib
        import os
        import signal
        import subprocess
        import tempfile

        @contextlib.contextmanager
        def run():
            if not self.exe:
                yield
                return
            fd, out = tempfile.mkstemp(prefix="meshgate-prof-", suffix=".txt")
            os.close(fd)
            proc = subprocess.Popen([self.exe, "record", "-p", str(self.pid), "-r", "50", "-f", "raw", "-o", out,
                                     "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                yield
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                try:
                    self._report(name, out)
                finally:
                    os.unlink(out)

        return run()

    def _report(self, name: str, path: str) -> None:
        """Inclusive share of the project's own functions and the top self time."""
        import collections
        import re

        incl: collections.Counter[str] = collections.Counter()
        own: collections.Counter[str] = collections.Counter()
        total = 0
        with open(path) as f:
            for line in f:
                stack, _, n = line.rstrip().rpartition(" ")
                if not stack or not n.isdigit():
                    continue
                total += int(n)
                frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
                for fr in set(frames):
                    if fr.startswith(_ROOT_FRAMES):  # every sample's: the entry point
                        continue
                    if re.search(r"\((controlplane|keyservice|common|gatewayd|auth)/", fr):
                        incl[fr] += int(n)
                own[frames[-1]] += int(n)
        if not total:
            info(f"profile {name}: no samples")
            return
        info(f"profile {name} ({total} samples at 50/s): busiest project functions (inclusive): "
             + "; ".join(f"{k} {100 * v / total:.0f}%" for k, v in incl.most_common(self.top)))
        info(f"profile {name}: top self time: "
             + "; ".join(f"{k} {100 * v / total:.0f}%" for k, v in own.most_common(self.top)))
