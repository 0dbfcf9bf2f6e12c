"""Run a single-member etcd on loopback, for tests and the dev stack.

The process is started with free loopback ports and a data directory of the
caller's choosing, waited for until `/health` answers, and stopped by its PID
(SIGTERM, then SIGKILL). Auto-compaction is on: after large deletes etcd 3.4
stays slow until it compacts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import zlib
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@dataclass
class EtcdProcess:
    data_dir: str
    client_port: int = 0
    peer_port: int = 0
    name: str = "meshgate-etcd"
    log_path: str = ""
    # Members of a cluster (`name=http://127.0.0.1:peer,...`); empty: this one alone.
    initial_cluster: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 30, wait: bool = True) -> "EtcdProcess":
        binary = shutil.which("etcd") or "/usr/bin/etcd"
        if not os.path.exists(binary):
            raise RuntimeError("etcd not found: install the Debian package etcd-server (make install)")
        self.client_port = self.client_port or free_port()
        self.peer_port = self.peer_port or free_port()
        # Checked first because the health probe cannot tell etcds apart: with
        # the port taken, another etcd would answer it while this one exits.
        for port in (self.client_port, self.peer_port):
            if port_in_use(port):
                raise RuntimeError(f"cannot start etcd: 127.0.0.1:{port} is already in use")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={peer}'}",
            "--initial-cluster-state=new",
            # one token for every member of a cluster (etcd refuses peers whose differs)
            f"--initial-cluster-token=meshgate-{zlib.crc32((self.initial_cluster or self.name).encode()):08x}",
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1h",
            "--logger=zap",
            "--log-level=warn",
        ]
        self.log_path = self.log_path or os.path.join(self.data_dir, "etcd.log")
        logf = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        logf.close()
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30) -> "EtcdProcess":
        """Until `/health` says true (for a cluster member: once it has a quorum)."""
        assert self.proc is not None
        client = f"http://127.0.0.1:{self.client_port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy in {timeout}s; see {self.log_path}")

    def stop(self, timeout: float = 10) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_cluster(base_dir: str, members: int = 3, timeout: float = 30) -> list[EtcdProcess]:
    """An etcd cluster of `members` on loopback, each with its own data
    directory under `base_dir`; every member started before any is waited for
    (a member is healthy only once a quorum is up)."""
    procs = [EtcdProcess(os.path.join(base_dir, f"m{i}"), client_port=free_port(), peer_port=free_port(),
                         name=f"m{i}") for i in range(members)]
    cluster = ",".join(f"{p.name}=http://127.0.0.1:{p.peer_port}" for p in procs)
    try:
        for p in procs:
            p.initial_cluster = cluster
            p.start(timeout, wait=False)
        for p in procs:
            p.wait_healthy(timeout)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs
