"""Garbage-collector settings of the control-plane process.

A fan-out to 1,000 agents allocates tens of thousands of short-lived objects
(messages, futures, coroutine frames), which with CPython's default thresholds
(700, 10, 10) means dozens of young collections per change and, every few
changes, a full collection that walks every object the process holds: the
imported modules (grpc, protobuf descriptors, OpenTelemetry: most of them),
the state cache, the agents' streams. On the convergence benchmark (1,000
streams; tests/bench/bench_convergence.py) the control plane ran 16 full
collections in one run, ~940 ms in all, up to ~110 ms each, landing inside
changes and setting the tail latency; with these settings, 2 in all (13 ms).

So, once the process has started and loaded its cache, everything alive is
moved out of the collector's sight (`gc.freeze()`: modules, descriptors and
the loaded state are never garbage), and young collections run less often.
Reference counting still frees almost everything at once; the collector only
matters for cycles, which it still finds, in fewer, larger passes. Objects
frozen here that later become cyclic garbage are not reclaimed: the startup
state is kept for the life of the process anyway.
"""

from __future__ import annotations

import gc

# Young-generation threshold: objects allocated (net of frees) between young
# collections. 20,000 is about one fan-out's worth of live temporaries.
GEN0_THRESHOLD = 20_000
GEN1_THRESHOLD = 10
GEN2_THRESHOLD = 10


def freeze_startup_heap() -> None:
    """Collect once, then freeze what survived and raise the thresholds;
    called after the cache is loaded, before agents connect."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
