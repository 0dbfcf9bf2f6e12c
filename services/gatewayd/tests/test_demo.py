"""The demonstration `make run` ends with, run standalone (its own etcd and
control plane, no key service): every step must report what it should, so the
README's account of it stays true."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


def test_the_demo_runs_every_step_and_cleans_up(lab):  # the fixture: skip or fail where labs cannot run
    p = subprocess.run([sys.executable, "-m", "meshgate.gatewayd.demo"], capture_output=True, text=True, timeout=240)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    for expected in (
        "the client tries the service directly: unreachable, as it should be",
        "the service sees the connection coming from 198.51.100.1: OK, the gateway, not the client",
        "for db.example.test: 203.0.113.100",
        "the client connects to db.example.test:5432 by name; the database sees 198.51.100.1: OK, the gateway",
        "TCP 5432: connects, as allowed; TCP 8080: refused by the gateway, as it should be",
        "PrivateKey = (secret)",
        "the laptop reaches the service, which sees 198.51.100.1: OK, the gateway",
        "tunnel counters unchanged: True",
        "OK, the client overlay address",
        "the client tries again: unreachable, as it should be",
        "result: the egress gateway works",
    ):
        assert expected in out, out
    # Nothing of the demo is left: its namespaces are gone.
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    tokens = {line.split()[0].split("-")[1] for line in out.splitlines() if line.strip().startswith("mg-")}
    assert tokens and not any(f"mg-{t}-" in left for t in tokens), left
