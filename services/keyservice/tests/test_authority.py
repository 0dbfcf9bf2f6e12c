"""The key authority and RegisterNodeKey, against real etcd over real gRPC."""

from __future__ import annotations

import asyncio
import base64
import os

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from meshgate.api.v1 import keys_pb2
from meshgate.common import signing
from meshgate.keyservice.core import KeyServiceCore


def violations(err) -> dict[str, str]:
    status = rpc_status.from_call(err)
    br = error_details_pb2.BadRequest()
    for d in status.details:
        if d.Unpack(br):
            return {v.field: v.description for v in br.field_violations}
    return {}


def wg_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def test_register_refuses_a_node_of_a_network_that_does_not_exist(ks):
    before = await ks.etcd.dump()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await ks.stub.RegisterNodeKey(keys_pb2.RegisterNodeKeyRequest(node="networks/ghost/nodes/a", public_key=wg_key()))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "ghost" in e.value.details()
    assert await ks.etcd.dump() == before


async def test_register_signs_a_binding_agents_verify(ks):
    ka = await ks.stub.GetKeyAuthority(keys_pb2.GetKeyAuthorityRequest())
    assert len(ka.public_keys) == 1 and ka.key_ids[0] == signing.key_id(ka.public_keys[0])
    key = wg_key()
    node = "networks/prod/nodes/a"
    signed = await ks.stub.RegisterNodeKey(keys_pb2.RegisterNodeKeyRequest(node=node, public_key=key))
    assert signed.node == node and signed.public_key == key and signed.key_id == ka.key_ids[0]
    assert signed.sign_time.seconds > 0
    assert signing.verify(ka.public_keys[0], node, key, signed.signature)
    assert not signing.verify(ka.public_keys[0], "networks/prod/nodes/b", key, signed.signature)
    assert not signing.verify(ka.public_keys[0], "networks/other/nodes/a", key, signed.signature)
    # Recorded (public) where the control plane can read it; registering again is stable.
    kv = await ks.etcd.get(ks.etcd.key("keys", "nodes", "prod", "a"))
    assert keys_pb2.SignedNodeKey.FromString(kv.value) == signed
    again = await ks.stub.RegisterNodeKey(keys_pb2.RegisterNodeKeyRequest(node=node, public_key=key))
    assert again == signed
    # A new key for the node replaces the record.
    key2 = wg_key()
    s2 = await ks.stub.RegisterNodeKey(keys_pb2.RegisterNodeKeyRequest(node=node, public_key=key2))
    assert signing.verify(ka.public_keys[0], node, key2, s2.signature)
    kv = await ks.etcd.get(ks.etcd.key("keys", "nodes", "prod", "a"))
    assert keys_pb2.SignedNodeKey.FromString(kv.value).public_key == key2


@pytest.mark.parametrize(
    "node,key,fields",
    [
        ("", "", {"node", "public_key"}),
        ("networks/prod/nodes/A", None, {"node"}),
        ("networks/prod/externalClients/a", None, {"node"}),
        ("nodes/a", None, {"node"}),
        ("networks/prod/nodes/a/x", None, {"node"}),
        ("networks/prod/nodes/a", "not base64!", {"public_key"}),
        ("networks/prod/nodes/a", base64.b64encode(b"x" * 31).decode(), {"public_key"}),
        ("networks/prod/nodes/a", base64.b64encode(bytes(32)).decode(), {"public_key"}),
    ],
)
async def test_register_refuses_bad_input_and_changes_nothing(ks, node, key, fields):
    before = await ks.etcd.dump()
    req = keys_pb2.RegisterNodeKeyRequest(node=node, public_key=wg_key() if key is None else key)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await ks.stub.RegisterNodeKey(req)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(ei.value)) == fields
    assert await ks.etcd.dump() == before


async def test_authority_created_once_across_racing_replicas(etcd, keks, put_network):
    keks.new("k1")
    cores = [KeyServiceCore(etcd, keks.ring("k1"), scheduler=False) for _ in range(4)]
    await asyncio.gather(*(c.start() for c in cores))
    try:
        ids = await asyncio.gather(*(c.authority.ensure() for c in cores))
        assert len(set(ids)) == 1
        kvs, _ = await etcd.list_prefix(etcd.key("keys", "authority", "keys") + b"/")
        assert len(kvs) == 1
        pubs = [await c.authority.public_keys() for c in cores]
        assert all(p == pubs[0] for p in pubs) and len(pubs[0]) == 1
        # A signature made by one replica verifies with what any replica publishes.
        key = wg_key()
        await put_network("n")
        s = await cores[3].authority.register("networks/n/nodes/x", key)
        assert signing.verify(pubs[0][0].public_key, "networks/n/nodes/x", key, s.signature)
    finally:
        for c in cores:
            await c.stop()


async def test_rotate_node_key_records_the_request(ks):
    r = await ks.stub.RotateNodeKey(keys_pb2.RotateNodeKeyRequest(node="networks/prod/nodes/a"))
    kv = await ks.etcd.get(ks.etcd.key("keys", "nodeRotation", "prod", "a"))
    assert keys_pb2.RotateNodeKeyResponse.FromString(kv.value) == r and r.request_time.seconds > 0
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await ks.stub.RotateNodeKey(keys_pb2.RotateNodeKeyRequest(node="networks/prod"))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and set(violations(ei.value)) == {"node"}
