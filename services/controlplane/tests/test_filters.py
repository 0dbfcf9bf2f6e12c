"""Property tests of the policy compiler: a node's filter rules allow a packet if and
only if the network's policies do.

The reference is a direct evaluation of the policies (`allowed_by_policies`, written
from the API's definition, not from the compiler), over random networks and packets.
The rules are evaluated the way gatewayd's nftables chain does (`allowed_by_rules`:
first match decides, no match allows), for every packet the node can receive (from
an address some peer of it may send from) and delivers (to itself, its egress ranges
or its relayed clients): the packets the chain is entered for.
"""

import base64
import ipaddress

from google.protobuf import duration_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.api.v1 import egress_pb2, external_client_pb2, network_pb2, node_pb2, policy_pb2
from meshgate.controlplane import compiler, filters

TAGS = ["web", "db", "ops"]
RANGES = ["198.51.100.0/24", "203.0.113.0/25", "2001:db8::/48"]
PROTOS = [policy_pb2.PROTOCOL_UNSPECIFIED, policy_pb2.TCP, policy_pb2.UDP, policy_pb2.ICMP, policy_pb2.ICMPV6]
PKT_PROTOS = ["tcp", "udp", "icmp", "icmpv6"]


def _key(i: int) -> str:
    return base64.b64encode(i.to_bytes(32, "big")).decode()


@st.composite
def networks(draw):
    deny = draw(st.booleans())
    net = network_pb2.Network(
        name="networks/n", ipv4_cidr="100.64.0.0/24", ipv6_cidr="fd00::/64",
        listen_port=51820, mtu=1420, persistent_keepalive=duration_pb2.Duration(seconds=25),
        default_policy=network_pb2.DENY if deny else network_pb2.ALLOW,
    )
    state = compiler.NetworkState(net)
    n = draw(st.integers(2, 6))
    for i in range(n):
        name = f"networks/n/nodes/n{i}"
        state.nodes[name] = node_pb2.Node(
            name=name, ipv4_address=f"100.64.0.{i + 1}", ipv6_address=f"fd00::{i + 1:x}",
            public_key=_key(i + 1), tags=draw(st.lists(st.sampled_from(TAGS), unique=True, max_size=2)))
    names = sorted(state.nodes)
    for g in range(draw(st.integers(0, 2))):
        gname = f"networks/n/egressGateways/g{g}"
        state.gateways[gname] = egress_pb2.EgressGateway(
            name=gname, node=draw(st.sampled_from(names)),
            ranges=draw(st.lists(st.sampled_from(RANGES), unique=True, min_size=1, max_size=2)),
            internet_gateway=draw(st.integers(0, 4)) == 0)
    for c in range(draw(st.integers(0, 2))):
        cname = f"networks/n/externalClients/c{c}"
        state.external_clients[cname] = external_client_pb2.ExternalClient(
            name=cname, gateway_node=draw(st.sampled_from(names)), ipv4_address=f"100.64.0.{200 + c}",
            public_key=_key(100 + c))
    selectors = (["*"] + [f"tag:{t}" for t in TAGS] + [f"node:n{i}" for i in range(n)]
                 + [f"egress:{g.rsplit('/', 1)[1]}" for g in state.gateways]
                 + [f"client:{c.rsplit('/', 1)[1]}" for c in state.external_clients])
    for p in range(draw(st.integers(0, 5))):
        proto = draw(st.sampled_from(PROTOS))
        ports = []
        if proto in (policy_pb2.TCP, policy_pb2.UDP):
            for _ in range(draw(st.integers(0, 2))):
                first = draw(st.sampled_from([22, 80, 443, 8000]))
                ports.append(policy_pb2.PortRange(first=first, last=draw(st.sampled_from([0, first, first + 80]))))
        pname = f"networks/n/accessPolicies/p{p}"
        state.policies[pname] = policy_pb2.AccessPolicy(
            name=pname,
            sources=draw(st.lists(st.sampled_from(selectors), min_size=1, max_size=2)),
            destinations=draw(st.lists(st.sampled_from(selectors), min_size=1, max_size=2)),
            protocol=proto, ports=ports,
            action=draw(st.sampled_from([policy_pb2.ACCEPT, policy_pb2.DROP])),
            priority=draw(st.integers(0, 3)), bidirectional=draw(st.booleans()), disabled=draw(st.integers(0, 5)) == 0)
    return state


