"""Key material end to end, in namespaces: a real key service, a real control
plane using it, and gatewayd agents that joined with an enrollment key.

- a peer key written straight into etcd is never applied, and the agent says why;
- rotating every pre-shared key under continuous ping (10/s) loses nothing;
- rotating a node's key under the same ping loses at most 10 packets.

Every test runs under the "never in the open" guard (`secret_guard`, root
conftest): the KEK, every secret it opens in the store, the enrollment
secret, the agents' tokens and the nodes' private keys (old and new) must
appear in no log record, no process log (key service, control plane, every
gatewayd), no raw etcd value and no span the three services exported.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time

import grpc
import pytest

from meshgate.api.v1 import enrollment_pb2, keys_pb2, keys_pb2_grpc, network_pb2, node_pb2
from meshgate.common.testing import KeyServicePki, ServiceProcess, keyservice_pki, write_kek_file
from meshgate.gatewayd.lab import ControlPlaneView, Egress, Lab
from meshgate.gatewayd.trust import fingerprint, pins_of_secret

RANGE = "198.51.100.0/24"
KS = "/meshgate.api.v1.KeyService/"


class KeyedLoop(ControlPlaneView):
    def __init__(self, ks: ServiceProcess, cp: ServiceProcess, socket: str, guard, pki: KeyServicePki):
        super().__init__(cp.target, socket, token=cp.admin_token)
        guard.add_token(cp.admin_token)
        self.ks_proc, self.cp, self.guard = ks, cp, guard
        # The test speaks to the key service as the control plane does.
        self.ks_channel = grpc.secure_channel(ks.target, pki.credentials("controlplane"))
        self.ks = keys_pb2_grpc.KeyServiceStub(self.ks_channel)

    def authority_keys(self) -> list[bytes]:
        return list(self.ks.GetKeyAuthority(keys_pb2.GetKeyAuthorityRequest(), timeout=10).public_keys)

    def close(self) -> None:
        super().close()
        self.ks_channel.close()


def node_secrets(lab: Lab) -> list[str]:
    """What the nodes hold in their state directories: private keys (current
    and pending), the agent's token, the enrollment secret it joined with."""
    out = []
    for n in lab.nodes:
        for f in (n.state_dir / "private.key", n.state_dir / "private.key.next",
                  n.state_dir.parent / f"{n.state_dir.name}-enroll.key"):
            if f.exists():
                out.append(f.read_text().strip())
        identity = n.state_dir / "identity.json"
        if identity.exists():
            token = json.loads(identity.read_text())["credential"].get("token")
            if token:
                out.append(token)
        for tls_key in (n.state_dir / "agent-tls.key", n.state_dir / "agent-tls.key.next"):
            if tls_key.exists():
                out.append(tls_key.read_text())  # the agent's mTLS private key (PEM)
    return out


def register(guard, held: list[str]) -> None:
    for value in held:
        if value.startswith(("mgek_", "mgat_")):
            guard.add_token(value)
        elif value.startswith("-----BEGIN"):
            guard.add(value)
        else:
            guard.add(base64.b64decode(value))


@pytest.fixture
def keyed(secret_guard, lab, etcd_server, etcd_prefix):
    kek = lab.dir / "kek"
    secret_guard.keks.update(write_kek_file(kek))
    common = ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix]
    pki = keyservice_pki(str(lab.dir / "pki"), etcd_server.endpoint, etcd_prefix, str(kek))
    ks = ServiceProcess("meshgate-keyservice", common + ["--kek-file", str(kek), *pki.server_args],
                        credentials=pki.credentials()).start()
    socket = str(lab.dir / "cp.sock")
    # Agents enroll on cp.sock and stream with their certificates on agents.sock (mTLS).
    cp = ServiceProcess("meshgate-controlplane", common + ["--keyservice", ks.target, *pki.controlplane_args,
                                                           *pki.agent_args(f"unix:{lab.dir / 'agents.sock'}")],
                        listen=f"127.0.0.1:0,unix:{socket}").start()
    loop = KeyedLoop(ks, cp, f"unix:{socket}", secret_guard, pki)
    try:
        yield loop
    finally:
        loop.close()
        for n in lab.nodes:  # before the lab removes their directories: their logs and keys
            n.stop()
        register(secret_guard, node_secrets(lab))
        secret_guard.process_logs += [n.log_path.read_text(errors="replace") for n in lab.nodes if n.log_path.exists()]
        cp.stop()
        ks.stop()
        secret_guard.process_logs += [cp.log(tail=0), ks.log(tail=0)]


