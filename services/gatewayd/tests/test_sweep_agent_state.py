"""`meshgate node list` shows what the agents do (issue 15, item 9): READY for
nodes whose gatewayd is connected and has applied its state, OFFLINE once an
agent has gone, PENDING for a node no agent ever ran for. Real control plane
process, real gatewayd agents in network namespaces, the real CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from meshgate.api.v1 import enrollment_pb2, network_pb2, node_pb2, node_pb2_grpc
from meshgate.common.testing import ServiceProcess
from meshgate.gatewayd.lab import ControlPlaneView, Egress

pytestmark = pytest.mark.root
MESHGATE = os.path.join(os.path.dirname(sys.executable), "meshgate")


@pytest.fixture
def view(lab, etcd_server, etcd_prefix, mgconfig_env):
    socket = str(lab.dir / "cp.sock")
    cp = ServiceProcess("meshgate-controlplane", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix],
                        listen=f"127.0.0.1:0,unix:{socket}").start()
    v = ControlPlaneView(cp.target, f"unix:{socket}", token=cp.admin_token)
    v.token = cp.admin_token
    try:
        yield v
    finally:
        v.channel.close()
        cp.stop()


@pytest.fixture
def mgconfig_env(tmp_path, monkeypatch):
    for k in list(os.environ):
        if k.startswith("MESHGATE_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MESHGATE_CONFIG", str(tmp_path / "meshgate-config.yaml"))


def node_states(view) -> dict[str, str]:
    """NAME -> STATE, from the table `meshgate node list` prints."""
    p = subprocess.run([MESHGATE, "--target", view.target, "node", "list", "--parent", "networks/lab", "-o", "table"],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, MESHGATE_TOKEN=view.token))
    assert p.returncode == 0 and p.stdout, (p.stdout, p.stderr)
    head, *rows = p.stdout.splitlines()
    col = head.index("STATE")  # columns are aligned; empty cells (IPV6) leave only blanks
    return {r.split()[0]: r[col:].split()[0] for r in rows}


def wait_states(view, want: dict[str, str], timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    got = {}
    while time.monotonic() < deadline:
        got = node_states(view)
        if got == want:
            return got
        time.sleep(0.3)
    st = view.status()
    raise AssertionError(f"node list shows {got}, expected {want}; status: "
                         + ", ".join(f"{n.node} connected={n.connected} converged={n.converged}" for n in st.nodes))


def test_node_list_shows_ready_offline_and_pending(view, egress: Egress):
    eg = egress
    view.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
        network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
    key = view.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
        parent="networks/lab", enrollment_key_id="lab", enrollment_key=enrollment_pb2.EnrollmentKey(max_uses=2)))
    eg.gw.join(view.agent_target, key.secret, "gateway", endpoint=f"{eg.gw_underlay(0)}:51820",
               insecure_no_authority=True)
    eg.clients[0].join(view.agent_target, key.secret, "client", insecure_no_authority=True)
    node_pb2_grpc.NodeServiceStub(view.channel).CreateNode(node_pb2.CreateNodeRequest(
        parent="networks/lab", node_id="spare", node=node_pb2.Node(endpoint="192.0.2.99:51820")))
    # Joined but not running yet: no agent has connected.
    assert set(node_states(view).values()) == {"PENDING"}

    for n in (eg.gw, eg.clients[0]):
        n.start()
    wait_states(view, {"networks/lab/nodes/gateway": "READY", "networks/lab/nodes/client": "READY",
                       "networks/lab/nodes/spare": "PENDING"})
    got = json.loads(subprocess.run(
        [MESHGATE, "--target", view.target, "node", "get", "networks/lab/nodes/gateway", "-o", "json"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, MESHGATE_TOKEN=view.token)).stdout)
    assert got["state"] == "READY"

    eg.clients[0].stop()
    wait_states(view, {"networks/lab/nodes/gateway": "READY", "networks/lab/nodes/client": "OFFLINE",
                       "networks/lab/nodes/spare": "PENDING"})
