"""Pure tests of ``plan(desired, observed)``, including a property test against a fake
kernel that *evaluates* a plan (applies it to an ``Observed``), in the style of
Faucet's fake dataplane: the assertions are about the resulting state, not calls.
"""

from __future__ import annotations

import base64
from dataclasses import replace

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.keys import Secret
from meshgate.gatewayd.model import (
    Desired,
    Observed,
    ObservedDevice,
    ObservedLink,
    PeerSpec,
    compile_desired,
    expected_observed,
)
from meshgate.gatewayd.planner import Plan, plan

S = Settings()
OWN = base64.b64encode(bytes([7] * 32)).decode()


def key(i: int) -> str:
    return base64.b64encode(bytes([i % 256]) * 31 + bytes([i // 256 + 1])).decode()


def psk(i: int) -> str:
    return base64.b64encode(bytes([200 + i % 50]) * 32).decode()


def state(n_peers: int = 3, **kw) -> pb.DesiredState:
    msg = pb.DesiredState(node="networks/n/nodes/a", revision=1)
    msg.interface.name = "mg0"
    msg.interface.addresses.append("100.64.0.1/24")
    msg.interface.listen_port = 51820
    for i in range(n_peers):
        p = msg.peers.add(public_key=key(i), persistent_keepalive_seconds=0)
        p.allowed_ips.append(f"100.64.0.{i + 2}/32")
    for k, v in kw.items():
        setattr(msg, k, v)
    return msg


def compiled(msg: pb.DesiredState) -> Desired:
    return compile_desired(msg, settings=S, public_key=OWN)


def empty_kernel() -> Observed:
    return Observed(None, None, frozenset(), frozenset(), None, {})


def evaluate(obs: Observed, p: Plan, desired: Desired) -> Observed:
    """A fake kernel: the state after carrying out ``p`` on ``obs``."""
    dev = obs.device
    if p.create_interface:
        dev = ObservedDevice(None, 0, 0, {})
        link = ObservedLink(0, False, frozenset())
        routes: frozenset = frozenset()
    else:
        link, routes = obs.link, obs.routes
    assert dev is not None and link is not None
    pub, port, mark = dev.public_key, dev.listen_port, dev.fwmark
    if p.device:
        pub = desired.public_key if p.device.set_private_key else pub
        port = p.device.listen_port if p.device.listen_port is not None else port
        mark = p.device.fwmark if p.device.fwmark is not None else mark
    peers = dict(dev.peers)
    for op in p.peers:
        if op.kind == "remove":
            assert op.public_key in peers
            del peers[op.public_key]
            continue
        if op.kind == "update":
            assert op.public_key in peers, "update_only of a missing peer does nothing"
            cur = peers[op.public_key]
        else:
            assert op.public_key not in peers
            cur = PeerSpec(op.public_key)
        peers[op.public_key] = PeerSpec(
            op.public_key,
            allowed_ips=op.allowed_ips if op.allowed_ips is not None else cur.allowed_ips,
            preshared_key=None if op.clear_preshared_key else (op.preshared_key or cur.preshared_key),
            endpoint=op.endpoint if op.endpoint is not None else cur.endpoint,
            keepalive=op.keepalive if op.keepalive is not None else cur.keepalive,
        )
    addrs = (link.addresses - set(p.addr_del)) | set(p.addr_add)
    link = ObservedLink(p.mtu or link.mtu, link.up or p.set_up, addrs)
    routes = (routes - set(p.route_del)) | set(p.route_add)
    rules = (obs.rules - set(p.rule_del)) | set(p.rule_add)
    sysctls = dict(obs.sysctls, **dict(p.sysctls))
    return Observed(ObservedDevice(pub, port, mark, peers), link, routes, rules,
                    p.nft.digest if p.nft else obs.nft_digest, sysctls)


def test_from_empty_creates_everything_and_converges():
    d = compiled(state(3))
    p = plan(d, empty_kernel())
    assert p.create_interface and p.device and p.device.set_private_key
    assert [op.kind for op in p.peers] == ["add"] * 3
    assert p.nft is not None and p.addr_add == ("100.64.0.1/24",)
    after = evaluate(empty_kernel(), p, d)
    assert plan(d, after).empty
    assert after == expected_observed(d)


def test_same_state_plans_nothing():
    d = compiled(state(5))
    assert plan(d, expected_observed(d)).empty
    assert plan(d, expected_observed(d)).changes() == []


def test_one_peer_changed_is_one_update_in_place():
    d1 = compiled(state(5))
    msg = state(5)
    msg.peers[2].allowed_ips.append("203.0.113.0/28")
    d2 = compiled(msg)
    p = plan(d2, expected_observed(d1))
    assert len(p.peers) == 1
    (op,) = p.peers
    assert op.kind == "update" and op.public_key == key(2)
    assert op.allowed_ips == frozenset({"100.64.0.4/32", "203.0.113.0/28"})
    # nothing else is touched: not the key, not the port, not the other peers
    assert p.device is None and p.nft is None and not p.touches_links()


def test_removed_peer_is_removed_not_replaced():
    d1 = compiled(state(3))
    msg = state(3)
    del msg.peers[1]
    p = plan(compiled(msg), expected_observed(d1))
    assert [(op.kind, op.public_key) for op in p.peers] == [("remove", key(1))]


def test_unmanaged_endpoint_is_left_alone():
    d = compiled(state(2))
    obs = expected_observed(d)
    roamed = dict(obs.device.peers)
    roamed[key(0)] = replace(roamed[key(0)], endpoint="192.0.2.7:4444")
    obs = replace(obs, device=replace(obs.device, peers=roamed))
    assert plan(d, obs).empty


def test_psk_set_and_cleared_without_leaking():
    msg = state(1)
    msg.peers[0].preshared_key = psk(1)
    d = compiled(msg)
    p = plan(d, expected_observed(compiled(state(1))))
    (op,) = p.peers
    assert op.preshared_key == Secret(psk(1))
    assert psk(1) not in repr(p) and psk(1) not in "\n".join(p.changes())
    p2 = plan(compiled(state(1)), expected_observed(d))
    assert p2.peers[0].clear_preshared_key


def test_private_key_mismatch_sets_key_only():
    d = compiled(state(2))
    obs = expected_observed(d)
    obs = replace(obs, device=replace(obs.device, public_key=key(99)))
    p = plan(d, obs)
    assert p.device and p.device.set_private_key and not p.peers


def test_missing_interface_recreates_routes_even_if_remembered():
    msg = state(1)
    msg.peers[0].allowed_ips.append("198.51.100.0/24")
    msg.routes.add(destination="198.51.100.0/24", via_peer=key(0))
    d = compiled(msg)
    obs = replace(expected_observed(d), device=None, link=None)
    p = plan(d, obs)
    assert p.create_interface and p.route_add and not p.rule_add  # rules survive a link


def test_drift_is_planned_back():
    msg = state(2)
    msg.peers[0].allowed_ips.append("198.51.100.0/24")
    msg.routes.add(destination="198.51.100.0/24", via_peer=key(0))
    d = compiled(msg)
    obs = expected_observed(d)
    drifted = replace(obs, routes=frozenset(), nft_digest=None, rules=frozenset(),
                      device=replace(obs.device, peers={}))
    p = plan(d, drifted)
    assert p.route_add and p.rule_add and p.nft is not None and len(p.peers) == 2
    assert plan(d, evaluate(drifted, p, d)).empty


def test_relayed_ranges_change_only_the_table_and_forwarding():
    d0 = compiled(state(3))
    with_relay = state(3)
    with_relay.relayed_ranges.append("100.64.0.3/32")  # peer 1's address: an external client
    d1 = compiled(with_relay)
    p = plan(d1, expected_observed(d0))
    assert p.nft is not None and p.nft.digest == d1.nft.digest
    assert p.sysctls == (("net.ipv4.ip_forward", "1"),)
    assert not p.peers and p.device is None and not p.touches_links()
    assert p.changes() == [f"replace table inet meshgate ({d1.nft.digest})", "sysctl net.ipv4.ip_forward=1"]
    after = evaluate(expected_observed(d0), p, d1)
    assert plan(d1, after).empty
    # taken away again: the table goes back, forwarding is never turned off
    back = plan(d0, after)
    assert back.nft is not None and back.nft.digest == d0.nft.digest and back.sysctls == ()


# ---------------------------------------------------------------- property


@st.composite
def desired_states(draw):
    n = draw(st.integers(0, 6))
    idx = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n, unique=True))
    msg = pb.DesiredState(node="networks/n/nodes/a", revision=draw(st.integers(0, 100)))
    msg.interface.name = "mg0"
    msg.interface.addresses.extend(draw(st.sampled_from(
        [["100.64.0.1/24"], ["100.64.0.1/24", "fd00::1/64"], []])))
    msg.interface.listen_port = draw(st.sampled_from([0, 51820, 4000]))
    msg.interface.mtu = draw(st.sampled_from([0, 1380]))
    for i in idx:
        p = msg.peers.add(public_key=key(i))
        p.allowed_ips.append(f"100.64.1.{i}/32")
        if draw(st.booleans()):
            p.allowed_ips.append(f"198.51.100.{i * 4}/30")
            if draw(st.booleans()):
                msg.routes.add(destination=f"198.51.100.{i * 4}/30", via_peer=key(i))
        if draw(st.booleans()):
            p.preshared_key = psk(i)
        if draw(st.booleans()):
            p.endpoint = f"203.0.113.{i + 1}:{51820 + i}"
        p.persistent_keepalive_seconds = draw(st.sampled_from([0, 25]))
    if idx and draw(st.booleans()):
        gw = msg.peers[0]
        gw.allowed_ips.append("0.0.0.0/0")
        msg.default_route_via_peer = gw.public_key
    if draw(st.booleans()):
        e = msg.egress.add(nat=draw(st.booleans()))
        e.ranges.extend(draw(st.sampled_from([["192.0.2.0/24"], ["192.0.2.0/25", "2001:db8::/32"]])))
    msg.relayed_ranges.extend(draw(st.sampled_from(
        [[], ["100.64.1.200/32"], ["100.64.1.200/32", "fd00::c8/128"]])))
    return msg


@hsettings(max_examples=150, deadline=None)
@given(desired_states(), desired_states())
def test_plan_converges_from_any_previous_state(a, b):
    da, db = compiled(a), compiled(b)
    start = expected_observed(da)
    p = plan(db, start)
    after = evaluate(start, p, db)
    assert plan(db, after).empty
    # endpoints left empty are not managed: whatever WireGuard has stays
    assert {k: replace(v, endpoint=None) for k, v in after.device.peers.items()} == {
        k: replace(v, endpoint=None) for k, v in db.peers.items()}
    assert all(after.device.peers[k].endpoint == v.endpoint
               for k, v in db.peers.items() if v.endpoint)
    assert after.routes == db.routes and after.rules == db.rules
    assert after.link.addresses == db.addresses
    assert after.nft_digest == db.nft.digest
    assert all(after.sysctls.get(k) == v for k, v in db.sysctls.items())


@hsettings(max_examples=100, deadline=None)
@given(desired_states())
def test_plan_from_empty_converges(a):
    d = compiled(a)
    after = evaluate(empty_kernel(), plan(d, empty_kernel()), d)
    assert plan(d, after).empty
