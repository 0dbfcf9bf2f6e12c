"""The agent loop against a stand-in reconciler (our own boundary): which passes it
runs (full or delta), retries with backoff after failures, rejections that keep the
previous state, and restore from disk.  The kernel side is covered by system tests.
"""

from __future__ import annotations

import asyncio
import base64
import random
from dataclasses import dataclass, field

import pytest

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.gatewayd.agent import Agent
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.errors import ApplyError
from meshgate.gatewayd.keys import NodeKeys
from meshgate.gatewayd.model import Desired, compile_desired
from meshgate.gatewayd.planner import Plan
from meshgate.gatewayd.reconciler import Reconciler, Result
from meshgate.gatewayd.sources import Delta, QueueSource, Snapshot
from meshgate.gatewayd.store import StateStore


def key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


def state(rev: int, n: int = 3) -> pb.DesiredState:
    msg = pb.DesiredState(node="networks/n/nodes/a", revision=rev)
    msg.interface.addresses.append("100.64.0.1/24")
    for i in range(1, n + 1):
        msg.peers.add(public_key=key(i)).allowed_ips.append(f"100.64.0.{i + 1}/32")
    return msg


@dataclass
class Backend:
    name: str = "stand-in"


@dataclass
class StandIn:
    """Records passes; fails the next ``fail`` of them."""

    store: StateStore
    settings: Settings
    fail: int = 0
    passes: list[tuple[int, bool]] = field(default_factory=list)
    is_alive: bool = True
    backend: Backend = field(default_factory=Backend)
    keys: NodeKeys | None = None

    def __post_init__(self) -> None:
        self.keys = NodeKeys(self.store.dir)

    @property
    def public_key(self) -> str:
        return self.keys.current.public

    def compile(self, msg: pb.DesiredState, restoring: bool = False) -> Desired:
        own = Reconciler.own_key(self, msg, restoring)  # type: ignore[arg-type]
        return compile_desired(msg, settings=self.settings, public_key=own)

    def reconcile(self, desired: Desired, full: bool = True) -> Result:
        if desired.public_key != self.keys.current.public:
            assert self.keys.promote(desired.public_key)
        self.passes.append((desired.revision, full))
        if self.fail:
            self.fail -= 1
            raise ApplyError("wireguard", "injected failure")
        return Result(Plan(desired.interface), full, 0.0)

    def alive(self) -> bool:
        return self.is_alive


@pytest.fixture
def setup(tmp_path):
    settings = Settings(state_dir=tmp_path, backoff_initial=0.01, backoff_max=0.05,
                        supervise_interval=0.01, resync_interval=3600)
    rec = StandIn(StateStore(tmp_path), settings)
    src = QueueSource()
    agent = Agent(rec, settings, src, rng=random.Random(0))  # type: ignore[arg-type]
    return agent, rec, src


async def until(pred, limit: int = 2000) -> None:
    for _ in range(limit):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


async def running(agent: Agent):
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    return stop, task


async def test_waits_without_state_then_full_then_delta(setup):
    agent, rec, src = setup
    stop, task = await running(agent)
    await asyncio.sleep(0.05)
    assert rec.passes == []  # nothing on disk, nothing received: nothing is touched
    src.put(Snapshot(state(1)))
    await until(lambda: rec.passes == [(1, True)])
    src.put(Snapshot(state(2)))
    await until(lambda: len(rec.passes) == 2 and len(src.reports) == 2)  # the pass ended (saved, reported)
    assert rec.passes[1] == (2, False)  # the fast path
    assert rec.store.load_desired().revision == 2
    assert [r.applied_revision for r in src.reports] == [1, 2]
    stop.set()
    await task


async def test_failed_apply_retried_as_full_pass_with_backoff(setup):
    agent, rec, src = setup
    stop, task = await running(agent)
    src.put(Snapshot(state(1)))
    await until(lambda: rec.passes)
    rec.fail = 3
    src.put(Snapshot(state(2)))
    await until(lambda: agent.status["applied_revision"] == 2)
    assert rec.passes[1:] == [(2, False), (2, True), (2, True), (2, True)]
    assert agent.status["state"] == "applied" and agent.status["last_error"] is None
    errors = [r.error for r in src.reports if r.error]
    assert len(errors) == 3 and all("injected" in e for e in errors)
    assert agent.backoff.attempt == 0
    stop.set()
    await task


async def test_bad_update_rejected_previous_kept(setup):
    agent, rec, src = setup
    stop, task = await running(agent)
    src.put(Snapshot(state(1)))
    await until(lambda: agent.status["applied_revision"] == 1)  # the pass finished, not just began
    bad = state(2)
    bad.peers[1].allowed_ips.append("100.64.0.2/32")
    src.put(Snapshot(bad))
    await until(lambda: agent.status["rejected"] == 1)
    assert "overlaps" in agent.status["last_error"]
    assert rec.passes == [(1, True)] and agent.target.revision == 1
    assert rec.store.load_desired().revision == 1
    stop.set()
    await task


async def test_peer_delta_and_stale_delta(setup):
    agent, rec, src = setup
    stop, task = await running(agent)
    src.put(Snapshot(state(1)))
    await until(lambda: rec.passes)
    d = pb.DesiredStateDelta(base_revision=1, removed_peers=[key(2)])
    src.put(Delta(d, revision=2))
    await until(lambda: len(rec.passes) == 2 and agent.status["applied_revision"] == 2)  # saved too
    assert rec.passes[1] == (2, False)
    assert key(2) not in agent.target.peers and len(rec.store.load_desired().peers) == 2
    src.put(Delta(pb.DesiredStateDelta(base_revision=1), revision=3))  # stale base
    await until(lambda: agent.status["rejected"] == 1)
    assert "snapshot is needed" in agent.status["last_error"]
    stop.set()
    await task


async def test_relayed_ranges_delta_is_not_a_peer_delta(setup):
    # the fast path keeps the previous table: a relayed_ranges change must be compiled whole
    agent, rec, src = setup
    stop, task = await running(agent)
    src.put(Snapshot(state(1)))
    await until(lambda: rec.passes)
    d = pb.DesiredStateDelta(base_revision=1, relayed_ranges_changed=True,
                             relayed_ranges=["100.64.0.3/32"])
    src.put(Delta(d, revision=2))
    await until(lambda: len(rec.passes) == 2 and agent.status["applied_revision"] == 2)  # saved too
    assert agent.target.relayed_ranges == ("100.64.0.3/32",)
    assert "@relay4" in agent.target.nft.text
    assert agent.target.sysctls["net.ipv4.ip_forward"] == "1"
    assert list(rec.store.load_desired().relayed_ranges) == ["100.64.0.3/32"]
    src.put(Delta(pb.DesiredStateDelta(base_revision=2, relayed_ranges_changed=True), revision=3))
    await until(lambda: len(rec.passes) == 3)
    assert agent.target.relayed_ranges == () and "relay" not in agent.target.nft.text
    stop.set()
    await task


async def test_restores_from_disk_and_resyncs_when_data_plane_dies(setup, tmp_path):
    agent, rec, src = setup
    rec.store.save_desired(state(7))
    stop, task = await running(agent)
    await until(lambda: rec.passes == [(7, True)])
    rec.is_alive = False  # e.g. wireguard-go died
    await until(lambda: len(rec.passes) >= 2)
    assert rec.passes[1] == (7, True)
    rec.is_alive = True
    n = len(rec.passes)
    agent.resync_now()  # what SIGHUP does
    await until(lambda: len(rec.passes) > n)
    assert rec.passes[-1] == (7, True)
    stop.set()
    await task
