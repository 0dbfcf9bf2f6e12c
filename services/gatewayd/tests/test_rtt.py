"""Round trips to relays (agent._rtt_us, by `ping`): when ping is missing or
not permitted the time is 0 (no ranking), and the agent says why, once, as a
warning, instead of silently never ranking relays."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from meshgate.gatewayd import agent


@pytest.fixture(autouse=True)
def _fresh_warning(monkeypatch):
    monkeypatch.setattr(agent, "_rtt_warned", False)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == agent.log.name and r.levelno == logging.WARNING]


async def test_missing_ping_is_said_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no ping
    caplog.set_level(logging.WARNING, logger=agent.log.name)
    assert await agent._rtt_us("127.0.0.1") == 0
    assert await agent._rtt_us("127.0.0.1") == 0
    [msg] = _warnings(caplog)
    assert "ping" in msg and "not installed" in msg and "iputils-ping" in msg, msg


async def test_ping_not_permitted_is_said_once(monkeypatch, tmp_path, caplog):
    # iputils ping's own words when it has neither CAP_NET_RAW nor an
    # ICMP datagram socket (ping_group_range) and exits 2
    fake = tmp_path / "ping"
    fake.write_text("#!/bin/sh\necho 'ping: socktype: SOCK_RAW' >&2\n"
                    "echo 'ping: socket: Operation not permitted' >&2\nexit 2\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    caplog.set_level(logging.WARNING, logger=agent.log.name)
    assert await agent._rtt_us("127.0.0.1") == 0
    assert await agent._rtt_us("127.0.0.1") == 0
    [msg] = _warnings(caplog)
    assert "not permitted" in msg and "NET_RAW" in msg and "Operation not permitted" in msg, msg


@pytest.mark.root
async def test_loopback_is_measured_without_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger=agent.log.name)
    assert await agent._rtt_us("127.0.0.1") > 0
    assert _warnings(caplog) == []
