"""Egress domains: what the API refuses (and that it then changes nothing), and how
the compiler turns what gateways learned into routes, NAT sets, HA and filter rules."""

import ipaddress

import grpc
import pytest

from cptest import details, make_gateway, make_network, make_node, state_dump
from meshgate.api.v1 import agent_pb2, egress_pb2, network_pb2, node_pb2, policy_pb2
from meshgate.controlplane import compiler, domains


@pytest.fixture
async def net(cp):
    await make_network(cp)
    await make_node(cp, node_id="a")


async def test_bad_domains_are_refused_with_field_violations_and_change_nothing(cp, net):
    before = await state_dump(cp.etcd)
    bad = ["db..example.test", "a.*.example.test", "*", "*.com", "db*.example.test", "gw.prod.meshgate.internal",
           "*.meshgate.internal", "198.51.100.7", "localhost", "x.localhost", "-a.example.test", "db"]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await make_gateway(cp, ranges=[], domains=[*bad, "ok.example.test", "OK.example.test."])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations, _ = details(e.value)
    assert set(violations) == {f"egress_gateway.domains[{i}]" for i in range(len(bad))} | {
        f"egress_gateway.domains[{len(bad) + 1}]"}, violations
    assert "wrong place" in violations["egress_gateway.domains[1]"]
    assert "overlay" in violations["egress_gateway.domains[5]"]
    assert "IP address" in violations["egress_gateway.domains[7]"]
    assert "twice" in violations[f"egress_gateway.domains[{len(bad) + 1}]"]
    assert await state_dump(cp.etcd) == before
    # An update is checked the same way.
    gw = await make_gateway(cp, ranges=[], domains=["DB.Example.test."])
    assert list(gw.domains) == ["db.example.test"]
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
            egress_gateway=egress_pb2.EgressGateway(name=gw.name, domains=["*.*.example.test"]),
            update_mask={"paths": ["domains"]}))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(details(e.value)[0]) == ["egress_gateway.domains[0]"]
    assert await state_dump(cp.etcd) == before
    # A policy destination may name a domain, with the same rules; a source may not.
    for sources, destinations, field in ((["*"], ["domain:a.*.example.test"], "access_policy.destinations[0]"),
                                         (["domain:db.example.test"], ["*"], "access_policy.sources[0]")):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await cp.policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
                parent="networks/prod", access_policy_id="p", access_policy=policy_pb2.AccessPolicy(
                    sources=sources, destinations=destinations)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(details(e.value)[0]) == [field]
        assert await state_dump(cp.etcd) == before
    ok = await cp.policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
        parent="networks/prod", access_policy_id="p", access_policy=policy_pb2.AccessPolicy(
            sources=["*"], destinations=["domain:db.example.test"])))
    assert list(ok.destinations) == ["domain:db.example.test"]


async def test_domain_status_is_output_only(cp, net):
    gw = await make_gateway(cp, ranges=[], domains=["db.example.test"],
                            domain_status=[egress_pb2.DomainStatus(domain="db.example.test", addresses=["192.0.2.1"])])
    assert not gw.domain_status
    got = await cp.egress.GetEgressGateway(egress_pb2.GetEgressGatewayRequest(name=gw.name))
    assert not got.domain_status