# -- the reference: the policies, evaluated as the API defines them ---------------------------

def _addresses_of(state, sel):
    """The networks a selector stands for, or None for every address."""
    if sel == "*":
        return None
    kind, _, value = sel.partition(":")
    out = []
    if kind == "tag":
        nodes = [n for n in state.nodes.values() if value in n.tags]
    elif kind == "node":
        nodes = [n for n in state.nodes.values() if n.name.endswith(f"/nodes/{value}")]
    elif kind == "client":
        nodes = [c for c in state.external_clients.values() if c.name.endswith(f"/externalClients/{value}")]
    else:
        nodes = []
        for g in state.gateways.values():
            if g.name.endswith(f"/egressGateways/{value}"):
                out += [ipaddress.ip_network(r) for r in g.ranges]
                if g.internet_gateway:
                    out.append(INTERNET)
    for n in nodes:
        out += [ipaddress.ip_network(a) for a in (n.ipv4_address, n.ipv6_address) if a]
    return out


class _Internet:
    """The internet, as an internet gateway's selector means it: outside the overlay
    and outside every gateway's ranges."""


INTERNET = _Internet()


def _inside(addr, n, state) -> bool:
    if n is INTERNET:
        inside = [state.network.ipv4_cidr, state.network.ipv6_cidr] + [r for g in state.gateways.values() for r in g.ranges]
        return not any(_inside(addr, ipaddress.ip_network(c), state) for c in inside if c)
    return addr.version == n.version and addr in n


def _in(addr, sels, state):
    for s in sels:
        nets = _addresses_of(state, s)
        if nets is None or any(_inside(addr, n, state) for n in nets):
            return True
    return False


def _policy_matches(p, src, dst, proto, port, state):
    want = {policy_pb2.TCP: "tcp", policy_pb2.UDP: "udp", policy_pb2.ICMP: "icmp", policy_pb2.ICMPV6: "icmpv6"}
    if p.protocol != policy_pb2.PROTOCOL_UNSPECIFIED and want[p.protocol] != proto:
        return False
    if p.ports and not any(r.first <= port <= (r.last or r.first) for r in p.ports):
        return False
    if _in(src, p.sources, state) and _in(dst, p.destinations, state):
        return True
    return p.bidirectional and _in(src, p.destinations, state) and _in(dst, p.sources, state)


def allowed_by_policies(state, src, dst, proto, port):
    for p in sorted(state.policies.values(), key=lambda p: (p.priority, p.name)):
        if not p.disabled and _policy_matches(p, src, dst, proto, port, state):
            return p.action != policy_pb2.DROP
    return state.network.default_policy != network_pb2.DENY


# -- the rules, evaluated as gatewayd's chain does ---------------------------------------------

def _rule_matches(r, src, dst, proto, port):
    def inside(addr, cidrs):
        return not cidrs or any(addr.version == n.version and addr in n for n in map(ipaddress.ip_network, cidrs))
    if r.protocol and r.protocol != proto:
        return False
    if r.ports and not any(int(a) <= port <= int(b or a) for a, _, b in (x.partition("-") for x in r.ports)):
        return False
    return inside(src, r.sources) and inside(dst, r.destinations)


def allowed_by_rules(rules, src, dst, proto, port):
    for r in rules:
        if _rule_matches(r, src, dst, proto, port):
            return r.accept
    return True


def _candidates(state):
    out = set()
    for n in list(state.nodes.values()) + list(state.external_clients.values()):
        out |= {a for a in (n.ipv4_address, n.ipv6_address) if a}
    out |= {"198.51.100.7", "203.0.113.9", "203.0.113.200", "2001:db8::9", "192.0.2.50", "2001:db8:1::1"}
    return sorted((ipaddress.ip_address(a) for a in out), key=lambda a: (a.version, a))


