"""Pure IPAM selection: never reserved, never used, deterministic first pick."""

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.controlplane import ipam


def test_first_pick_is_lowest_free():
    assert ipam.pick("100.64.0.0/24", set()) == "100.64.0.1"
    assert ipam.pick("100.64.0.0/24", {"100.64.0.1", "100.64.0.3"}) == "100.64.0.2"


def test_full_range_gives_none():
    used = {str(a) for a in ipam.usable(ipaddress.ip_network("100.64.0.0/29"))}
    assert len(used) == 6
    assert ipam.pick("100.64.0.0/29", used) is None
    assert ipam.pick("100.64.0.0/29", used, attempt=3) is None


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.integers(min_value=22, max_value=30),
    v6=st.booleans(),
    used_frac=st.floats(min_value=0, max_value=1),
    attempt=st.integers(min_value=0, max_value=5),
    seed=st.integers(),
)
def test_pick_is_free_inside_and_not_reserved(prefix, v6, used_frac, attempt, seed):
    cidr = f"fd00::/{prefix + 96}" if v6 else f"100.64.0.0/{prefix}"
    net = ipaddress.ip_network(cidr)
    rng = random.Random(seed)
    all_usable = [str(a) for a in ipam.usable(net)]
    used = {a for a in all_usable if rng.random() < used_frac}
    got = ipam.pick(cidr, used, attempt, rng)
    if len(used) == len(all_usable):
        assert got is None
        return
    assert got is not None
    addr = ipaddress.ip_address(got)
    assert addr in net and got not in used
    assert addr not in (net.network_address, net.broadcast_address)


@given(st.sets(st.integers(1, 62), max_size=62), st.sets(st.integers(1, 62), max_size=8), st.integers(0, 3))
def test_pick_int_with_claims_in_flight_is_pick_over_both(taken, claims, attempt):
    """`also_taken` (claims in flight, kept apart from the cache's set so it
    is not copied per join) picks what a pick over the union would: the lowest
    free address, or one of the lowest SPREAD free ones on later attempts."""
    base = int(ipaddress.ip_address("100.64.0.0"))
    t, c = {base + i for i in taken}, {base + i for i in claims}
    union = sorted(set(range(base + 1, base + 63)) - t - c)
    got = ipam.pick_int("100.64.0.0/26", t, attempt, random.Random(7), also_taken=c)
    if not union:
        assert got is None
    elif attempt == 0:
        assert got == str(ipaddress.ip_address(union[0]))
    else:
        assert int(ipaddress.ip_address(got)) in union[:ipam.SPREAD]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "discard", "pick", "pick-spread"]), st.integers(0, 64)), max_size=120))
def test_a_used_set_that_remembers_its_floor_picks_what_a_full_scan_picks(ops):
    """The cache's `UsedInts` starts its scan at the first address that may be
    free; over any sequence of claims, releases and picks (the pick's address
    then claimed, as a create does) it picks exactly what a scan from the
    range's start over a plain set picks, also when the range fills up."""
    base = int(ipaddress.ip_address("100.64.0.0"))
    fast, plain = ipam.UsedInts(), set()
    for op, i in ops:
        if op == "add":
            fast.add(base + i)
            plain.add(base + i)
        elif op == "discard":
            fast.discard(base + i)
            plain.discard(base + i)
        else:
            attempt = 0 if op == "pick" else 2
            got = ipam.pick_int("100.64.0.0/26", fast, attempt, random.Random(i))
            want = ipam.pick_int("100.64.0.0/26", plain, attempt, random.Random(i))
            assert got == want
            if got is not None:
                fast.add(int(ipaddress.ip_address(got)))
                plain.add(int(ipaddress.ip_address(got)))
        assert set(fast) == plain
