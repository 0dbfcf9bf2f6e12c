"""A node's state (READY, CONVERGING, OFFLINE, PENDING) is the same whether it
is read for one node (GetNode, UpdateNode: the node's own status and session
keys) or for many (ListNodes: the network's), with a real etcd, a real control
plane and simulated agents on real Sync streams (issue 18: an Update at 10,000
nodes listed 20,000 keys to show one node's state)."""

from cptest import SimAgent, make_key, make_network, wait_until
from meshgate.api.v1 import node_pb2
from meshgate.controlplane import sync


async def test_one_node_and_many_read_the_same_state(cp):
    await make_network(cp)
    ek = await make_key(cp)
    agents = [await SimAgent(cp.agents, ek.secret, f"n{i:02d}", f"192.0.2.{i + 1}:51820",
                             ack=i >= 3).enroll() for i in range(sync.FEW_NODES + 4)]
    try:
        for a in agents[:12]:  # 0-2 never ack, 3-10 ack, 11 goes away; the rest never connect
            await a.connect()
        await wait_until(lambda: all(a.state is not None for a in agents[:12]), "snapshots")
        await agents[11].close()
        want = {**{a.node.name: node_pb2.Node.CONVERGING for a in agents[:3]},
                **{a.node.name: node_pb2.Node.READY for a in agents[3:11]},
                agents[11].node.name: node_pb2.Node.OFFLINE,
                **{a.node.name: node_pb2.Node.PENDING for a in agents[12:]}}

        async def listed() -> dict[str, int]:
            resp = await cp.nodes.ListNodes(node_pb2.ListNodesRequest(parent="networks/prod", page_size=100))
            assert len(resp.nodes) > sync.FEW_NODES  # the many-nodes read
            return {n.name: n.state for n in resp.nodes}

        got: dict[str, int] = {}

        async def settled() -> bool:
            got.clear()
            got.update(await listed())
            return got == want

        try:
            await wait_until(settled, "ListNodes shows every state", timeout=30)
        except AssertionError:
            raise AssertionError({k: node_pb2.Node.State.Name(v) for k, v in got.items() if want[k] != v}) from None
        for a in agents:
            one = await cp.nodes.GetNode(node_pb2.GetNodeRequest(name=a.node.name))
            assert one.state == want[a.node.name], a.node.name
    finally:
        for a in agents:
            await a.close()
