"""The rendered ``inet meshgate`` table: its shape (pure) and that nft accepts it and
replaces it atomically without touching other tables (root, in a namespace)."""

from __future__ import annotations

import ipaddress

from meshgate.gatewayd.nftrules import Egress, Filter, patch_script, render

N = ipaddress.ip_network


def egress(**kw) -> Egress:
    args = dict(ranges=(N("198.51.100.0/24"), N("2001:db8::/32")), sources=(N("100.64.0.0/24"),),
                nat=True, egress_interface=None, internet_gateway=False)
    args.update(kw)
    return Egress(**args)


def test_ranges_are_set_elements_not_rules():
    many = tuple(N(f"198.51.{i // 256}.{i % 256}/32") for i in range(1000))
    t = render("mg0", [egress(ranges=many)], [])
    assert t.text.count("masquerade") == 1 and t.text.count("daddr @e0_dst4") == 2
    assert t.text.count("\n") < 60  # one rule per direction, whatever the number of ranges
    assert "198.51.3.231/32" in t.text


def test_nat_off_has_no_masquerade_and_digest_changes():
    on, off = render("mg0", [egress()], []), render("mg0", [egress(nat=False)], [])
    assert "masquerade" not in off.text and "masquerade" in on.text
    assert on.digest != off.digest
    assert render("mg0", [egress()], []).digest == on.digest


def test_internet_gateway_matches_everything_but_the_tunnel():
    t = render("mg0", [egress(internet_gateway=True, ranges=(), egress_interface="eth0")], [])
    assert 'oifname != "mg0" oifname "eth0" masquerade' in t.text
    assert "e0_dst4" not in t.text


POLICIES = [
    Filter((N("100.64.0.0/24"),), (), "tcp", ("22", "8000-8080"), True, "ssh"),
    Filter((N("100.64.0.7/32"), N("100.64.0.9/32")), (N("fd00::/64"), N("10.1.0.0/24")), "udp", (), False, "p2"),
    Filter((), (), "", (), False),
]


def _chain(text: str, name: str) -> list[str]:
    lines = [x.strip() for x in text.splitlines()]
    body = lines[lines.index(f"chain {name} {{") + 1:]
    return body[:body.index("}")]


def test_filters_render_a_chain_per_policy_entered_for_what_the_node_delivers():
    t = render("mg0", [egress()], POLICIES)
    assert _chain(t.text, "overlay_policy") == ["jump pol_0", "jump pol_1", "jump pol_2", "accept"]
    assert _chain(t.text, "pol_0") == [
        'ip saddr 100.64.0.0/24 meta l4proto tcp th dport { 22, 8000-8080 } accept comment "ssh"']
    # sources only of IPv4, destinations of both: only the IPv4 rule can match
    assert _chain(t.text, "pol_1") == ['ip saddr @pol_1_0_s4 ip daddr 10.1.0.0/24 meta l4proto udp drop comment "p2"']
    assert _chain(t.text, "pol_2") == ["drop"]
    fwd = _chain(t.text, "forward")
    # replies first; what the egress rule admits goes to the policies instead of being accepted
    assert fwd[1] == 'iifname "mg0" ct state established,related accept'
    assert 'iifname "mg0" ip saddr @e0_src4 ip daddr @e0_dst4 jump overlay_policy' in fwd
    assert _chain(t.text, "input")[1:] == ['iifname "mg0" ct state established,related accept',
                                           'iifname "mg0" jump overlay_policy']
    # without filters, nothing of this
    plain = render("mg0", [egress()], [])
    assert "overlay_policy" not in plain.text and "chain input" not in plain.text


def test_a_change_inside_policies_is_a_patch_of_their_chains_only():
    base = render("mg0", [egress()], POLICIES)
    changed = render("mg0", [egress()], [POLICIES[0], Filter((N("100.64.0.8/32"), N("100.64.0.9/32")), (), "udp",
                                                               ("53",), False, "p2"), POLICIES[2]])
    script = patch_script(base, changed)
    assert script is not None
    assert "pol_0" not in script and "flush chain inet meshgate pol_1" in script
    assert "delete set inet meshgate pol_1_0_s4" in script and "add set inet meshgate pol_1_0_s4" in script
    assert script.rstrip().endswith(f'comment "meshgate:{changed.digest}"')
    # a new policy, or a change outside the policies: the whole table
    assert patch_script(base, render("mg0", [egress()], POLICIES + [Filter((), (), "icmp", (), True, "x")])) is None
    assert patch_script(base, render("mg0", [egress(nat=False)], POLICIES)) is None


