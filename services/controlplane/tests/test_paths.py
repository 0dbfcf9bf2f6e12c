"""Path health and relays in the control plane: the pure derivation of a pair's
state (paths.py), the compiled desired states of relayed pairs, the relay
field at the API, and a status that derives unreachable peers from reports."""

from __future__ import annotations

import asyncio
import base64

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cptest import details, make_network, make_node, state_dump
from meshgate.api.v1 import agent_pb2, network_pb2, node_pb2
from meshgate.controlplane import compiler, paths, relays

S = 10**9
NOW = 1_000_000 * S


def _key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


# ---------------------------------------------------------------- pair states


def seen(**kw) -> paths.PeerSeen:
    return paths.PeerSeen(**kw)


def test_a_pair_is_not_judged_before_the_delay():
    fresh = seen(configure_ns=NOW - 1 * S)
    assert paths.direct_state(fresh, None, NOW, delay_s=5) == paths.UNKNOWN
    assert paths.direct_state(None, None, NOW) == paths.UNKNOWN


def test_configured_long_enough_without_a_handshake_is_never_connected():
    d = paths.direct_state(seen(configure_ns=NOW - 12 * S), seen(configure_ns=NOW - 8 * S), NOW, delay_s=5)
    assert d.state == network_pb2.PATH_NEVER_CONNECTED and d.unhealthy
    assert d.since_ns == NOW - 8 * S  # from when both sides had it
    assert d.reason == "no handshake in the 8 s since it was configured"
    # one side alone says nothing (the other may not have the peer yet), and a
    # first handshake gets a retry's time (6 s) even under a shorter delay
    assert paths.direct_state(seen(configure_ns=NOW - 12 * S), None, NOW, delay_s=5) == paths.UNKNOWN
    both = (seen(configure_ns=NOW - 4 * S), seen(configure_ns=NOW - 4 * S))
    assert paths.direct_state(*both, NOW, delay_s=2) == paths.UNKNOWN


def test_unanswered_traffic_past_the_delay_is_stale_and_answered_is_up():
    hs = NOW - 30 * S
    up = paths.direct_state(seen(handshake_ns=hs, configure_ns=hs), seen(handshake_ns=hs), NOW, delay_s=5)
    assert up.state == network_pb2.PATH_UP and up.up
    short = paths.direct_state(seen(handshake_ns=hs, unanswered_ns=NOW - 3 * S), None, NOW, delay_s=5)
    assert short.state == network_pb2.PATH_UP
    stale = paths.direct_state(seen(handshake_ns=hs, unanswered_ns=NOW - 7 * S), seen(handshake_ns=hs), NOW, delay_s=5)
    assert stale.state == network_pb2.PATH_STALE and stale.reason == "traffic unanswered for 7 s"


def test_the_age_of_a_handshake_alone_is_not_judged():
    old = seen(handshake_ns=NOW - 400 * S)  # agents report the first handshake, not every rekey
    assert paths.direct_state(old, None, NOW).state == network_pb2.PATH_UP


# ---------------------------------------------------------------- compiled routes


def _state(relay_endpoint: str = "203.0.113.2:51820") -> compiler.NetworkState:
    st = compiler.NetworkState(network_pb2.Network(name="networks/n", ipv4_cidr="100.64.0.0/24", listen_port=51820))
    for i, (nid, ep, relay) in enumerate((("r", relay_endpoint, True), ("a", "", False), ("b", "", False),
                                          ("p", "203.0.113.14:51820", False)), start=1):
        st.nodes[f"networks/n/nodes/{nid}"] = node_pb2.Node(
            name=f"networks/n/nodes/{nid}", ipv4_address=f"100.64.0.{i}", public_key=_key(i), endpoint=ep, relay=relay)
    return st


def _peers(s) -> dict[str, list[str]]:
    return {p.resource.rsplit("/", 1)[1]: list(p.allowed_ips) for p in s.peers}


