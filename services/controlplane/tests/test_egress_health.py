"""Egress health and drain on a real control plane and etcd, with simulated
agents: a gateway whose agent reports its egress path broken yields its range
to the healthy standby at once and takes it back only after the failback
hold, doubled on every further failover (no flapping); a report about another
node's gateway is ignored; a drained gateway (or node) hands its range over
and the status says when nothing uses it any more; a control plane that just
started gives agents its startup grace; bad probes are refused, precisely,
and change nothing."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from cptest import (
    SimAgent,
    details,
    make_gateway,
    make_key,
    make_network,
    make_node,
    state_dump,
    wait_until,
)
from meshgate.api.v1 import (
    agent_pb2,
    egress_pb2,
    network_pb2,
    node_pb2,
)
from meshgate.controlplane.egresshealth import Damper
from test_failover import RANGE, failover_cp, via  # noqa: F401 - failover_cp: a fixture
from test_failover import ha_network as ha

PRIMARY = "networks/prod/egressGateways/gw-primary"


@pytest.fixture
def health_cp(failover_cp):  # noqa: F811 - the fixture imported above
    """Control planes with a failback hold, a startup grace and a failover delay."""
    def start(failback: float = 0.3, grace: float = 0.0, delay: float = 0.5):
        return failover_cp(delay, failback=failback, grace=grace)
    return start


async def report(agent, gateway: str, healthy: bool, reason: str = ""):
    msg = agent_pb2.SyncRequest.EgressHealth()
    msg.gateways.add(gateway=gateway, healthy=healthy, reason=reason)
    await agent._acks.put(agent_pb2.SyncRequest(egress_health=msg))


async def gateway_status(cp, name=PRIMARY):
    st = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
    return next(g for g in st.gateways if g.gateway == name)


async def test_an_unhealthy_gateway_yields_its_range_and_takes_it_back_after_the_hold(health_cp):
    cp = await health_cp(failback=0.5)
    agents = await ha(cp)
    client, primary, standby = agents["client"], agents["primary"], agents["standby"]
    # The agent sends its gateway config's name: compiled into its EgressConfig.
    assert [e.gateway for e in primary.state.egress] == [PRIMARY]
    await report(primary, PRIMARY, False, "eth1 has no carrier")
    await wait_until(lambda: via(client) == standby.public_key, "client fails over to the standby")
    g = await gateway_status(cp)
    assert not g.healthy and g.reason == "eth1 has no carrier" and list(g.active_ranges) == []
    assert list((await gateway_status(cp, "networks/prod/egressGateways/gw-standby")).active_ranges) == [RANGE]
    await report(primary, PRIMARY, True)
    await wait_until(lambda: via(client) == primary.public_key, "client back on the primary")
    assert cp.app.egress_health.marks_written == 1 and cp.app.egress_health.marks_cleared == 1
    assert (await gateway_status(cp)).healthy


async def test_deleting_a_gateway_deletes_its_health_mark(health_cp):
    cp = await health_cp(failback=30)
    agents = await ha(cp)
    await report(agents["primary"], PRIMARY, False, "no carrier")
    key = cp.etcd.key("egressHealth", "prod", "gw-primary")
    await wait_until(lambda: _exists(cp, key), "marked")
    await cp.egress.DeleteEgressGateway(egress_pb2.DeleteEgressGatewayRequest(name=PRIMARY))
    assert await cp.etcd.get(key) is None


async def _exists(cp, key):
    return await cp.etcd.get(key) is not None


async def test_a_flapping_path_moves_the_range_a_few_times_not_at_every_change(health_cp):
    cp = await health_cp(failback=0.4)
    agents = await ha(cp)
    client, primary = agents["client"], agents["primary"]
    moves, last = 0, via(client)
    for i in range(12):  # six times down 0.15 s, up 0.25 s
        await report(primary, PRIMARY, i % 2 == 1, "" if i % 2 else "eth1 has no carrier")
        for _ in range(5 if i % 2 else 3):
            await asyncio.sleep(0.05)
            if via(client) != last:
                moves, last = moves + 1, via(client)
    # One failover; the hold doubles (0.4, 0.8, 1.6 s...) so the up periods never earn a failback.
    assert moves <= 3, f"{moves} moves"
    await wait_until(lambda: via(client) == primary.public_key, "back on the primary once stable", timeout=30)


async def test_an_agent_that_stops_reporting_is_disconnected_and_failed_over(health_cp):
    """A gateway's agent reports every second; one silent for 2.5 s (its
    transport still open: here the simulated agent just stops sending) has its
    stream ended, and after the failover delay its range moves."""
    cp = await health_cp()
    agents = await ha(cp)
    await report(agents["primary"], PRIMARY, True)
    await wait_until(lambda: via(agents["client"]) == agents["standby"].public_key,
                     "the silent primary's range moves to the standby", timeout=30)
    assert cp.app.egress_health.streams_ended == 1


async def test_a_node_whose_gateway_was_deleted_keeps_its_stream_without_reporting(health_cp):
    """Its agent has nothing to report any more; ending its stream for silence
    left the node OFFLINE after `make run`'s demo deleted its gateway."""
    from meshgate.api.v1 import egress_pb2

    cp = await health_cp()
    agents = await ha(cp)
    await report(agents["standby"], "networks/prod/egressGateways/gw-standby", True)
    await cp.egress.DeleteEgressGateway(egress_pb2.DeleteEgressGatewayRequest(
        name="networks/prod/egressGateways/gw-standby"))
    await asyncio.sleep(cp.app.egress_health.stale_s + 1.5)  # silent for longer than a gateway may be
    assert cp.app.egress_health.streams_ended == 0
    st = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
    assert {n.node: n.connected for n in st.nodes}["networks/prod/nodes/standby"]


async def test_a_report_about_another_nodes_gateway_is_ignored(health_cp):
    cp = await health_cp()
    agents = await ha(cp)
    await report(agents["client"], PRIMARY, False, "lies")
    await asyncio.sleep(0.5)
    assert via(agents["client"]) == agents["primary"].public_key
    assert cp.app.egress_health.marks_written == 0


async def test_drain_moves_the_range_and_the_status_says_when_nothing_uses_the_gateway(health_cp):
    cp = await health_cp()
    agents = await ha(cp)
    client, primary, standby = agents["client"], agents["primary"], agents["standby"]
    assert (await gateway_status(cp)).in_use
    await cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
        egress_gateway=egress_pb2.EgressGateway(name=PRIMARY, drain=True),
        update_mask=field_mask_pb2.FieldMask(paths=["drain"])))
    await wait_until(lambda: via(client) == standby.public_key, "client moves to the standby")
    # The primary keeps its egress config: it forwards what is still in flight.
    assert [list(e.ranges) for e in primary.state.egress] == [[RANGE]]

    async def unused():
        g = await gateway_status(cp)
        return g.drained and not g.in_use and not g.active_ranges
    await wait_until(unused, "the status says nothing uses the drained gateway")
    await cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
        egress_gateway=egress_pb2.EgressGateway(name=PRIMARY, drain=False),
        update_mask=field_mask_pb2.FieldMask(paths=["drain"])))
    await wait_until(lambda: via(client) == primary.public_key, "undrain: back on the primary")
    # A node drain drains its gateways.
    await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
        node=node_pb2.Node(name="networks/prod/nodes/primary", drain=True),
        update_mask=field_mask_pb2.FieldMask(paths=["drain"])))
    await wait_until(lambda: via(client) == standby.public_key, "node drain: client moves to the standby")
    assert (await gateway_status(cp)).drained


async def test_a_drained_gateway_keeps_its_range_when_the_standby_is_unhealthy(health_cp):
    cp = await health_cp()
    agents = await ha(cp)
    client, primary, standby = agents["client"], agents["primary"], agents["standby"]
    await report(standby, "networks/prod/egressGateways/gw-standby", False, "no route")
    await wait_until(lambda: cp.app.egress_health.marks_written == 1, "the standby is marked")
    await cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
        egress_gateway=egress_pb2.EgressGateway(name=PRIMARY, drain=True),
        update_mask=field_mask_pb2.FieldMask(paths=["drain"])))
    await asyncio.sleep(0.5)
    assert via(client) == primary.public_key
    assert (await gateway_status(cp)).in_use


async def test_no_gateway_is_marked_down_during_the_startup_grace(health_cp):
    cp = await health_cp(grace=60, delay=0.1)
    agents = await ha(cp)
    await agents["primary"].close()
    await asyncio.sleep(1.0)
    assert await cp.etcd.get(cp.etcd.key("liveness", "prod", "primary")) is None
    assert via(agents["client"]) == agents["primary"].public_key


def probe(**kw):
    kw.setdefault("protocol", egress_pb2.EgressProbe.ICMP)
    kw.setdefault("target", "198.51.100.10")
    kw.setdefault("interval", duration_pb2.Duration(seconds=1))
    return egress_pb2.EgressProbe(**kw)


@pytest.mark.parametrize("bad, field", [
    (probe(target="203.0.113.5"), "egress_gateway.probes[0].target"),
    (probe(target="db.example"), "egress_gateway.probes[0].target"),
    (probe(interval=duration_pb2.Duration()), "egress_gateway.probes[0].interval"),
    (probe(protocol=egress_pb2.EgressProbe.TCP), "egress_gateway.probes[0].port"),
    (probe(port=80), "egress_gateway.probes[0].port"),
    (probe(protocol=0), "egress_gateway.probes[0].protocol"),
    (probe(timeout=duration_pb2.Duration(seconds=2)), "egress_gateway.probes[0].timeout"),
    (probe(failure_threshold=1000), "egress_gateway.probes[0].failure_threshold"),
])
async def test_bad_probes_are_refused_and_change_nothing(health_cp, bad, field):
    cp = await health_cp()
    await make_network(cp)
    await make_node(cp, node_id="a")  # no agent: nothing writes meanwhile
    gw = await make_gateway(cp, gw_id="gw", node="a", ranges=(RANGE,))
    before = await state_dump(cp.etcd)
    for call in (
        lambda: make_gateway(cp, gw_id="gw2", node="a", ranges=("192.0.2.128/25",), probes=[bad]),
        lambda: cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
            egress_gateway=egress_pb2.EgressGateway(name=gw.name, probes=[bad]),
            update_mask=field_mask_pb2.FieldMask(paths=["probes"]))),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations, _ = details(e.value)
        assert any(f == field for f in violations), violations
    assert await state_dump(cp.etcd) == before


async def test_good_probes_reach_the_gateways_agent(health_cp):
    cp = await health_cp()
    await make_network(cp)
    ek = await make_key(cp)
    a = await (await SimAgent(cp.agents, ek.secret, "a", "192.0.2.1:51820").enroll()).connect()
    cp.sim.append(a)
    p = probe(protocol=egress_pb2.EgressProbe.TCP, port=5432, failure_threshold=2)
    await make_gateway(cp, gw_id="gw", node="a", ranges=(RANGE,), probes=[p])
    await wait_until(lambda: a.state is not None and a.state.egress and list(a.state.egress[0].probes) == [p],
                     "the agent has the probe")


def test_the_damper_doubles_the_hold_for_repeated_failovers_and_forgets_after_a_quiet_window():
    now = [0.0]
    d = Damper(10, cap=60, window=100, clock=lambda: now[0])
    assert d.hold("g") == 10
    d.failed("g")
    assert d.hold("g") == 10
    now[0] = 20
    d.failed("g")
    assert d.hold("g") == 20
    for _ in range(5):
        d.failed("g")
    assert d.hold("g") == 60
    now[0] = 200
    assert d.hold("g") == 10


async def test_a_session_key_goes_even_when_the_closing_stream_handler_is_cancelled(health_cp):
    """A vanished agent's stream handler is cancelled (keepalive) and may be
    cancelled again while it removes its session key: the key must still go,
    else the node shows connected and never fails over."""
    cp = await health_cp()
    agents = await ha(cp)
    session = cp.app.fanout.sessions["networks/prod/nodes/primary"]
    key = cp.etcd.key("sessions", "prod", "primary")
    task = asyncio.create_task(cp.app.fanout.close(session))
    await asyncio.sleep(0)  # up to its etcd call
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await wait_until(_gone(cp, key), "the session key is gone")
    await wait_until(lambda: via(agents["client"]) == agents["standby"].public_key, "and the range moves")


def _gone(cp, key):
    async def check():
        return await cp.etcd.get(key) is None
    return check


def _handoffs(agent) -> list[tuple[list[str], str]]:
    return [(list(h.ranges), h.address) for e in agent.state.egress for h in e.handoffs] if agent.state else []


async def _overlay(cp, name: str) -> str:
    return (await cp.nodes.GetNode(node_pb2.GetNodeRequest(name=f"networks/prod/nodes/{name}"))).ipv4_address


