"""The operator's allow-list of routes (``gatewayd --accept-routes``) and
``--no-default-route`` (consent.py): which routes are declined and why, that
their allowed IPs go with them (also when a peers-only delta brings the peer
back), the agent's status and ack, and the flags' parsing, saving and
overriding. The kernel side and the network status are in
test_route_consent_system.py."""

from __future__ import annotations

import asyncio
import base64
import logging
import random

import grpc
import pytest
from google.rpc import error_details_pb2

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.gatewayd import consent
from meshgate.gatewayd.agent import Agent
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.keys import Secret
from meshgate.gatewayd.main import build_parser
from meshgate.gatewayd.sources import Delta, QueueSource, Report, Snapshot
from meshgate.gatewayd.store import StateStore
from meshgate.gatewayd.stream import ControlPlaneSource, Identity
from test_agent import StandIn


def key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


def two_gateways(rev: int = 1) -> pb.DesiredState:
    """A node with two egress gateways: peer 1 carries 10.1.0.0/16 and
    198.51.100.0/24, peer 2 carries 203.0.113.0/24 and is the internet gateway."""
    msg = pb.DesiredState(node="networks/n/nodes/a", revision=rev)
    msg.interface.addresses.append("100.64.0.1/24")
    msg.peers.add(public_key=key(1), allowed_ips=["100.64.0.2/32", "10.1.0.0/16", "198.51.100.0/24"])
    msg.peers.add(public_key=key(2), allowed_ips=["100.64.0.3/32", "203.0.113.0/24", "0.0.0.0/0"])
    for dst, via in (("10.1.0.0/16", 1), ("198.51.100.0/24", 1), ("203.0.113.0/24", 2)):
        msg.routes.add(destination=dst, via_peer=key(via))
    msg.default_route_via_peer = key(2)
    return msg


def allowed(msg: pb.DesiredState, i: int) -> list[str]:
    return [a for p in msg.peers if p.public_key == key(i) for a in p.allowed_ips]


def test_parse_accept_routes():
    assert consent.parse_accept_routes("10.0.0.0/8, 198.51.100.7/24,10.0.0.0/8") == ("10.0.0.0/8", "198.51.100.0/24")
    assert consent.parse_accept_routes("all") is None
    assert consent.parse_accept_routes("none") == ()
    assert consent.parse_accept_routes("2001:db8::/32") == ("2001:db8::/32",)
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not a CIDR"):
        consent.parse_accept_routes("10.0.0.0/8,10.0.0.0/33")


def test_an_allow_list_declines_routes_outside_it_with_their_allowed_ips():
    msg = two_gateways()
    declined = consent.declined_routes(msg, accept_default_route=True, accept_routes=("10.0.0.0/8", "198.51.100.0/24"))
    assert [(d.route, d.via_peer, d.code) for d in declined] == [("203.0.113.0/24", key(2), consent.ROUTE_REASON)]
    assert declined[0].reason == ("not within the ranges this node accepts "
                                  "(gatewayd --accept-routes 10.0.0.0/8,198.51.100.0/24)")
    out = consent.without_declined(msg, declined)
    assert [r.destination for r in out.routes] == ["10.1.0.0/16", "198.51.100.0/24"]
    assert out.default_route_via_peer == key(2)  # default routes follow their own consent
    # the declined range is neither routed nor accepted from the peer; the peer stays
    assert allowed(out, 2) == ["100.64.0.3/32", "0.0.0.0/0"] and allowed(out, 1) == allowed(msg, 1)
    assert allowed(msg, 2) == ["100.64.0.3/32", "203.0.113.0/24", "0.0.0.0/0"]  # the original is untouched


def test_a_route_that_only_overlaps_an_accepted_range_is_declined_whole():
    msg = two_gateways()
    declined = consent.declined_routes(msg, True, accept_routes=("10.1.2.0/24", "198.51.0.0/16", "2001:db8::/32"))
    assert {d.route for d in declined} == {"10.1.0.0/16", "203.0.113.0/24"}
    assert consent.declined_routes(msg, True, accept_routes=()) and all(
        d.code == consent.ROUTE_REASON for d in consent.declined_routes(msg, True, accept_routes=()))
    assert consent.declined_routes(msg, True, accept_routes=None) == []


def test_no_default_route_says_so_and_takes_the_default_allowed_ips_only_when_unused():
    msg = two_gateways()
    declined = consent.declined_routes(msg, accept_default_route=False, explicit=True)
    assert [(d.route, d.reason, d.code) for d in declined] == [
        ("default route", consent.NO_DEFAULT_ROUTE, consent.ERROR_REASON)]
    out = consent.without_declined(msg, declined)
    assert out.default_route_via_peer == "" and len(out.routes) == 3
    # 0.0.0.0/0 also covered 203.0.113.0/24 via the same peer... which has its own entry: gone
    assert allowed(out, 2) == ["100.64.0.3/32", "203.0.113.0/24"]
    # a kept route that needs the broad entry keeps it
    narrow = two_gateways()
    narrow.peers[1].allowed_ips.remove("203.0.113.0/24")
    out = consent.without_declined(narrow, consent.declined_routes(narrow, False, explicit=True))
    assert allowed(out, 2) == ["100.64.0.3/32", "0.0.0.0/0"]