def test_a_pair_without_endpoints_goes_through_the_relay_on_both_sides():
    st = _state()
    a = compiler.compile_node(st, "networks/n/nodes/a")
    assert _peers(a)["r"] == ["100.64.0.1/32", "100.64.0.3/32"]
    assert _peers(a)["b"] == []  # kept, empty: it probes the direct path
    assert _peers(a)["p"] == ["100.64.0.4/32"]  # P has an endpoint: direct
    b = compiler.compile_node(st, "networks/n/nodes/b")
    assert _peers(b)["r"] == ["100.64.0.1/32", "100.64.0.2/32"]
    r = compiler.compile_node(st, "networks/n/nodes/r")
    assert list(r.relayed_ranges) == ["100.64.0.2/32", "100.64.0.3/32"]
    assert _peers(r)["a"] == ["100.64.0.2/32"] and _peers(r)["b"] == ["100.64.0.3/32"]


def test_marks_move_pairs_and_learned_endpoints_reach_the_peers():
    st = _state()
    st.relay_marks[paths.pair_id("a", "b")] = ""  # proven direct
    st.relay_marks[paths.pair_id("a", "p")] = "r"  # cut: relayed
    st.learned_endpoints["networks/n/nodes/b"] = "203.0.113.10:51820"
    a = compiler.compile_node(st, "networks/n/nodes/a")
    assert _peers(a)["b"] == ["100.64.0.3/32"] and _peers(a)["p"] == []
    assert _peers(a)["r"] == ["100.64.0.1/32", "100.64.0.4/32"]
    assert {p.resource: p.endpoint for p in a.peers}["networks/n/nodes/b"] == "203.0.113.10:51820"
    r = compiler.compile_node(st, "networks/n/nodes/r")
    assert list(r.relayed_ranges) == ["100.64.0.2/32", "100.64.0.4/32"]


def test_without_a_relay_nothing_moves():
    st = _state()
    st.nodes["networks/n/nodes/r"].relay = False
    a = compiler.compile_node(st, "networks/n/nodes/a")
    assert _peers(a)["b"] == ["100.64.0.3/32"] and _peers(a)["r"] == ["100.64.0.1/32"]
    assert compiler.affected_by_node(st, _state(), "networks/n/nodes/r") == set(st.nodes)


def test_a_relay_under_deny_must_be_a_peer_of_both_sides():
    st = _state()
    st.network.default_policy = network_pb2.DENY  # nobody peers: nothing to relay
    assert paths.route(st, "networks/n/nodes/a", "networks/n/nodes/b", None,
                       lambda n: compiler.peers_of(st, n)) == ""


def test_reports_merge_on_change_and_a_complete_one_replaces():
    h = agent_pb2.SyncRequest.Health(complete=True)
    p = h.peers.add(public_key="kb", endpoint="203.0.113.10:51820")
    p.latest_handshake_time.FromNanoseconds(NOW)
    h.peers.add(public_key="kc")
    h.peers.add(public_key="client")  # not a node peer: ignored
    rec = relays.merge_report({}, h, {"kb": "b", "kc": "c"})
    assert rec == {"b": {"handshake_ns": NOW, "endpoint": "203.0.113.10:51820", "unanswered_ns": 0, "configure_ns": 0},
                   "c": {"handshake_ns": 0, "endpoint": "", "unanswered_ns": 0, "configure_ns": 0}}
    change = agent_pb2.SyncRequest.Health()
    change.peers.add(public_key="kc").unanswered_since_time.FromNanoseconds(NOW)
    after = relays.merge_report(rec, change, {"kb": "b", "kc": "c"})
    assert after["b"] == rec["b"] and after["c"]["unanswered_ns"] == NOW
    assert relays.merge_report(after, change, {"kc": "c"}).keys() == {"c"}  # b is no longer a peer


# ---------------------------------------------------------------- the API


async def test_a_relay_needs_an_endpoint_and_bad_input_changes_nothing(cp):
    await make_network(cp)
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await make_node(cp, node_id="r", relay=True)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.relay" in details(e.value)[0]
    assert await state_dump(cp.etcd) == before
    n = await make_node(cp, node_id="r", endpoint="203.0.113.2:51820", relay=True)
    assert n.relay
    before = await state_dump(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
            node=node_pb2.Node(name=n.name, endpoint=""), update_mask=field_mask_pb2.FieldMask(paths=["endpoint"])))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.relay" in details(e.value)[0]
    assert await state_dump(cp.etcd) == before
    off = await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
        node=node_pb2.Node(name=n.name, relay=False), update_mask=field_mask_pb2.FieldMask(paths=["relay"])))
    assert not off.relay


# ---------------------------------------------------------------- reports to decisions, through a real control plane



