"""Fixtures for SDK and CLI tests: real control-plane processes on real etcd.

- `controlplane` (session): one `meshgate-controlplane` process on its own etcd
  prefix; tests keep apart by using `fresh` ids and ranges.
- `fresh`: a unique network id and a /24 of 100.64.0.0/10 no other test uses.
- `own_controlplane`: a process just for one test (restarts, SIGSTOP).
- `mgconfig`: an empty context file and `MESHGATE_*` cleared, so a developer's
  own settings never leak into a test.
"""

from __future__ import annotations

import ipaddress
import itertools
import uuid
from dataclasses import dataclass

import pytest

from meshgate.common.testing import ServiceProcess

_blocks = itertools.count(1)


def start_controlplane(etcd_server, prefix: str, listen: str = "127.0.0.1:0", env=None) -> ServiceProcess:
    return ServiceProcess(
        "meshgate-controlplane",
        ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", prefix],
        env=env or {},
        listen=listen,
    ).start()


@pytest.fixture(scope="session")
def controlplane(etcd_server):
    proc = start_controlplane(etcd_server, f"/sdk-{uuid.uuid4().hex[:8]}")
    yield proc
    proc.stop()


@pytest.fixture
def own_controlplane(etcd_server, monkeypatch):
    """Starts a process for this test; its bootstrap admin token becomes
    MESHGATE_TOKEN (as a user would export it)."""
    procs = []

    def start(prefix: str | None = None, listen: str = "127.0.0.1:0", env=None) -> ServiceProcess:
        p = start_controlplane(etcd_server, prefix or f"/sdk-{uuid.uuid4().hex[:8]}", listen, env)
        procs.append(p)
        if p.admin_token:
            monkeypatch.setenv("MESHGATE_TOKEN", p.admin_token)
        return p

    yield start
    for p in procs:
        p.signal(18)  # SIGCONT, in case a test left it stopped
        p.stop()


@dataclass
class Fresh:
    net: str
    cidr: str

    @property
    def network(self) -> str:
        return f"networks/{self.net}"


@pytest.fixture
def fresh() -> Fresh:
    block = next(_blocks)
    net = ipaddress.ip_network("100.64.0.0/10")
    cidr = ipaddress.ip_network((int(net.network_address) + block * 256, 24))
    return Fresh(f"n{uuid.uuid4().hex[:10]}", str(cidr))


@pytest.fixture(autouse=True)
def mgconfig(request, tmp_path, monkeypatch):
    """An empty context file and MESHGATE_* cleared; for a test of the shared
    control plane, its admin token in MESHGATE_TOKEN (the way a user passes one)."""
    import os

    for k in list(os.environ):
        if k.startswith("MESHGATE_"):
            monkeypatch.delenv(k)
    path = tmp_path / "meshgate-config.yaml"
    monkeypatch.setenv("MESHGATE_CONFIG", str(path))
    if "controlplane" in request.fixturenames:
        monkeypatch.setenv("MESHGATE_TOKEN", request.getfixturevalue("controlplane").admin_token)
    return path
