"""The key service's rotation lag against policy, served by `--metrics-listen`.

A real key service (scheduler ticking every 0.2 s) finds a network whose
pre-shared keys were due an hour ago (created two hours ago, rotated every
hour) and one whose node key is an hour past `max_node_key_age`: it starts both
rotations and `meshgate_keyservice_rotation_lag_seconds` records, per kind, how
late each was against its policy (about an hour), next to the rotations and
the leadership it counts. `promtool check metrics` passes on the output.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from meshgate.api.v1 import node_pb2
from meshgate.common.testing import ServiceProcess, eventually, in_ci

HOUR = duration_pb2.Duration(seconds=3600)


def hours_ago(h: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns() - int(h * 3600e9))
    return ts


def sample(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name)}(?:\{{{re.escape(labels)}\}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


async def test_rotation_lag_against_policy_is_served(etcd_server, etcd_prefix, etcd, keks, kek_env, put_network,
                                                    process_logs, tmp_path):
    keks.new("k1")
    await put_network("due", preshared_key_rotation_period=HOUR, create_time=hours_ago(2))
    await put_network("aged", max_node_key_age=HOUR)
    old = node_pb2.Node(name="networks/aged/nodes/old", public_key="x" * 44, public_key_create_time=hours_ago(2))
    await etcd.put(etcd.key("nodes", "aged", "old"), old.SerializeToString())
    ks = ServiceProcess("meshgate-keyservice", [
        "--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix, "--scheduler-interval", "0.2",
        "--metrics-listen", "0", "--insecure"], env=kek_env("k1", path=str(tmp_path / "kek"))).start()
    try:
        def served_at() -> str | None:
            m = re.search(r"metrics served at (http://\S+/metrics)", ks.log(tail=0))
            return m.group(1) if m else None

        url = await asyncio.to_thread(eventually, served_at, "the key service logs its metrics URL")

        def scraped() -> str | None:
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
            counts = [sample(text, "meshgate_keyservice_rotation_lag_seconds_count", f'kind="{k}"')
                      for k in ("psk", "node_key")]
            return text if all(c and c >= 1 for c in counts) else None

        text = await asyncio.to_thread(eventually, scraped, "rotation lag of both kinds served")
        for kind in ("psk", "node_key"):
            count = sample(text, "meshgate_keyservice_rotation_lag_seconds_count", f'kind="{kind}"')
            lag = sample(text, "meshgate_keyservice_rotation_lag_seconds_sum", f'kind="{kind}"')
            assert count == 1, (kind, count)  # started once: nothing is due afterwards
            # due an hour ago: about an hour late (plus the time this test took to start it)
            assert lag is not None and 3590 <= lag <= 3600 + 600, (kind, lag)
        assert sample(text, "meshgate_keyservice_scheduler_leader") == 1
        assert sample(text, "meshgate_keyservice_kek_age_seconds") is not None
        promtool = Path("/usr/bin/promtool")
        if not promtool.exists():
            if in_ci():
                pytest.fail("CI=true but promtool is missing (Debian package prometheus)")
            pytest.skip("needs promtool (Debian package prometheus)")
        r = await asyncio.to_thread(subprocess.run, [str(promtool), "check", "metrics"], input=text,
                                    capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        ks.stop()
        process_logs.append(ks.log(tail=0))
