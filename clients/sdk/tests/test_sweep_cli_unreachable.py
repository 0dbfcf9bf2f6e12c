"""The CLI against an address where nothing answers: one line saying so and
naming the address, exit 1, instead of a bare DEADLINE_EXCEEDED after the
call's whole deadline (issue 15, item 10)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

MESHGATE = os.path.join(os.path.dirname(sys.executable), "meshgate")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args):
    return subprocess.run([MESHGATE, *args], capture_output=True, text=True, timeout=120)


def test_a_call_to_a_closed_port_says_nothing_answers_there(mgconfig):
    target = f"127.0.0.1:{closed_port()}"
    # The deadline is long: the message must come from the connection check, not from it.
    p = run("--target", target, "--timeout", "3600", "network", "list")
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"error: UNAVAILABLE: nothing answers at {target}"), p.stderr
    assert "Connection refused" in p.stderr and "DEADLINE_EXCEEDED" not in p.stderr


def test_watch_and_the_key_service_target_name_their_address(mgconfig, controlplane):
    target = f"127.0.0.1:{closed_port()}"
    p = run("--target", target, "--timeout", "3600", "watch")
    assert p.returncode == 1 and f"nothing answers at {target}" in p.stderr, p.stderr
    # A reachable control plane but a dead key service: the key service's address is named.
    ks = f"127.0.0.1:{closed_port()}"
    p = run("--target", controlplane.target, "--key-service-target", ks, "--timeout", "3600",
            "key", "get-key-authority")
    assert p.returncode == 1 and f"nothing answers at {ks}" in p.stderr, p.stderr


def test_a_context_sets_the_connect_timeout(mgconfig):
    target = f"127.0.0.1:{closed_port()}"
    run("context", "add", "dead", "--target", target, "--connect-timeout", "1", "--use")
    p = run("network", "list")
    assert p.returncode == 1 and f"nothing answers at {target}: no connection within 1s" in p.stderr, p.stderr
    bad = run("--connect-timeout", "0", "network", "list")
    assert bad.returncode == 2 and "connect-timeout must be positive" in bad.stderr


def test_a_missing_token_file_is_one_line(mgconfig, tmp_path):
    p = run("--target", "127.0.0.1:9", "--token-file", str(tmp_path / "gone"), "network", "list")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert f"token-file {tmp_path / 'gone'}: No such file or directory" in p.stderr
