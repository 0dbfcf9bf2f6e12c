"""`make run` with its demonstration (issue 15, item 11): once every step has
been shown, the demo's network, agents and namespaces stay for the newcomer to
explore, the last thing printed is how to call the CLI, and the printed
commands work against what is running; Ctrl-C removes everything."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV_BIN = pathlib.Path(sys.executable).parent

pytestmark = pytest.mark.root


def test_make_run_leaves_the_demo_to_explore_and_says_how(tmp_path):
    from meshgate.common.testing import in_ci
    from meshgate.gatewayd.lab import can_run

    if can_run():
        (pytest.fail if in_ci() else pytest.skip)(f"the demo cannot run here: {can_run()}")
    config = tmp_path / "meshgate-config.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_")}
    env["MESHGATE_CONFIG"] = str(config)
    p = subprocess.Popen([sys.executable, str(ROOT / "scripts/devstack.py"), "--state-dir", str(tmp_path / "state"),
                          "--etcd-port", "0", "--controlplane-port", "0", "--keyservice-port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)
            if line.startswith("running"):
                break
        out = "".join(lines)
        assert "result: the egress gateway works" in out, out
        assert "running (the demo's network networks/egress-demo, its agents and namespaces too)" in out, out
        # The CLI instructions come after the demo, right before "running".
        assert out.index("result: ") < out.index(f". {VENV_BIN / 'activate'}") < out.index("running"), out
        namespaces = {w.strip("(),:") for w in out.split() if w.startswith("mg-") and w.count("-") >= 2}
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert namespaces and all(ns in left for ns in namespaces), (namespaces, left)

        # The printed commands, as printed, through the context the dev stack saved.
        printed = [line.split("#")[0].split() for line in lines if line.strip().startswith("meshgate node list")]
        cli = subprocess.run([str(VENV_BIN / "meshgate"), *printed[0][1:], "-o", "json"], capture_output=True,
                             text=True, timeout=60, env=env)
        assert cli.returncode == 0, cli.stderr
        nodes = {n["name"]: n["state"] for n in json.loads(cli.stdout)["nodes"]}
        assert nodes == {"networks/egress-demo/nodes/gateway": "READY", "networks/egress-demo/nodes/client": "READY"}
    finally:
        p.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = p.communicate(timeout=120)
    assert p.returncode == 0, rest
    assert "stopped everything the dev stack started" in rest, rest
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in left for ns in namespaces), left