@settings(max_examples=250, deadline=None)
@given(networks(), st.sampled_from(PKT_PROTOS), st.sampled_from([22, 80, 100, 443, 8000, 8080, 9000]))
def test_rules_allow_exactly_what_the_policies_allow(state, proto, port):
    index = compiler.PeerIndex(state)
    addrs = _candidates(state)
    for name in state.nodes:
        out = compiler.compile_node(state, name, index=index)
        # what WireGuard lets in; through a default route come the internet's addresses
        admitted = [ipaddress.ip_network(c) if not c.endswith("/0") else INTERNET
                    for p in out.peers for c in p.allowed_ips]
        me = state.nodes[name]
        delivers = [ipaddress.ip_network(f"{a}/{32 if ':' not in a else 128}") for a in (me.ipv4_address, me.ipv6_address)]
        delivers += [ipaddress.ip_network(r) for r in out.relayed_ranges]
        for e in out.egress:
            delivers += [ipaddress.ip_network(r) for r in e.ranges]
            if e.internet_gateway:
                delivers += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]  # what it forwards
        for src in addrs:
            if not any(_inside(src, n, state) for n in admitted):
                continue  # WireGuard drops it before any filter
            for dst in addrs:
                if src.version != dst.version or not any(_inside(dst, n, state) for n in delivers):
                    continue
                want = allowed_by_policies(state, src, dst, proto, port)
                got = allowed_by_rules(out.filter_rules, src, dst, proto, port)
                assert got == want, (name, str(src), str(dst), proto, port, list(out.filter_rules))


def test_intersect_keeps_the_narrower_of_nested_cidrs_and_drops_disjoint_ones():
    assert filters.intersect(["10.0.0.0/8", "192.0.2.0/24"], ["10.1.0.0/16", "198.51.100.0/24"]) == ["10.1.0.0/16"]
    assert filters.intersect(["100.64.0.5/32", "100.64.0.6/32"], ["100.64.0.0/24"]) == ["100.64.0.5/32", "100.64.0.6/32"]
    assert filters.intersect(None, ["fd00::/64"]) == ["fd00::/64"]
    assert filters.intersect(None, None) is None
    assert filters.intersect([], None) == []


def test_a_deny_network_ends_every_node_rule_list_with_a_drop_and_an_allow_network_without_drops_has_none():
    state = compiler.NetworkState(network_pb2.Network(name="networks/n", ipv4_cidr="100.64.0.0/24",
                                                      default_policy=network_pb2.DENY))
    for i in (1, 2):
        state.nodes[f"networks/n/nodes/n{i}"] = node_pb2.Node(
            name=f"networks/n/nodes/n{i}", ipv4_address=f"100.64.0.{i}", public_key=_key(i))
    state.policies["networks/n/accessPolicies/web"] = policy_pb2.AccessPolicy(
        name="networks/n/accessPolicies/web", sources=["node:n1"], destinations=["node:n2"],
        protocol=policy_pb2.TCP, ports=[policy_pb2.PortRange(first=80)], action=policy_pb2.ACCEPT)
    rules = list(compiler.compile_node(state, "networks/n/nodes/n2").filter_rules)
    assert [(list(r.sources), list(r.destinations), r.protocol, list(r.ports), r.accept, r.policy) for r in rules] == [
        (["100.64.0.1/32"], ["100.64.0.2/32"], "tcp", ["80"], True, "networks/n/accessPolicies/web"),
        ([], [], "", [], False, ""),
    ]
    # n1 delivers nothing the policy names: only the default drop
    assert [r.accept for r in compiler.compile_node(state, "networks/n/nodes/n1").filter_rules] == [False]
    state.network.default_policy = network_pb2.ALLOW
    assert list(compiler.compile_node(state, "networks/n/nodes/n2").filter_rules) == []


def _deny_net():
    state = compiler.NetworkState(network_pb2.Network(name="networks/n", ipv4_cidr="100.64.0.0/24",
                                                      default_policy=network_pb2.DENY))
    return state


def _node(state, i, tags=()):
    name = f"networks/n/nodes/n{i}"
    state.nodes[name] = node_pb2.Node(name=name, ipv4_address=f"100.64.0.{i}", public_key=_key(i), tags=list(tags))
    return name


