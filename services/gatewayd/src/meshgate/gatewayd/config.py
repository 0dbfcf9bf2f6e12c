"""gatewayd's typed settings, read once at the entry point.

Every value comes from (in rising precedence) its default, an environment variable
``MESHGATE_GATEWAYD_<FIELD>`` or a command-line flag, and remembers which one it came
from (``Settings.origins``) so ``gatewayd show`` can say why a value is what it is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "MESHGATE_GATEWAYD_"


@dataclass(frozen=True)
class Settings:
    state_dir: Path = Path("/var/lib/meshgate/gatewayd")
    """Where the private key, the last applied desired state and the status live."""

    backend: str = "auto"
    """WireGuard backend: ``kernel`` (netlink), ``userspace`` (wireguard-go) or ``auto``
    (kernel when the host can create a ``wireguard`` link, else userspace)."""

    default_interface: str = "mg0"
    """Interface name used when the desired state leaves it empty."""

    route_table: int = 51821
    """The routing table that holds gatewayd's routes (and nothing else's)."""

    handoff_table: int = 51822
    """The routing table of the late-reply link's next hops (handoff.py)."""

    route_protocol: int = 77
    """rtnetlink protocol id stamped on gatewayd's routes and policy rules, so it can
    tell them from anyone else's."""

    fwmark: int = 51821
    """Firewall mark for the tunnel's own UDP packets when routes need one and the
    desired state does not pick one (the wg-quick technique)."""

    rule_priority: int = 5200
    """Priority of the ``suppress_prefixlength 0`` rule; the table rule is at +10."""

    resync_interval: float = 60.0
    """Seconds between full resyncs that read the kernel and heal drift."""

    resync_jitter: float = 0.2
    """Fraction of ``resync_interval`` by which each resync is randomly moved."""

    backoff_initial: float = 0.5
    """First retry delay after a failed apply, in seconds."""

    backoff_max: float = 30.0
    """Cap of the retry delay, in seconds."""

    supervise_interval: float = 1.0
    """Seconds between liveness checks of the wireguard-go process."""

    drift_watch: bool = True
    """Watch what gatewayd owns (netlink events of its link, addresses, routes and rules;
    nftables events of its table; a poll of the WireGuard peers) and repair a change
    within moments (``drift.py``); off, only the periodic full pass heals drift."""

    drift_poll_interval: float = 1.0
    """Seconds between reads of the WireGuard device by the drift watcher."""

    drift_burst: int = 5
    """Drift repairs allowed back to back before the rate limit holds them back."""

    drift_refill: float = 2.0
    """Seconds to regain one drift repair: while something keeps undoing gatewayd's
    changes, it repairs at most once per this many seconds and reports a fight."""

    health_interval: float = 30.0
    """Seconds between complete reports of the peers' handshake times, endpoints and
    byte counters to the control plane (0: never report)."""

    path_check_interval: float = 1.0
    """Seconds between samples of the peers for path health: a change (handshake,
    endpoint, traffic unanswered) is reported at the next sample (pathwatch.py)."""

    path_rtt_interval: float = 10.0
    """Seconds between measurements of the round-trip time to each relay (the desired
    peers with an ``rtt_address``; three ICMP echoes by ``ping``, the least time), for
    the control plane's choice of the closest relay."""

    wireguard_go: str = "wireguard-go"
    """The wireguard-go binary gatewayd starts for the userspace backend."""

    wireguard_go_log_level: str = "error"
    """``LOG_LEVEL`` passed to wireguard-go (it logs per-peer lines at higher levels)."""

    bypass: tuple[str, ...] = ()
    """Addresses never routed through the tunnel when a default route goes through a
    peer (a ``to <address> lookup main`` rule ahead of gatewayd's): ``run`` puts the
    control plane's addresses here; comma-separated in the environment."""

    origins: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Where each value came from: ``default``, ``env`` or ``flag``."""

    @property
    def rule_table_priority(self) -> int:
        return self.rule_priority + 10

    @classmethod
    def load(
        cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        env = os.environ if env is None else env
        flags = flags or {}
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for f in dataclasses.fields(cls):
            if f.name == "origins":
                continue
            conv = _converter(f.default)
            if flags.get(f.name) is not None:
                values[f.name] = conv(flags[f.name])
                origins[f.name] = "flag"
            elif ENV_PREFIX + f.name.upper() in env:
                values[f.name] = conv(env[ENV_PREFIX + f.name.upper()])
                origins[f.name] = "env"
            else:
                origins[f.name] = "default"
        settings = cls(**values, origins=origins)
        settings.check()
        return settings

    def check(self) -> None:
        if self.backend not in ("auto", "kernel", "userspace"):
            raise ValueError(f"backend must be auto, kernel or userspace, not {self.backend!r}")
        if not 0 < self.route_protocol < 256:
            raise ValueError("route_protocol must be in 1..255")
        if not 0 < self.route_table < 2**32 or self.route_table in (253, 254, 255):
            raise ValueError("route_table must be a free table id")
        if not 0 < self.handoff_table < 2**32 or self.handoff_table in (253, 254, 255, self.route_table):
            raise ValueError("handoff_table must be a free table id other than route_table")
        if self.resync_interval <= 0 or self.backoff_initial <= 0:
            raise ValueError("intervals must be positive")
        if self.drift_poll_interval <= 0 or self.drift_refill <= 0 or self.drift_burst < 1:
            raise ValueError("drift_poll_interval and drift_refill must be positive, drift_burst at least 1")


def _converter(default: Any):
    if isinstance(default, tuple):
        return lambda v: tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else tuple(v)
    if isinstance(default, Path):
        return Path
    if isinstance(default, bool):
        return lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return lambda v: int(v, 0) if isinstance(v, str) else int(v)
    if isinstance(default, float):
        return float
    return str
