"""Real control-plane processes with simulated agents: one trace per change
(the API call, the fan-out, and the trace context each affected agent receives,
at a real OTLP receiver), joined by the key service's spans when the call
needs it; a graceful shutdown ending agent streams; two processes on one etcd
serving agents that converge on each other's changes."""

import asyncio
import base64
import os

import grpc
import pytest

import cptest
from meshgate.api.v1 import (
    agent_pb2_grpc,
    egress_pb2,
    egress_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    external_client_pb2,
    external_client_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from meshgate.common.testing import OtlpReceiver, ServiceProcess, keyservice_pki, write_kek_file

API = "/meshgate.api.v1.EgressGatewayService/CreateEgressGateway"


@pytest.fixture
async def otlp():
    r = await OtlpReceiver().start()
    yield r
    await r.stop()


async def test_api_change_and_its_deltas_share_one_trace(etcd_server, etcd_prefix, otlp):
    cp = ServiceProcess(
        "meshgate-controlplane",
        ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix],
        env=otlp.env("meshgate-controlplane"),
    ).start()
    ch = cptest.authed_channel(cp.target, cp.admin_token)
    agents = []
    try:
        await network_pb2_grpc.NetworkServiceStub(ch).CreateNetwork(
            network_pb2.CreateNetworkRequest(network_id="prod", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24"))
        )
        key = await enrollment_pb2_grpc.EnrollmentKeyServiceStub(ch).CreateEnrollmentKey(
            enrollment_pb2.CreateEnrollmentKeyRequest(parent="networks/prod", enrollment_key_id="k", enrollment_key=enrollment_pb2.EnrollmentKey())
        )
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        for i in range(3):
            a = cptest.SimAgent(stub, key.secret, f"n{i}", f"192.0.2.{i + 1}:51820")
            agents.append(await (await a.enroll()).connect())
        await cptest.wait_until(lambda: all(a.state is not None and len(a.state.peers) == 2 for a in agents), "mesh")
        before = [len(a.received) for a in agents]

        await egress_pb2_grpc.EgressGatewayServiceStub(ch).CreateEgressGateway(
            egress_pb2.CreateEgressGatewayRequest(
                parent="networks/prod", egress_gateway_id="db",
                egress_gateway=egress_pb2.EgressGateway(node="networks/prod/nodes/n0", ranges=["198.51.100.0/24"]),
            )
        )
        await cptest.wait_until(lambda: all(len(a.received) > b for a, b in zip(agents, before, strict=True)), "deltas")
        parents = {a.received[-1].trace_context.traceparent for a in agents}
        assert len(parents) == 1 and parents != {""}
        trace_id = bytes.fromhex(parents.pop().split("-")[1])

        def api_and_fanout():
            names = {s.name for _, s in otlp.trace(trace_id)}
            return API in names and "controlplane.fanout" in names

        await cptest.wait_until(api_and_fanout, "API and fan-out spans at the OTLP receiver")
        spans = {s.name: s for _, s in otlp.trace(trace_id)}
        api = spans[API]
        assert spans["controlplane.fanout"].parent_span_id == api.span_id
        attrs = {a.key: a.value.int_value for a in spans["controlplane.fanout"].attributes}
        assert attrs["meshgate.messages_sent"] == 3
    finally:
        for a in agents:
            await a.close()
        await ch.close()
        cp.stop()


async def test_key_service_calls_join_the_api_calls_trace(etcd_server, etcd_prefix, otlp, tmp_path):
    kek = tmp_path / "kek"
    write_kek_file(kek)
    common = ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix]
    pki = keyservice_pki(str(tmp_path / "pki"), etcd_server.endpoint, etcd_prefix, str(kek))
    ks = ServiceProcess("meshgate-keyservice", common + ["--kek-file", str(kek), *pki.server_args],
                        env=otlp.env("meshgate-keyservice"), credentials=pki.credentials()).start()
    cp = ServiceProcess("meshgate-controlplane", common + ["--keyservice", ks.target, *pki.controlplane_args,
                                                           "--agent-bearer-tokens"],
                        env=otlp.env("meshgate-controlplane")).start()
    ch = cptest.authed_channel(cp.target, cp.admin_token)
    try:
        await network_pb2_grpc.NetworkServiceStub(ch).CreateNetwork(
            network_pb2.CreateNetworkRequest(network_id="prod", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
        await node_pb2_grpc.NodeServiceStub(ch).CreateNode(node_pb2.CreateNodeRequest(
            parent="networks/prod", node_id="gw",
            node=node_pb2.Node(endpoint="192.0.2.1:51820", public_key=base64.b64encode(os.urandom(32)).decode())))
        await external_client_pb2_grpc.ExternalClientServiceStub(ch).CreateExternalClient(
            external_client_pb2.CreateExternalClientRequest(
                parent="networks/prod", external_client_id="phone",
                external_client=external_client_pb2.ExternalClient(gateway_node="networks/prod/nodes/gw")))
        create = "/meshgate.api.v1.ExternalClientService/CreateExternalClient"
        issue = "/meshgate.api.v1.KeyService/IssueClientKeyPair"

        def spans_of_create():
            roots = [s for svc, s in otlp.spans if svc == "meshgate-controlplane" and s.name == create]
            if not roots:
                return None
            trace = otlp.trace(roots[0].trace_id)
            if not any(svc == "meshgate-keyservice" and s.name == issue for svc, s in trace):
                return None
            return trace

        trace = await cptest.wait_until(spans_of_create, "the create's trace with the key service's span")
        by_service = {(svc, s.name, s.kind): s for svc, s in trace}
        api = next(s for (svc, name, _), s in by_service.items() if svc == "meshgate-controlplane" and name == create)
        server = next(s for (svc, name, _), s in by_service.items() if svc == "meshgate-keyservice" and name == issue)
        client = next(s for (svc, name, _), s in by_service.items()
                      if svc == "meshgate-controlplane" and name == issue)
        # API call -> the control plane's client span -> the key service's server span.
        assert client.parent_span_id == api.span_id and server.parent_span_id == client.span_id
    finally:
        await ch.close()
        cp.stop()
        ks.stop()


async def test_sigterm_ends_agent_streams_with_unavailable(etcd_server, etcd_prefix):
    """Agent streams never end on their own; a graceful shutdown must end them
    (so agents reconnect elsewhere) instead of waiting out the drain period."""
    cp = ServiceProcess(
        "meshgate-controlplane",
        ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix, "--shutdown-grace", "300"],
    ).start()
    ch = cptest.authed_channel(cp.target, cp.admin_token)
    try:
        await network_pb2_grpc.NetworkServiceStub(ch).CreateNetwork(
            network_pb2.CreateNetworkRequest(network_id="prod", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24"))
        )
        key = await enrollment_pb2_grpc.EnrollmentKeyServiceStub(ch).CreateEnrollmentKey(
            enrollment_pb2.CreateEnrollmentKeyRequest(parent="networks/prod", enrollment_key_id="k", enrollment_key=enrollment_pb2.EnrollmentKey())
        )
        a = await (await cptest.SimAgent(agent_pb2_grpc.AgentServiceStub(ch), key.secret, "a").enroll()).connect()
        await cptest.wait_until(lambda: a.state is not None, "snapshot")
        import signal

        cp.signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(a._task, 60)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.to_thread(cp.proc.wait, 60) == 0
    finally:
        await ch.close()
        cp.stop()


async def test_agents_on_two_control_plane_processes_converge_on_a_change_made_through_either(etcd_server, etcd_prefix):
    """Two control-plane processes on one etcd: an agent on each; a change made
    through one reaches the agent on the other, and both report converged."""
    procs = [
        ServiceProcess("meshgate-controlplane", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix]).start()
        for _ in range(2)
    ]
    token = next(p.admin_token for p in procs if p.admin_token)
    chans = [cptest.authed_channel(p.target, token) for p in procs]
    agents = []
    try:
        await network_pb2_grpc.NetworkServiceStub(chans[0]).CreateNetwork(
            network_pb2.CreateNetworkRequest(network_id="prod", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24"))
        )
        key = await enrollment_pb2_grpc.EnrollmentKeyServiceStub(chans[0]).CreateEnrollmentKey(
            enrollment_pb2.CreateEnrollmentKeyRequest(parent="networks/prod", enrollment_key_id="k", enrollment_key=enrollment_pb2.EnrollmentKey())
        )
        for i, ch in enumerate(chans):
            a = cptest.SimAgent(agent_pb2_grpc.AgentServiceStub(ch), key.secret, f"n{i}", f"192.0.2.{i + 1}:51820")
            agents.append(await (await a.enroll()).connect())
        await cptest.wait_until(lambda: all(a.state is not None and len(a.state.peers) == 1 for a in agents), "peered")
        for made_through, gw_node in ((0, "n1"), (1, "n0")):
            gw = await egress_pb2_grpc.EgressGatewayServiceStub(chans[made_through]).CreateEgressGateway(
                egress_pb2.CreateEgressGatewayRequest(
                    parent="networks/prod", egress_gateway_id=f"via-{gw_node}",
                    egress_gateway=egress_pb2.EgressGateway(
                        node=f"networks/prod/nodes/{gw_node}", ranges=[f"198.51.100.{64 * made_through}/26"]),
                )
            )
            other = agents[1 - int(gw_node[1])]  # the agent that routes through the new gateway
            await cptest.wait_until(lambda gw=gw, other=other: any(r.destination == gw.ranges[0] for r in other.state.routes),
                                    "route")
            for ch in chans:  # both processes report both nodes converged
                async def converged(ch=ch):
                    st = await network_pb2_grpc.NetworkServiceStub(ch).GetNetworkStatus(
                        network_pb2.GetNetworkStatusRequest(name="networks/prod"))
                    return st.converged_nodes == 2 and all(n.connected for n in st.nodes)

                await cptest.wait_until(converged, "converged on both processes")
    finally:
        for a in agents:
            await a.close()
        for ch in chans:
            await ch.close()
        for p in procs:
            p.stop()


FROZEN_AGENT = """
import asyncio, sys
import grpc
sys.path.insert(0, sys.argv[3])
import cptest
from meshgate.api.v1 import agent_pb2_grpc

async def main():
    ch = grpc.aio.insecure_channel(sys.argv[1])
    a = await (await cptest.SimAgent(agent_pb2_grpc.AgentServiceStub(ch), sys.argv[2], "frozen").enroll()).connect()
    await cptest.wait_until(lambda: a.state is not None, "snapshot")
    print("connected", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_an_agent_that_stops_answering_is_disconnected_by_keepalive(etcd_server, etcd_prefix):
    """An agent whose machine hangs (here: SIGSTOP, so its kernel still acks
    TCP but nothing answers HTTP/2 pings) is noticed by the server's keepalive
    and shown disconnected, so gateway failover can start; without keepalive
    its stream would look alive until TCP gave up, many minutes later."""
    import os
    import signal
    import subprocess
    import sys

    cp = ServiceProcess(
        "meshgate-controlplane", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix]).start()
    ch = cptest.authed_channel(cp.target, cp.admin_token)
    agent = None
    try:
        nets = network_pb2_grpc.NetworkServiceStub(ch)
        await nets.CreateNetwork(
            network_pb2.CreateNetworkRequest(network_id="prod", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
        key = await enrollment_pb2_grpc.EnrollmentKeyServiceStub(ch).CreateEnrollmentKey(
            enrollment_pb2.CreateEnrollmentKeyRequest(parent="networks/prod", enrollment_key_id="k",
                                                      enrollment_key=enrollment_pb2.EnrollmentKey()))
        tests_dir = os.path.dirname(cptest.__file__)
        agent = subprocess.Popen([sys.executable, "-c", FROZEN_AGENT, cp.target, key.secret, tests_dir],
                                 stdout=subprocess.PIPE, text=True)
        assert await asyncio.to_thread(agent.stdout.readline) == "connected\n"

        async def connected() -> bool:
            st = await nets.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
            return bool(st.nodes) and st.nodes[0].connected

        assert await connected()
        agent.send_signal(signal.SIGSTOP)
        await cptest.wait_until(lambda: _not(connected), "the hung agent shown disconnected", timeout=60)
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGCONT)
            agent.kill()
            agent.wait(10)
        await ch.close()
        cp.stop()


def _not(check):
    async def run():
        return not await check()
    return run()


async def test_the_key_service_link_can_use_mtls(etcd_server, etcd_prefix, tmp_path):
    """Key service serving mTLS (certificates from `meshgate-keyservice-certs`);
    the control plane reaches it with --keyservice-ca/-cert/-key (a node key
    gets signed); without a client certificate, or with the operator's
    identity instead of its own, it cannot (the create is refused as
    UNAVAILABLE, not made unsigned)."""
    kek = tmp_path / "kek"
    write_kek_file(kek)
    common = ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix]
    pki = keyservice_pki(str(tmp_path / "pki"), etcd_server.endpoint, etcd_prefix, str(kek))
    ks = ServiceProcess("meshgate-keyservice", common + ["--kek-file", str(kek), *pki.server_args],
                        credentials=pki.credentials()).start()
    procs = [ks]
    token = ""
    try:
        for name, extra in (("mtls", ["--keyservice-cert", pki.path("controlplane.pem"),
                                      "--keyservice-key", pki.path("controlplane.key")]),
                            ("no-client-cert", []),
                            ("operator-cert", ["--keyservice-cert", pki.path("operator.pem"),
                                               "--keyservice-key", pki.path("operator.key")])):
            cp = ServiceProcess("meshgate-controlplane",
                                common + ["--keyservice", ks.target, "--keyservice-ca", pki.path("ca.pem"), *extra,
                                          "--agent-bearer-tokens"]
                                ).start()
            procs.append(cp)
            token = cp.admin_token or token  # the first process on the prefix made it
            async with cptest.authed_channel(cp.target, token) as ch:
                if name == "mtls":
                    await network_pb2_grpc.NetworkServiceStub(ch).CreateNetwork(network_pb2.CreateNetworkRequest(
                        network_id="prod", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
                req = node_pb2.CreateNodeRequest(parent="networks/prod", node_id=f"n-{name}",
                                                 node=node_pb2.Node(public_key=base64.b64encode(os.urandom(32)).decode()))
                if name == "mtls":
                    node = await node_pb2_grpc.NodeServiceStub(ch).CreateNode(req)
                    assert node.public_key
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as ei:
                        await node_pb2_grpc.NodeServiceStub(ch).CreateNode(req)
                    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "key service" in ei.value.details()
    finally:
        for p in procs:
            p.stop()