def up(loop: KeyedLoop, eg: Egress) -> None:
    # The three services export their spans to the guard, which searches them:
    # what follows must have made some.
    loop.guard.expect_span("/meshgate.api.v1.AgentService/Enroll", "meshgate-controlplane", at_least=2)
    loop.guard.expect_span(KS + "RegisterNodeKey", "meshgate-keyservice", at_least=2)
    loop.guard.expect_span(KS + "IssuePresharedKeys", "meshgate-keyservice")
    loop.guard.expect_span("gatewayd.apply", "meshgate-gatewayd", at_least=2)
    loop.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
        network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
    key = loop.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
        parent="networks/lab", enrollment_key_id="lab", enrollment_key=enrollment_pb2.EnrollmentKey()))
    loop.guard.add_token(key.secret)
    base, pins = pins_of_secret(key.secret)
    loop.guard.add_token(base)  # its random part, whatever the pins after it
    # a control plane with a key service pins its authority in the secret
    assert pins == tuple(fingerprint(k) for k in loop.authority_keys())
    eg.gw.join(loop.agent_target, key.secret, "gateway", endpoint=f"{eg.gw_underlay(0)}:51820")
    for i, c in enumerate(eg.clients):
        c.join(loop.agent_target, key.secret, f"client{i}")
    for n in (eg.gw, *eg.clients):  # the pinned authority, and only it, is what the agents verify with
        saved = json.loads((n.state_dir / "identity.json").read_text())
        assert saved["authority_pinned_by"] == "enrollment key" and not saved["insecure_no_authority"]
        assert [base64.b64decode(k) for k in saved["key_authority_public_keys"]] == loop.authority_keys()
    register(loop.guard, node_secrets(eg.lab))  # the first private keys (a rotation replaces them)
    for n in (eg.gw, *eg.clients):
        n.start()
    loop.wait_converged(1 + len(eg.clients))


def ping(node, count: int = 100):
    node.host.wait_reachable("100.64.0.1")
    return node.host.spawn("ping", "-n", "-i", "0.1", "-c", str(count), "-W", "1", "100.64.0.1")


def lost(p, what: str) -> tuple[int, int]:
    """(sent, lost) of a finished ping; prints the worst round trip too, since
    ping counts a reply held back by a handshake as received, however late."""
    out, _ = p.communicate(timeout=120)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    rtt = re.search(r"= [\d.]+/[\d.]+/([\d.]+)/", out)
    if os.environ.get("MESHGATE_DEBUG_PING"):  # which ones: at the rotation, or before it?
        got = {int(x) for x in re.findall(r"icmp_seq=(\d+)", out)}
        print("missing seqs:", sorted(set(range(1, int(m.group(1)) + 1)) - got))
    sent, lost_n = int(m.group(1)), int(m.group(1)) - int(m.group(2))
    print(f"{what} under ping: {lost_n} of {sent} packets lost, slowest reply {rtt.group(1) if rtt else '?'} ms")
    return sent, lost_n


def test_peer_key_written_into_etcd_is_not_applied_and_the_agent_says_why(
    keyed: KeyedLoop, egress: Egress, etcd_server, etcd_prefix
):
    eg = egress
    up(keyed, eg)
    client = eg.clients[0]
    assert eg.gw.public_key in client.peers()
    # An attacker with write access to etcd swaps the gateway's key in its record.
    import asyncio

    from meshgate.common.etcd import Etcd

    async def forge() -> str:
        etcd = Etcd(etcd_server.endpoint, etcd_prefix)
        try:
            kv = await etcd.get(etcd.key("nodes", "lab", "gateway"))
            node = node_pb2.Node.FromString(kv.value)
            node.public_key = base64.b64encode(os.urandom(32)).decode()
            await etcd.put(kv.key, node.SerializeToString())
            return node.public_key
        finally:
            await etcd.close()

    forged = asyncio.run(forge())
    deadline = time.monotonic() + 30
    st = None
    while time.monotonic() < deadline:
        st = keyed.status()
        c = next(n for n in st.nodes if n.node.endswith("/client0"))
        if "networks/lab/nodes/gateway" in c.last_error:
            break
        time.sleep(0.2)
    assert "networks/lab/nodes/gateway" in c.last_error and "sign" in c.last_error, st
    assert forged not in client.peers() and not c.converged


def test_psk_rotation_under_ping_loses_nothing(keyed: KeyedLoop, egress: Egress):
    eg = egress
    up(keyed, eg)
    client = eg.clients[0]
    # The key about to be rotated away (the store keeps only the new one): the guard searches for it too.
    before = keyed.ks.IssuePresharedKeys(keys_pb2.IssuePresharedKeysRequest(
        network="networks/lab", pairs=["networks/lab/nodes/client0|networks/lab/nodes/gateway"]))
    keyed.guard.add(*(base64.b64decode(k.key) for k in before.keys))
    p = ping(client)
    time.sleep(2)
    r = keyed.ks.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(network="networks/lab"))
    assert r.rotated >= 1
    keyed.wait_converged(2, at_least=keyed.status().revision)
    sent, lost_n = lost(p, "PSK rotation")
    assert sent == 100 and lost_n == 0


def test_node_key_rotation_under_ping_loses_at_most_10_packets(keyed: KeyedLoop, egress: Egress):
    eg = egress
    up(keyed, eg)
    client = eg.clients[0]
    old = eg.gw.public_key
    p = ping(client)
    time.sleep(2)
    keyed.ks.RotateNodeKey(keys_pb2.RotateNodeKeyRequest(node="networks/lab/nodes/gateway"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        peers = client.peers()
        if old not in peers and len(peers) == 1:
            break
        time.sleep(0.1)
    keyed.wait_converged(2)
    new = next(iter(client.peers()))
    assert new != old
    sent, lost_n = lost(p, "node key rotation")
    assert sent == 100 and lost_n <= 10
