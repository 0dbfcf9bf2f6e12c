"""Unit tests of the small pieces: keys, UAPI encoding, backoff, settings, nft render."""

from __future__ import annotations

import base64
import logging
import os
import random
import stat

import pytest

from meshgate.gatewayd import keys
from meshgate.gatewayd.backoff import Backoff, jittered
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.lab import LabError, parse_wg_quick
from meshgate.gatewayd.planner import DeviceChange, PeerOp
from meshgate.gatewayd.wireguard.uapi import b64_to_hex, parse_get
from meshgate.gatewayd.wireguard.userspace import device_to_observed, uapi_lines


def test_key_file_created_0600_and_reused(tmp_path):
    old = os.umask(0)  # even a permissive umask must not widen the key file
    try:
        priv, pub = keys.load_or_create(tmp_path / "s")
    finally:
        os.umask(old)
    path = tmp_path / "s" / "private.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    assert keys.load_or_create(tmp_path / "s") == (priv, pub)
    assert keys.public_key_of(priv) == pub and keys.is_valid_key(pub)


def test_secret_never_shows_itself(caplog):
    priv = keys.generate_private_key()
    text = priv.reveal()
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("t").info("key %s %r", priv, priv)
        logging.getLogger("t").info(f"{priv}")  # noqa: G004 - an f-string is what this checks
    assert text not in caplog.text and "redacted" in caplog.text
    assert text not in repr([priv]) and text not in str({"k": priv})


GET = """private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a
listen_port=12912
public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33
preshared_key=188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52
allowed_ip=192.168.4.4/32
endpoint=[abcd:23::33%2]:51820
persistent_keepalive_interval=25
last_handshake_time_sec=1700000000
last_handshake_time_nsec=5
rx_bytes=100
tx_bytes=200
public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376
allowed_ip=192.168.4.10/32
allowed_ip=192.168.4.11/32
endpoint=182.122.22.19:3233
errno=0

"""


def test_uapi_get_parses_device_and_peers():
    dev = parse_get(GET)
    assert dev.listen_port == 12912 and len(dev.peers) == 2
    obs, stats = device_to_observed(dev)
    assert obs.public_key and keys.is_valid_key(obs.public_key)
    p0, p1 = dev.peers
    assert obs.peers[p0.public_key].keepalive == 25
    assert obs.peers[p0.public_key].preshared_key is not None
    assert obs.peers[p1.public_key].allowed_ips == {"192.168.4.10/32", "192.168.4.11/32"}
    assert stats[p0.public_key].rx_bytes == 100 and stats[p0.public_key].last_handshake_sec == 1700000000
    assert "188515093e" not in repr(obs) and "e84b5a6d" not in repr(dev)


def test_uapi_set_lines_per_peer_never_replace_peers():
    k = base64.b64encode(bytes(range(32))).decode()
    psk = keys.Secret(base64.b64encode(bytes([1] * 32)).decode())
    lines = uapi_lines(keys.generate_private_key(), DeviceChange(True, 51820, 0), [
        PeerOp("add", k, endpoint="192.0.2.1:51820", preshared_key=psk, keepalive=0,
               allowed_ips=frozenset({"100.64.0.2/32"})),
        PeerOp("update", k, keepalive=25),
        PeerOp("update", k, allowed_ips=frozenset()),
        PeerOp("remove", k),
    ])
    assert "replace_peers=true" not in lines
    assert lines[1:3] == ["listen_port=51820", "fwmark=0"]
    hexk = b64_to_hex(k)
    starts = [i for i, line in enumerate(lines) if line == f"public_key={hexk}"]
    assert len(starts) == 4
    assert lines[starts[1] + 1] == "update_only=true"
    assert "persistent_keepalive_interval=25" in lines
    assert lines[starts[2] + 1:starts[3]] == ["update_only=true", "replace_allowed_ips=true"]
    assert lines[-1] == "remove=true"
    assert "preshared_key=" + "01" * 32 in lines


def test_backoff_is_capped_jittered_and_resets():
    b = Backoff(0.5, 8.0, random.Random(1))
    delays = [b.next_delay() for _ in range(30)]
    assert all(0 < d <= 8.0 for d in delays)
    assert max(delays[10:]) > 2.0  # grows towards the cap
    assert len(set(delays)) > 20  # jittered, not a fixed schedule
    b.reset()
    assert b.next_delay() <= 0.5
    assert all(80 <= jittered(100, 0.2, random.Random(i)) <= 120 for i in range(50))


