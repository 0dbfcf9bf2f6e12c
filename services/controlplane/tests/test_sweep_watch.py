"""Watch refuses start revisions it cannot serve with a precise status, and a
refused or failed Watch never breaks the etcd watch stream the replica's other
Watch calls share (issue 15, item 3)."""

import asyncio

import grpc
import pytest

from cptest import details, make_network, state_dump
from meshgate.api.v1 import events_pb2, events_pb2_grpc

INT64_MAX = 2**63 - 1


async def first_event(call):
    async for ev in call:
        return ev
    return None


async def started(call) -> int:
    """The revision a Watch call starts after (its initial metadata)."""
    md = dict(await call.initial_metadata())
    return int(md["meshgate-watch-start-revision"])


@pytest.mark.parametrize("revision", [INT64_MAX, INT64_MAX - 1, 10**12])
async def test_start_revision_beyond_the_store_is_out_of_range_and_other_watches_go_on(cp, revision):
    events = events_pb2_grpc.EventServiceStub(cp.channel)
    await make_network(cp, "prod", "100.64.0.0/24")
    before = await state_dump(cp.etcd)

    bad = events.Watch(events_pb2.WatchRequest(start_revision=revision))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(first_event(bad), 20)
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE, e.value.details()
    violations, reason = details(e.value)
    assert "start_revision" in violations, violations
    assert "beyond" in violations["start_revision"]
    assert reason == "INVALID_FIELD"
    assert await state_dump(cp.etcd) == before

    # The replica's shared etcd watch still serves new Watch calls, twice over.
    for i in range(2):
        good = events.Watch(events_pb2.WatchRequest(parent="networks/prod"))
        await asyncio.wait_for(started(good), 20)
        await cp.networks.UpdateNetwork(_rename(f"after {i}"))
        ev = await asyncio.wait_for(first_event(good), 20)
        assert ev is not None and ev.type == events_pb2.WatchEvent.UPDATED
        assert ev.network.display_name == f"after {i}"
        good.cancel()


async def test_watch_open_across_a_refused_one_keeps_receiving(cp):
    """A Watch opened before the bad one keeps getting events after it."""
    events = events_pb2_grpc.EventServiceStub(cp.channel)
    await make_network(cp, "prod", "100.64.0.0/24")
    good = events.Watch(events_pb2.WatchRequest(parent="networks/prod"))
    await asyncio.wait_for(started(good), 20)
    for _ in range(3):
        bad = events.Watch(events_pb2.WatchRequest(start_revision=INT64_MAX))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(first_event(bad), 20)
        assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    await cp.networks.UpdateNetwork(_rename("still here"))
    ev = await asyncio.wait_for(first_event(good), 20)
    assert ev is not None and ev.network.display_name == "still here"
    good.cancel()


async def test_the_current_revision_is_still_a_valid_start(cp):
    """The bound is the store's revision: resuming from the latest revision a
    caller saw (equal to the current one) is fine and gets what comes next."""
    events = events_pb2_grpc.EventServiceStub(cp.channel)
    net = await make_network(cp, "prod", "100.64.0.0/24")
    call = events.Watch(events_pb2.WatchRequest(start_revision=int(net.etag)))
    await asyncio.wait_for(started(call), 20)
    await cp.networks.UpdateNetwork(_rename("next"))
    ev = await asyncio.wait_for(first_event(call), 20)
    assert ev is not None and ev.revision > int(net.etag)
    call.cancel()


async def test_a_watch_that_fails_in_the_etcd_client_does_not_wedge_the_shared_stream(etcd):
    """Below the API: a watch whose creation request cannot even be built (an
    int64 overflow) fails by itself; the next watch on the stream is created."""
    bad_start = 2**63  # not an int64: the etcd request cannot be encoded
    with pytest.raises(Exception):  # noqa: B017 - aetcd raises its own or protobuf's error
        await asyncio.wait_for(
            etcd.client.watch(etcd.key("x"), start_revision=bad_start), 20)
    watch = await asyncio.wait_for(etcd.client.watch(etcd.key("x")), 20)
    await etcd.put(etcd.key("x"), b"1")

    async def one():
        async for e in watch:
            return e

    ev = await asyncio.wait_for(one(), 20)
    assert ev.kv.value == b"1"
    await watch.cancel()


def _rename(display_name: str):
    from google.protobuf import field_mask_pb2

    from meshgate.api.v1 import network_pb2

    return network_pb2.UpdateNetworkRequest(
        network=network_pb2.Network(name="networks/prod", display_name=display_name),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )
