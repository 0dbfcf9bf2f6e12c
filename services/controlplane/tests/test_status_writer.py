"""The agents' status records writer (sync.StatusWriter) against a real etcd:
batched transactions, what `latest` answers meanwhile, and a failed write."""

import json

import pytest

from meshgate.common.etcd import EtcdUnavailable
from meshgate.controlplane import sync


def records(etcd, n):
    return {etcd.key("status", "prod", f"n{i:04d}"): {"applied_revision": i} for i in range(n)}


async def test_a_flush_writes_every_record_and_latest_follows_it(etcd):
    w = sync.StatusWriter(etcd)
    recs = records(etcd, sync.MAX_TXN_OPS * 2 + 5)
    for k, v in recs.items():
        w.put(k, v)
    seen = []
    original = etcd.txn

    async def txn(*a, **kw):
        # While a transaction is under way, every record not yet written (in
        # it or in a later one) reads as what it will be.
        done = len(seen) * sync.MAX_TXN_OPS
        seen.append(all(w.latest(k) == (True, json.dumps(v, sort_keys=True).encode())
                        for k, v in list(recs.items())[done:]))
        return await original(*a, **kw)

    etcd.txn = txn
    await w.flush()
    assert seen == [True, True, True]
    dump = await etcd.dump()
    assert {k: json.loads(dump[k]) for k in recs} == recs
    assert all(w.latest(k) == (False, None) for k in recs)


async def test_a_failed_transaction_leaves_its_records_and_the_untried_ones_for_the_next_flush(etcd):
    w = sync.StatusWriter(etcd)
    recs = records(etcd, sync.MAX_TXN_OPS * 3)
    for k, v in recs.items():
        w.put(k, v)
    original, calls = etcd.txn, []

    async def txn(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise EtcdUnavailable("etcd went away")
        return await original(*a, **kw)

    etcd.txn = txn
    with pytest.raises(EtcdUnavailable):
        await w.flush()
    assert len(w.pending) == sync.MAX_TXN_OPS * 2  # the failed chunk and the one never tried
    await w.flush()
    dump = await etcd.dump()
    assert {k: json.loads(dump[k]) for k in recs} == recs
