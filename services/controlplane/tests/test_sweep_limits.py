"""No single request freezes the control plane (issue 15, item 2).

The egress range overlap check was quadratic and ran before the 256-range
limit: 10,000 ranges held the event loop for 40 s, 100,000 for more than ten
minutes, and meanwhile health checks and agent streams went unanswered (agents
marked disconnected, a healthy gateway failed over). Now every size limit is
checked before anything else (generically, from the request descriptors, then
per field) and the overlap checks are sort-based.

Against a real control-plane process: the worst requests (100,000 ranges,
labels, tags, selectors, DNS servers, rules) are refused with INVALID_ARGUMENT
naming the field, while health checks, an agent's stream and a Watch on the
same process go on being served; etcd holds what it held.
"""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import cptest
from meshgate.api.v1 import (
    agent_pb2_grpc,
    egress_pb2,
    egress_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    external_client_pb2,
    external_client_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from meshgate.common.testing import ServiceProcess
from meshgate.controlplane import validation

N = 100_000
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def ranges(n: int) -> list[str]:
    """n distinct /32s (nothing overlaps: the worst case for a pairwise check)."""
    return [f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}/32" for i in range(n)]


def worst_requests():
    """(stub, method, request, field the refusal must name)."""
    gw = egress_pb2.EgressGateway(node="networks/prod/nodes/a", ranges=ranges(N))
    return [
        ("egress", "CreateEgressGateway",
         egress_pb2.CreateEgressGatewayRequest(parent="networks/prod", egress_gateway_id="big", egress_gateway=gw),
         "egress_gateway.ranges"),
        ("egress", "CreateEgressGateway",
         egress_pb2.CreateEgressGatewayRequest(parent="networks/prod", egress_gateway_id="big2",
                                               egress_gateway=egress_pb2.EgressGateway(
                                                   node="networks/prod/nodes/a", ranges=ranges(10_000))),
         "egress_gateway.ranges"),
        ("egress", "UpdateEgressGateway",
         egress_pb2.UpdateEgressGatewayRequest(
             egress_gateway=egress_pb2.EgressGateway(name="networks/prod/egressGateways/gw", ranges=ranges(N))),
         "egress_gateway.ranges"),
        ("egress", "CreateEgressGateway",
         egress_pb2.CreateEgressGatewayRequest(
             parent="networks/prod", egress_gateway_id="sel",
             egress_gateway=egress_pb2.EgressGateway(node="networks/prod/nodes/a", ranges=["203.0.113.0/24"],
                                                     used_by=[f"node:n{i}" for i in range(N)])),
         "egress_gateway.used_by"),
        ("networks", "CreateNetwork",
         network_pb2.CreateNetworkRequest(network_id="big", network=network_pb2.Network(
             ipv4_cidr="100.64.9.0/24", labels={f"k{i}": "v" for i in range(N)})),
         "network.labels"),
        ("nodes", "CreateNode",
         node_pb2.CreateNodeRequest(parent="networks/prod", node_id="big",
                                    node=node_pb2.Node(tags=[f"t{i}" for i in range(N)])),
         "node.tags"),
        ("clients", "CreateExternalClient",
         external_client_pb2.CreateExternalClientRequest(
             parent="networks/prod", external_client_id="big",
             external_client=external_client_pb2.ExternalClient(
                 gateway_node="networks/prod/nodes/a", allowed_ranges=ranges(N),
                 dns_servers=[f"192.0.2.{i % 250}" for i in range(N)])),
         "external_client.allowed_ranges"),
        ("policies", "CreateAccessPolicy",
         policy_pb2.CreateAccessPolicyRequest(
             parent="networks/prod", access_policy_id="big",
             access_policy=policy_pb2.AccessPolicy(sources=[f"tag:t{i}" for i in range(N)],
                                                   destinations=["*"])),
         "access_policy.sources"),
    ]


@pytest.fixture
async def process(etcd_server, etcd_prefix, etcd):
    cp = ServiceProcess("meshgate-controlplane",
                        ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix]).start()
    ch = cptest.authed_channel(cp.target, cp.admin_token)
    try:
        yield cp, ch
    finally:
        await ch.close()
        cp.stop()


