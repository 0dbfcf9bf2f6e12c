"""Access policies through the API: what selectors may name, and updates that keep a
policy consistent (a review found an update storing an unspecified action, which the
compiler's two halves read differently, and updates refused for a field not touched)."""

import grpc
import pytest

from cptest import make_network, make_node, state_dump
from meshgate.api.v1 import node_pb2, policy_pb2


async def _create(cp, pid, **kw):
    return await cp.policies.CreateAccessPolicy(policy_pb2.CreateAccessPolicyRequest(
        parent="networks/prod", access_policy_id=pid, access_policy=policy_pb2.AccessPolicy(**kw)))


async def test_an_update_to_an_unspecified_action_stores_accept(cp):
    await make_network(cp)
    await make_node(cp, node_id="a")
    p = await _create(cp, "p", sources=["node:a"], destinations=["*"], action=policy_pb2.DROP)
    got = await cp.policies.UpdateAccessPolicy(policy_pb2.UpdateAccessPolicyRequest(
        access_policy=policy_pb2.AccessPolicy(name=p.name, action=policy_pb2.POLICY_ACTION_UNSPECIFIED),
        update_mask={"paths": ["action"]}))
    assert got.action == policy_pb2.ACCEPT
    stored = await cp.policies.GetAccessPolicy(policy_pb2.GetAccessPolicyRequest(name=p.name))
    assert stored.action == policy_pb2.ACCEPT


async def test_a_policy_naming_a_deleted_node_can_still_be_updated_elsewhere_but_not_renamed_to_a_missing_one(cp):
    await make_network(cp)
    await make_node(cp, node_id="ci")
    await make_node(cp, node_id="web")
    p = await _create(cp, "no-ci", sources=["node:ci"], destinations=["node:web"], action=policy_pb2.DROP)
    await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name="networks/prod/nodes/ci"))
    # another field, and the destinations: the dangling source is not the caller's doing
    got = await cp.policies.UpdateAccessPolicy(policy_pb2.UpdateAccessPolicyRequest(
        access_policy=policy_pb2.AccessPolicy(name=p.name, destinations=["*"], description="kept"),
        update_mask={"paths": ["destinations", "description"]}))
    assert list(got.destinations) == ["*"] and list(got.sources) == ["node:ci"]
    before = await state_dump(cp.app.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cp.policies.UpdateAccessPolicy(policy_pb2.UpdateAccessPolicyRequest(
            access_policy=policy_pb2.AccessPolicy(name=p.name, sources=["node:ci", "node:nobody"]),
            update_mask={"paths": ["sources"]}))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "access_policy.sources[0]" in e.value.details() and "access_policy.sources[1]" in e.value.details()
    assert await state_dump(cp.app.etcd) == before
