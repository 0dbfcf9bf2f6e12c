"""A user's journey on a topology of its own: the control plane, its key
service and etcd in one network namespace, reached only over TCP with TLS at
203.0.113.1 (a bridge); two gatewayd nodes in two more namespaces join with
`--ca-file`, get certificates and stream over the TCP mTLS agent endpoint;
the CLI (from a node's namespace, TLS, MESHGATE_TOKEN) creates the network
and an enrollment key, a viewer token is refused a delete and the refusal is
in the audit log, and the two nodes ping each other through the overlay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.root

PY = sys.executable
BIN = os.path.dirname(PY)


def sh(host, *argv, check=True, input=None, env=None):
    full = ["ip", "netns", "exec", host.name, *argv]
    r = subprocess.run(full, capture_output=True, text=True, input=input, env=env, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv[:3]} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def until(pred, what, tries=150, log=None):
    for _ in range(tries):
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"never: {what}" + (f"\n{log.read_text()[-3000:]}" if log is not None and log.exists() else ""))


def test_tls_control_plane_in_its_own_namespace_two_certified_nodes_and_a_refused_viewer(lab):
    d = lab.dir
    cp, n1, n2 = lab.host("cp"), lab.host("n1"), lab.host("n2")
    cp.ip("link", "add", "br0", "type", "bridge")
    cp.ip("address", "add", "203.0.113.1/24", "dev", "br0")
    cp.ip("link", "set", "br0", "up")
    for h, addr, ifn in ((n1, "203.0.113.2/24", "v1"), (n2, "203.0.113.3/24", "v2")):
        cp.ip("link", "add", f"{ifn}c", "type", "veth", "peer", "name", "eth0", "netns", h.name)
        cp.ip("link", "set", f"{ifn}c", "master", "br0")
        cp.ip("link", "set", f"{ifn}c", "up")
        h.ip("address", "add", addr, "dev", "eth0")
        h.ip("link", "set", "eth0", "up")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHGATE_", "OTEL_"))}
    # etcd, key service, control plane: all inside the cp namespace
    etcd = cp.spawn("etcd", "--data-dir", str(d / "etcd"), "--listen-client-urls", "http://127.0.0.1:2379",
                    "--advertise-client-urls", "http://127.0.0.1:2379", "--listen-peer-urls", "http://127.0.0.1:2380",
                    stdout=open(d / "etcd.log", "w"), stderr=subprocess.STDOUT)
    until(lambda: sh(cp, "etcdctl", "--endpoints", "127.0.0.1:2379", "endpoint", "health", check=False).returncode == 0,
          "etcd healthy")
    (d / "kek").write_text(sh(cp, PY, "-m", "meshgate.keyservice.sealing", "new", "k1").stdout)
    os.chmod(d / "kek", 0o600)
    pki = d / "pki"
    (sh(cp, f"{BIN}/meshgate-keyservice-certs", "--etcd-endpoints", "127.0.0.1:2379", "--kek-file", str(d / "kek"),
             "--out-dir", str(pki), "--controlplane-name", "203.0.113.1"))
    ks = cp.spawn(f"{BIN}/meshgate-keyservice", "--listen", "127.0.0.1:7401", "--etcd-endpoints", "127.0.0.1:2379",
                  "--kek-file", str(d / "kek"), "--tls-cert", str(pki / "keyservice.pem"), "--tls-key", str(pki / "keyservice.key"),
                  "--tls-client-ca", str(pki / "ca.pem"), stdout=open(d / "ks.log", "w"), stderr=subprocess.STDOUT, env=env)
    until(lambda: "127.0.0.1]:7401 " in sh(cp, "ss", "-ltn", check=False).stdout, "the key service's port",
          log=d / "ks.log")

    def c(n: str) -> str:
        return str(pki / n)

    cpp = cp.spawn(f"{BIN}/meshgate-controlplane", "--listen", "203.0.113.1:7400", "--etcd-endpoints", "127.0.0.1:2379",
                   "--tls-cert", c("controlplane.pem"), "--tls-key", c("controlplane.key"),
                   "--keyservice", "127.0.0.1:7401", "--keyservice-ca", c("ca.pem"), "--keyservice-cert", c("controlplane.pem"),
                   "--keyservice-key", c("controlplane.key"), "--agent-listen", "203.0.113.1:7402",
                   "--agent-client-ca", c("ca.pem"), "--bootstrap-token-file", str(d / "admin-token"),
                   stdout=open(d / "cp.log", "w"), stderr=subprocess.STDOUT, env=env)
    until(lambda: (d / "admin-token").exists(), "the bootstrap admin token", log=d / "cp.log")
    until(lambda: sh(cp, "ss", "-ltn", check=False).stdout.count("203.0.113.1]:74") >= 2, "the API and agent ports")
    admin = (d / "admin-token").read_text().strip()
    cfg = d / "mg.yaml"
    menv = {**env, "MESHGATE_CONFIG": str(cfg)}
    def mg(host, *args, token=admin, check=True):
        return sh(host, f"{BIN}/meshgate", "--target", "203.0.113.1:7400", "--ca-file", c("ca.pem"),
                  *args, check=check, env={**menv, "MESHGATE_TOKEN": token})
    mg(n1, "network", "create", "--network-id", "journey", "--network.ipv4-cidr", "100.64.20.0/24")
    secret = mg(n1, "enrollment-key", "create", "--parent", "networks/journey", "--enrollment-key-id", "k",
                "--enrollment-key.max-uses", "2", "-o", "secret").stdout.strip()
    assert ".ka_" in secret  # the key authority's pin
    nodes = []
    for h, addr, role in ((n1, "203.0.113.2", "a"), (n2, "203.0.113.3", "b")):
        node = lab.node(h, role)
        kf = d / f"{role}.key"
        kf.write_text(secret)
        os.chmod(kf, 0o600)
        r = sh(h, PY, "-m", "meshgate.gatewayd", "join", "--key-file", str(kf), "--control-plane", "203.0.113.1:7400",
               "--ca-file", c("ca.pem"), "--node-id", role, "--endpoint", f"{addr}:51820", "--state-dir", str(node.state_dir),
               "--backend", "userspace")
        assert f"joined as networks/journey/nodes/{role}" in r.stdout
        ident = json.loads((node.state_dir / "identity.json").read_text())
        assert ident["credential"] == {"certificate": "agent-tls.pem", "agent_endpoint": "203.0.113.1:7402"}
        node.start()
        nodes.append(node)
    st = until(lambda: (lambda s: s if s.get("converged_nodes") == 2 else None)(
        json.loads(mg(n1, "network", "get-status", "networks/journey", "-o", "json").stdout)), "2 nodes converged")
    assert st.get("converged_nodes") == 2, st
    a_ip = json.loads(mg(n1, "node", "get", "networks/journey/nodes/a", "-o", "json").stdout)["ipv4_address"]
    ping = sh(n2, "ping", "-c", "3", "-W", "2", a_ip, check=False)
    assert " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
    viewer = mg(n1, "token", "create", "--token-id", "ann", "--token.bindings", "{role: viewer}", "--token.expire-time", "+1d",
                "-o", "secret").stdout.strip()
    listed = json.loads(mg(n1, "node", "list", "--parent", "networks/journey", "-o", "json", token=viewer).stdout)
    assert sorted(n["name"] for n in listed["nodes"]) == ["networks/journey/nodes/a", "networks/journey/nodes/b"]
    r = mg(n1, "node", "delete", "networks/journey/nodes/a", token=viewer, check=False)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr, r.stderr
    assert mg(n1, "node", "get", "networks/journey/nodes/a").returncode == 0  # still there
    rec = json.loads(mg(n1, "audit", "list", "--principal", "tokens/ann", "-o", "json").stdout)["audit_records"]
    assert [(x["method"].rsplit("/", 1)[1], x["status_code"]) for x in rec] == [("DeleteNode", "PERMISSION_DENIED")]
    assert rec[0]["peer"].startswith("ipv4:203.0.113.2:")  # from n1, as the server saw it
    # The admin deletes b: its agent is cut off and cannot stream again.
    mg(n1, "node", "delete", "networks/journey/nodes/b")
    until(lambda: "control plane refused networks/journey/nodes/b" in open(nodes[1].log_path).read(), "b refused")
    for n in nodes:
        n.stop()
    for p in (cpp, ks, etcd):
        p.terminate()
        p.wait(15)
    assert admin not in open(d / "cp.log").read() and viewer not in open(d / "cp.log").read()
