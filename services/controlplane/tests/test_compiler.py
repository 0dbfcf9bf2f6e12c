"""Property tests of the desired-state compiler and of deltas."""

import base64
import ipaddress
import random

from google.protobuf import duration_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.api.v1 import egress_pb2, external_client_pb2, network_pb2, node_pb2, policy_pb2
from meshgate.controlplane import compiler

RANGE_POOL = ["198.51.100.0/24", "203.0.113.0/25", "203.0.113.128/25", "192.0.2.0/26", "192.0.2.64/26", "2001:db8::/48"]
TAGS = ["hub", "spoke", "db", "web"]


def _key(i: int) -> str:
    return base64.b64encode(i.to_bytes(32, "big")).decode()


@st.composite
def network_states(draw):
    deny = draw(st.booleans())
    v6 = draw(st.booleans())
    net = network_pb2.Network(
        name="networks/n", ipv4_cidr="100.64.0.0/24", ipv6_cidr="fd00::/64" if v6 else "",
        listen_port=51820, mtu=1420, persistent_keepalive=duration_pb2.Duration(seconds=25),
        default_policy=network_pb2.DENY if deny else network_pb2.ALLOW,
    )
    state = compiler.NetworkState(net)
    n = draw(st.integers(min_value=1, max_value=10))
    for i in range(n):
        name = f"networks/n/nodes/node{i}"
        state.nodes[name] = node_pb2.Node(
            name=name,
            ipv4_address=f"100.64.0.{i + 1}",
            ipv6_address=f"fd00::{i + 1:x}" if v6 else "",
            public_key=_key(i + 1) if draw(st.integers(0, 9)) else "",
            endpoint=f"192.0.2.{i + 1}:51820" if draw(st.booleans()) else "",
            tags=draw(st.lists(st.sampled_from(TAGS), unique=True, max_size=2)),
        )
    names = sorted(state.nodes)
    for g in range(draw(st.integers(0, 4))):
        gname = f"networks/n/egressGateways/gw{g}"
        state.gateways[gname] = egress_pb2.EgressGateway(
            name=gname,
            node=draw(st.sampled_from(names)),
            ranges=draw(st.lists(st.sampled_from(RANGE_POOL), unique=True, max_size=3)),
            priority=draw(st.integers(0, 3)),
            internet_gateway=draw(st.integers(0, 5)) == 0,
        )
    state.down = set(draw(st.lists(st.sampled_from(names), unique=True, max_size=3)))
    for c in range(draw(st.integers(0, 3))):
        cname = f"networks/n/externalClients/c{c}"
        state.external_clients[cname] = external_client_pb2.ExternalClient(
            name=cname,
            gateway_node=draw(st.sampled_from(names)),
            ipv4_address=f"100.64.0.{200 + c}",
            ipv6_address=f"fd00::c{c}" if v6 else "",
            public_key=_key(500 + c) if draw(st.integers(0, 5)) else "",
            disabled=draw(st.integers(0, 4)) == 0,
        )
    if deny:
        for p in range(draw(st.integers(0, 3))):
            sel = st.one_of(st.just("*"), st.sampled_from([f"tag:{t}" for t in TAGS]), st.sampled_from([f"node:node{i}" for i in range(n)]))
            pname = f"networks/n/accessPolicies/p{p}"
            state.policies[pname] = policy_pb2.AccessPolicy(
                name=pname, sources=[draw(sel)], destinations=[draw(sel)], action=policy_pb2.ACCEPT,
            )
    return state


@settings(max_examples=300, deadline=None)
@given(network_states())
def test_compiled_states_hold_the_invariants(state):
    by_range, internet = compiler.active_gateways(state)
    for name, me in state.nodes.items():
        out = compiler.compile_node(state, name)
        # never peers with itself
        assert all(p.resource != name for p in out.peers)
        assert not me.public_key or all(p.public_key != me.public_key for p in out.peers)
        # allowed IPs never overlap across peers (the default route excepted)
        seen = []
        for p in out.peers:
            for c in p.allowed_ips:
                net = ipaddress.ip_network(c)
                if net.prefixlen == 0:
                    assert p.public_key == out.default_route_via_peer
                    continue
                assert not any(net.version == o.version and net.overlaps(o) for o in seen), (c, seen)
                seen.append(net)
        # every egress range reachable from the node is on exactly one peer
        # (not when the node runs a healthy gateway for it: it uses its own egress)
        peer_names = {p.resource for p in out.peers}
        own = {r for g in state.gateways.values() if g.node == name and compiler.healthy(state, g) for r in g.ranges}
        for r, gw in by_range.items():
            holders = [p for p in out.peers if r in p.allowed_ips]
            reachable = (gw.node != name and r not in own and gw.node in peer_names
                         and compiler.uses(state, gw, name))
            assert len(holders) == (1 if reachable else 0), (r, gw.node, name)
            if reachable:
                assert holders[0].resource == gw.node
        # a gateway node carries an egress config per gateway it runs
        assert len(out.egress) == sum(1 for g in state.gateways.values() if g.node == name)
        # late replies: copied only from the gateway's own IPv4 ranges, to the
        # overlay IPv4 address of another gateway's node that carries the range
        # (no drain is pending here), which is one of its late-reply peers
        overlay4 = {n.ipv4_address: n for n in state.nodes.values()}
        for e in out.egress:
            gw = state.gateways[e.gateway]
            assert not gw.internet_gateway or not (e.handoffs or e.handoff_peers)
            for h in e.handoffs:
                assert h.address in e.handoff_peers and h.address != me.ipv4_address
                for r in h.ranges:
                    assert r in gw.ranges and ":" not in r
                    assert by_range[r].name != gw.name and overlay4[h.address].name == by_range[r].node
        # peers in canonical order (meshgate.common.desired.apply_delta keeps it)
        assert [p.resource for p in out.peers] == sorted(p.resource for p in out.peers)
        # external clients: exactly the enabled, keyed clients of this gateway
        # node are peers, with their host routes only, and relayed for
        mine = [c for c in state.external_clients.values()
                if c.gateway_node == name and c.public_key and not c.disabled]
        client_peers = [p for p in out.peers if "/externalClients/" in p.resource]
        assert [p.resource for p in client_peers] == sorted(c.name for c in mine)
        relayed = set()
        for c in mine:
            hosts = {f"{c.ipv4_address}/32"} | ({f"{c.ipv6_address}/128"} if c.ipv6_address else set())
            (p,) = [p for p in client_peers if p.resource == c.name]
            assert set(p.allowed_ips) == hosts and p.endpoint == ""
            relayed |= hosts
        assert set(out.relayed_ranges) == relayed
        # every other node reaches an enabled client through its gateway node, if it peers with it
        for c in state.external_clients.values():
            if c.gateway_node == name or not c.public_key or c.disabled:
                continue
            via = [p.resource for p in out.peers if f"{c.ipv4_address}/32" in p.allowed_ips]
            assert via == ([c.gateway_node] if c.gateway_node in peer_names else [])


@settings(max_examples=100, deadline=None)
@given(network_states(), st.randoms())
def test_compilation_is_deterministic(state, rnd):
    shuffled = compiler.NetworkState(state.network, down=set(state.down))
    for attr in ("nodes", "gateways", "policies", "external_clients"):
        items = list(getattr(state, attr).items())
        rnd.shuffle(items)
        setattr(shuffled, attr, dict(items))
    for name in state.nodes:
        a = compiler.compile_node(state, name, 7).SerializeToString(deterministic=True)
        b = compiler.compile_node(shuffled, name, 7).SerializeToString(deterministic=True)
        assert a == b


@settings(max_examples=200, deadline=None)
@given(network_states(), network_states())
def test_delta_takes_old_state_to_new(before, after):
    for name in set(before.nodes) & set(after.nodes):
        old = compiler.compile_node(before, name, 10)
        new = compiler.compile_node(after, name, 11)
        delta = compiler.diff(old, new)
        if delta is None:
            old.revision = 11
            assert old == new
            continue
        assert delta.base_revision == 10
        assert compiler.apply_delta(old, delta, 11) == new


@settings(max_examples=100, deadline=None)
@given(network_states(), st.data())
def test_affected_set_covers_every_node_whose_state_changes(state, data):
    """Changing one node (its key or tags) changes no node outside affected_by_node."""
    name = data.draw(st.sampled_from(sorted(state.nodes)))
    after = state.copy()
    changed = node_pb2.Node()
    changed.CopyFrom(state.nodes[name])
    changed.public_key = _key(random.Random(data.draw(st.integers())).randrange(1000, 2000))
    changed.tags[:] = data.draw(st.lists(st.sampled_from(TAGS), unique=True, max_size=2))
    after.nodes[name] = changed
    affected = compiler.affected_by_node(state, after, name)
    for other in state.nodes:
        if other in affected:
            continue
        assert compiler.compile_node(state, other) == compiler.compile_node(after, other), other