async def test_worst_requests_are_refused_while_health_agents_and_watches_are_served(process, etcd):
    cp, ch = process
    stubs = {
        "networks": network_pb2_grpc.NetworkServiceStub(ch), "nodes": node_pb2_grpc.NodeServiceStub(ch),
        "egress": egress_pb2_grpc.EgressGatewayServiceStub(ch),
        "clients": external_client_pb2_grpc.ExternalClientServiceStub(ch),
        "policies": policy_pb2_grpc.AccessPolicyServiceStub(ch),
    }
    await stubs["networks"].CreateNetwork(network_pb2.CreateNetworkRequest(
        network_id="prod", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
    await stubs["networks"].CreateNetwork(network_pb2.CreateNetworkRequest(
        network_id="side", network=network_pb2.Network(ipv4_cidr="100.64.1.0/24")))
    await stubs["nodes"].CreateNode(node_pb2.CreateNodeRequest(parent="networks/prod", node_id="a"))
    await stubs["egress"].CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
        parent="networks/prod", egress_gateway_id="gw",
        egress_gateway=egress_pb2.EgressGateway(node="networks/prod/nodes/a", ranges=["198.51.100.0/24"])))
    key = await enrollment_pb2_grpc.EnrollmentKeyServiceStub(ch).CreateEnrollmentKey(
        enrollment_pb2.CreateEnrollmentKeyRequest(parent="networks/side", enrollment_key_id="k",
                                                  enrollment_key=enrollment_pb2.EnrollmentKey()))
    agents = agent_pb2_grpc.AgentServiceStub(ch)
    agent = await (await cptest.SimAgent(agents, key.secret, "s0", "192.0.2.1:51820").enroll()).connect()
    await cptest.wait_until(lambda: agent.state is not None, "the agent's snapshot")
    watch = events_pb2_grpc.EventServiceStub(ch).Watch(events_pb2.WatchRequest(parent="networks/side"))
    await watch.initial_metadata()
    watched: list = []

    async def read_watch():
        async for ev in watch:
            watched.append(ev)

    watch_task = asyncio.create_task(read_watch())
    before = {k: v for k, v in (await cptest.state_dump(etcd)).items()}

    health = health_pb2_grpc.HealthStub(ch)
    requests = worst_requests()
    outstanding = 0
    served_meanwhile = {"health": 0}
    results = []

    async def bad(stub, method, request, field):
        nonlocal outstanding
        outstanding += 1
        try:
            # A generous deadline only so that a regression fails instead of hanging.
            await getattr(stubs[stub], method)(request, timeout=120)
            results.append((method, field, "OK", {}))
        except grpc.aio.AioRpcError as e:
            results.append((method, field, e.code(), cptest.details(e)[0]))
        finally:
            outstanding -= 1

    async def checks():
        # Health checks and an agent-visible change go on while bad requests
        # are in flight; each must be answered (the deadline only turns a
        # starved event loop into a failure instead of a hang).
        while True:
            r = await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            if outstanding:
                served_meanwhile["health"] += 1
            await asyncio.sleep(0)

    checker = asyncio.create_task(checks())
    # Every worst request, three times over, all in flight together.
    bad_calls = [asyncio.create_task(bad(*r)) for r in requests for _ in range(3)]
    await asyncio.sleep(0)
    # A node joins the agent's network while the bad requests are in flight:
    # the agent's stream gets its delta and the Watch its event.
    joined = await node_pb2_grpc.NodeServiceStub(ch).CreateNode(
        node_pb2.CreateNodeRequest(parent="networks/side", node_id="s1",
                                   node=node_pb2.Node(public_key=cptest.key(), endpoint="192.0.2.2:51820")), timeout=60)
    await cptest.wait_until(lambda: any(ev.resource_name == joined.name for ev in watched), "the Watch event",
                            timeout=60)
    await cptest.wait_until(lambda: agent.state is not None and len(agent.state.peers) == 1,
                            "the agent's delta with the new peer", timeout=60)
    await asyncio.gather(*bad_calls)
    assert not checker.done(), checker.exception() if checker.done() else None
    checker.cancel()
    await asyncio.gather(checker, return_exceptions=True)

    for method, field, code, violations in results:
        assert code == INVALID, (method, field, code)
        assert field in violations, (method, field, violations)
    assert len(results) == 3 * len(requests)
    # Behaviour, not time: health checks were answered while refusals were
    # pending, and the agent and the Watch were served meanwhile.
    assert served_meanwhile["health"] > 0
    after = await cptest.state_dump(etcd)
    side = {k for k in after.keys() | before.keys() if b"/side/" in k or k.endswith(b"/changes/trace")
            or b"/sessions/" in k or b"/status/" in k or b"/guards/" in k}
    assert {k: v for k, v in after.items() if k not in side} == {k: v for k, v in before.items() if k not in side}
    assert cp.healthy()
    watch.cancel()
    await asyncio.gather(watch_task, return_exceptions=True)
    await agent.close()


