"""Agents stream with certificates: issued at enrollment, checked on every
stream, renewed over the stream before they expire.

Real processes (etcd, the key service with mTLS, a control plane with an mTLS
agent endpoint) and gatewayd's own join and stream code; refusals are driven
with raw gRPC calls carrying the credentials an attacker would have.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
from pathlib import Path

import grpc
import pytest

from cptest import wait_until
from meshgate.api.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from meshgate.common.testing import ServiceProcess, keyservice_pki, write_kek_file, write_test_pki
from meshgate.gatewayd import agentcert, stream


def wg_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def certified(etcd_server, etcd_prefix, tmp_path):
    """Key service (certificates valid 12 s) and a control plane serving agents on agents.sock."""
    kek = tmp_path / "kek"
    write_kek_file(kek)
    common = ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix]
    pki = keyservice_pki(str(tmp_path / "pki"), etcd_server.endpoint, etcd_prefix, str(kek))
    ks = ServiceProcess("meshgate-keyservice", common + ["--kek-file", str(kek), *pki.server_args,
                                                         "--cert-validity-hours", str(12 / 3600)],
                        credentials=pki.credentials()).start()
    agents = f"unix:{tmp_path / 'agents.sock'}"
    cp = ServiceProcess("meshgate-controlplane", common + ["--keyservice", ks.target, *pki.controlplane_args,
                                                           *pki.agent_args(agents)],
                        listen=f"127.0.0.1:0,unix:{tmp_path / 'cp.sock'}").start()
    md = cp.auth_metadata
    with grpc.insecure_channel(cp.target) as ch:
        network_pb2_grpc.NetworkServiceStub(ch).CreateNetwork(network_pb2.CreateNetworkRequest(
            network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")), metadata=md)
        key = enrollment_pb2_grpc.EnrollmentKeyServiceStub(ch).CreateEnrollmentKey(
            enrollment_pb2.CreateEnrollmentKeyRequest(parent="networks/lab", enrollment_key_id="k",
                                                      enrollment_key=enrollment_pb2.EnrollmentKey()), metadata=md)
    try:
        yield cp, key.secret, agents, tmp_path, pki
    finally:
        cp.stop()
        ks.stop()


async def joined(cp, secret: str, node_id: str, state: Path) -> stream.Identity:
    cp_sock = cp.listen.split(",")[1]
    ident, resp = await stream.join(cp_sock, secret, wg_key(), state, node_id=node_id)
    assert resp.credential.WhichOneof("credential") == "certificate_chain" and not resp.credential.token
    return stream.Identity.load(state)


async def first_update(src: stream.ControlPlaneSource, timeout: float = 15):
    async def first():
        async for u in src.updates():
            return u
    return await asyncio.wait_for(first(), timeout)


async def sync_code(target: str, creds, node: str, *, metadata=None, server_name: str = "localhost"):
    """The status of a Sync stream opened with `creds` (None: plaintext) saying Hello as `node`."""
    opts = [("grpc.ssl_target_name_override", server_name)] if creds is not None else []
    ch = grpc.aio.secure_channel(target, creds, options=opts) if creds is not None else grpc.aio.insecure_channel(target)
    async with ch:
        async def hello():
            yield agent_pb2.SyncRequest(hello=agent_pb2.SyncRequest.Hello(node=node))
            await asyncio.sleep(10)

        call = agent_pb2_grpc.AgentServiceStub(ch).Sync(hello(), metadata=metadata, timeout=10)
        try:
            async for msg in call:
                if msg.WhichOneof("message") == "snapshot":
                    return "OK", ""
        except grpc.aio.AioRpcError as e:
            return e.code().name, e.details()
    return "ENDED", ""


def creds_of(state: Path) -> grpc.ChannelCredentials:
    return agentcert.credentials(state)


async def test_agents_stream_with_their_certificate_and_renew_it_without_losing_the_stream(certified):
    cp, secret, agents, tmp, _ = certified
    ident = await joined(cp, secret, "n1", tmp / "n1")
    assert ident.certified and ident.agent_endpoint == agents
    ident_json = (tmp / "n1" / "identity.json").read_text()
    assert "token" not in ident_json and "BEGIN" not in ident_json  # no secret in the identity file
    assert os.stat(tmp / "n1" / agentcert.KEY).st_mode & 0o077 == 0
    _, first_end = agentcert.lifetime(tmp / "n1")
    src = stream.ControlPlaneSource(ident)
    src.renew_check_s = 0.5
    updates = []

    async def consume():
        async for u in src.updates():
            updates.append(u)

    task = asyncio.create_task(consume())
    try:
        await wait_until(lambda: src.certificates_renewed >= 1, "the certificate renewed", timeout=60)
        _, new_end = agentcert.lifetime(tmp / "n1")
        assert new_end > first_end
        # Before the old certificate expired, and on the same stream.
        assert dt.datetime.now(dt.UTC) < first_end
        assert src.streams_opened == 1 and updates and type(updates[0]).__name__ == "Snapshot"
        # The renewed pair works for a new connection.
        assert (await sync_code(agents, creds_of(tmp / "n1"), "networks/lab/nodes/n1"))[0] == "OK"
    finally:
        task.cancel()


async def test_streams_are_refused_without_the_right_certificate(certified):
    cp, secret, agents, tmp, _ = certified
    await joined(cp, secret, "n1", tmp / "n1")
    await joined(cp, secret, "n2", tmp / "n2")
    cp_sock = cp.listen.split(",")[1]
    # No certificate, on the plain listener: bearer tokens are refused on this control plane.
    code, details = await sync_code(cp_sock, None, "networks/lab/nodes/n1", metadata=(("authorization", "Bearer mgat_lab.n1.x"),))
    assert code == "UNAUTHENTICATED" and "certificate" in details
    # No client certificate on the agent endpoint: the handshake itself fails.
    ca = (tmp / "n1" / agentcert.CA).read_bytes()
    assert (await sync_code(agents, grpc.ssl_channel_credentials(ca), "networks/lab/nodes/n1"))[0] == "UNAVAILABLE"
    # A certificate from another CA.
    (tmp / "other").mkdir()
    other = write_test_pki(tmp / "other")
    alien = grpc.ssl_channel_credentials(ca, open(other["cli.key"], "rb").read(), open(other["cli.pem"], "rb").read())
    assert (await sync_code(agents, alien, "networks/lab/nodes/n1"))[0] == "UNAVAILABLE"
    # n2's certificate cannot open n1's stream.
    code, details = await sync_code(agents, creds_of(tmp / "n2"), "networks/lab/nodes/n1")
    assert code == "PERMISSION_DENIED", details
    assert (await sync_code(agents, creds_of(tmp / "n2"), "networks/lab/nodes/n2"))[0] == "OK"


async def test_an_expired_certificate_is_refused(certified):
    cp, secret, agents, tmp, _ = certified
    await joined(cp, secret, "n1", tmp / "n1")
    _, end = agentcert.lifetime(tmp / "n1")
    await asyncio.sleep(max(0.0, (end - dt.datetime.now(dt.UTC)).total_seconds()) + 1)
    assert (await sync_code(agents, creds_of(tmp / "n1"), "networks/lab/nodes/n1"))[0] == "UNAVAILABLE"


async def test_a_deleted_node_is_cut_off_at_once_despite_its_certificate(certified):
    cp, secret, agents, tmp, _ = certified
    ident = await joined(cp, secret, "n1", tmp / "n1")
    src = stream.ControlPlaneSource(ident)
    assert type(await first_update(src)).__name__ == "Snapshot"
    with grpc.insecure_channel(cp.target) as ch:
        node_pb2_grpc.NodeServiceStub(ch).DeleteNode(node_pb2.DeleteNodeRequest(name="networks/lab/nodes/n1"),
                                                     metadata=cp.auth_metadata)
    code, details = await sync_code(agents, creds_of(tmp / "n1"), "networks/lab/nodes/n1")
    assert code == "UNAUTHENTICATED" and "no longer exists" in details
    # A node of the same name joins again (another machine, another key): the
    # old certificate, still unexpired, does not speak for it.
    await joined(cp, secret, "n1", tmp / "n1-again")
    code, details = await sync_code(agents, creds_of(tmp / "n1"), "networks/lab/nodes/n1")
    assert code == "UNAUTHENTICATED" and "not one of" in details, details
    assert (await sync_code(agents, creds_of(tmp / "n1-again"), "networks/lab/nodes/n1"))[0] == "OK"
