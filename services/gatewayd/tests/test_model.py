"""Validation and expansion of desired states (pure)."""

from __future__ import annotations

import base64

import pytest

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.gatewayd import nftrules as nftables
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.errors import InvalidDesiredState
from meshgate.gatewayd.model import (
    RouteSpec,
    compile_desired,
    compile_peer_delta,
    merge_delta,
    peers_only,
)

S = Settings()
OWN = base64.b64encode(bytes([7] * 32)).decode()


def key(i: int) -> str:
    return base64.b64encode(bytes([i % 256]) * 31 + bytes([i // 256 + 1])).decode()


def state(n_peers: int = 3) -> pb.DesiredState:
    msg = pb.DesiredState(node="networks/n/nodes/a", revision=1)
    msg.interface.name = "mg0"
    msg.interface.addresses.append("100.64.0.1/24")
    for i in range(n_peers):
        msg.peers.add(public_key=key(i)).allowed_ips.append(f"100.64.0.{i + 2}/32")
    return msg


def compiled(msg: pb.DesiredState):
    return compile_desired(msg, settings=S, public_key=OWN)


def violations(msg: pb.DesiredState, host_links=None) -> list[str]:
    with pytest.raises(InvalidDesiredState) as e:
        compile_desired(msg, settings=S, public_key=OWN, host_links=host_links)
    return [str(v) for v in e.value.violations]


def test_valid_state_compiles():
    d = compiled(state(3))
    assert d.interface == "mg0" and len(d.peers) == 3 and d.fwmark == 0
    assert d.rules == frozenset() and d.routes == frozenset()


def test_overlapping_allowed_ips_across_peers_rejected():
    msg = state(3)
    msg.peers[2].allowed_ips.append("100.64.0.0/30")  # contains peer 0's and 1's /32
    v = violations(msg)
    assert any("peers[2].allowed_ips" in x or "overlaps" in x for x in v)


def test_identical_allowed_ips_rejected():
    msg = state(2)
    msg.peers[1].allowed_ips.append("100.64.0.2/32")
    assert any("overlaps" in x for x in violations(msg))


def test_default_route_peer_may_contain_others():
    msg = state(3)
    msg.peers[0].allowed_ips.append("0.0.0.0/0")
    msg.default_route_via_peer = key(0)
    d = compiled(msg)
    assert RouteSpec("0.0.0.0/0", 0) in d.routes
    assert d.fwmark == S.fwmark
    assert {r.priority for r in d.rules} == {S.rule_priority, S.rule_table_priority}
    assert d.sysctls["net.ipv4.conf.all.src_valid_mark"] == "1"


def test_invalid_keys_rejected_without_echoing_secrets():
    msg = state(2)
    msg.peers[0].public_key = "short"
    secret = "c2VjcmV0LXZhbHVlLXRoYXQtaXMtbm90LWEta2V5IQ=="
    msg.peers[1].preshared_key = secret
    v = violations(msg)
    assert any(x.startswith("peers[0].public_key") for x in v)
    assert any(x.startswith("peers[1].preshared_key") for x in v)
    assert all(secret not in x for x in v)


def test_unknown_egress_interface_rejected():
    msg = state(1)
    e = msg.egress.add(nat=True, egress_interface="eth9")
    e.ranges.append("198.51.100.0/24")
    assert any("egress[0].egress_interface" in x for x in violations(msg, host_links={"lo", "eth0"}))
    compile_desired(msg, settings=S, public_key=OWN, host_links={"eth9"})


def test_bad_interface_name_and_cidrs_listed_together():
    msg = state(1)
    msg.interface.name = "this-name-is-far-too-long"
    msg.peers[0].allowed_ips.append("100.64.0.300/32")
    msg.peers[0].allowed_ips.append("100.64.0.2/24")  # host bits set
    msg.routes.add(destination="198.51.100.0/24", via_peer=key(5))
    v = violations(msg)
    assert any(x.startswith("interface.name") for x in v)
    assert any("allowed_ips[1]" in x for x in v) and any("allowed_ips[2]" in x for x in v)
    assert any(x.startswith("routes[0].via_peer") for x in v)


def test_route_must_be_within_its_peer():
    msg = state(1)
    msg.routes.add(destination="198.51.100.0/24", via_peer=key(0))
    assert any("routes[0].destination" in x for x in violations(msg))


def test_own_key_and_duplicates_rejected():
    msg = state(2)
    msg.peers[0].public_key = OWN
    msg.peers.add(public_key=key(1)).allowed_ips.append("100.64.9.0/24")
    v = violations(msg)
    assert any("own key" in x for x in v) and any("duplicates" in x for x in v)


def test_egress_expands_to_forwarding_sysctls_and_nat_table():
    msg = state(1)
    e = msg.egress.add(nat=True)
    e.ranges.extend(["198.51.100.0/24", "2001:db8::/32"])
    d = compiled(msg)
    assert d.sysctls == {"net.ipv4.ip_forward": "1"}  # no v6 source range, no v6 forwarding
    assert "masquerade" in d.nft.text and "198.51.100.0/24" in d.nft.text
    msg.egress[0].source_ranges.append("fd00::/64")
    assert compiled(msg).sysctls["net.ipv6.conf.all.forwarding"] == "1"


def test_peer_delta_fast_path_matches_full_compile():
    base = state(50)
    d0 = compiled(base)
    delta = pb.DesiredStateDelta(base_revision=1)
    up = delta.upserted_peers.add(public_key=key(3), persistent_keepalive_seconds=25)
    up.allowed_ips.extend(["100.64.0.5/32", "203.0.113.0/28"])
    delta.removed_peers.append(key(7))
    merged = merge_delta(base, delta)
    assert compile_peer_delta(d0, delta, 2).peers == compiled(merged).peers


def test_peer_delta_overlap_rejected():
    d0 = compiled(state(5))
    delta = pb.DesiredStateDelta(base_revision=1)
    delta.upserted_peers.add(public_key=key(40)).allowed_ips.append("100.64.0.3/32")
    with pytest.raises(InvalidDesiredState):
        compile_peer_delta(d0, delta, 2)


def test_delta_removing_a_routed_peer_rejected():
    msg = state(2)
    msg.peers[0].allowed_ips.append("198.51.100.0/24")
    msg.routes.add(destination="198.51.100.0/24", via_peer=key(0))
    delta = pb.DesiredStateDelta(base_revision=1, removed_peers=[key(0)])
    with pytest.raises(InvalidDesiredState):
        compile_peer_delta(compiled(msg), delta, 2)


def test_relayed_ranges_expand_to_relay_sets_and_forwarding():
    msg = state(2)
    msg.relayed_ranges.extend(["100.64.0.9/32", "100.64.0.3/32"])
    d = compiled(msg)
    assert d.relayed_ranges == ("100.64.0.3/32", "100.64.0.9/32")
    assert d.sysctls == {"net.ipv4.ip_forward": "1"}  # no v6 range: no v6 forwarding
    assert 'iifname "mg0" oifname "mg0" ip saddr @relay4 accept' in d.nft.text
    assert 'iifname "mg0" oifname "mg0" ip daddr @relay4 accept' in d.nft.text
    assert "relay6" not in d.nft.text
    msg.relayed_ranges.append("fd00:64::9/128")
    d6 = compiled(msg)
    assert d6.sysctls == {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
    assert "ip6 saddr @relay6 accept" in d6.nft.text and "ip6 daddr @relay6 accept" in d6.nft.text
    assert compiled(state(2)).sysctls == {} and "relay" not in compiled(state(2)).nft.text


def test_relayed_ranges_are_a_set_order_and_repetition_do_not_change_the_table():
    a, b = state(1), state(1)
    a.relayed_ranges.extend(["100.64.0.9/32", "fd00::/64", "100.64.0.3/32"])
    b.relayed_ranges.extend(["fd00:0::/64", "100.64.0.3/32", " 100.64.0.9/32", "100.64.0.3/32"])
    da, db = compiled(a), compiled(b)
    assert da.relayed_ranges == db.relayed_ranges == ("100.64.0.3/32", "100.64.0.9/32", "fd00::/64")
    assert da.nft == db.nft


def test_bad_relayed_ranges_rejected_precisely():
    msg = state(1)
    msg.relayed_ranges.extend(["100.64.0.5", "100.64.0.5/24", "laptop/32", "100.64.0.5/33",
                               "0.0.0.0/0", "::/0", "100.64.0.6/32"])
    v = violations(msg)
    assert v == [
        "relayed_ranges[0]: not a valid CIDR (missing /prefix length)",
        "relayed_ranges[1]: not a valid CIDR (100.64.0.5/24 has host bits set)",
        "relayed_ranges[2]: not a valid CIDR ('laptop' is not an IPv4 address)",
        "relayed_ranges[3]: not a valid CIDR (prefix length above 32)",
        "relayed_ranges[4]: 0.0.0.0/0 would relay all traffic between peers; "
        "list the external clients' addresses",
        "relayed_ranges[5]: ::/0 would relay all traffic between peers; "
        "list the external clients' addresses",
    ]


def test_relayed_ranges_delta_takes_the_full_compile():
    base = state(3)
    d0 = compiled(base)
    delta = pb.DesiredStateDelta(base_revision=1, relayed_ranges_changed=True,
                                 relayed_ranges=["100.64.0.7/32"])
    assert not peers_only(delta)
    d1 = compiled(merge_delta(base, delta))
    assert d1.relayed_ranges == ("100.64.0.7/32",) and d1.nft.digest != d0.nft.digest
    cleared = merge_delta(merge_delta(base, delta), pb.DesiredStateDelta(
        base_revision=1, relayed_ranges_changed=True))
    assert compiled(cleared).nft == d0.nft
    # a peers-only delta leaves the relayed ranges as they were
    peer_delta = pb.DesiredStateDelta(base_revision=1, removed_peers=[key(2)])
    assert peers_only(peer_delta)
    assert compile_peer_delta(d1, peer_delta, 2).relayed_ranges == ("100.64.0.7/32",)


def test_a_filter_rules_delta_takes_the_fast_path_and_renders_what_a_full_compile_would():
    base = state(3)
    base.egress.add(ranges=["198.51.100.0/24"], nat=True)
    base.relayed_ranges.append("100.64.0.9/32")
    base.filter_rules.add(sources=["100.64.0.2/32"], protocol="tcp", ports=["80"], accept=True, policy="p/web")
    base.filter_rules.add(accept=False)
    d0 = compiled(base)
    delta = pb.DesiredStateDelta(base_revision=1, filter_rules_changed=True)
    delta.filter_rules.add(sources=["100.64.0.2/32", "100.64.0.3/32"], protocol="tcp", ports=["80", "8000-8080"],
                           accept=True, policy="p/web")
    delta.filter_rules.add(accept=False)
    assert peers_only(delta)
    fast = compile_peer_delta(d0, delta, 2)
    full = compiled(merge_delta(base, delta))
    assert fast.nft == full.nft and fast.revision == 2
    assert nftables.patch_script(d0.nft, fast.nft) is not None  # loaded as a patch of one chain
    bad = pb.DesiredStateDelta(base_revision=1, filter_rules_changed=True)
    bad.filter_rules.add(protocol="sctp", ports=["99999"])
    with pytest.raises(InvalidDesiredState) as e:
        compile_peer_delta(d0, bad, 2)
    assert {v.field for v in e.value.violations} == {"filter_rules[0].protocol", "filter_rules[0].ports[0]"}


def test_late_reply_handoffs_expand_to_the_link_its_rule_and_the_receiving_rules():
    """EgressConfig.handoffs/handoff_peers (handoff.py): the link with every
    peer, the copies, the `oif` rule to the link's next-hop table, and in
    `inet meshgate` the guards: VXLAN only through the tunnel from a peer,
    nothing from the link delivered locally, copies forwarded only from this
    gateway's ranges to the overlay."""
    msg = state(1)
    e = msg.egress.add(nat=True, ranges=["198.51.100.0/24"], handoff_peers=["100.64.0.9", "100.64.0.8"])
    e.handoffs.add(ranges=["198.51.100.0/24"], address="100.64.0.9")
    d = compiled(msg)
    assert d.handoff is not None
    assert (d.handoff.device, d.handoff.local, d.handoff.peers) == ("mg0h", "100.64.0.1",
                                                                  frozenset({"100.64.0.8", "100.64.0.9"}))
    assert d.handoff.copies == ((("198.51.100.0/24",), ("100.64.0.0/24",), "100.64.0.9"),)
    assert any(r.oif == "mg0h" and r.table == S.handoff_table for r in d.rules)
    t = d.nft.text
    assert f'udp dport {nftables.HANDOFF_PORT} iifname != "mg0" drop' in t
    assert f'iifname "mg0" udp dport {nftables.HANDOFF_PORT} ip saddr != @handoff_peers4 drop' in t
    assert 'iifname "mg0h" fib daddr type local drop' in t
    assert 'iifname "mg0h" oifname "mg0" ip saddr @e0_hdst4 ip daddr @e0_hsrc4 accept' in t
    assert t.index('iifname "mg0h" oifname "mg0"') < t.index('iifname "mg0h" drop')
    assert "elements = { 100.64.0.8, 100.64.0.9 }" in t
    del msg.egress[0].handoff_peers[:]
    del msg.egress[0].handoffs[:]
    plain = compiled(msg)
    assert plain.handoff is None and "mg0h" not in plain.nft.text and not any(r.oif for r in plain.rules)


def test_bad_handoffs_are_rejected_precisely():
    msg = state(1)
    e = msg.egress.add(nat=True, ranges=["198.51.100.0/24"], handoff_peers=["fd00::1"])
    e.handoffs.add(ranges=["203.0.113.0/24"], address="100.64.0.9")
    e.handoffs.add(ranges=["198.51.100.0/24"], address="not-an-address")
    assert violations(msg) == [
        "egress[0].handoff_peers[0]: 'fd00::1' is not an IPv4 address",
        "egress[0].handoffs[0].ranges: 203.0.113.0/24: not IPv4 ranges of this gateway",
        "egress[0].handoffs[1].address: 'not-an-address' is not an IPv4 address",
    ]


def test_the_late_reply_link_name_never_is_the_interface_itself():
    assert nftables.handoff_device("mg0") == "mg0h"
    assert nftables.handoff_device("a" * 15) == "a" * 14 + "h"
    assert nftables.handoff_device("a" * 14 + "h") == "a" * 14 + "g"
