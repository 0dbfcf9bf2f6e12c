"""The state cache says which nodes a change reaches without copying the
network per watch batch (issue 18: at 10,000 nodes that copy and a pass over
every node for the new node's peers were most of a join's cost).

With a real etcd and a real control plane, a run of changes through the API
(joins with tags, tag changes, a listen-port change, deletes) and two batched
transactions (several nodes in one etcd revision, as a relist or a bulk
writer produces): after each change, every node whose compiled desired state
differs from before must be in the change's `affected`, and the cache's tag
index must equal a scan of the nodes.
"""

from __future__ import annotations

from google.protobuf import field_mask_pb2

from cptest import key, make_network, make_node, wait_until
from meshgate.api.v1 import network_pb2, node_pb2, policy_pb2
from meshgate.controlplane import compiler
from meshgate.controlplane.cache import Change

NET = "networks/prod"


def bodies(st: compiler.NetworkState) -> dict[str, bytes]:
    index = compiler.PeerIndex(st)
    return {n: compiler.body(compiler.compile_node(st, n, index=index)) for n in st.nodes}


def scanned_tags(st: compiler.NetworkState) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for n in st.nodes.values():
        for t in n.tags:
            out.setdefault(t, set()).add(n.name)
    return out


class Watcher:
    """Checks every change the cache reports against compiled states."""

    def __init__(self, cp) -> None:
        self.cache = cp.app.cache
        self.before: dict[str, bytes] = {}
        self.checked = 0
        self.reached: list[set[str]] = []
        self.errors: list[str] = []  # the cache logs a listener's exception and goes on
        self.cache.listeners.insert(0, self.on_change)

    async def on_change(self, change: Change) -> None:
        st = self.cache.networks.get("prod")
        if st is None:
            return
        after = bodies(st)
        differ = {n for n in after if self.before.get(n) != after[n]}
        aff = change.affected.get("prod", set())
        if not differ <= aff:
            self.errors.append(f"revision {change.revision}: changed but not reached: {sorted(differ - aff)}")
        if st.by_tag is None or {t: s for t, s in st.by_tag.items() if s} != scanned_tags(st):
            self.errors.append(f"revision {change.revision}: tag index {st.by_tag} != {scanned_tags(st)}")
        self.before = after
        self.checked += 1
        self.reached.append(set(aff))


async def update(cp, node_id: str, paths: list[str], **fields):
    return await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
        node=node_pb2.Node(name=f"{NET}/nodes/{node_id}", **fields),
        update_mask=field_mask_pb2.FieldMask(paths=paths)))


async def put_nodes(cp, *nodes: node_pb2.Node) -> None:
    """Several nodes rewritten in one etcd transaction: one watch batch."""
    e = cp.etcd
    ops = []
    for n in nodes:
        k = e.key("nodes", "prod", n.name.rsplit("/", 1)[1])
        assert await e.get(k) is not None
        stored = node_pb2.Node()
        stored.CopyFrom(n)
        stored.ClearField("etag")
        ops.append(e.txn_ops.put(k, stored.SerializeToString()))
    await e.txn([], ops)


async def test_every_node_a_change_reaches_is_in_affected_and_the_tag_index_holds(cp):
    await make_network(cp, default_policy=network_pb2.DENY)
    for pid, src, dst in (("hub-spoke", "tag:spoke", "tag:hub"), ("hub-hub", "tag:hub", "tag:hub")):
        await cp.policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
            parent=NET, access_policy_id=pid,
            access_policy=policy_pb2.AccessPolicy(sources=[src], destinations=[dst])))
    await wait_until(lambda: "prod" in cp.app.cache.networks, "the cache has the network")
    w = Watcher(cp)
    w.before = bodies(cp.app.cache.networks["prod"])
    for i in range(2):
        await make_node(cp, node_id=f"hub{i}", public_key=key(), tags=["hub"], endpoint=f"192.0.2.{i + 1}:51820")
    for i in range(6):
        await make_node(cp, node_id=f"s{i}", public_key=key(), tags=["spoke"])
    await make_node(cp, node_id="loner", public_key=key(), tags=["none"])

    await update(cp, "s0", ["tags"], tags=["hub"])  # a spoke becomes a hub: everyone's peers move
    gen = cp.app.cache.generation
    await update(cp, "s1", ["listen_port"], listen_port=51999)  # no peer sees it
    # ... so what was worked out of the network (the fan-out's PeerIndex) still holds.
    assert cp.app.cache.generation == gen
    assert cp.app.cache.networks["prod"].nodes[f"{NET}/nodes/s1"].listen_port == 51999
    await update(cp, "loner", ["tags"], tags=["spoke"])  # joins the spokes
    assert cp.app.cache.generation > gen
    await update(cp, "hub1", ["tags"], tags=[])  # leaves
    await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name=f"{NET}/nodes/s2"))

    st = cp.app.cache.networks["prod"]
    s3, s4, hub0 = (node_pb2.Node() for _ in range(3))
    s3.CopyFrom(st.nodes[f"{NET}/nodes/s3"])
    s4.CopyFrom(st.nodes[f"{NET}/nodes/s4"])
    hub0.CopyFrom(st.nodes[f"{NET}/nodes/hub0"])
    s3.tags[:] = ["hub"]
    s4.tags[:] = ["none"]
    hub0.tags[:] = ["spoke"]
    await put_nodes(cp, s3, s4, hub0)  # three nodes, one batch, each step reaching others
    s3.tags[:] = ["spoke"]
    s4.tags[:] = ["spoke"]
    await put_nodes(cp, s4, s3)  # and back, in the other order

    await wait_until(lambda: st.nodes[f"{NET}/nodes/s3"].tags == ["spoke"], "the last batch applied")
    assert w.errors == []
    assert w.checked >= 14
    # The listen-port change reached only its own node.
    assert {f"{NET}/nodes/s1"} in w.reached


async def test_a_change_of_a_nodes_own_field_reaches_its_agent_on_the_kept_index(cp):
    """The listen port is in no peer's view: the cache keeps its generation (the
    fan-out's PeerIndex stays), and the node's agent still gets its new port
    while its peer gets nothing."""
    from cptest import SimAgent, make_key

    await make_network(cp)
    ek = await make_key(cp)
    a = await (await SimAgent(cp.agents, ek.secret, "a", "192.0.2.1:51820").enroll()).connect()
    b = await (await SimAgent(cp.agents, ek.secret, "b", "192.0.2.2:51820").enroll()).connect()
    try:
        await wait_until(lambda: a.state is not None and len(a.state.peers) == 1 and b.state is not None
                         and len(b.state.peers) == 1, "a and b peer")
        gen, b_seen = cp.app.cache.generation, len(b.received)
        await update(cp, "a", ["listen_port"], listen_port=51999)
        await wait_until(lambda: a.state.interface.listen_port == 51999, "a's agent gets its new port")
        assert cp.app.cache.generation == gen
        await update(cp, "a", ["endpoint"], endpoint="192.0.2.9:51820")  # a field its peer sees
        await wait_until(lambda: b.state.peers[0].endpoint == "192.0.2.9:51820", "b sees a's new endpoint")
        assert len(b.received) == b_seen + 1  # the endpoint, not the port
    finally:
        await a.close()
        await b.close()