async def relay_trio(cp, a_endpoint: str):
    """Relay R and node P (both with endpoints) and node A (`a_endpoint`), enrolled
    and connected as simulated agents, with 1 s path delays."""
    from cptest import SimAgent, make_key

    await make_network(cp)
    secret = (await make_key(cp)).secret
    r, p, a = (SimAgent(cp.agents, secret, n, endpoint=ep) for n, ep in
               (("r", "203.0.113.2:51820"), ("p", "203.0.113.14:51820"), ("a", a_endpoint)))
    for ag in (r, p, a):
        await ag.enroll()
    await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
        node=node_pb2.Node(name="networks/prod/nodes/r", relay=True), update_mask=field_mask_pb2.FieldMask(paths=["relay"])))
    cp.app.relays.delay_s, cp.app.relays.recover_s = 1.0, 1.0
    for ag in (r, p, a):
        await ag.connect()
    return r, p, a


async def test_reports_move_a_pair_to_the_relay_and_back_and_the_status_says_so(cp):
    import time

    from cptest import wait_until

    r, p, a = await relay_trio(cp, "")

    def entry(ag, peer) -> list[str]:
        return next((list(x.allowed_ips) for x in (ag.state.peers if ag.state else ()) if x.public_key == peer.public_key),
                    None)

    async def report(ag, peer, unanswered_s: float | None):
        h = agent_pb2.SyncRequest.Health(complete=True)
        now = time.time_ns()
        for other in (x for x in (r, p, a) if x is not ag):
            ph = h.peers.add(public_key=other.public_key, endpoint="203.0.113.6:51820")
            ph.latest_handshake_time.FromNanoseconds(now - 10 * S)
            ph.configure_time.FromNanoseconds(now - 20 * S)
            if other is peer and unanswered_s is not None:
                ph.unanswered_since_time.FromNanoseconds(now - int(unanswered_s * S))
        await ag._acks.put(agent_pb2.SyncRequest(health=h))

    await wait_until(lambda: entry(a, p) == [p.node.ipv4_address + "/32"], "A has P directly")
    await report(p, a, None)
    await report(a, p, 3)  # A's traffic to P unanswered for 3 s: past the 1 s delay
    await wait_until(lambda: entry(a, p) == [] and p.node.ipv4_address + "/32" in entry(a, r)
                     and entry(p, a) == [] and a.node.ipv4_address + "/32" in entry(p, r), "A-P through R")
    assert sorted(r.state.relayed_ranges) == sorted([a.node.ipv4_address + "/32", p.node.ipv4_address + "/32"])
    status = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
    by_node = {n.node: n for n in status.nodes}
    paths_of_a = {x.peer: x for x in by_node["networks/prod/nodes/a"].unreachable_peers}
    pa = paths_of_a["networks/prod/nodes/p"]
    assert (pa.state, pa.relay) == (network_pb2.PATH_STALE, "networks/prod/nodes/r")
    assert pa.reason.startswith("traffic unanswered for") and "via r" in pa.summary
    assert by_node["networks/prod/nodes/a"].healthy  # reached through the relay
    # a replica that starts now loads the same decisions and reports
    from meshgate.controlplane.cache import StateCache

    fresh = StateCache(cp.etcd)
    await fresh.start()
    try:
        await fresh.ready.wait()
        loaded = fresh.networks["prod"]
        assert loaded.relay_marks == {"a~p": "r"}
        assert loaded.learned_endpoints == {"networks/prod/nodes/a": "203.0.113.6:51820"}
        assert set(fresh.path_health["prod"]) == {"networks/prod/nodes/a", "networks/prod/nodes/p"}  # who reported
    finally:
        await fresh.stop()
    # answered again: back to direct after the recovery delay (doubled: one move)
    cp.app.relays._rechoose_at[("prod", "a~p")] = time.monotonic() + 3600  # as if a relay had been reconsidered
    await report(a, p, None)
    await wait_until(lambda: entry(a, p) == [p.node.ipv4_address + "/32"], "A-P direct again")
    await wait_until(lambda: ("prod", "a~p") not in cp.app.relays._rechoose_at, "A-P's rechoose time forgotten")
    # a deleted node's records go with it
    await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name="networks/prod/nodes/p"))

    async def gone():
        dump = await state_dump(cp.etcd)
        return not any(b"/pathHealth/prod/p" in k or b"/pathRoutes/prod/a~p" in k for k in dump)

    await wait_until(gone, "P's path records deleted")
    for ag in (r, p, a):
        await ag.close()