def test_sizes_are_checked_before_anything_else():
    """In the core too: a gateway with too many ranges is refused for its size
    alone, without one range parsed or compared."""
    gw = egress_pb2.EgressGateway(node="bogus", ranges=["not a cidr"] * (validation.MAX_RANGES + 1))
    _, violations = validation.egress(gw)
    assert [v.field for v in violations] == ["egress_gateway.ranges"]
    client = external_client_pb2.ExternalClient(gateway_node="bogus",
                                                allowed_ranges=["not a cidr"] * (validation.MAX_RANGES + 1))
    assert [v.field for v in validation.external_client(client)] == ["external_client.allowed_ranges"]
    assert [v.field for v in validation.check_labels("l", {f"K{i}": "v" for i in range(65)})] == ["l"]
    assert [v.field for v in validation.check_tags("t", ["Bad Tag"] * 33)] == ["t"]


def test_overlaps_within_a_gateway_are_found_by_sorting():
    """The sort-based check finds exactly the overlaps the pairwise one did."""
    import ipaddress
    import random

    rnd = random.Random(15)
    for _ in range(200):
        rs = []
        for _ in range(rnd.randint(1, 12)):
            p = rnd.randint(20, 32)
            rs.append(str(ipaddress.ip_network(f"10.0.{rnd.randint(0, 15)}.{rnd.randint(0, 255)}/{p}", strict=False)))
        gw = egress_pb2.EgressGateway(node="networks/p/nodes/a", ranges=rs)
        _, violations = validation.egress(gw)
        got = {v.field for v in violations}
        nets = [ipaddress.ip_network(r) for r in rs]
        want = {f"egress_gateway.ranges[{i}]" for i in range(len(nets)) if any(nets[i].overlaps(nets[j])
                                                                            for j in range(i))}
        assert got == want, rs


def test_overlaps_against_other_gateways_are_found_by_index():
    import ipaddress
    import random

    rnd = random.Random(16)
    network = network_pb2.Network(ipv4_cidr="100.64.0.0/24", ipv6_cidr="fd00:64::/64")
    for _ in range(200):
        def some(n):
            return [str(ipaddress.ip_network(f"10.0.{rnd.randint(0, 7)}.{rnd.randint(0, 255)}/{rnd.randint(21, 32)}",
                                             strict=False)) for _ in range(n)]
        others = [egress_pb2.EgressGateway(name=f"networks/p/egressGateways/o{k}", ranges=sorted(set(some(4))))
                  for k in range(3)]
        mine = [ipaddress.ip_network(r) for r in sorted(set(some(5)))]
        gw = egress_pb2.EgressGateway(ranges=[str(n) for n in mine])
        violations = validation.egress_overlaps(gw, mine, network, others)
        got = {v.field for v in violations}
        want = {f"egress_gateway.ranges[{i}]" for i, n in enumerate(mine)
                if any(n.overlaps(ipaddress.ip_network(r)) and n != ipaddress.ip_network(r)
                       for o in others for r in o.ranges)}
        assert got == want


def test_underlay_check_by_index_finds_what_the_pairwise_one_did():
    """Ranges covering a node's endpoint or the control plane's address, found
    through the range index: for each range the first such host, as a direct
    comparison of every range with every host finds it."""
    import ipaddress
    import random

    from meshgate.controlplane.egress import endpoint_ip, underlay_violations

    rnd = random.Random(17)
    for _ in range(200):
        nodes = [node_pb2.Node(name=f"networks/p/nodes/n{k}",
                               endpoint=rnd.choice([f"10.0.{rnd.randint(0, 7)}.{rnd.randint(0, 255)}:51820",
                                                    f"[fd00::{rnd.randint(0, 300):x}]:51820", "gw.example:1", ""]))
                 for k in range(rnd.randint(0, 12))]
        cp = [f"10.0.{rnd.randint(0, 7)}.{rnd.randint(0, 255)}"] if rnd.random() < 0.5 else []
        pool = [f"10.0.{rnd.randint(0, 7)}.{rnd.randint(0, 255)}/{rnd.randint(22, 32)}" for _ in range(6)]
        pool += ["fd00::/120", "fd00::100/120"]
        ranges, taken = [], []
        for r in pool:
            net = ipaddress.ip_network(r, strict=False)
            if not any(net.overlaps(t) for t in taken if t.version == net.version):
                taken.append(net)
                ranges.append(net)
        hosts = [(ip, n.name) for n in nodes for ip in [endpoint_ip(n.endpoint)] if ip is not None]
        hosts += [(ipaddress.ip_address(a), "cp") for a in cp]
        want = {}
        for i, net in enumerate(ranges):
            for ip, _ in hosts:
                if ip.version == net.version and ip in net:
                    want[f"egress_gateway.ranges[{i}]"] = str(ip)
                    break
        got = {v.field: v.description.split(" covers ")[1].split(",")[0]
               for v in underlay_violations(ranges, nodes, cp)}
        assert got == want
