"""Forwarding sysctls, read and written under ``/proc/sys`` of the current network
namespace.

gatewayd only ever turns forwarding *on* (an egress node needs it); it never turns
it off again, because it cannot know whether something else on the host relies on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from meshgate.gatewayd.errors import ApplyError

ROOT = Path("/proc/sys")


def _path(key: str) -> Path:
    return ROOT / key.replace(".", "/")


def read(keys: Iterable[str]) -> dict[str, str]:
    out = {}
    for k in keys:
        try:
            out[k] = _path(k).read_text().strip()
        except OSError:
            pass
    return out


def write(values: Iterable[tuple[str, str]] | Mapping[str, str]) -> None:
    items = values.items() if isinstance(values, Mapping) else values
    for k, v in items:
        try:
            _path(k).write_text(v)
        except OSError as e:
            raise ApplyError("sysctl", f"cannot set {k}={v}: {e.strerror}") from None
