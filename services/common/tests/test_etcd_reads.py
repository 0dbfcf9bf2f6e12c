"""Batched reads by key (`Etcd.get_many`) against a real etcd."""

from meshgate.common import etcd as etcd_mod


async def test_get_many_finds_exactly_the_keys_that_exist_across_transactions(etcd):
    n = etcd_mod.GET_MANY_TXN * 2 + 7  # three transactions, the last one short
    present = [etcd.key("many", f"k{i:04d}") for i in range(0, n, 2)]
    for k in present:
        await etcd.put(k, k[-5:])
    # A neighbour under the same prefix that was not asked for stays out.
    await etcd.put(etcd.key("many", "other"), b"x")
    wanted = [etcd.key("many", f"k{i:04d}") for i in range(n)]
    got = await etcd.get_many(wanted)
    assert sorted(got) == sorted(present)
    assert all(kv.value == k[-5:] and kv.mod_revision > 0 for k, kv in got.items())
    assert await etcd.get_many([]) == {}
    assert await etcd.get_many([etcd.key("many", "missing")]) == {}
