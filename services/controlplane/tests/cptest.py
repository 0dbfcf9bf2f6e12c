"""Small builders shared by the control-plane tests."""

from __future__ import annotations

import base64
import os

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from meshgate.api.v1 import egress_pb2, network_pb2, node_pb2


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def make_network(cp, net_id="prod", cidr="100.64.0.0/24", **kw):
    return await cp.networks.CreateNetwork(
        network_pb2.CreateNetworkRequest(network_id=net_id, network=network_pb2.Network(ipv4_cidr=cidr, **kw))
    )


async def make_node(cp, net_id="prod", node_id="a", **kw):
    return await cp.nodes.CreateNode(
        node_pb2.CreateNodeRequest(parent=f"networks/{net_id}", node_id=node_id, node=node_pb2.Node(**kw))
    )


async def make_gateway(cp, net_id="prod", gw_id="gw", node="a", ranges=("198.51.100.0/24",), **kw):
    return await cp.egress.CreateEgressGateway(
        egress_pb2.CreateEgressGatewayRequest(
            parent=f"networks/{net_id}",
            egress_gateway_id=gw_id,
            egress_gateway=egress_pb2.EgressGateway(node=f"networks/{net_id}/nodes/{node}", ranges=list(ranges), **kw),
        )
    )


def details(err: grpc.aio.AioRpcError):
    """(field violations as {field: description}, ErrorInfo reason) of an error."""
    status = rpc_status.from_call(err)
    violations, reason = {}, ""
    if status is None:
        return violations, reason
    for d in status.details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            violations.update({v.field: v.description for v in br.field_violations})
        elif d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason = info.reason
    return violations, reason


class SimAgent:
    """A lightweight agent: enrolls, holds the Sync stream, applies what it
    receives to an in-memory desired state (as gatewayd would) and acks."""

    def __init__(self, stub, secret: str, node_id: str, endpoint: str = "", ack: bool = True):
        self.stub, self.secret, self.node_id, self.endpoint, self.auto_ack = stub, secret, node_id, endpoint, ack
        self.public_key = key()
        self.state = None
        self.received = []
        self.call = None
        self._acks = None
        self._task = None
        self.node = None
        self.token = None
        self.rotations_asked = 0
        self.authority = []

    async def enroll(self):
        from meshgate.api.v1 import agent_pb2

        resp = await self.stub.Enroll(
            agent_pb2.EnrollRequest(enrollment_secret=self.secret, node_id=self.node_id, public_key=self.public_key, endpoint=self.endpoint)
        )
        self.node, self.token = resp.node, resp.credential.token
        self.authority = list(resp.key_authority_public_keys)
        return self

    async def connect(self):
        import asyncio

        from meshgate.api.v1 import agent_pb2

        self._acks = asyncio.Queue()
        hello = agent_pb2.SyncRequest(hello=agent_pb2.SyncRequest.Hello(node=self.node.name, agent_version="sim"))

        async def requests():
            yield hello
            while True:
                item = await self._acks.get()
                if item is None:
                    return
                yield item

        self.call = self.stub.Sync(requests(), metadata=(("authorization", f"Bearer {self.token}"),))
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self):
        from meshgate.api.v1 import agent_pb2
        from meshgate.controlplane import compiler

        async for msg in self.call:
            kind = msg.WhichOneof("message")
            if kind == "heartbeat":
                continue
            if kind == "rotate_key":
                self.rotations_asked += 1
                continue
            self.received.append(msg)
            if kind == "snapshot":
                self.state = msg.snapshot.state
            else:
                assert self.state is not None and msg.delta.delta.base_revision == self.state.revision
                self.state = compiler.apply_delta(self.state, msg.delta.delta, msg.revision)
            if self.auto_ack:
                await self._acks.put(agent_pb2.SyncRequest(ack=agent_pb2.SyncRequest.Ack(revision=msg.revision)))

    async def close(self):
        if self._acks is not None:
            await self._acks.put(None)
        if self.call is not None:
            self.call.cancel()
        if self._task is not None:
            try:
                await self._task
            except BaseException:  # noqa: BLE001 - cancelled stream
                pass


async def wait_until(predicate, what: str, timeout: float = 20):
    """Poll an async or sync predicate; fail with `what` when it never holds."""
    import asyncio
    import inspect

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def make_key(cp, net_id="prod", key_id="k", **kw):
    from meshgate.api.v1 import enrollment_pb2

    return await cp.keys.CreateEnrollmentKey(
        enrollment_pb2.CreateEnrollmentKeyRequest(
            parent=f"networks/{net_id}", enrollment_key_id=key_id, enrollment_key=enrollment_pb2.EnrollmentKey(**kw)
        )
    )


# ---------------------------------------------------------------- credentials


class _Bearer:
    """Adds `authorization: Bearer <token>` to calls that have none (an
    agent's own credential on the same channel wins)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details):
        md = list(details.metadata or ())
        if not any(k == "authorization" for k, _ in md):
            md.append(("authorization", f"Bearer {self.token}"))
        return details._replace(metadata=md)


# grpc.aio files an interceptor under the first call type it implements
# only, so each call type gets its own class.
class _BearerUU(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerUS(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerSU(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _BearerSS(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def bearer_interceptors(token: str) -> list:
    return [cls(token) for cls in (_BearerUU, _BearerUS, _BearerSU, _BearerSS)]


async def mint_token(app, token_id: str = "test-admin", role: str = "admin", networks=(), permissions=(),
                     ttl_s: float = 3600) -> str:
    """An API token made through the control plane's core (as CreateToken does)."""
    import time

    from meshgate.api.v1 import auth_pb2

    token = auth_pb2.Token(bindings=[auth_pb2.RoleBinding(role=role, networks=list(networks),
                                                          permissions=list(permissions))])
    token.expire_time.FromNanoseconds(int((time.time() + ttl_s) * 1e9))
    from meshgate.common.errors import ApiError

    try:
        made = await app.tokens.create(auth_pb2.CreateTokenRequest(token_id=token_id, token=token), creator="test")
    except ApiError as e:
        if e.code != grpc.StatusCode.ALREADY_EXISTS:
            raise
        # Another replica of the same test minted it on the shared prefix.
        made = await app.tokens.create(auth_pb2.CreateTokenRequest(token_id=f"{token_id}-{os.urandom(3).hex()}",
                                                                   token=token), creator="test")
    return made.secret


def authed_channel(target: str, token: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(token))


async def state_dump(etcd) -> dict[bytes, bytes]:
    """etcd's content without the audit log and tokens' last use: what a
    refused call must leave exactly as it was (it does leave an audit record)."""
    return {k: v for k, v in (await etcd.dump()).items() if b"/audit/" not in k and b"/tokenUse/" not in k}


async def audit_records(etcd) -> list:
    from meshgate.api.v1 import auth_pb2

    return [auth_pb2.AuditRecord.FromString(v) for k, v in sorted((await etcd.dump()).items()) if b"/audit/" in k]
