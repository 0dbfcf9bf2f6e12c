"""`make run`'s dev stack starts, creates the example network, stops
everything it started, and can run again on the same state; it says how to
call the CLI (how to get `meshgate` on the PATH, the context it saved), and
what it says works."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV_BIN = pathlib.Path(sys.executable).parent


def _run(state: pathlib.Path, config: pathlib.Path) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/devstack.py"), "--once", "--no-demo", "--state-dir", str(state),
         "--etcd-port", "0", "--controlplane-port", "0", "--keyservice-port", "0"],
        capture_output=True, text=True, timeout=120, env=_env(config),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _env(config: pathlib.Path) -> dict[str, str]:
    """The dev stack saves a CLI context: in a file of the test's, never the user's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_")}
    env["MESHGATE_CONFIG"] = str(config)
    return env


def _pids(text: str) -> list[int]:
    return [int(line.split("(pid ")[1].split(",")[0]) for line in text.splitlines() if "(pid " in line]


def test_devstack_twice_on_same_state(tmp_path):
    config = tmp_path / "meshgate-config.yaml"
    first = _run(tmp_path / "state", config)
    assert "example network networks/demo: 100.64.0.0/24" in first
    for svc in ("meshgate-keyservice", "meshgate-controlplane"):  # where each serves its metrics
        assert re.search(rf"{svc} serves Prometheus metrics at http://127\.0\.0\.1:\d+/metrics", first), first
    second = _run(tmp_path / "state", config)
    assert "example network networks/demo: 100.64.0.0/24" in second
    for pid in _pids(first) + _pids(second):
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_devstack_says_how_to_call_the_cli(tmp_path):
    config = tmp_path / "meshgate-config.yaml"
    out = _run(tmp_path / "state", config)
    # How to get the CLI (on the PATH, or by its full path), and the context it saved, where.
    assert f". {VENV_BIN / 'activate'}" in out and f"full path, {VENV_BIN / 'meshgate'}" in out, out
    assert f"context `local` (current, saved in {config})" in out, out
    assert "grpc" not in out.lower(), out  # no raw gRPC one-liner
    # The commands it prints run as printed, with the context it saved.
    cmd = next(line.split("#")[0].split() for line in out.splitlines() if line.strip().startswith("meshgate network list"))
    p = subprocess.run([str(VENV_BIN / cmd[0]), *cmd[1:], "-o", "json"], capture_output=True, text=True, timeout=60,
                       env=_env(config))
    # --once stopped the stack: the context still names it, and the CLI says nothing answers there.
    assert p.returncode == 1 and "nothing answers at 127.0.0.1:" in p.stderr, p.stderr
    ctx = config.read_text()
    assert "local" in ctx and str(tmp_path / "state" / "admin-token") in ctx
