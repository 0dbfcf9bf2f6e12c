"""Who may call what, generated from the API's descriptors over every RPC.

Every RPC the control plane serves is called with no credentials, with a
viewer's token, with a network-admin token of network `a` about network `b`,
and with an agent's credential; each refusal must be the precise status, leave
etcd as it was (but for one audit record) and never run the handler. The rule
table itself is checked against the served services, so an RPC added without
a rule fails here (and the server refuses to start).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass

from cptest import (
    SimAgent,
    audit_records,
    authed_channel,
    details,
    make_key,
    make_network,
    make_node,
    mint_token,
    state_dump,
    wait_until,
)
from meshgate.api.v1 import auth_pb2, auth_pb2_grpc, events_pb2, events_pb2_grpc, network_pb2, node_pb2, node_pb2_grpc
from meshgate.controlplane.auth import rules
from meshgate.controlplane.auth.guard import Authenticator, Guard
from meshgate.controlplane.auth.principal import ROLES, role_permissions


def served_methods(app):
    """(service descriptor, method descriptor) of every RPC the app serves."""
    pool = descriptor_pool.Default()
    for b in app.bindings:
        sd = pool.FindServiceByName(b.full_name)
        for md in sd.methods:
            yield sd, md


def request_about(rule: rules.Rule, md, network: str):
    """A well-formed request of `md` naming something in `network`."""
    req = GetMessageClass(md.input_type)()
    collection = rule.permission.split(".")[0]
    if rule.scope_field:
        if rule.scope_field == ("parent",) or rule.scope_field == ("resource",) or collection == "networks" or collection == "events":
            value = f"networks/{network}"
        else:
            value = f"networks/{network}/{collection}/x"
        msg = req
        for part in rule.scope_field[:-1]:
            msg = getattr(msg, part)
        setattr(msg, rule.scope_field[-1], value)
    elif collection == "networks" and md.name.startswith("Create"):
        req.network_id = network
    if rule.id_field:
        setattr(req, rule.id_field, "x" if collection != "networks" else network)
    if "name" in md.input_type.fields_by_name and not req.name and collection == "tokens":
        req.name = "tokens/x"
    return req


async def call(channel, sd, md, request, metadata=None):
    """Invoke any RPC by its descriptors; returns the status code."""
    path = f"/{sd.full_name}/{md.name}"
    resp_cls = GetMessageClass(md.output_type)
    kw = dict(request_serializer=type(request).SerializeToString, response_deserializer=resp_cls.FromString)
    try:
        if md.client_streaming:
            stub = channel.stream_stream(path, **kw)
            c = stub(iter([request]), metadata=metadata, timeout=5)
            async for _ in c:
                break
        elif md.server_streaming:
            c = channel.unary_stream(path, **kw)(request, metadata=metadata, timeout=5)
            # A stream that is allowed stays open: one read with a short wait.
            try:
                await asyncio.wait_for(c.read(), 0.5)
            except TimeoutError:
                c.cancel()
                return grpc.StatusCode.OK, None
        else:
            await channel.unary_unary(path, **kw)(request, metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as e:
        return e.code(), e
    return grpc.StatusCode.OK, None


@pytest.fixture
async def world(cp):
    await make_network(cp, "a", "100.64.0.0/24")
    await make_network(cp, "b", "100.64.1.0/24")
    await make_node(cp, "a", "x")
    await make_node(cp, "b", "x")
    return cp


def test_every_served_rpc_has_exactly_one_rule_and_the_table_covers_them(world):
    table = rules.control_plane_rules()
    served = {f"/{sd.full_name}/{md.name}" for sd, md in served_methods(world.app)}
    assert served == set(table), "an RPC is served without a rule, or a rule names no served RPC"
    for path, rule in table.items():
        assert rule.agent or rule.permission or path.endswith("/GetCallerIdentity"), path
        assert not (rule.agent and rule.permission), path
        if rule.mutation and not rule.agent:
            assert rule.permission, path
    # Every permission some role grants exists, and the roles differ.
    perms = rules.all_permissions() | {"secrets.read"}
    for role in ROLES:
        assert role_permissions(role) <= perms and role_permissions(role), role


def test_a_service_with_an_rpc_without_a_rule_is_refused():
    fd = descriptor_pb2.FileDescriptorProto(name="t_norule.proto", package="t.norule")
    fd.message_type.add(name="M")
    svc = fd.service.add(name="S")
    svc.method.add(name="Do", input_type=".t.norule.M", output_type=".t.norule.M")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    sd = pool.FindServiceByName("t.norule.S")

    class Servicer:
        async def Do(self, request, context):
            return request

    guard = Guard(Authenticator(None, None), None)  # never reached: the rule check comes first
    with pytest.raises(rules.MissingRule, match="t.norule.S.Do declares no access rule"):
        guard.protect(Servicer(), sd)


async def _refusals(world, metadata_or_channel, network: str, pick, expected: grpc.StatusCode):
    """Call every non-agent RPC `pick` selects; each must give `expected`,
    change nothing but the audit log, and leave one audit record."""
    channel = metadata_or_channel
    checked = []
    for sd, md in served_methods(world.app):
        rule = rules.control_plane_rules()[f"/{sd.full_name}/{md.name}"]
        if rule.agent or not pick(rule):
            continue
        before = await state_dump(world.etcd)
        audited = len(await audit_records(world.etcd))
        code, err = await call(channel, sd, md, request_about(rule, md, network))
        assert code == expected, (md.name, code, err and err.details())
        _, reason = details(err)
        assert reason, md.name  # every refusal says why
        assert await state_dump(world.etcd) == before, md.name
        new = (await audit_records(world.etcd))[audited:]
        assert [(r.method, r.status_code) for r in new] == [(rule.method, expected.name)], md.name
        checked.append(md.name)
    return checked


async def test_no_credentials_is_unauthenticated_on_every_rpc(world):
    async with grpc.aio.insecure_channel(world.target) as ch:
        checked = await _refusals(world, ch, "a", lambda r: True, grpc.StatusCode.UNAUTHENTICATED)
    assert len(checked) >= 40


async def test_a_viewer_is_denied_every_mutation_and_every_secret(world):
    token = await mint_token(world.app, "viewer", role="viewer")
    async with authed_channel(world.target, token) as ch:
        checked = await _refusals(world, ch, "a", lambda r: r.mutation or r.returns_secret,
                                  grpc.StatusCode.PERMISSION_DENIED)
        assert {"CreateEnrollmentKey", "CreateExternalClient", "RotateExternalClientKey", "CreateToken",
                "DeleteNetwork", "UpdateNode"} <= set(checked)
        # ... and may read: every non-secret read of network a works or says NOT_FOUND (x may not exist).
        for sd, md in served_methods(world.app):
            rule = rules.control_plane_rules()[f"/{sd.full_name}/{md.name}"]
            if rule.agent or rule.mutation or rule.returns_secret or rule.permission.startswith(("tokens.", "audit.")):
                continue
            code, err = await call(ch, sd, md, request_about(rule, md, "a"))
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), (md.name, code, err and err.details())


async def test_a_network_admin_of_a_is_denied_everything_about_b_and_sees_only_a(world):
    token = await mint_token(world.app, "admin-a", role="network-admin", networks=["networks/a"])
    async with authed_channel(world.target, token) as ch:
        about_b = await _refusals(world, ch, "b", lambda r: bool(r.scope_field) and not r.per_item,
                                  grpc.StatusCode.PERMISSION_DENIED)
        assert {"GetNode", "UpdateNode", "CreateNode", "ListNodes", "GetNetworkStatus", "UpdateNetwork"} <= set(about_b)
        outside = await _refusals(world, ch, "b", lambda r: not r.scope_field and not r.per_item and r.permission,
                                  grpc.StatusCode.PERMISSION_DENIED)
        assert {"CreateNetwork", "CreateToken", "ListTokens"} <= set(outside)
        # Explicitly about b, even listings marked per-item are refused.
        code, _ = await call(ch, events_pb2.DESCRIPTOR.services_by_name["EventService"],
                             events_pb2.DESCRIPTOR.services_by_name["EventService"].methods_by_name["Watch"],
                             events_pb2.WatchRequest(parent="networks/b"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        # Lists and watches show only a.
        nets = network_pb2.ListNetworksResponse.FromString(await ch.unary_unary(
            "/meshgate.api.v1.NetworkService/ListNetworks", request_serializer=network_pb2.ListNetworksRequest.SerializeToString,
            response_deserializer=lambda b: b)(network_pb2.ListNetworksRequest()))
        assert [n.name for n in nets.networks] == ["networks/a"]
        watch = events_pb2_grpc.EventServiceStub(ch).Watch(events_pb2.WatchRequest())
        await watch.initial_metadata()
        # Changes in both networks (made by the test's admin); a's arrive, b's never.
        await make_node(world, "b", "y")
        await make_node(world, "a", "y")
        ev = await asyncio.wait_for(watch.read(), 5)
        assert ev.resource_name == "networks/a/nodes/y"
        watch.cancel()
        audit = auth_pb2_grpc.AuditRecordServiceStub(ch)
        recs = (await audit.ListAuditRecords(auth_pb2.ListAuditRecordsRequest(page_size=1000))).audit_records
        assert recs and {r.network for r in recs} == {"a"}
        # It can work inside a.
        await world.nodes.GetNode(node_pb2.GetNodeRequest(name="networks/a/nodes/x"))
        made = await node_pb2_grpc.NodeServiceStub(ch).CreateNode(
            node_pb2.CreateNodeRequest(parent="networks/a", node_id="z", node=node_pb2.Node()))
        assert made.name == "networks/a/nodes/z"


async def test_an_agent_credential_is_no_api_token_and_an_api_token_opens_no_agent_stream(world):
    ek = await make_key(world, "a", "k")
    agent = await SimAgent(world.agents, ek.secret, "agent-1").enroll()
    async with authed_channel(world.target, agent.token) as ch:
        code, err = await call(ch, network_pb2.DESCRIPTOR.services_by_name["NetworkService"],
                               network_pb2.DESCRIPTOR.services_by_name["NetworkService"].methods_by_name["ListNetworks"],
                               network_pb2.ListNetworksRequest())
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert details(err)[1] == "TOKEN_INVALID"
    admin = await mint_token(world.app, "admin-2")
    impostor = SimAgent(world.agents, "", "agent-1")
    impostor.node, impostor.token = agent.node, admin
    await impostor.connect()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await impostor._task
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await impostor.close()


async def test_revoked_deleted_and_expired_tokens_are_refused_on_every_replica(etcd):
    """Two replicas on one etcd prefix: a token made through one works on the
    other at once; revoking, deleting or expiry takes effect on both without
    a restart. (How fast: `BENCH cp_token_revocation_other_replica_ms`.)"""
    from meshgate.common.config import ServerConfig
    from meshgate.common.server import GrpcServer
    from meshgate.controlplane.api import ControlPlane

    apps, servers, channels = [], [], []
    try:
        for _ in range(2):
            app = ControlPlane(etcd)
            await app.start()
            server = GrpcServer(ServerConfig(listen="127.0.0.1:0", shutdown_grace=0), app.bindings)
            port = await server.start()
            apps.append(app)
            servers.append((server, port))
        admin = await mint_token(apps[0], "root")
        one = authed_channel(f"127.0.0.1:{servers[0][1]}", admin)
        channels.append(one)
        tokens = auth_pb2_grpc.TokenServiceStub(one)

        async def make(tid: str, ttl: float) -> str:
            t = auth_pb2.Token(bindings=[auth_pb2.RoleBinding(role="viewer")])
            t.expire_time.FromNanoseconds(int((time.time() + ttl) * 1e9))
            return (await tokens.CreateToken(auth_pb2.CreateTokenRequest(token_id=tid, token=t))).secret

        async def code_on(replica: int, token: str):
            async with authed_channel(f"127.0.0.1:{servers[replica][1]}", token) as ch:
                try:
                    await auth_pb2_grpc.TokenServiceStub(ch).GetCallerIdentity(auth_pb2.GetCallerIdentityRequest())
                    return "OK"
                except grpc.aio.AioRpcError as e:
                    return details(e)[1]

        async def refused_on(replica: int, token: str, reason: str):
            async def says():
                return await code_on(replica, token) == reason
            await wait_until(says, f"replica {replica} refusing with {reason}")

        ann = await make("ann", 3600)
        assert await code_on(1, ann) == "OK"  # made on replica 0, usable on 1 at once
        await tokens.RevokeToken(auth_pb2.RevokeTokenRequest(name="tokens/ann"))
        await refused_on(1, ann, "TOKEN_REVOKED")
        assert await code_on(0, ann) == "TOKEN_REVOKED"
        bob = await make("bob", 3600)
        await tokens.DeleteToken(auth_pb2.DeleteTokenRequest(name="tokens/bob"))
        await refused_on(1, bob, "TOKEN_INVALID")
        eve = await make("eve", 1.5)
        assert await code_on(1, eve) == "OK"
        await asyncio.sleep(1.6)
        assert await code_on(1, eve) == "TOKEN_EXPIRED" and await code_on(0, eve) == "TOKEN_EXPIRED"
        # A wrong secret for a real id is refused like an unknown token.
        assert await code_on(0, ann.rsplit(".", 1)[0] + ".AAAA") == "TOKEN_INVALID"
    finally:
        for ch in channels:
            await ch.close()
        for server, _ in servers:
            await server.stop(0)
        for app in apps:
            await app.stop()


async def test_token_create_is_validated_and_changes_nothing_when_refused(world):
    stub = auth_pb2_grpc.TokenServiceStub(world.channel)
    cases = {
        "no bindings": (auth_pb2.CreateTokenRequest(token_id="t1", token=auth_pb2.Token()), "token.bindings"),
        "unknown role": (auth_pb2.CreateTokenRequest(token_id="t1", token=auth_pb2.Token(
            bindings=[auth_pb2.RoleBinding(role="root")])), "token.bindings[0]"),
        "scoped admin": (auth_pb2.CreateTokenRequest(token_id="t1", token=auth_pb2.Token(
            bindings=[auth_pb2.RoleBinding(role="admin", networks=["networks/a"])])), "token.bindings[0]"),
        "scoped token permission": (auth_pb2.CreateTokenRequest(token_id="t1", token=auth_pb2.Token(
            bindings=[auth_pb2.RoleBinding(permissions=["tokens.create"], networks=["networks/a"])])),
            "token.bindings[0]"),
        "bad id": (auth_pb2.CreateTokenRequest(token_id="Bad_Id", token=auth_pb2.Token(
            bindings=[auth_pb2.RoleBinding(role="viewer")])), "token_id"),
    }
    for what, (req, field) in cases.items():
        if what != "bad id" and not req.token.HasField("expire_time"):
            req.token.expire_time.FromNanoseconds(int((time.time() + 60) * 1e9))
        before = await state_dump(world.etcd)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateToken(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert field in details(e.value)[0], (what, details(e.value))
        assert await state_dump(world.etcd) == before, what
    no_expiry = auth_pb2.CreateTokenRequest(token_id="t2", token=auth_pb2.Token(bindings=[auth_pb2.RoleBinding(role="viewer")]))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateToken(no_expiry)
    assert "token.expire_time" in details(e.value)[0]


async def test_each_committed_change_carries_its_audit_record_in_the_same_transaction(world):
    """The record of a change is written by the change's own transaction: same
    etcd revision, so no crash can commit one without the other."""
    n = await make_node(world, "a", "audited")
    rec = next(r for r in reversed(await audit_records(world.etcd))
               if r.resource == "networks/a/nodes/audited" and r.method.endswith("/CreateNode"))
    kv = await world.etcd.get(world.etcd.key("audit", rec.name.split("/", 1)[1]))
    assert kv.mod_revision == int(n.etag)
    assert rec.status_code == "OK" and rec.principal == "tokens/test-admin"
    assert "node" not in rec.field_paths and all(not p.startswith("node.name") for p in rec.field_paths)


async def test_audit_records_stream_to_watchers_as_they_are_written(world):
    stub = auth_pb2_grpc.AuditRecordServiceStub(world.channel)
    watch = stub.WatchAuditRecords(auth_pb2.WatchAuditRecordsRequest(resource="networks/a"))
    await asyncio.sleep(0.3)  # the watch is open (no initial metadata to wait on)
    await make_node(world, "b", "unseen")  # filtered out: another resource
    await make_node(world, "a", "seen")
    rec = await asyncio.wait_for(watch.read(), 5)
    assert (rec.resource, rec.method, rec.status_code, rec.principal) == (
        "networks/a/nodes/seen", "/meshgate.api.v1.NodeService/CreateNode", "OK", "tokens/test-admin")
    watch.cancel()
    # Listing filters by resource, principal and time, oldest first, in pages.
    listed = []
    token = ""
    while True:
        page = await stub.ListAuditRecords(auth_pb2.ListAuditRecordsRequest(resource="networks/a", page_size=2,
                                                                            page_token=token))
        listed += page.audit_records
        token = page.next_page_token
        if not token:
            break
    assert [r.resource for r in listed][-1] == "networks/a/nodes/seen"
    assert all(r.resource.startswith("networks/a") for r in listed) and len(listed) >= 3
    assert [r.name for r in listed] == sorted(r.name for r in listed)
    assert not (await stub.ListAuditRecords(auth_pb2.ListAuditRecordsRequest(principal="tokens/nobody"))).audit_records


async def test_audit_retention_deletes_what_is_too_old_or_too_many(world):
    from meshgate.controlplane.auth.audit import AuditLog

    for i in range(5):
        await make_node(world, "a", f"r{i}")
    recs = await audit_records(world.etcd)
    total = len(recs)
    assert total >= 5
    # At most 3 records: the oldest go first.
    keep3 = AuditLog(world.etcd, retention_s=86400, max_records=3)
    assert await keep3.sweep() == total - 3
    assert [r.name for r in await audit_records(world.etcd)] == [r.name for r in recs[-3:]]
    # Older than the retention period (seen from two days later): all of them.
    aged = AuditLog(world.etcd, retention_s=86400)
    assert await aged.sweep(now_ns=time.time_ns() + 2 * 86400 * 10**9) == 3
    assert await audit_records(world.etcd) == []
    # Nothing else was touched.
    assert await world.etcd.get(world.etcd.key("nodes", "a", "r4")) is not None


async def test_a_stream_ends_when_its_token_is_revoked(world):
    token = await mint_token(world.app, "watcher", role="viewer")
    tokens = auth_pb2_grpc.TokenServiceStub(world.channel)
    async with authed_channel(world.target, token) as ch:
        watch = events_pb2_grpc.EventServiceStub(ch).Watch(events_pb2.WatchRequest())
        await watch.initial_metadata()
        await make_node(world, "a", "before")
        assert (await asyncio.wait_for(watch.read(), 5)).resource_name == "networks/a/nodes/before"
        await tokens.RevokeToken(auth_pb2.RevokeTokenRequest(name="tokens/watcher"))
        await make_node(world, "a", "after")  # not delivered: the stream ends instead
        with pytest.raises(grpc.aio.AioRpcError) as e:
            while True:
                ev = await asyncio.wait_for(watch.read(), 5)
                assert ev.resource_name != "networks/a/nodes/after", "delivered after the revocation"
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details(e.value)[1] == "CREDENTIALS_ENDED"


async def test_a_token_never_grants_more_than_its_creator_holds(world):
    minter = await mint_token(world.app, "minter", role="", permissions=["tokens.create", "secrets.read"])
    async with authed_channel(world.target, minter) as ch:
        stub = auth_pb2_grpc.TokenServiceStub(ch)
        t = auth_pb2.Token(bindings=[auth_pb2.RoleBinding(role="admin")])
        t.expire_time.FromNanoseconds(int((time.time() + 60) * 1e9))
        before = await state_dump(world.etcd)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateToken(auth_pb2.CreateTokenRequest(token_id="evil", token=t))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and details(e.value)[1] == "GRANT_EXCEEDS_CALLER"
        assert await state_dump(world.etcd) == before
        # What it holds itself it may pass on.
        t2 = auth_pb2.Token(bindings=[auth_pb2.RoleBinding(permissions=["secrets.read"])])
        t2.expire_time.FromNanoseconds(int((time.time() + 60) * 1e9))
        assert (await stub.CreateToken(auth_pb2.CreateTokenRequest(token_id="ok", token=t2))).secret


async def test_bad_times_and_huge_names_are_refused_precisely_and_kept_small(world):
    stub = auth_pb2_grpc.TokenServiceStub(world.channel)
    for seconds, nanos in ((10**15, 0), (int(time.time()) + 60, -5), (int(time.time()) + 60, 2 * 10**9)):
        t = auth_pb2.Token(bindings=[auth_pb2.RoleBinding(role="viewer")])
        t.expire_time.seconds, t.expire_time.nanos = seconds, nanos
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateToken(auth_pb2.CreateTokenRequest(token_id="t", token=t))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token.expire_time" in details(e.value)[0]
    audit = auth_pb2_grpc.AuditRecordServiceStub(world.channel)
    req = auth_pb2.ListAuditRecordsRequest()
    req.start_time.seconds = 10**15
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await audit.ListAuditRecords(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "start_time" in details(e.value)[0]
    # A refused call with a megabyte of name leaves a small record.
    async with grpc.aio.insecure_channel(world.target) as anon:
        with pytest.raises(grpc.aio.AioRpcError):
            await node_pb2_grpc.NodeServiceStub(anon).GetNode(node_pb2.GetNodeRequest(name="networks/a/nodes/" + "x" * 1_000_000))
    rec = (await audit_records(world.etcd))[-1]
    assert rec.status_code == "UNAUTHENTICATED" and len(rec.SerializeToString()) < 4096
