"""The examples, run against real control planes."""

from __future__ import annotations

import asyncio
import logging

import yaml

from meshgate.sdk import AsyncClient, Client
from meshgate.sdk.examples import converge, watch_joins


def _manifest(fresh, ranges=("198.51.100.0/24",)):
    return yaml.safe_load(f"""
networks:
  - id: {fresh.net}
    ipv4_cidr: {fresh.cidr}
    display_name: Demo
    labels: {{team: net}}
    nodes:
      - {{id: gw1, endpoint: "192.0.2.10:51820"}}
    egress_gateways:
      - id: db
        node: gw1
        ranges: {list(ranges)}
        nat: true
""")


async def test_manifest_applied_twice_changes_nothing_the_second_time(own_controlplane, etcd, etcd_prefix, fresh):
    cp = own_controlplane(prefix=etcd_prefix)
    manifest = _manifest(fresh)

    def apply(m, **kw):
        with Client(cp.target) as c:
            return [str(a) for a in converge.converge(c, m, **kw)]

    first = await asyncio.to_thread(apply, manifest)
    assert first == [f"create networks/{fresh.net}", f"create networks/{fresh.net}/nodes/gw1",
                     f"create networks/{fresh.net}/egressGateways/db"]
    before, rev = await etcd.dump(), await etcd.revision()
    second = await asyncio.to_thread(apply, manifest)
    assert all(a.startswith("unchanged ") for a in second)
    assert await etcd.dump() == before and await etcd.revision() == rev

    # A change in the manifest updates exactly that field; --prune removes the unlisted.
    changed = _manifest(fresh, ranges=("198.51.100.0/25",))
    changed["networks"][0]["egress_gateways"] = [changed["networks"][0]["egress_gateways"][0]]
    with Client(cp.target) as c:
        await asyncio.to_thread(c.create_egress_gateway, parent=f"networks/{fresh.net}", egress_gateway_id="extra",
                                egress_gateway={"node": f"networks/{fresh.net}/nodes/gw1", "ranges": ["203.0.113.0/24"]})
    third = await asyncio.to_thread(apply, changed, prune=True)
    assert f"update networks/{fresh.net}/egressGateways/db (ranges)" in third
    assert f"delete networks/{fresh.net}/egressGateways/extra" in third
    assert all(a.startswith("unchanged") for a in await asyncio.to_thread(apply, changed, prune=True))


async def test_watcher_logs_joins(controlplane, fresh, caplog):
    caplog.set_level(logging.INFO, logger="meshgate.examples.watch_joins")
    async with AsyncClient(controlplane.target) as c:
        started = asyncio.Event()
        task = asyncio.create_task(watch_joins.watch_joins(
            c, f"networks/{fresh.net}", limit=2, on_start=lambda rev: started.set()))
        await asyncio.wait_for(started.wait(), 30)
        net = await c.create_network(network_id=fresh.net, network={"ipv4_cidr": fresh.cidr})
        a = await c.create_node(parent=net.name, node_id="a", node={"endpoint": "192.0.2.1:51820"})
        await c.update_node(node={"name": a.name, "display_name": "A"}, update_mask=["display_name"])
        b = await c.create_node(parent=net.name, node_id="b")
        joined = await asyncio.wait_for(task, 30)
    assert [n.name for n in joined] == [a.name, b.name]
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0].startswith(f"node {a.name} joined with {a.ipv4_address} (endpoint 192.0.2.1:51820)")
    assert len(msgs) == 2