def _policy(state, pid, src, dst, **kw):
    name = f"networks/n/accessPolicies/{pid}"
    state.policies[name] = policy_pb2.AccessPolicy(name=name, sources=[src], destinations=[dst], **kw)


def test_a_policy_to_the_internet_names_no_node_and_no_other_range():
    state = _deny_net()
    gw, db = _node(state, 1), _node(state, 3)
    _node(state, 2, ["ops"])
    state.gateways["networks/n/egressGateways/internet"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/internet", node=gw, internet_gateway=True)
    state.gateways["networks/n/egressGateways/lab"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/lab", node=gw, ranges=["203.0.113.0/24"])
    _policy(state, "browse", "tag:ops", "egress:internet", protocol=policy_pb2.TCP,
            ports=[policy_pb2.PortRange(first=443)], action=policy_pb2.ACCEPT)
    _policy(state, "ssh", "tag:ops", "node:n3", protocol=policy_pb2.TCP,
            ports=[policy_pb2.PortRange(first=22)], action=policy_pb2.ACCEPT)
    db_rules = compiler.compile_node(state, db).filter_rules
    assert [r.policy.rsplit("/", 1)[1] for r in db_rules if r.policy] == ["ssh"]
    gw_rules = [r for r in compiler.compile_node(state, gw).filter_rules if r.policy.endswith("browse")]
    assert gw_rules
    dst = [ipaddress.ip_network(c) for r in gw_rules for c in r.destinations]
    for inside in ("100.64.0.1", "203.0.113.5"):  # the gateway itself, its other range
        assert not any(ipaddress.ip_address(inside) in n for n in dst if n.version == 4), inside
    assert any(ipaddress.ip_address("192.0.2.80") in n for n in dst if n.version == 4)


def test_a_policy_naming_a_gateway_covers_its_standby_after_failover():
    state = _deny_net()
    g1, g2, laptop = _node(state, 1), _node(state, 2), _node(state, 3, ["ops"])
    for gid, node, prio in (("db-a", g1, 10), ("db-b", g2, 1)):
        state.gateways[f"networks/n/egressGateways/{gid}"] = egress_pb2.EgressGateway(
            name=f"networks/n/egressGateways/{gid}", node=node, ranges=["203.0.113.0/24"], priority=prio)
    _policy(state, "db", "tag:ops", "egress:db-a", action=policy_pb2.ACCEPT)
    state.down.add(g1)
    out = compiler.compile_node(state, laptop)
    assert [(r.destination, r.via_peer) for r in out.routes] == [("203.0.113.0/24", state.nodes[g2].public_key)]
    assert any(r.accept and r.policy for r in compiler.compile_node(state, g2).filter_rules)


def test_an_unspecified_action_is_accept_for_peering_and_rules_alike():
    state = _deny_net()
    a, b = _node(state, 1), _node(state, 2)
    _policy(state, "p", "node:n1", "node:n2")  # action left unspecified
    assert compiler.peers_of(state, a) == [b]
    assert compiler.compile_node(state, b).filter_rules[0].accept


def test_a_node_behind_an_internet_gateway_has_no_rule_about_nodes_it_does_not_peer_with():
    """The fan-out recompiles a node's peers when another node's tags change; a node's
    rules must therefore depend on no other node (here: d, whose default route goes
    through the internet gateway, must not see n's new tag)."""
    state = _deny_net()
    gw, d, n = _node(state, 1), _node(state, 2), _node(state, 3)
    state.gateways["networks/n/egressGateways/internet"] = egress_pb2.EgressGateway(
        name="networks/n/egressGateways/internet", node=gw, internet_gateway=True)
    _policy(state, "out", "node:n2", "egress:internet", action=policy_pb2.ACCEPT)
    _policy(state, "bad", "tag:bad", "*", action=policy_pb2.DROP, priority=0)
    before = compiler.compile_node(state, d)
    assert n not in compiler.peers_of(state, d)
    state.nodes[n].tags.append("bad")
    assert compiler.compile_node(state, d) == before
    assert compiler.affected_by_node(None, state, n) >= {n}
