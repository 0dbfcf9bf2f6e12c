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
