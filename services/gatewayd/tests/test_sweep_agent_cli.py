"""gatewayd's command line as a newcomer meets it (issue 15, item 11): a
refused enrollment key has its own exit code (not 2, "invalid desired state or
flags"), the exit codes are in --help, and `show` finds the interface `run` was
given without being told again. Real control plane process, real gatewayd in a
network namespace.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from meshgate.api.v1 import enrollment_pb2, network_pb2
from meshgate.common.testing import ServiceProcess
from meshgate.gatewayd.lab import ControlPlaneView

pytestmark = pytest.mark.root


@pytest.fixture
def view(lab, etcd_server, etcd_prefix):
    sock = str(lab.dir / "cp.sock")
    cp = ServiceProcess("meshgate-controlplane", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix],
                        listen=f"127.0.0.1:0,unix:{sock}").start()
    v = ControlPlaneView(cp.target, f"unix:{sock}", token=cp.admin_token)
    try:
        v.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
            network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
        yield v
    finally:
        v.channel.close()
        cp.stop()


def enrollment_key(view, key_id: str = "k", max_uses: int = 1) -> str:
    return view.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
        parent="networks/lab", enrollment_key_id=key_id,
        enrollment_key=enrollment_pb2.EnrollmentKey(max_uses=max_uses))).secret


def test_exit_codes_of_a_refused_join(lab, view):
    node = lab.node(lab.host("a"), "a")
    secret = enrollment_key(view)
    # A key the control plane does not know (right network and id, wrong secret): refused, exit 4.
    wrong = secret[: secret.rindex(".") + 1] + "x" * 20
    r = node.join_result(view.agent_target, wrong, "a", insecure_no_authority=True)
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "gatewayd: join refused: UNAUTHENTICATED: enrollment key not recognised" in r.stderr, r.stderr
    assert not (node.state_dir / "identity.json").exists()
    # The key used up: refused too. The same exit code, and nothing saved.
    node.join(view.agent_target, secret, "a", insecure_no_authority=True)
    other = lab.node(lab.host("b"), "b")
    r = other.join_result(view.agent_target, secret, "b", insecure_no_authority=True)
    assert r.returncode == 4 and "join refused" in r.stderr, (r.returncode, r.stderr)
    # A bad flag stays 2; a control plane that does not answer is 5.
    r = other.join_result(view.agent_target, secret, "b", insecure_no_authority=True,
                          extra=("--accept-routes", "nonsense"))
    assert r.returncode == 2, (r.returncode, r.stderr)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    r = subprocess.run([sys.executable, "-m", "meshgate.gatewayd", "join", "mgek_lab.k.x", "--control-plane", closed,
                        "--state-dir", str(lab.dir / "c-state"), "--insecure-no-authority"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 5 and f"the control plane at {closed} did not answer" in r.stderr, (r.returncode, r.stderr)


def test_help_lists_the_exit_codes():
    for args in ([], ["join"]):
        out = subprocess.run([sys.executable, "-m", "meshgate.gatewayd", *args, "--help"],
                             capture_output=True, text=True, timeout=60).stdout
        assert "4 " in out and "refused" in out and "2 " in out, out


def test_show_finds_the_interface_run_was_given(lab, view):
    node = lab.node(lab.host("a"), "a")
    node.join(view.agent_target, enrollment_key(view), "a", insecure_no_authority=True)
    node.start()  # run --interface <the lab's unique name>
    node.wait_status(lambda st: st.get("state") == "applied")
    deadline = time.monotonic() + 30
    while True:
        r = node.gatewayd("show")  # no --interface
        shown = json.loads(r.stdout) if r.returncode == 0 else {}
        if shown.get("exists") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.returncode == 0, r.stderr
    assert shown["interface"] == node.ifname and shown["exists"], shown
    assert shown["device"]["public_key"] == node.public_key
    node.stop()
    # ... and `down` removes it without --interface either.
    r = node.gatewayd("down")
    assert r.returncode == 0 and f"removed interface {node.ifname}" in r.stdout, r.stdout + r.stderr
