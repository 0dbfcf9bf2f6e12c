"""Egress gateway failover by liveness, with simulated agents on a real
control plane and etcd: when the primary gateway node's agent stays away
longer than the failover delay, its range moves to the standby; when it comes
back, the range moves back; a shorter absence changes nothing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from cptest import SimAgent, authed_channel, make_gateway, make_key, make_network, mint_token, wait_until
from meshgate.api.v1 import (
    agent_pb2_grpc,
    egress_pb2_grpc,
    enrollment_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
    node_pb2_grpc,
)
from meshgate.common.config import ServerConfig
from meshgate.common.server import GrpcServer
from meshgate.controlplane.api import ControlPlane

RANGE = "198.51.100.0/24"


@pytest.fixture
async def failover_cp(etcd):
    """Starts control planes with a given failover delay on the test's etcd prefix."""
    made = []

    async def start(delay: float, failback: float = 0.2, grace: float = 0.0):
        # By default no startup grace and a short failback hold: these tests look at the
        # delay alone (test_egress_health.py tests the grace and the hold).
        app = ControlPlane(etcd, gateway_failover_after=delay, gateway_startup_grace=grace,
                           gateway_failback_after=failback)
        await app.start()
        server = GrpcServer(ServerConfig(listen="127.0.0.1:0", shutdown_grace=0), app.bindings)
        port = await server.start()
        ch = authed_channel(f"127.0.0.1:{port}", await mint_token(app))
        cp = SimpleNamespace(
            app=app, etcd=etcd, networks=network_pb2_grpc.NetworkServiceStub(ch),
            nodes=node_pb2_grpc.NodeServiceStub(ch), egress=egress_pb2_grpc.EgressGatewayServiceStub(ch),
            keys=enrollment_pb2_grpc.EnrollmentKeyServiceStub(ch), agents=agent_pb2_grpc.AgentServiceStub(ch),
            sim=[],
        )
        made.append((cp, ch, server))
        return cp

    yield start
    for cp, ch, server in made:
        for a in cp.sim:
            await a.close()
        await ch.close()
        await server.stop(0)
        await cp.app.stop()


async def ha_network(cp):
    """primary (priority 10) and standby (priority 1) both declare RANGE; a
    client routes it through whichever carries it."""
    await make_network(cp)
    ek = await make_key(cp)
    agents = {}
    for i, name in enumerate(("primary", "standby", "client")):
        a = await (await SimAgent(cp.agents, ek.secret, name, f"192.0.2.{i + 1}:51820").enroll()).connect()
        cp.sim.append(a)
        agents[name] = a
    await make_gateway(cp, gw_id="gw-primary", node="primary", ranges=(RANGE,), priority=10)
    await make_gateway(cp, gw_id="gw-standby", node="standby", ranges=(RANGE,), priority=1)
    await wait_until(lambda: via(agents["client"]) == agents["primary"].public_key, "client routes via the primary")
    # Both gateway agents know their gateway, as a real agent does before it
    # reports on it (a report about a gateway the cache has not applied yet is
    # ignored: under load the standby's came first).
    await wait_until(lambda: all(agents[n].state is not None and len(agents[n].state.egress) == 1
                                 for n in ("primary", "standby")), "both gateway agents have their gateway")
    return agents


def via(agent) -> str:
    routes = [r.via_peer for r in agent.state.routes if r.destination == RANGE] if agent.state else []
    return routes[0] if routes else ""


async def mark(cp, node: str):
    return await cp.etcd.get(cp.etcd.key("liveness", "prod", node))


async def test_range_moves_to_the_standby_and_back(failover_cp):
    cp = await failover_cp(0.5)
    agents = await ha_network(cp)
    client, primary, standby = agents["client"], agents["primary"], agents["standby"]
    await primary.close()  # the primary's machine goes away
    await wait_until(lambda: via(client) == standby.public_key, "client fails over to the standby", timeout=20)
    assert await mark(cp, "primary") is not None
    status = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
    assert {n.node.rsplit("/", 1)[1]: n.failed_over for n in status.nodes} == {
        "client": False, "primary": True, "standby": False}
    # The standby's own state is unchanged in what it forwards: it always had its egress config.
    assert [list(e.ranges) for e in standby.state.egress] == [[RANGE]]
    await primary.connect()  # back
    await wait_until(lambda: via(client) == primary.public_key, "client back on the primary", timeout=20)
    await wait_until(_cleared(cp, "primary"), "the primary's mark is cleared")
    assert cp.app.liveness.marks_written == 1 and cp.app.liveness.marks_cleared == 1


def _cleared(cp, node):
    async def check():
        return await mark(cp, node) is None
    return check


async def test_an_absence_shorter_than_the_delay_changes_nothing(failover_cp):
    cp = await failover_cp(30)
    agents = await ha_network(cp)
    client, primary = agents["client"], agents["primary"]
    received = len(client.received)
    await primary.close()
    await asyncio.sleep(0.5)
    await primary.connect()
    await wait_until(lambda: primary.state is not None and primary.received, "primary reconnected")
    await asyncio.sleep(0.5)
    assert via(client) == primary.public_key and len(client.received) == received
    assert await mark(cp, "primary") is None and cp.app.liveness.marks_written == 0


async def test_failover_off_keeps_the_range_on_the_primary(failover_cp):
    cp = await failover_cp(0)
    agents = await ha_network(cp)
    client, primary = agents["client"], agents["primary"]
    await primary.close()
    await asyncio.sleep(1.5)
    assert via(client) == primary.public_key and await mark(cp, "primary") is None


async def test_a_lone_gateway_keeps_its_range_while_down(failover_cp):
    """No standby: the range stays where it is (routes never vanish because an agent is away)."""
    cp = await failover_cp(0.3)
    await make_network(cp)
    ek = await make_key(cp)
    gw = await (await SimAgent(cp.agents, ek.secret, "gw", "192.0.2.1:51820").enroll()).connect()
    client = await (await SimAgent(cp.agents, ek.secret, "client", "192.0.2.2:51820").enroll()).connect()
    cp.sim += [gw, client]
    await make_gateway(cp, gw_id="only", node="gw", ranges=(RANGE,))
    await wait_until(lambda: via(client) == gw.public_key, "client routes via the gateway")
    await gw.close()
    await wait_until(lambda: mark(cp, "gw"), "gw marked down", timeout=20)
    await asyncio.sleep(0.3)
    assert via(client) == gw.public_key


async def test_an_old_stream_ending_on_one_replica_does_not_disconnect_the_agent_on_another(failover_cp):
    """The agent's stream to replica A goes stale and it reconnects to B; when
    A finally ends the old stream it must not delete B's session key (else the
    node would look gone, be marked down and never fail back)."""
    a_cp = await failover_cp(0.3)
    b_cp = await failover_cp(0.3)
    agents = await ha_network(a_cp)
    primary = agents["primary"]
    again = SimAgent(b_cp.agents, "", "primary")
    again.node, again.token, again.public_key = primary.node, primary.token, primary.public_key
    await again.connect()
    b_cp.sim.append(again)
    await wait_until(lambda: again.state is not None, "primary streaming from B")
    await primary.close()  # A ends the old stream now
    await asyncio.sleep(1.0)  # longer than the failover delay
    assert await a_cp.etcd.get(a_cp.etcd.key("sessions", "prod", "primary")) is not None
    assert await mark(a_cp, "primary") is None
    assert via(agents["client"]) == primary.public_key
