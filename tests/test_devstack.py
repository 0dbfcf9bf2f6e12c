"""`make run`'s dev stack starts, creates the example network, stops
everything it started, and can run again on the same state."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(state: pathlib.Path) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/devstack.py"), "--once", "--no-demo", "--state-dir", str(state),
         "--etcd-port", "0", "--controlplane-port", "0", "--keyservice-port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _pids(text: str) -> list[int]:
    return [int(line.split("(pid ")[1].split(",")[0]) for line in text.splitlines() if "(pid " in line]


def test_devstack_twice_on_same_state(tmp_path):
    first = _run(tmp_path)
    assert "example network networks/demo: 100.64.0.0/24" in first
    second = _run(tmp_path)
    assert "example network networks/demo: 100.64.0.0/24" in second
    for pid in _pids(first) + _pids(second):
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
