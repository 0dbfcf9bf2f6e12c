"""The rendered ``inet meshgate`` table: its shape (pure) and that nft accepts it and
replaces it atomically without touching other tables (root, in a namespace)."""

from __future__ import annotations

import ipaddress

from meshgate.gatewayd.nftables import Egress, Filter, render

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


def test_filters_render_input_chain():
    t = render("mg0", [], [Filter((N("100.64.0.0/24"),), (), "tcp", ("22", "8000-8080"), True)])
    assert 'iifname "mg0" ip saddr { 100.64.0.0/24 } meta l4proto tcp th dport { 22, 8000-8080 } accept' in t.text
    assert t.text.rstrip().endswith('iifname "mg0" drop\n\t}\n}'.rstrip())


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
