"""Streams cancelled after a stall end cleanly (issue 15, item 12).

A client that stops reading (an agent stalled, a Watch whose reader hangs)
lets the server's writes block; when it then goes away the call is cancelled
while the handler waits at a `yield`. grpc.aio left such a handler suspended:
the garbage collector closed it later in another context, OpenTelemetry's
interceptor logged "Failed to detach context" with a traceback, and the
handler's `finally` (ending the agent's session, the etcd watch) ran late or
never, so the node still showed as connected.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import grpc

from cptest import SimAgent, bearer_interceptors, key, make_key, make_network, make_node, mint_token, wait_until
from meshgate.api.v1 import agent_pb2, agent_pb2_grpc, events_pb2, events_pb2_grpc, network_pb2

# Big enough resources that a few dozen events or peers fill the stream's flow-control window.
LABELS = {f"k{i:02d}": "v" * 63 for i in range(64)}


async def stalling_channel(cp) -> grpc.aio.Channel:
    """A channel whose receive window stays at HTTP/2's initial 64 KiB (no
    BDP probing): a reader that stops reading stalls the server's writes."""
    target = f"127.0.0.1:{cp.server.port}"
    return grpc.aio.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)],
                                     interceptors=bearer_interceptors(await mint_token(cp.app, "stall")))


def detach_errors(caplog) -> list[str]:
    """Context detach failures, and any other ERROR our code or OpenTelemetry logged.
    (grpc's own "ExecuteBatchError raised in core by servicer method", which it
    may log for a stream cancelled in the middle of a write, is grpc's.)"""
    return [r.getMessage() for r in caplog.records
            if "detach context" in r.getMessage().lower()
            or (r.levelno >= logging.ERROR and not r.name.startswith("grpc"))]


async def settle() -> None:
    """Let grpc finish the cancelled call, then collect what it left behind."""
    for _ in range(5):
        await asyncio.sleep(0.1)
        gc.collect()


async def test_a_stalled_then_cancelled_watch_logs_no_detach_error(cp, caplog):
    caplog.set_level(logging.DEBUG)
    await make_network(cp)
    channel = await stalling_channel(cp)
    stub = events_pb2_grpc.EventServiceStub(channel)
    call = stub.Watch(events_pb2.WatchRequest(parent="networks/prod"))
    await call.initial_metadata()
    await make_node(cp, node_id="first")
    assert (await call.read()).resource_name == "networks/prod/nodes/first"
    for i in range(150):  # no more reads: the server's writes block
        await make_node(cp, node_id=f"n{i}", labels=LABELS)
    await asyncio.sleep(0.5)
    call.cancel()
    await settle()
    await channel.close()
    assert detach_errors(caplog) == []


async def test_a_stalled_agent_that_goes_away_is_disconnected_and_logs_no_detach_error(cp, caplog):
    caplog.set_level(logging.DEBUG)
    await make_network(cp, cidr="100.64.0.0/22")
    for i in range(700):  # peers of a: its snapshot alone is larger than the stalled reader's window
        await make_node(cp, node_id=f"p{i}", endpoint=f"192.0.2.{i % 250 + 2}:{51821 + i}", public_key=key())
    ek = await make_key(cp)
    agent = await SimAgent(cp.agents, ek.secret, "a", "192.0.2.1:51820").enroll()
    hello = agent_pb2.SyncRequest(hello=agent_pb2.SyncRequest.Hello(node=agent.node.name, agent_version="stalled"))
    done = asyncio.Event()

    async def requests():
        yield hello
        await done.wait()

    channel = await stalling_channel(cp)
    call = agent_pb2_grpc.AgentServiceStub(channel).Sync(requests(), metadata=(("authorization", f"Bearer {agent.token}"),))
    await call.initial_metadata()
    fanout = cp.app.fanout
    await wait_until(lambda: agent.node.name in fanout.sessions, "session open")
    await asyncio.sleep(0.5)  # the snapshot's write is blocked: the agent never reads
    call.cancel()  # the agent goes away (to reconnect)
    done.set()
    await settle()
    await wait_until(lambda: agent.node.name not in fanout.sessions, "session closed", timeout=10)
    async def status():
        # UNAVAILABLE (CACHE_BEHIND) means "retry shortly": under load the
        # cache may still be applying the 700 creates.
        try:
            return await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return None

    st = await wait_until(status, "the network status", timeout=60)
    assert not next(n for n in st.nodes if n.node == agent.node.name).connected
    await channel.close()
    assert detach_errors(caplog) == []
