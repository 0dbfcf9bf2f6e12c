"""Default routes need the node's consent (consent.py): which routes count as
default routes, what a declined state looks like, the agent's status and
report, and the ack the stream sends for it.  The kernel side (no route in
table 51821) is in test_system_trust.py."""

from __future__ import annotations

import asyncio
import base64
import logging
import random

import grpc
from google.rpc import error_details_pb2

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.gatewayd import consent
from meshgate.gatewayd.agent import Agent
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.keys import Secret
from meshgate.gatewayd.sources import QueueSource, Report, Snapshot
from meshgate.gatewayd.store import StateStore
from meshgate.gatewayd.stream import ControlPlaneSource, Identity
from test_agent import StandIn


def key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


def internet_client(rev: int = 1) -> pb.DesiredState:
    """A node whose control plane routes everything through peer 1, also as the
    split default routes and an ordinary range."""
    msg = pb.DesiredState(node="networks/n/nodes/a", revision=rev)
    msg.interface.addresses.append("100.64.0.1/24")
    msg.peers.add(public_key=key(1), allowed_ips=["100.64.0.2/32", "0.0.0.0/0", "::/0"])
    msg.default_route_via_peer = key(1)
    for dst in ("0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1", "198.51.100.0/24"):
        msg.routes.add(destination=dst, via_peer=key(1))
    return msg


def test_what_counts_as_a_default_route():
    for dst in ("0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1", "::/0", "::/1", "8000::/1", "128.0.0.1/1"):
        assert consent.is_default(dst), dst
    for dst in ("0.0.0.0/2", "10.0.0.0/8", "198.51.100.0/24", "::/2", "nonsense", ""):
        assert not consent.is_default(dst), dst


def test_without_consent_every_default_route_is_declined():
    msg = internet_client()
    declined = consent.declined_routes(msg, accept_default_route=False)
    assert [d.route for d in declined] == ["default route", "0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]
    assert {d.reason for d in declined} == {consent.NOT_ACCEPTED}
    out = consent.without_declined(msg, declined)
    assert out.default_route_via_peer == "" and [r.destination for r in out.routes] == ["198.51.100.0/24"]
    assert len(msg.routes) == 5  # the original is untouched
    assert consent.summary(declined[:2]) == (
        f"declined 2 default routes ({consent.NOT_ACCEPTED}): default route via {key(1)}, 0.0.0.0/1 via {key(1)}")
    assert consent.declined_routes(msg, accept_default_route=True) == []


def test_the_internet_gateway_itself_never_takes_a_default_route():
    msg = internet_client()
    msg.egress.add(internet_gateway=True, nat=True)
    declined = consent.declined_routes(msg, accept_default_route=True)
    assert len(declined) == 5 and {d.reason for d in declined} == {consent.IS_GATEWAY}


async def until(pred, limit: int = 2000) -> None:
    for _ in range(limit):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


async def agent_with(tmp_path, accept: bool):
    settings = Settings(state_dir=tmp_path, resync_interval=3600)
    rec = StandIn(StateStore(tmp_path), settings)
    src = QueueSource()
    agent = Agent(rec, settings, src, rng=random.Random(0), accept_default_route=accept)  # type: ignore[arg-type]
    stop = asyncio.Event()
    return agent, src, stop, asyncio.create_task(agent.run(stop))


async def test_agent_declines_reports_once_and_applies_the_rest(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    agent, src, stop, task = await agent_with(tmp_path, accept=False)
    src.put(Snapshot(internet_client(1)))
    await until(lambda: src.reports)
    assert {r.dst for r in agent.target.routes} == {"198.51.100.0/24"}
    report = src.reports[-1]
    assert report.applied_revision == 1 and report.error is None and len(report.declined) == 5
    assert agent.status["state"] == "applied" and len(agent.status["declined_routes"]) == 5
    assert agent.status["accept_default_route"] is False
    # the same state again: applied, not logged again
    src.put(Snapshot(internet_client(2)))
    await until(lambda: len(src.reports) == 2)
    assert caplog.text.count("declined 5 default routes") == 1
    # the control plane stops sending them: the status clears
    plain = internet_client(3)
    plain.default_route_via_peer = ""
    del plain.routes[:4]
    src.put(Snapshot(plain))
    await until(lambda: len(src.reports) == 3)
    assert src.reports[-1] == Report(3, None) and agent.status["declined_routes"] == []
    assert "no routes declined any more" in caplog.text
    stop.set()
    await task


async def test_agent_with_consent_installs_the_default_route(tmp_path):
    agent, src, stop, task = await agent_with(tmp_path, accept=True)
    src.put(Snapshot(internet_client(1)))
    await until(lambda: src.reports)
    assert {"0.0.0.0/0", "::/0", "0.0.0.0/1", "128.0.0.0/1"} <= {r.dst for r in agent.target.routes}
    assert src.reports[-1] == Report(1, None) and agent.status["declined_routes"] == []
    stop.set()
    await task


async def test_the_ack_of_a_declined_route_is_ok_and_says_what():
    src = ControlPlaneSource(Identity("networks/n/nodes/a", "unix:/x", Secret("t"), insecure_no_authority=True))
    src._out = asyncio.Queue()
    declined = tuple(consent.declined_routes(internet_client(), False))[:2]
    await src.report(Report(4, None, declined=declined))
    ack = src._out.get_nowait().ack
    assert ack.revision == 4 and ack.status.code == grpc.StatusCode.OK.value[0]
    assert ack.status.message.startswith("declined 2 default routes (default routes need this node")
    info = error_details_pb2.ErrorInfo()
    assert ack.status.details[0].Unpack(info)
    assert info.reason == "DEFAULT_ROUTE_DECLINED" and info.metadata["routes"] == "default route,0.0.0.0/1"