def test_nft_patches_policy_chains_in_place_and_the_result_verifies(lab, tmp_path):
    h = lab.host("nftp")
    base = render("mg0", [egress()], POLICIES)
    changed = render("mg0", [egress()], [POLICIES[0], Filter((N("100.64.0.8/32"), N("100.64.0.9/32")), (), "udp",
                                                               ("53",), False, "p2"), POLICIES[2]])
    script = (
        "import sys, pathlib, pickle\n"
        "from meshgate.gatewayd.nftables import NftTables\n"
        "base, changed = pickle.load(open(sys.argv[2], 'rb'))\n"
        "n = NftTables(pathlib.Path(sys.argv[1]))\n"
        "n.load(base)\n"
        "n.settle()\n"
        "print(n.observe() == base.digest)\n"
        "n.load(changed, base)\n"
        "n.settle()\n"
        "print(n.observe() == changed.digest)\n"
    )
    import pickle
    import sys

    tables = tmp_path / "tables.pkl"
    tables.write_bytes(pickle.dumps((base, changed)))
    out = h.run(sys.executable, "-c", script, str(tmp_path / "nft.json"), str(tables)).stdout.split()
    assert out == ["True", "True"]  # each verified against its own digest
    patched = {c: h.run("nft", "list", "chain", "inet", "meshgate", c).stdout for c in ("pol_0", "pol_1", "pol_2")}
    assert "udp dport 53 drop" in patched["pol_1"] and "100.64.0.8" in h.run(
        "nft", "list", "set", "inet", "meshgate", "pol_1_0_s4").stdout
    # the same chains as a fresh load of the changed table
    h.run("nft", "delete", "table", "inet", "meshgate")
    h.run("nft", "-f", "-", input=changed.text)
    fresh = {c: h.run("nft", "list", "chain", "inet", "meshgate", c).stdout for c in ("pol_0", "pol_1", "pol_2")}
    assert patched == fresh


def test_relayed_ranges_accept_tunnel_to_tunnel_before_the_drops():
    t = render("mg0", [egress()], [], [N("100.64.0.5/32"), N("100.64.0.8/30"), N("fd00:64::5/128")])
    lines = [x.strip() for x in t.text.splitlines()]
    relay = [
        'iifname "mg0" oifname "mg0" ip daddr @relay4 accept',
        'iifname "mg0" oifname "mg0" ip saddr @relay4 accept',
        'iifname "mg0" oifname "mg0" ip6 daddr @relay6 accept',
        'iifname "mg0" oifname "mg0" ip6 saddr @relay6 accept',
    ]
    idx = [lines.index(r) for r in relay]
    assert idx == sorted(idx)
    assert max(idx) < lines.index('iifname "mg0" drop') < lines.index('oifname "mg0" drop')
    assert "elements = { 100.64.0.5/32, 100.64.0.8/30 }" in lines
    assert "elements = { fd00:64::5/128 }" in lines
    # relay rules never NAT: the postrouting chain is the egress entry's alone
    assert t.text.count("masquerade") == 1 and "relay" not in t.text.split("chain postrouting")[1]
    # no relayed ranges: exactly the table of before
    assert render("mg0", [egress()], [], []) == render("mg0", [egress()], [])
    assert "relay" not in render("mg0", [egress()], []).text


def test_nft_accepts_the_relay_sets(lab):
    h = lab.host("nftr")
    t = render("mg0", [egress()], [Filter((), (), "icmp", (), True)],
               [N("100.64.0.5/32"), N("100.64.0.4/30"), N("fd00:64::5/128")])
    h.run("nft", "-f", "-", input=t.text)
    listing = h.run("nft", "list", "table", "inet", "meshgate").stdout
    assert 'iifname "mg0" oifname "mg0" ip saddr @relay4 accept' in listing
    assert 'iifname "mg0" oifname "mg0" ip6 daddr @relay6 jump overlay_policy' in listing
    assert "100.64.0.4/30" in listing  # the /32 inside it is merged away (auto-merge)


def test_nft_loads_replaces_atomically_and_leaves_others(lab, tmp_path):
    h = lab.host("nft")
    h.run("nft", "add", "table", "ip", "foreign")
    t1 = render("mg0", [egress()], [Filter((), (), "icmp", (), True)])
    t2 = render("mg0", [egress(nat=False)], [])
    # run the adapter (NftTables) inside the namespace through a tiny script
    script = (
        "import sys, pathlib\n"
        "from meshgate.gatewayd.nftables import NftTables, Table\n"
        "n = NftTables(pathlib.Path(sys.argv[1]))\n"
        "before = n.observe()\n"
        "n.load(Table(sys.stdin.read(), sys.argv[2]))\n"
        "print(before, n.observe())\n"
    )
    import sys

    cache = tmp_path / "nft.json"
    r = h.run(sys.executable, "-c", script, str(cache), t1.digest, input=t1.text)
    assert r.stdout.split() == ["None", t1.digest]
    r = h.run(sys.executable, "-c", script, str(cache), t2.digest, input=t2.text)
    assert r.stdout.split() == [t1.digest, t2.digest]  # t1 verified from the cache, then replaced
    listing = h.run("nft", "list", "ruleset").stdout
    assert "masquerade" not in listing and "table ip foreign" in listing
    assert listing.count("table inet meshgate") == 1


def test_libnftables_in_process_and_the_nft_command_see_the_same_table(lab):
    """gatewayd talks to nftables in-process (libnft) when the library is there; what
    it loads and lists is what the nft command loads and lists."""
    import sys

    h = lab.host("nftl")
    t = render("mg0", [egress()], POLICIES)
    script = (
        "import sys\n"
        "from meshgate.gatewayd import libnft\n"
        "from meshgate.gatewayd.nftables import NftTables\n"
        "assert libnft.shared() is not None, 'libnftables is missing'\n"
        "n = NftTables()\n"
        "n._run(['-f', '-'], sys.stdin.read())\n"
        "print(n.listing(), end='')\n"
        "r = n._run(['list', 'table', 'inet', 'nothing'])\n"
        "assert r.returncode != 0 and 'No such file or directory' in r.stderr, r\n"
    )
    inproc = h.run(sys.executable, "-c", script, input=t.text).stdout
    assert inproc == h.run("nft", "list", "table", "inet", "meshgate").stdout
    assert "jump overlay_policy" in inproc