@settings(max_examples=100, deadline=None)
@given(network_states(), st.data())
def test_affected_set_covers_every_node_a_client_change_touches(state, data):
    """Adding, changing (key, gateway node, disabled) or removing one external
    client changes no node outside affected_by_client."""
    after = state.copy()
    names = sorted(state.nodes)
    cname = data.draw(st.sampled_from(sorted(state.external_clients) + ["networks/n/externalClients/new"]))
    if cname in state.external_clients and data.draw(st.booleans()):
        del after.external_clients[cname]
    else:
        after.external_clients[cname] = external_client_pb2.ExternalClient(
            name=cname, gateway_node=data.draw(st.sampled_from(names)), ipv4_address="100.64.0.250",
            public_key=_key(900), disabled=data.draw(st.booleans()))
    affected = compiler.affected_by_client(state, after, cname)
    for other in state.nodes:
        if other not in affected:
            assert compiler.compile_node(state, other) == compiler.compile_node(after, other), other


@settings(max_examples=200, deadline=None)
@given(network_states())
def test_a_range_stays_on_a_gateway_whose_node_is_up_when_there_is_one(state):
    by_range, _ = compiler.active_gateways(state)
    for r, chosen in by_range.items():
        candidates = [g for g in state.gateways.values()
                      if r in g.ranges and g.node in state.nodes and state.nodes[g.node].public_key]
        assert chosen in candidates
        up = [g for g in candidates if g.node not in state.down]
        best = min(up or candidates, key=lambda g: (-g.priority, g.name))
        assert chosen == best


@settings(max_examples=100, deadline=None)
@given(network_states(), st.data())
def test_affected_set_covers_every_node_a_liveness_change_touches(state, data):
    name = data.draw(st.sampled_from(sorted(state.nodes)))
    after = state.copy()
    after.down ^= {name}
    affected = compiler.affected_by_liveness(state, name)
    for other in state.nodes:
        if other not in affected:
            assert compiler.compile_node(state, other) == compiler.compile_node(after, other), other


def test_failover_moves_a_range_to_the_standby_and_back():
    net = network_pb2.Network(name="networks/n", ipv4_cidr="100.64.0.0/24")
    state = compiler.NetworkState(net)
    for i, n in enumerate(("primary", "standby", "client")):
        state.nodes[f"networks/n/nodes/{n}"] = node_pb2.Node(
            name=f"networks/n/nodes/{n}", ipv4_address=f"100.64.0.{i + 1}", public_key=_key(i + 1))
    for g, (node, prio) in enumerate((("primary", 10), ("standby", 1))):
        state.gateways[f"networks/n/egressGateways/g{g}"] = egress_pb2.EgressGateway(
            name=f"networks/n/egressGateways/g{g}", node=f"networks/n/nodes/{node}", ranges=["198.51.100.0/24"],
            priority=prio)

    def via():
        out = compiler.compile_node(state, "networks/n/nodes/client")
        return [r.via_peer for r in out.routes]

    assert via() == [_key(1)]
    state.down = {"networks/n/nodes/primary"}
    assert via() == [_key(2)]
    state.down = {"networks/n/nodes/primary", "networks/n/nodes/standby"}
    assert via() == [_key(1)]  # all down: the best keeps it
    state.down = set()
    assert via() == [_key(1)]


def test_client_allowed_ranges_default_to_network_and_reachable_egress():
    net = network_pb2.Network(name="networks/n", ipv4_cidr="100.64.0.0/24", default_policy=network_pb2.DENY)
    state = compiler.NetworkState(net)
    for i, n in enumerate(("gw", "egr", "lonely")):
        state.nodes[f"networks/n/nodes/{n}"] = node_pb2.Node(
            name=f"networks/n/nodes/{n}", ipv4_address=f"100.64.0.{i + 1}", public_key=_key(i + 1))
    for g, (node, r) in enumerate((("egr", "198.51.100.0/24"), ("lonely", "203.0.113.0/24"))):
        state.gateways[f"networks/n/egressGateways/g{g}"] = egress_pb2.EgressGateway(
            name=f"networks/n/egressGateways/g{g}", node=f"networks/n/nodes/{node}", ranges=[r])
    state.policies["networks/n/accessPolicies/p"] = policy_pb2.AccessPolicy(
        name="networks/n/accessPolicies/p", sources=["node:gw"], destinations=["node:egr"], action=policy_pb2.ACCEPT)
    client = external_client_pb2.ExternalClient(name="networks/n/externalClients/c", gateway_node="networks/n/nodes/gw")
    # gw reaches egr's range (policy) but not lonely's
    assert compiler.client_allowed_ranges(state, client) == ["100.64.0.0/24", "198.51.100.0/24"]
    client.allowed_ranges[:] = ["0.0.0.0/0"]
    assert compiler.client_allowed_ranges(state, client) == ["0.0.0.0/0"]