async def test_a_drain_moves_the_client_only_once_the_old_gateway_copies_late_replies(health_cp):
    """Make-before-break for late replies (handoff.py): on a drain the
    primary's node is told at once to copy replies from the range to the
    standby, but the client keeps routing through the primary until that
    node has acknowledged it; on the undrain the same holds for the standby.
    Each gateway node knows the other as a late-reply peer throughout."""
    cp = await health_cp()
    agents = await ha(cp)
    client, primary, standby = agents["client"], agents["primary"], agents["standby"]
    p_addr, s_addr = await _overlay(cp, "primary"), await _overlay(cp, "standby")
    assert [list(e.handoff_peers) for e in primary.state.egress] == [[s_addr]]
    assert [list(e.handoff_peers) for e in standby.state.egress] == [[p_addr]]
    assert _handoffs(primary) == []  # it carries the range: nothing to copy
    assert _handoffs(standby) == [([RANGE], p_addr)]  # a standby copies its (rare) replies to the active one

    primary.auto_ack = False
    await cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
        egress_gateway=egress_pb2.EgressGateway(name=PRIMARY, drain=True),
        update_mask=field_mask_pb2.FieldMask(paths=["drain"])))
    await wait_until(lambda: _handoffs(primary) == [([RANGE], s_addr)], "the primary told to copy to the standby")
    await asyncio.sleep(1.0)  # under the handoff's 3 s limit: only the ack may move the client
    assert via(client) == primary.public_key, "the client moved before the primary applied its copying"
    assert (await gateway_status(cp)).drained  # the operator's flag, shown at once
    primary.auto_ack = True
    await primary._acks.put(agent_pb2.SyncRequest(ack=agent_pb2.SyncRequest.Ack(revision=primary.state.revision)))
    await wait_until(lambda: via(client) == standby.public_key, "the client moves once the primary acked")
    assert _handoffs(primary) == [([RANGE], s_addr)]  # and goes on copying what comes back late
    assert _handoffs(standby) == []

    standby.auto_ack = False
    await cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
        egress_gateway=egress_pb2.EgressGateway(name=PRIMARY, drain=False),
        update_mask=field_mask_pb2.FieldMask(paths=["drain"])))
    await wait_until(lambda: _handoffs(standby) == [([RANGE], p_addr)], "the standby told to copy to the primary")
    await asyncio.sleep(1.0)
    assert via(client) == standby.public_key, "the client moved back before the standby applied its copying"
    standby.auto_ack = True
    await standby._acks.put(agent_pb2.SyncRequest(ack=agent_pb2.SyncRequest.Ack(revision=standby.state.revision)))
    await wait_until(lambda: via(client) == primary.public_key, "undrain: back on the primary once the standby acked")
    assert _handoffs(primary) == []
    assert not await _exists(cp, cp.etcd.key("egressDrain", "prod", "gw-primary"))


async def test_a_drain_whose_gateway_never_acks_still_moves_after_the_limit(health_cp):
    """An agent that does not apply its copying holds a drain back at most
    the handoff limit (3 s), then the move happens as before."""
    cp = await health_cp()
    agents = await ha(cp)
    client, primary, standby = agents["client"], agents["primary"], agents["standby"]
    primary.auto_ack = False
    await cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
        egress_gateway=egress_pb2.EgressGateway(name=PRIMARY, drain=True),
        update_mask=field_mask_pb2.FieldMask(paths=["drain"])))
    assert await _exists(cp, cp.etcd.key("egressDrain", "prod", "gw-primary"))  # written with the flag
    await wait_until(lambda: via(client) == standby.public_key, "the client moves after the limit", timeout=15)
    await wait_until(_gone(cp, cp.etcd.key("egressDrain", "prod", "gw-primary")), "the mark released")


async def test_a_drain_undone_before_its_handoff_moves_nothing(health_cp):
    """A drain and its undrain before the primary applied anything: the mark
    written with the drain is kept by the undrain (routing still holds the
    primary), then released as nothing changed; the client never moves."""
    cp = await health_cp()
    agents = await ha(cp)
    client, primary = agents["client"], agents["primary"]
    primary.auto_ack = False
    for drain in (True, False):
        await cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
            egress_gateway=egress_pb2.EgressGateway(name=PRIMARY, drain=drain),
            update_mask=field_mask_pb2.FieldMask(paths=["drain"])))
    await wait_until(_gone(cp, cp.etcd.key("egressDrain", "prod", "gw-primary")), "the mark released")
    assert via(client) == primary.public_key
    assert not (await gateway_status(cp)).drained
