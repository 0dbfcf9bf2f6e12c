"""EventService.Watch against real etcd, through the in-process control plane."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from meshgate.api.v1 import egress_pb2, events_pb2, events_pb2_grpc, network_pb2, node_pb2

E = events_pb2.WatchEvent


async def _net(cp, net_id, cidr):
    return await cp.networks.CreateNetwork(
        network_pb2.CreateNetworkRequest(network_id=net_id, network=network_pb2.Network(ipv4_cidr=cidr))
    )


async def _node(cp, net_id, node_id):
    return await cp.nodes.CreateNode(
        node_pb2.CreateNodeRequest(parent=f"networks/{net_id}", node_id=node_id, node=node_pb2.Node())
    )


async def _collect(stub, req, n):
    call = stub.Watch(req)
    out = []
    async for ev in call:
        out.append(ev)
        if len(out) == n:
            break
    call.cancel()
    return out


async def test_resume_delivers_exactly_the_missed_events_in_order(cp):
    stub = events_pb2_grpc.EventServiceStub(cp.channel)
    net = await _net(cp, "w1", "100.64.0.0/24")
    start = int(net.etag)
    a = await _node(cp, "w1", "a")
    gw = await cp.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
        parent="networks/w1", egress_gateway_id="gw",
        egress_gateway=egress_pb2.EgressGateway(node=a.name, ranges=["198.51.100.0/24"])))
    upd = await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
        node=node_pb2.Node(name=a.name, display_name="A"), update_mask={"paths": ["display_name"]}))
    await cp.egress.DeleteEgressGateway(egress_pb2.DeleteEgressGatewayRequest(name=gw.name))

    events = await asyncio.wait_for(_collect(stub, events_pb2.WatchRequest(start_revision=start), 4), 10)
    assert [(e.type, e.resource_name) for e in events] == [
        (E.CREATED, a.name),
        (E.CREATED, gw.name),
        (E.UPDATED, a.name),
        (E.DELETED, gw.name),
    ]
    revs = [e.revision for e in events]
    assert revs == sorted(revs) and revs[0] > start
    assert events[0].node.ipv4_address == a.ipv4_address and events[0].node.etag == a.etag
    assert events[2].node.display_name == "A" and events[2].node.etag == upd.etag
    # A delete carries the resource as it was before.
    assert events[3].egress_gateway.ranges == ["198.51.100.0/24"]

    # Resuming from the middle delivers only what came after.
    later = await asyncio.wait_for(_collect(stub, events_pb2.WatchRequest(start_revision=revs[1]), 2), 10)
    assert [e.revision for e in later] == revs[2:]


async def test_filters_by_network_and_type_and_streams_live(cp):
    stub = events_pb2_grpc.EventServiceStub(cp.channel)
    await _net(cp, "one", "100.64.0.0/24")
    await _net(cp, "two", "100.64.1.0/24")
    call = stub.Watch(events_pb2.WatchRequest(parent="networks/two", resource_types=["meshgate.io/Node"]))
    # Wait until the stream is established before changing anything.
    await asyncio.wait_for(call.initial_metadata(), 10)
    await _node(cp, "one", "x")
    await _net(cp, "three", "100.64.2.0/24")
    n = await _node(cp, "two", "y")
    ev = await asyncio.wait_for(call.read(), 10)
    assert (ev.type, ev.resource_name, ev.WhichOneof("resource")) == (E.CREATED, n.name, "node")
    call.cancel()


async def test_bad_watch_request_is_invalid_argument(cp):
    stub = events_pb2_grpc.EventServiceStub(cp.channel)
    call = stub.Watch(events_pb2.WatchRequest(parent="nets/x", start_revision=-1, resource_types=["meshgate.io/Bogus"]))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for f in ("parent", "start_revision", "resource_types[0]"):
        assert f in exc.value.details()