def test_access_policies_hold_on_the_relay():
    from meshgate.api.v1 import policy_pb2

    st = _state()
    st.network.default_policy = network_pb2.DENY
    st.policies["networks/n/accessPolicies/to-relay"] = policy_pb2.AccessPolicy(
        name="networks/n/accessPolicies/to-relay", sources=["*"], destinations=["node:r"])
    st.policies["networks/n/accessPolicies/ssh"] = policy_pb2.AccessPolicy(
        name="networks/n/accessPolicies/ssh", sources=["node:a"], destinations=["node:b"], protocol=policy_pb2.TCP,
        ports=[policy_pb2.PortRange(first=22)])
    r = compiler.compile_node(st, "networks/n/nodes/r")
    assert list(r.relayed_ranges) == ["100.64.0.2/32", "100.64.0.3/32"]  # A and B peer with R: it relays them
    to_b = [x for x in r.filter_rules if "100.64.0.3/32" in x.destinations]
    assert [(list(x.sources), x.protocol, list(x.ports), x.accept) for x in to_b] == [
        (["100.64.0.2/32"], "tcp", ["22"], True)]
    assert not r.filter_rules[-1].accept and not r.filter_rules[-1].destinations  # DENY: everything else dropped


# ---------------------------------------------------------------- relayed egress


def _gateway_state(default_policy=network_pb2.ALLOW) -> compiler.NetworkState:
    """R relays, A and B have no endpoint (relayed), B runs a gateway for 198.51.100.0/29."""
    from meshgate.api.v1 import egress_pb2

    st = _state()
    st.network.default_policy = default_policy
    st.gateways["networks/n/egressGateways/lan"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/lan", node="networks/n/nodes/b", ranges=["198.51.100.0/29"])
    return st


def test_a_relayed_gateway_s_ranges_go_through_the_relay():
    st = _gateway_state()
    a = compiler.compile_node(st, "networks/n/nodes/a")
    # A: the range goes to R's entry (beside B's address), the route names R; B's own entry stays empty
    assert _peers(a)["r"] == ["100.64.0.1/32", "100.64.0.3/32", "198.51.100.0/29"]
    assert _peers(a)["b"] == []
    assert [(x.destination, x.via_peer) for x in a.routes] == [("198.51.100.0/29", _key(1))]
    # R carries it to B: in B's entry, routed there, and forwarded (relayed_ranges, under the policies)
    r = compiler.compile_node(st, "networks/n/nodes/r")
    assert _peers(r)["b"] == ["100.64.0.3/32", "198.51.100.0/29"]
    assert [(x.destination, x.via_peer) for x in r.routes] == [("198.51.100.0/29", _key(3))]
    assert list(r.relayed_ranges) == ["100.64.0.2/32", "100.64.0.3/32", "198.51.100.0/29"]
    # B answers A through R
    b = compiler.compile_node(st, "networks/n/nodes/b")
    assert _peers(b)["r"] == ["100.64.0.1/32", "100.64.0.2/32"] and _peers(b)["a"] == []
    assert b.egress[0].ranges == ["198.51.100.0/29"]
    # P reaches B directly (P has an endpoint): the range stays on B's entry
    p = compiler.compile_node(st, "networks/n/nodes/p")
    assert _peers(p)["b"] == ["100.64.0.3/32", "198.51.100.0/29"]
    # the pair goes direct (marked): the range goes back to B's entry, R no longer carries it
    st.relay_marks[paths.pair_id("a", "b")] = ""
    a = compiler.compile_node(st, "networks/n/nodes/a")
    assert _peers(a)["b"] == ["100.64.0.3/32", "198.51.100.0/29"] and _peers(a)["r"] == ["100.64.0.1/32"]
    r = compiler.compile_node(st, "networks/n/nodes/r")
    assert "198.51.100.0/29" not in r.relayed_ranges
    assert _peers(r)["b"] == ["100.64.0.3/32", "198.51.100.0/29"]  # R itself still uses the gateway


def test_a_relay_that_does_not_use_the_gateway_still_carries_its_ranges():
    st = _gateway_state()
    st.nodes["networks/n/nodes/a"].tags.append("lan-users")
    st.gateways["networks/n/egressGateways/lan"].used_by.append("tag:lan-users")
    r = compiler.compile_node(st, "networks/n/nodes/r")
    assert _peers(r)["b"] == ["100.64.0.3/32", "198.51.100.0/29"]
    assert [(x.destination, x.via_peer) for x in r.routes] == [("198.51.100.0/29", _key(3))]
    # nobody relayed uses it: nothing carried
    st.gateways["networks/n/egressGateways/lan"].used_by[:] = ["tag:nobody"]
    r = compiler.compile_node(st, "networks/n/nodes/r")
    assert _peers(r)["b"] == ["100.64.0.3/32"] and not r.routes
    assert "198.51.100.0/29" not in r.relayed_ranges


def test_relayed_egress_under_deny_is_filtered_on_the_relay():
    from meshgate.api.v1 import policy_pb2

    st = _gateway_state(network_pb2.DENY)
    st.policies["networks/n/accessPolicies/to-relay"] = policy_pb2.AccessPolicy(
        name="networks/n/accessPolicies/to-relay", sources=["*"], destinations=["node:r"])
    st.policies["networks/n/accessPolicies/web"] = policy_pb2.AccessPolicy(
        name="networks/n/accessPolicies/web", sources=["node:a"], destinations=["egress:lan"],
        protocol=policy_pb2.TCP, ports=[policy_pb2.PortRange(first=8080)])
    a = compiler.compile_node(st, "networks/n/nodes/a")
    assert _peers(a)["r"] == ["100.64.0.1/32", "100.64.0.3/32", "198.51.100.0/29"]
    r = compiler.compile_node(st, "networks/n/nodes/r")
    assert "198.51.100.0/29" in r.relayed_ranges
    to_lan = [x for x in r.filter_rules if "198.51.100.0/29" in x.destinations]
    assert [(list(x.sources), x.protocol, list(x.ports), x.accept) for x in to_lan] == [
        (["100.64.0.2/32"], "tcp", ["8080"], True)]
    assert not r.filter_rules[-1].accept and not r.filter_rules[-1].destinations


def test_the_internet_gateway_goes_through_the_relay_only_where_the_relay_routes_it():
    from meshgate.api.v1 import egress_pb2

    st = _state()
    st.gateways["networks/n/egressGateways/inet"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/inet", node="networks/n/nodes/b", internet_gateway=True)
    a = compiler.compile_node(st, "networks/n/nodes/a")
    assert "0.0.0.0/0" in _peers(a)["r"] and a.default_route_via_peer == _key(1)
    r = compiler.compile_node(st, "networks/n/nodes/r")
    assert "0.0.0.0/0" in _peers(r)["b"] and r.default_route_via_peer == _key(3)
    # a relay that runs a gateway of its own keeps its own default route: A keeps it on B's entry
    st.gateways["networks/n/egressGateways/rl"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/rl", node="networks/n/nodes/r", ranges=["192.0.2.128/25"])
    a = compiler.compile_node(st, "networks/n/nodes/a")
    assert _peers(a)["b"] == ["0.0.0.0/0"] and a.default_route_via_peer == _key(3)


# ---------------------------------------------------------------- choosing the closest relay


def test_the_relay_chosen_is_the_healthiest_then_the_closest_then_the_least_loaded():
    C = paths.Candidate
    ms = 1000
    # health first: a far relay both reach beats a near one only one side reaches
    assert paths.choose_relay([C("near", 1, 2 * ms, 0), C("far", 2, 80 * ms, 0)]) == "far"
    # then the summed round trip; a relay a side has not measured comes after the measured
    assert paths.choose_relay([C("r1", 2, 40 * ms, 0), C("r2", 2, 12 * ms, 5), C("r3", 2, None, 0)]) == "r2"
    assert paths.choose_relay([C("r1", 2, None, 3), C("r2", 2, None, 1)]) == "r2"
    # then the load, then the name
    assert paths.choose_relay([C("r1", 2, 10 * ms, 4), C("r2", 2, 10 * ms, 1)]) == "r2"
    assert paths.choose_relay([C("r2", 2, 10 * ms, 1), C("r1", 2, 10 * ms, 1)]) == "r1"
    assert paths.choose_relay([]) == ""


def test_a_small_change_of_round_trip_does_not_move_a_pair():
    C = paths.Candidate
    ms = 1000
    # the current relay stays while the other is not clearly closer
    assert paths.choose_relay([C("cur", 2, 30 * ms, 1), C("other", 2, 25 * ms, 0)], current="cur") == "cur"
    assert paths.choose_relay([C("cur", 2, 12 * ms, 1), C("other", 2, 4 * ms, 0)], current="cur") == "cur"  # < 10 ms
    # clearly closer (under 70% and 10 ms less): it moves
    assert paths.choose_relay([C("cur", 2, 60 * ms, 1), C("other", 2, 20 * ms, 0)], current="cur") == "other"
    # healthier always wins; an unmeasured current relay stays
    assert paths.choose_relay([C("cur", 1, 5 * ms, 0), C("other", 2, 90 * ms, 0)], current="cur") == "other"
    assert paths.choose_relay([C("cur", 2, None, 0), C("other", 2, 5 * ms, 0)], current="cur") == "cur"


def test_reports_keep_the_round_trip_to_a_relay():
    h = agent_pb2.SyncRequest.Health(complete=True)
    h.peers.add(public_key="kr", rtt_us=1500)
    h.peers.add(public_key="kb")
    rec = relays.merge_report({}, h, {"kr": "r", "kb": "b"})
    assert rec["r"]["rtt_us"] == 1500 and "rtt_us" not in rec["b"]
    assert paths.PeerSeen.of(rec["r"]).rtt_us == 1500


def test_relays_carry_their_overlay_address_to_measure():
    a = compiler.compile_node(_state(), "networks/n/nodes/a")
    assert {p.resource.rsplit("/", 1)[1]: p.rtt_address for p in a.peers} == {"r": "100.64.0.1", "b": "", "p": ""}


def test_external_clients_behind_a_relayed_node_are_reached_through_the_relay():
    from meshgate.api.v1 import external_client_pb2

    st = _state()
    st.external_clients["networks/n/externalClients/lap"] = external_client_pb2.ExternalClient(
        name="networks/n/externalClients/lap", gateway_node="networks/n/nodes/b", public_key=_key(9),
        ipv4_address="100.64.0.9")
    a = compiler.compile_node(st, "networks/n/nodes/a")
    assert _peers(a)["r"] == ["100.64.0.1/32", "100.64.0.3/32", "100.64.0.9/32"] and _peers(a)["b"] == []
    r = compiler.compile_node(st, "networks/n/nodes/r")
    assert _peers(r)["b"] == ["100.64.0.3/32", "100.64.0.9/32"]
    assert list(r.relayed_ranges) == ["100.64.0.2/32", "100.64.0.3/32", "100.64.0.9/32"]
    p = compiler.compile_node(st, "networks/n/nodes/p")  # direct to B: unchanged
    assert _peers(p)["b"] == ["100.64.0.3/32", "100.64.0.9/32"]


async def test_with_two_relays_a_relayed_pair_moves_to_the_closer_one(cp):
    """Through a real control plane: A and B have no endpoint, so they start on
    the first relay by name (r1); both report r2 much closer: the pair moves to r2."""
    import time

    from cptest import SimAgent, make_key, wait_until

    await make_network(cp)
    secret = (await make_key(cp)).secret
    r1, r2, a, b = (SimAgent(cp.agents, secret, n, endpoint=ep) for n, ep in
                    (("r1", "203.0.113.2:51820"), ("r2", "203.0.113.6:51820"), ("a", ""), ("b", "")))
    for ag in (r1, r2, a, b):
        await ag.enroll()
    for r in ("r1", "r2"):
        await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
            node=node_pb2.Node(name=f"networks/prod/nodes/{r}", relay=True),
            update_mask=field_mask_pb2.FieldMask(paths=["relay"])))
    cp.app.relays.delay_s = 1.0
    for ag in (r1, r2, a, b):
        await ag.connect()

    def entry(ag, peer) -> list[str]:
        return next((list(x.allowed_ips) for x in (ag.state.peers if ag.state else ()) if x.public_key == peer.public_key),
                    [])

    def rtt_address(ag, peer) -> str:
        return next((x.rtt_address for x in (ag.state.peers if ag.state else ()) if x.public_key == peer.public_key), "")

    b_addr = b.node.ipv4_address + "/32"
    await wait_until(lambda: b_addr in entry(a, r1) and rtt_address(a, r2) == r2.node.ipv4_address,
                     "A reaches B through r1 (the first by name) and measures r2")

    async def report(ag, rtts: dict):
        h = agent_pb2.SyncRequest.Health(complete=True)
        now = time.time_ns()
        for other in (x for x in (r1, r2, a, b) if x is not ag):
            ph = h.peers.add(public_key=other.public_key, rtt_us=rtts.get(other, 0))
            ph.configure_time.FromNanoseconds(now - 20 * S)
            if other in (r1, r2) or ag in (r1, r2):
                ph.latest_handshake_time.FromNanoseconds(now - 10 * S)
        await ag._acks.put(agent_pb2.SyncRequest(health=h))

    for ag in (r1, r2):
        await report(ag, {})
    for ag in (a, b):  # r2 is 2 ms away, r1 50 ms: clearly closer
        await report(ag, {r1: 50_000, r2: 2_000})
    await wait_until(lambda: b_addr in entry(a, r2) and b_addr not in entry(a, r1)
                     and a.node.ipv4_address + "/32" in entry(b, r2), "A-B through r2")
    assert cp.app.relays.cache.networks["prod"].relay_marks == {"a~b": "r2"}
    # a switch to a closer relay is no flap: it does not count into the moves
    # that double the pair's recovery wait
    assert cp.app.relays.cache.relay_records["prod"]["a~b"].get("moves") == []
    # a small change of round trip does not move it back (hysteresis)
    for ag in (a, b):
        await report(ag, {r1: 1_500, r2: 2_000})

    def heard() -> bool:
        recs = cp.app.relays.cache.path_health.get("prod", {})
        return all(recs.get(f"networks/prod/nodes/{n}", {}).get("r1", {}).get("rtt_us") == 1_500 for n in "ab")

    await wait_until(heard, "the new round trips recorded")
    cp.app.relays._rechoose_at.clear()
    await cp.app.relays.evaluate()
    assert cp.app.relays.cache.networks["prod"].relay_marks == {"a~b": "r2"}
    assert ("prod", "a~b") in cp.app.relays._rechoose_at
    # a deleted node's pairs leave nothing behind in the replica either
    await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name="networks/prod/nodes/a"))
    await wait_until(lambda: ("prod", "a~b") not in cp.app.relays._rechoose_at, "A-B's rechoose time forgotten")
    for ag in (r1, r2, a, b):
        await ag.close()


async def test_a_peer_whose_agent_is_offline_is_not_a_broken_path(cp):
    """A's traffic to P goes unanswered because P's agent went away: the pair
    is not moved to the relay (it would not help), A stays healthy, and the
    status lists P as unreachable saying its agent is offline (review)."""
    import time

    from cptest import wait_until

    r, p, a = await relay_trio(cp, "203.0.113.18:51820")
    try:
        await wait_until(lambda: a.state is not None and len(a.state.peers) == 2, "A has its peers")
        await p.close()
        await wait_until(lambda: "networks/prod/nodes/p" not in cp.app.cache.sessions, "P's session gone")
        h = agent_pb2.SyncRequest.Health(complete=True)
        now = time.time_ns()
        for other in (r, p):
            ph = h.peers.add(public_key=other.public_key, endpoint="203.0.113.6:51820")
            ph.latest_handshake_time.FromNanoseconds(now - 10 * S)
            ph.configure_time.FromNanoseconds(now - 20 * S)
            if other is p:
                ph.unanswered_since_time.FromNanoseconds(now - 3 * S)  # past the 1 s delay
        await a._acks.put(agent_pb2.SyncRequest(health=h))

        async def listed():
            st = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
            na = next(n for n in st.nodes if n.node == "networks/prod/nodes/a")
            return na if any(x.peer == "networks/prod/nodes/p" for x in na.unreachable_peers) else None

        na = await wait_until(listed, "A's report of P in the status")
        pa = next(x for x in na.unreachable_peers if x.peer == "networks/prod/nodes/p")
        assert "its agent is offline" in pa.summary and not pa.relay
        assert na.healthy
        await asyncio.sleep(3)  # three of the relay loop's passes, past the delay
        assert not any(b"/pathRoutes/prod/" in k for k in await state_dump(cp.etcd))
        assert [list(x.allowed_ips) for x in a.state.peers if x.public_key == p.public_key] == [
            [p.node.ipv4_address + "/32"]]  # still direct
    finally:
        for ag in (r, p, a):
            await ag.close()