def test_hub_and_spoke_spoke_join_affects_only_spoke_and_hubs():
    net = network_pb2.Network(name="networks/n", ipv4_cidr="100.64.0.0/16", default_policy=network_pb2.DENY)
    state = compiler.NetworkState(net)
    state.policies["networks/n/accessPolicies/hs"] = policy_pb2.AccessPolicy(
        name="networks/n/accessPolicies/hs", sources=["tag:spoke"], destinations=["tag:hub"], action=policy_pb2.ACCEPT
    )
    for i in range(2):
        state.nodes[f"networks/n/nodes/hub{i}"] = node_pb2.Node(name=f"networks/n/nodes/hub{i}", public_key=_key(100 + i), tags=["hub"], ipv4_address=f"100.64.1.{i + 1}")
    for i in range(20):
        state.nodes[f"networks/n/nodes/s{i}"] = node_pb2.Node(name=f"networks/n/nodes/s{i}", public_key=_key(i + 1), tags=["spoke"], ipv4_address=f"100.64.2.{i + 1}")
    after = compiler.NetworkState(net, dict(state.nodes), {}, dict(state.policies))
    after.nodes["networks/n/nodes/s99"] = node_pb2.Node(name="networks/n/nodes/s99", public_key=_key(999), tags=["spoke"], ipv4_address="100.64.2.99")
    affected = compiler.affected_by_node(state, after, "networks/n/nodes/s99")
    assert affected == {"networks/n/nodes/s99", "networks/n/nodes/hub0", "networks/n/nodes/hub1"}
    spoke = compiler.compile_node(after, "networks/n/nodes/s99")
    assert [p.resource for p in spoke.peers] == ["networks/n/nodes/hub0", "networks/n/nodes/hub1"]


