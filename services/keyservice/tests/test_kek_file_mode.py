"""Small hardening of the key service's start: a KEK file others may read is
refused, so is a KEK on the command line (visible in `ps`), and plaintext on a
non-loopback address (`--insecure`) is warned about on every start.

Through the real entry point (`meshgate-keyservice` processes that stop at
their first refusal, before they connect to etcd or bind anything), plus the
permission rule itself on crafted `stat` results (the Kubernetes Secret volume
layout cannot be made here without a second user)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from meshgate.common.testing import write_kek_file
from meshgate.keyservice.sealing import KekError, Keyring, check_private_file, kek_line

BIN = os.path.dirname(sys.executable)
KEYSERVICE = shutil.which("meshgate-keyservice", path=BIN) or os.path.join(BIN, "meshgate-keyservice")


def start(*args: str) -> subprocess.CompletedProcess:
    """A key service start that must stop before touching etcd (its endpoint is
    a closed port, so one that got that far would fail differently)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_KEYSERVICE_")}
    return subprocess.run(
        [KEYSERVICE, "--etcd-endpoints", "127.0.0.1:9", "--listen", "127.0.0.1:0", "--insecure", *args],
        check=False, capture_output=True, text=True, timeout=60, env=env)


def test_write_kek_file_writes_0600(tmp_path):
    path = tmp_path / "kek"
    write_kek_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode, who", [(0o644, "every user"), (0o604, "every user"), (0o640, "its group"),
                                       (0o660, "its group")])
def test_a_kek_file_others_may_read_is_refused_at_start(tmp_path, mode, who):
    path = tmp_path / "kek"
    write_kek_file(path)
    os.chmod(path, mode)
    r = start("--kek-file", str(path))
    assert r.returncode != 0
    assert f"refusing the KEK file {path}: it is accessible by {who}" in r.stderr
    assert f"chmod 600 {path}" in r.stderr
    assert path.read_text().split(":")[1].strip() not in r.stderr + r.stdout  # never the key


def test_a_kek_on_the_command_line_is_refused(tmp_path):
    line = kek_line("k1")
    r = start("--kek", line)
    assert r.returncode != 0 and "refusing a KEK given on the command line (--kek)" in r.stderr
    assert line.split(":")[1] not in r.stderr + r.stdout
    r = start(f"--kek={line}")
    assert r.returncode != 0 and "refusing a KEK given on the command line" in r.stderr


def test_insecure_on_a_non_loopback_address_warns_on_every_start(tmp_path):
    path = tmp_path / "kek"
    write_kek_file(path)
    os.chmod(path, 0o644)  # so the start stops right after the warning, before binding anything
    for _ in range(2):
        r = subprocess.run(
            [KEYSERVICE, "--etcd-endpoints", "127.0.0.1:9", "--listen", "192.0.2.1:0", "--insecure",
             "--kek-file", str(path)], check=False, capture_output=True, text=True, timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_KEYSERVICE_")})
        assert "INSECURE: serving plaintext on non-loopback address(es) 192.0.2.1:0 (--insecure)" in r.stderr
        assert r.stderr.count("INSECURE: serving plaintext") == 1  # once per start, not per check


def fake_stat(mode: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 1, 1, 1, uid, gid, 60, 0, 0, 0))


def test_the_permission_rule(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 10001)
    monkeypatch.setattr(os, "getegid", lambda: 10001)
    monkeypatch.setattr(os, "getgroups", lambda: [10001])
    check_private_file("k", fake_stat(0o600, 10001, 10001))
    check_private_file("k", fake_stat(0o400, 10001, 10001))
    check_private_file("k", fake_stat(0o600, 0, 0))  # root's file (we can read it: root made it ours)
    # a Kubernetes Secret volume with fsGroup: root's file, group-readable by our own group
    check_private_file("k", fake_stat(0o440, 0, 10001))
    for mode, uid, gid, why in [
        (0o640, 10001, 10001, "its group"),     # our own file: no group access
        (0o440, 0, 20002, "its group"),         # root's, but another group
        (0o460, 0, 10001, "its group"),         # group-writable
        (0o444, 0, 10001, "every user"),
        (0o600, 20002, 10001, "owned by uid 20002"),
    ]:
        with pytest.raises(KekError, match=why):
            check_private_file("k", fake_stat(mode, uid, gid))


def test_only_the_service_checks_the_mode(tmp_path):
    path = tmp_path / "kek"
    path.write_text(kek_line("k1") + "\n")
    os.chmod(path, 0o644)
    assert Keyring.from_config(str(path), "").ids == ["k1"]  # tools and tests reading a KEK file
    with pytest.raises(KekError, match="accessible by every user"):
        Keyring.from_config(str(path), "", private_file=True)