def _state(*, deny=False) -> compiler.NetworkState:
    st = compiler.NetworkState(network_pb2.Network(
        name="networks/n", ipv4_cidr="100.64.0.0/24", default_policy=network_pb2.DENY if deny else network_pb2.ALLOW))
    for i, n in enumerate("abc"):
        st.nodes[f"networks/n/nodes/{n}"] = node_pb2.Node(
            name=f"networks/n/nodes/{n}", ipv4_address=f"100.64.0.{i + 1}", public_key=f"{n}" * 43 + "=",
            tags=["db"] if n == "b" else [])
    st.gateways["networks/n/egressGateways/db"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/db", node="networks/n/nodes/a", domains=["db.example.test", "*.wild.test"])
    st.learned["networks/n/nodes/a"] = agent_pb2.SyncRequest.Domains(domains=[
        egress_pb2.DomainStatus(domain="db.example.test", addresses=["198.51.100.20", "100.64.0.9"]),
        egress_pb2.DomainStatus(domain="x.wild.test", addresses=["203.0.113.5"]),
        egress_pb2.DomainStatus(domain="not.declared.test", addresses=["203.0.113.99"]),
    ])
    return st


def test_learned_addresses_route_through_the_gateway_and_fill_its_sets():
    st = _state()
    b = compiler.compile_node(st, "networks/n/nodes/b")
    routes = {r.destination: r.via_peer for r in b.routes}
    assert routes == {"198.51.100.20/32": "a" * 43 + "=", "203.0.113.5/32": "a" * 43 + "="}, \
        "the overlay address and the undeclared name are not routed"
    (peer_a,) = [p for p in b.peers if p.resource == "networks/n/nodes/a"]
    assert "198.51.100.20/32" in peer_a.allowed_ips
    a = compiler.compile_node(st, "networks/n/nodes/a")
    (e,) = a.egress
    assert list(e.ranges) == ["198.51.100.20/32", "203.0.113.5/32"] and list(e.domains) == ["*.wild.test", "db.example.test"]
    assert not a.routes
    # the overlay zone: itself and its peers
    assert b.dns.zone == "n.meshgate.internal"
    assert {r.name: list(r.addresses) for r in b.dns.records} == {
        "a": ["100.64.0.1"], "b": ["100.64.0.2"], "c": ["100.64.0.3"]}
    # used_by narrows who routes it
    st.gateways["networks/n/egressGateways/db"].used_by.append("tag:db")
    assert compiler.compile_node(st, "networks/n/nodes/b").routes
    assert not compiler.compile_node(st, "networks/n/nodes/c").routes
    # a changed report: the delta carries the routes
    old = compiler.compile_node(st, "networks/n/nodes/b", revision=1)
    st.learned["networks/n/nodes/a"].domains[0].addresses[:] = ["198.51.100.21"]
    new = compiler.compile_node(st, "networks/n/nodes/b", revision=2)
    d = compiler.diff(old, new)
    assert d is not None and d.routes_changed and "198.51.100.21/32" in {r.destination for r in d.routes}
    assert compiler.apply_delta(old, d, 2) == new
    assert compiler.affected_by_learned(st, "networks/n/nodes/a") == set(st.nodes)
    assert compiler.affected_by_learned(st, "networks/n/nodes/b") == set()


def test_two_gateways_for_one_domain_follow_priority_and_failover():
    st = _state()
    st.gateways["networks/n/egressGateways/db2"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/db2", node="networks/n/nodes/b", domains=["db.example.test"], priority=10)
    st.learned["networks/n/nodes/b"] = agent_pb2.SyncRequest.Domains(domains=[
        egress_pb2.DomainStatus(domain="db.example.test", addresses=["198.51.100.20"])])
    c = compiler.compile_node(st, "networks/n/nodes/c")
    via = {r.destination: r.via_peer for r in c.routes}
    assert via["198.51.100.20/32"] == "b" * 43 + "=", "the higher priority carries the domain"
    assert via["203.0.113.5/32"] == "a" * 43 + "=", "the wildcard only gateway a declares"
    st.down.add("networks/n/nodes/b")
    via = {r.destination: r.via_peer for r in compiler.compile_node(st, "networks/n/nodes/c").routes}
    assert via["198.51.100.20/32"] == "a" * 43 + "=", "failover: its standby takes it"
    # both gateway nodes forward and NAT the domain's addresses (a failover only moves routes)
    assert "198.51.100.20/32" in compiler.compile_node(st, "networks/n/nodes/b").egress[0].ranges


def test_a_down_gateways_last_report_does_not_outlive_the_failover():
    """The record changes while the primary (b) is down: its last report
    still names the old address, the standby (a) resolves the new one. Only
    the new address is routed, NATed by a and admitted by a domain: policy;
    with every serving node down, their last reports stand (as ranges stay
    routed when every candidate gateway is down)."""
    st = _state(deny=True)
    st.gateways["networks/n/egressGateways/db2"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/db2", node="networks/n/nodes/b", domains=["db.example.test"], priority=10)
    st.learned["networks/n/nodes/b"] = agent_pb2.SyncRequest.Domains(domains=[
        egress_pb2.DomainStatus(domain="db.example.test", addresses=["198.51.100.20"])])
    st.learned["networks/n/nodes/a"].domains[0].addresses[:] = ["198.51.100.21"]
    st.policies["networks/n/accessPolicies/p"] = policy_pb2.AccessPolicy(
        name="networks/n/accessPolicies/p", sources=["node:c"], destinations=["domain:db.example.test"],
        protocol=policy_pb2.TCP, ports=[policy_pb2.PortRange(first=5432)])

    def seen():
        c = compiler.compile_node(st, "networks/n/nodes/c")
        a = compiler.compile_node(st, "networks/n/nodes/a")
        routed = {r.destination for r in c.routes if r.destination.startswith("198.51.100.")}
        natted = {r for r in a.egress[0].ranges if r.startswith("198.51.100.")}
        admitted = {f"{h}/32" for r in a.filter_rules if r.accept for d in r.destinations
                    for h in ipaddress.ip_network(d) if d.startswith("198.51.100.")}  # merged: .20/31
        return routed, natted, admitted

    both = {"198.51.100.20/32", "198.51.100.21/32"}
    assert seen() == (both, both, both), "both up: both reports count"
    st.down.add("networks/n/nodes/b")
    new = {"198.51.100.21/32"}
    assert seen() == (new, new, new), "b down: only the standby's own answer"
    st.down.add("networks/n/nodes/a")
    assert seen() == (both, both, both), "every server down: their last word"


def test_a_domain_destination_becomes_the_learned_addresses_in_filter_rules():
    st = _state(deny=True)
    st.policies["networks/n/accessPolicies/p"] = policy_pb2.AccessPolicy(
        name="networks/n/accessPolicies/p", sources=["node:c"], destinations=["domain:db.example.test"],
        protocol=policy_pb2.TCP, ports=[policy_pb2.PortRange(first=5432)])
    a = compiler.compile_node(st, "networks/n/nodes/a")
    accept = [r for r in a.filter_rules if r.accept]
    assert [(list(r.sources), list(r.destinations)) for r in accept] == [(["100.64.0.3/32"], ["198.51.100.20/32"])]
    assert compiler.peers_of(st, "networks/n/nodes/c") == ["networks/n/nodes/a"], "c peers with the domain's gateway"
    assert domains.addresses_of("*.wild.test", st.gateways.values(), st.learned, ["100.64.0.0/24"]) == \
        ["203.0.113.5/32"]


async def test_a_gateway_agents_report_becomes_routes_elsewhere_and_status(cp):
    """Over real Sync streams: what the gateway's agent reports is kept only for
    the names it was sent (overlay addresses dropped and said), the other node
    gets host routes through it, the gateway shows domain_status; another node
    cannot report for the gateway; deleting the gateway's domain removes the
    routes."""
    from cptest import SimAgent, make_key, wait_until

    await make_network(cp)
    ek = await make_key(cp)
    gwa = await (await SimAgent(cp.agents, ek.secret, "a", "192.0.2.1:51820").enroll()).connect()
    b = await (await SimAgent(cp.agents, ek.secret, "b", "192.0.2.2:51820").enroll()).connect()
    try:
        gw = await make_gateway(cp, node="a", ranges=[], domains=["db.example.test", "*.wild.test"])
        await wait_until(lambda: gwa.state is not None and gwa.state.egress
                         and list(gwa.state.egress[0].domains) == ["*.wild.test", "db.example.test"], "domains sent")

        def report(agent, *entries):
            return agent._acks.put(agent_pb2.SyncRequest(domains=agent_pb2.SyncRequest.Domains(domains=[
                egress_pb2.DomainStatus(domain=d, addresses=a) for d, a in entries])))

        await report(b, ("db.example.test", ["203.0.113.66"]))  # b runs no gateway: ignored
        await report(gwa, ("db.example.test", ["198.51.100.20", "100.64.0.2", "bogus"]), ("x.wild.test", ["203.0.113.5"]),
                     ("evil.example.org", ["203.0.113.9"]))

        def b_routes():
            return sorted(r.destination for r in b.state.routes) if b.state is not None else []

        await wait_until(lambda: b_routes() == ["198.51.100.20/32", "203.0.113.5/32"], "routes through the gateway")
        # Each agent's stream gets its delta on its own: b's can arrive first.
        await wait_until(lambda: "198.51.100.20/32" in gwa.state.egress[0].ranges, "the gateway's own ranges")
        got = await cp.egress.GetEgressGateway(egress_pb2.GetEgressGatewayRequest(name=gw.name))
        by = {s.domain: s for s in got.domain_status}
        assert set(by) == {"db.example.test", "x.wild.test"}
        assert list(by["db.example.test"].addresses) == ["198.51.100.20"]
        assert "100.64.0.2" in by["db.example.test"].error and "bogus" in by["db.example.test"].error
        await cp.egress.UpdateEgressGateway(egress_pb2.UpdateEgressGatewayRequest(
            egress_gateway=egress_pb2.EgressGateway(name=gw.name, domains=["*.wild.test"]),
            update_mask={"paths": ["domains"]}))
        await wait_until(lambda: b_routes() == ["203.0.113.5/32"], "the removed domain's routes go")
    finally:
        await b.close()
        await gwa.close()


def test_a_domain_gateway_is_in_use_and_client_configs_keep_only_declared_ranges():
    """Seen by a new operator: a domain-only gateway showed no active ranges and
    not in use (a drain of it read as done at once), and an external client's
    configuration baked in the address DNS had just returned (AllowedIPs cannot
    follow DNS)."""
    from meshgate.api.v1 import external_client_pb2
    from meshgate.controlplane import egresshealth

    st = _state()
    st.gateways["networks/n/egressGateways/lan"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/lan", node="networks/n/nodes/a", ranges=["192.0.2.0/24"])
    out = network_pb2.NetworkStatus()
    egresshealth.fill_status(out, st)
    by_name = {g.gateway: g for g in out.gateways}
    db = by_name["networks/n/egressGateways/db"]
    assert list(db.active_ranges) == ["198.51.100.20/32", "203.0.113.5/32"] and db.in_use
    assert list(by_name["networks/n/egressGateways/lan"].active_ranges) == ["192.0.2.0/24"]
    client = external_client_pb2.ExternalClient(name="networks/n/externalClients/l", gateway_node="networks/n/nodes/b")
    assert compiler.client_allowed_ranges(st, client) == ["100.64.0.0/24", "192.0.2.0/24"]