def _gateway_network():
    net = network_pb2.Network(name="networks/n", ipv4_cidr="100.64.0.0/24")
    state = compiler.NetworkState(net)
    for i, tags in ((1, []), (2, ["laptop"]), (3, []), (4, ["laptop"])):
        state.nodes[f"networks/n/nodes/n{i}"] = node_pb2.Node(
            name=f"networks/n/nodes/n{i}", ipv4_address=f"100.64.0.{i}", public_key=_key(i), tags=tags)
    # n1: internet gateway; n3: a gateway for a range
    state.gateways["networks/n/egressGateways/inet"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/inet", node="networks/n/nodes/n1", internet_gateway=True)
    state.gateways["networks/n/egressGateways/lan"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/lan", node="networks/n/nodes/n3", ranges=["198.51.100.0/24"])
    return state


def test_an_internet_gateway_is_not_used_by_other_gateways_unless_selected():
    state = _gateway_network()
    inet = state.nodes["networks/n/nodes/n1"].public_key
    via = {n: compiler.compile_node(state, n).default_route_via_peer for n in state.nodes}
    assert via == {"networks/n/nodes/n1": "", "networks/n/nodes/n2": inet,
                   "networks/n/nodes/n3": "", "networks/n/nodes/n4": inet}
    # n3 keeps its own default route, and still routes nothing else differently
    n3 = compiler.compile_node(state, "networks/n/nodes/n3")
    assert all("0.0.0.0/0" not in p.allowed_ips for p in n3.peers)
    # selected explicitly: only the laptops use it
    state.gateways["networks/n/egressGateways/inet"].used_by.append("tag:laptop")
    via = {n: bool(compiler.compile_node(state, n).default_route_via_peer) for n in state.nodes}
    assert via == {"networks/n/nodes/n1": False, "networks/n/nodes/n2": True,
                   "networks/n/nodes/n3": False, "networks/n/nodes/n4": True}


def test_used_by_limits_who_routes_a_range_and_gateways_accept_each_others_ranges():
    state = _gateway_network()
    routes = {n: [r.destination for r in compiler.compile_node(state, n).routes] for n in state.nodes}
    assert routes["networks/n/nodes/n2"] == ["198.51.100.0/24"] and routes["networks/n/nodes/n1"] == ["198.51.100.0/24"]
    state.gateways["networks/n/egressGateways/lan"].used_by.extend(["node:n2"])
    for n in state.nodes:
        out = compiler.compile_node(state, n)
        got = [r.destination for r in out.routes]
        assert got == (["198.51.100.0/24"] if n == "networks/n/nodes/n2" else []), n
        # not selected: the range is not in any peer's allowed IPs either
        if n != "networks/n/nodes/n2":
            assert all("198.51.100.0/24" not in p.allowed_ips for p in out.peers)
    # site-to-site: a gateway accepts from the ranges another gateway carries for it
    state.gateways["networks/n/egressGateways/lan"].ClearField("used_by")
    state.gateways["networks/n/egressGateways/lan2"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/lan2", node="networks/n/nodes/n1", ranges=["203.0.113.0/24"])
    n3 = compiler.compile_node(state, "networks/n/nodes/n3")
    assert list(n3.egress[0].source_ranges) == ["100.64.0.0/24", "203.0.113.0/24"]


def _two_gateways(drain: bool = False, held: bool | None = None) -> compiler.NetworkState:
    net = network_pb2.Network(name="networks/n", ipv4_cidr="100.64.0.0/24", listen_port=51820, mtu=1420)
    state = compiler.NetworkState(net)
    for i, n in enumerate(("client", "primary", "standby", "other")):
        name = f"networks/n/nodes/{n}"
        state.nodes[name] = node_pb2.Node(name=name, ipv4_address=f"100.64.0.{i + 1}", public_key=_key(i + 1),
                                          endpoint=f"192.0.2.{i + 1}:51820")
    for g, node, prio in (("p", "primary", 10), ("s", "standby", 1)):
        name = f"networks/n/egressGateways/{g}"
        state.gateways[name] = egress_pb2.EgressGateway(
            name=name, node=f"networks/n/nodes/{node}", ranges=["198.51.100.0/24", "2001:db8::/48"],
            priority=prio, drain=drain and g == "p")
    state.gateways["networks/n/egressGateways/net"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/net", node="networks/n/nodes/other", internet_gateway=True)
    if held is not None:
        state.drain_held["networks/n/egressGateways/p"] = (held, 7)
    return state


def _egress(state, node: str):
    (e,) = [e for e in compiler.compile_node(state, f"networks/n/nodes/{node}").egress if not e.internet_gateway]
    return [(list(h.ranges), h.address) for h in e.handoffs], list(e.handoff_peers)


def _route(state) -> str:
    out = compiler.compile_node(state, "networks/n/nodes/client")
    keys = {p.public_key: p.resource.rsplit("/", 1)[1] for p in out.peers}
    return next(keys[r.via_peer] for r in out.routes if r.destination == "198.51.100.0/24")


def test_a_drain_holds_routing_until_its_mark_goes_and_copies_late_replies_meanwhile():
    """The drain routing keeps while a change waits for its handoff
    (`drain_held`), and who copies late replies to whom in each step: IPv4
    ranges only, never an internet gateway, each gateway node the other's
    late-reply peer."""
    steady = _two_gateways()
    assert _route(steady) == "primary"
    assert _egress(steady, "primary") == ([], ["100.64.0.3"])
    assert _egress(steady, "standby") == ([(["198.51.100.0/24"], "100.64.0.2")], ["100.64.0.2"])
    pending = _two_gateways(drain=True, held=False)  # the drain written, its handoff not ready
    assert compiler.drain_requested(pending, pending.gateways["networks/n/egressGateways/p"])
    assert _route(pending) == "primary"
    assert _egress(pending, "primary") == ([(["198.51.100.0/24"], "100.64.0.3")], ["100.64.0.3"])
    drained = _two_gateways(drain=True)  # mark released
    assert _route(drained) == "standby"
    assert _egress(drained, "primary") == ([(["198.51.100.0/24"], "100.64.0.3")], ["100.64.0.3"])
    assert _egress(drained, "standby") == ([], ["100.64.0.2"])
    undraining = _two_gateways(drain=False, held=True)
    assert _route(undraining) == "standby"
    assert _egress(undraining, "standby") == ([(["198.51.100.0/24"], "100.64.0.2")], ["100.64.0.2"])
    assert compiler.drain_pending(undraining) and not compiler.drain_pending(drained)
    inet = [e for e in compiler.compile_node(steady, "networks/n/nodes/other").egress]
    assert inet and not any(e.handoffs or e.handoff_peers for e in inet)


def test_no_late_reply_copies_between_two_gateways_on_one_node():
    state = _two_gateways()
    state.gateways["networks/n/egressGateways/s"].node = "networks/n/nodes/primary"
    out = compiler.compile_node(state, "networks/n/nodes/primary")
    assert not any(e.handoffs or e.handoff_peers for e in out.egress)
