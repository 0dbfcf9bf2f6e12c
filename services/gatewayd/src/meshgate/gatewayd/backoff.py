"""Capped exponential backoff with full jitter, and the jittered resync interval.

Full jitter (a uniform draw in ``[0, min(cap, base * 2**attempt)]``) spreads the
retries of many nodes that failed together, e.g. after a control-plane outage.
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, initial: float, cap: float, rng: random.Random | None = None):
        self.initial = initial
        self.cap = cap
        self.rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        # never 0: a tight loop of failing applies helps nobody
        return max(self.initial / 10, self.rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0


def jittered(interval: float, fraction: float, rng: random.Random | None = None) -> float:
    r = rng or random
    return interval * (1 + r.uniform(-fraction, fraction))
