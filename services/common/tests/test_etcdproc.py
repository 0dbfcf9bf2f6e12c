"""EtcdProcess: a real etcd on free loopback ports, stopped by PID with nothing left behind."""

from __future__ import annotations

import os

import aetcd
import pytest

from meshgate.common.etcd import Etcd
from meshgate.common.etcdproc import EtcdProcess, free_port


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_start_serve_stop_leaves_no_process(tmp_path):
    proc = EtcdProcess(str(tmp_path / "data"))
    try:
        proc.start()
        pid = proc.proc.pid
        assert pid_alive(pid)
        host, port = proc.endpoint.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) == proc.client_port != proc.peer_port
        client = Etcd(proc.endpoint, "/p")
        await client.connect()
        try:
            await client.put(client.key("k"), b"v")
            assert (await client.get(client.key("k"))).value == b"v"
        finally:
            await client.close()
        assert oct(os.stat(tmp_path / "data").st_mode & 0o777) == oct(0o700)
    finally:
        proc.stop()
    assert proc.proc.returncode is not None
    assert not pid_alive(pid)
    proc.stop()  # idempotent


async def test_data_survives_restart(tmp_path):
    data = str(tmp_path / "data")
    first = EtcdProcess(data)
    try:
        first.start()
        c = aetcd.Client(host="127.0.0.1", port=first.client_port)
        await c.put(b"/keep", b"1")
        await c.close()
    finally:
        first.stop()
    second = EtcdProcess(data)
    try:
        second.start()
        c = aetcd.Client(host="127.0.0.1", port=second.client_port)
        assert (await c.get(b"/keep")).value == b"1"
        await c.close()
    finally:
        second.stop()
    assert not pid_alive(first.proc.pid) and not pid_alive(second.proc.pid)


@pytest.mark.parametrize("which", ["client_port", "peer_port"])
def test_taken_port_is_refused(etcd_server, tmp_path, which):
    """With its port taken, the health probe would reach the other etcd: start() must refuse."""
    proc = EtcdProcess(str(tmp_path / "data"), **{which: etcd_server.client_port})
    with pytest.raises(RuntimeError, match="already in use"):
        proc.start()
    assert proc.proc is None  # refused before starting anything


def test_early_exit_raises_and_leaves_no_process(tmp_path):
    """etcd that dies on start (a data dir it cannot use) is reported, not waited on."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "member").write_text("not a directory")
    proc = EtcdProcess(str(tmp_path / "data"))
    with pytest.raises(RuntimeError, match="etcd exited"):
        proc.start()
    assert proc.proc.returncode is not None
    assert not pid_alive(proc.proc.pid)
    assert os.path.exists(proc.log_path)


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