def test_settings_from_defaults_env_and_flags():
    s = Settings.load({"resync_interval": 5}, env={"MESHGATE_GATEWAYD_ROUTE_TABLE": "0x1234",
                                                   "MESHGATE_GATEWAYD_BACKEND": "userspace"})
    assert s.resync_interval == 5.0 and s.route_table == 0x1234 and s.backend == "userspace"
    assert s.origins["resync_interval"] == "flag" and s.origins["route_table"] == "env"
    assert s.origins["fwmark"] == "default"
    with pytest.raises(ValueError):
        Settings.load({"backend": "iptables"}, env={})
    with pytest.raises(ValueError):
        Settings.load({"route_table": 254}, env={})


def test_wg_quick_config_split_for_wg_setconf():
    text = """
[Interface]
PrivateKey = cHJpdmF0ZS1rZXktcHJpdmF0ZS1rZXktcHJpdmF0ZSE=
Address = 100.64.0.5/32, fd00:64::5/128   # both families
DNS = 100.64.0.1, corp.example
mtu = 1380
SaveConfig = true

[Peer]
PublicKey = cHVibGljL2tleS9wdWJsaWMva2V5L3B1YmxpYy9rZSE=
PresharedKey = cHJlc2hhcmVkLWtleS1wcmVzaGFyZWQta2V5LXByZSE=
Endpoint = 203.0.113.1:51820
AllowedIPs = 100.64.0.0/24,198.51.100.0/24
AllowedIPs = 0.0.0.0/0
PersistentKeepalive = 25
"""
    c = parse_wg_quick(text)
    assert c.addresses == ("100.64.0.5/32", "fd00:64::5/128")
    assert c.dns == ("100.64.0.1", "corp.example") and c.mtu == 1380 and c.table == "auto"
    assert c.allowed_ips == ("100.64.0.0/24", "198.51.100.0/24", "0.0.0.0/0")
    assert c.wg_text.splitlines() == [
        "[Interface]",
        "PrivateKey = cHJpdmF0ZS1rZXktcHJpdmF0ZS1rZXktcHJpdmF0ZSE=",
        "[Peer]",
        "PublicKey = cHVibGljL2tleS9wdWJsaWMva2V5L3B1YmxpYy9rZSE=",
        "PresharedKey = cHJlc2hhcmVkLWtleS1wcmVzaGFyZWQta2V5LXByZSE=",
        "Endpoint = 203.0.113.1:51820",
        "AllowedIPs = 100.64.0.0/24,198.51.100.0/24",
        "AllowedIPs = 0.0.0.0/0",
        "PersistentKeepalive = 25",
    ]
    with pytest.raises(LabError, match="PostUp is not supported"):
        parse_wg_quick("[Interface]\nPostUp = touch /tmp/x\n")
    with pytest.raises(LabError, match="unknown section"):
        parse_wg_quick("[Peers]\n")
    with pytest.raises(LabError, match="Table"):
        parse_wg_quick("[Interface]\nTable = main\n")


def test_check_reports_readiness_from_the_agents_status(tmp_path, capsys):
    """`gatewayd check`, the health probe: ready once a state is applied and the
    last pass succeeded; stale when the agent stopped writing its status."""
    import json
    import os
    import time

    from meshgate.gatewayd.main import main

    def check(*extra):
        code = main(["check", "--state-dir", str(tmp_path), *extra])
        return code, capsys.readouterr().out.strip()

    assert check()[0] == 1 and "no readable status" in check()[1]
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"state": "waiting", "applied_revision": None}))
    assert check() == (1, "not ready: nothing applied yet (waiting)")
    status.write_text(json.dumps({"state": "retrying", "applied_revision": 7, "last_error": "nft: boom"}))
    assert check() == (1, "not ready: the last pass failed: nft: boom")
    status.write_text(json.dumps({"state": "applied", "applied_revision": 9}))
    assert check() == (0, "ok: revision 9 applied")
    old = time.time() - 600
    os.utime(status, (old, old))
    assert check("--max-age", "300")[0] == 1 and check()[0] == 0
