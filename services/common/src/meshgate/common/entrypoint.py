"""What every service's `main()` does, written once: read the typed config
(flags, env, file), set up logging and the OpenTelemetry SDK (traces, and
metrics on `--metrics-listen`), run the service's coroutine, and shut
telemetry down (flushing spans) at the end."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from meshgate.common import config, logsetup, metrics, telemetry

T = TypeVar("T")


def run_service(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    service: str,
    description: str,
    run: Callable[[T], Coroutine[Any, Any, None]],
) -> None:
    """Run `meshgate-{service}`: options come from `MESHGATE_{SERVICE}_*`."""
    loaded = config.load(
        cls, argv, prog=f"meshgate-{service}", env_prefix=f"MESHGATE_{service.upper()}_", description=description
    )
    cfg = loaded.config
    logsetup.configure(cfg.log_level, cfg.log_json, service=service)  # type: ignore[attr-defined]
    log = logging.getLogger(f"meshgate.{service}")
    for k, v in loaded.describe().items():
        log.debug("config %s = %s", k, v)
    provider = telemetry.configure(f"meshgate-{service}")
    meters = metrics.configure(f"meshgate-{service}", getattr(cfg, "metrics_listen", ""))
    try:
        asyncio.run(run(cfg))
    finally:
        metrics.shutdown(meters)
        telemetry.shutdown(provider)