def test_both_kinds_in_one_summary():
    declined = consent.declined_routes(two_gateways(), False, accept_routes=("10.0.0.0/8",))
    assert consent.summary(declined) == (
        f"declined 1 default route ({consent.NOT_ACCEPTED}): default route via {key(2)}; "
        "declined 2 routes (not within the ranges this node accepts (gatewayd --accept-routes 10.0.0.0/8)): "
        f"198.51.100.0/24 via {key(1)}, 203.0.113.0/24 via {key(2)}")
    assert list(consent.by_code(declined)) == [consent.ERROR_REASON, consent.ROUTE_REASON]


async def until(pred, limit: int = 2000) -> None:
    for _ in range(limit):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


async def test_the_agent_declines_outside_its_allow_list_and_a_peer_delta_keeps_it_so(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    settings = Settings(state_dir=tmp_path, resync_interval=3600)
    rec = StandIn(StateStore(tmp_path), settings)
    src = QueueSource()
    agent = Agent(rec, settings, src, rng=random.Random(0), accept_default_route=True,  # type: ignore[arg-type]
                  accept_routes=("10.0.0.0/8", "198.51.100.0/24"), no_default_route=True)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    src.put(Snapshot(two_gateways(1)))
    await until(lambda: src.reports)
    assert {r.dst for r in agent.target.routes} == {"10.1.0.0/16", "198.51.100.0/24"}  # no default, no 203.0.113.0/24
    assert agent.target.peers[key(2)].allowed_ips == {"100.64.0.3/32"}
    report = src.reports[-1]
    assert report.applied_revision == 1 and report.error is None
    assert [d.route for d in report.declined] == ["default route", "203.0.113.0/24"]
    assert agent.status["accept_routes"] == ["10.0.0.0/8", "198.51.100.0/24"]
    assert agent.status["accept_default_route"] is False and len(agent.status["declined_routes"]) == 2
    # A peers-only delta that sends peer 2 again (a new endpoint): its declined
    # allowed IPs stay out, and nothing is logged again.
    delta = pb.DesiredStateDelta(base_revision=1, revision=2)
    delta.upserted_peers.add().CopyFrom(two_gateways().peers[1])
    delta.upserted_peers[0].endpoint = "192.0.2.9:51820"
    src.put(Delta(delta, 2))
    await until(lambda: len(src.reports) == 2)
    assert agent.target.peers[key(2)].allowed_ips == {"100.64.0.3/32"}
    assert agent.target.peers[key(2)].endpoint == "192.0.2.9:51820"
    assert src.reports[-1].applied_revision == 2 and len(src.reports[-1].declined) == 2
    assert caplog.text.count("declined 1 route (not within") == 1
    stop.set()
    await task


async def test_the_ack_has_one_error_info_per_kind():
    src = ControlPlaneSource(Identity("networks/n/nodes/a", "unix:/x", Secret("t"), insecure_no_authority=True))
    src._out = asyncio.Queue()
    declined = tuple(consent.declined_routes(two_gateways(), False, ("10.0.0.0/8",), explicit=True))
    await src.report(Report(4, None, declined=declined))
    ack = src._out.get_nowait().ack
    assert ack.revision == 4 and ack.status.code == grpc.StatusCode.OK.value[0]
    infos = []
    for d in ack.status.details:
        info = error_details_pb2.ErrorInfo()
        assert d.Unpack(info)
        infos.append(info)
    assert [(i.reason, i.metadata["routes"]) for i in infos] == [
        ("DEFAULT_ROUTE_DECLINED", "default route"), ("ROUTE_NOT_ACCEPTED", "198.51.100.0/24,203.0.113.0/24")]
    assert infos[0].metadata["reason"] == consent.NO_DEFAULT_ROUTE
    assert infos[1].metadata["reason"].startswith("not within the ranges this node accepts")


def test_flags_join_saves_and_run_overrides(tmp_path, capsys):
    from meshgate.gatewayd import main

    p = build_parser()
    j = p.parse_args(["join", "k", "--control-plane", "unix:/x", "--no-default-route",
                      "--accept-routes", "10.0.0.0/8"])
    assert j.accept_default_route is False and j.accept_routes == ("10.0.0.0/8",)
    with pytest.raises(SystemExit):
        p.parse_args(["join", "k", "--control-plane", "unix:/x", "--no-default-route", "--accept-default-route"])
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--accept-routes", "10.0.0.0/40"])
    assert "--accept-routes: invalid _accept_routes value" not in capsys.readouterr().err  # says what is wrong
    saved = consent.Consent(False, True, ("10.0.0.0/8",))
    run = p.parse_args(["run"])
    assert main._consent(run, saved) == saved
    run = p.parse_args(["run", "--accept-default-route", "--accept-routes", "all"])
    assert main._consent(run, saved) == consent.Consent(True, False, None)
    run = p.parse_args(["run", "--no-accept-default-route"])  # the old spelling still works
    assert main._consent(run, consent.Consent(True)) == consent.Consent(False, True, None)
    # identity.json keeps them
    ident = Identity("networks/n/nodes/a", "unix:/x", Secret("t"), insecure_no_authority=True,
                     no_default_route=True, accept_routes=("10.0.0.0/8",))
    ident.save(tmp_path)
    loaded = Identity.load(tmp_path)
    assert loaded.no_default_route and not loaded.accept_default_route and loaded.accept_routes == ("10.0.0.0/8",)
    Identity("networks/n/nodes/a", "unix:/x", Secret("t"), insecure_no_authority=True).save(tmp_path)
    assert Identity.load(tmp_path).accept_routes is None
