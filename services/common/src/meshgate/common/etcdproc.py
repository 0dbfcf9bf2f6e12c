"""Run a single-member etcd on loopback, for tests and the dev stack.

The process is started with free loopback ports and a data directory of the
caller's choosing, waited for until `/health` answers, and stopped by its PID
(SIGTERM, then SIGKILL). Auto-compaction is on: after large deletes etcd 3.4
stays slow until it compacts.

With `cert_file` and `key_file` it serves clients over TLS (`https://`), and
with `client_ca_file` it requires client certificates signed by that CA
(`--client-cert-auth`). Its own health probe (and `etcdctl()`) then presents
`cert_file` as the client certificate, so that certificate must allow client
authentication too (as etcd's own gateway needs; `testing.write_etcd_pki`
makes one). `etcdctl()` runs etcdctl against it, for setting up users, roles
and authentication.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
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


def terminate(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """Stop a child by its PID: SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class EtcdProcess:
    data_dir: str
    client_port: int = 0
    peer_port: int = 0
    name: str = "meshgate-etcd"
    log_path: str = ""
    # Members of a cluster (`name=http://127.0.0.1:peer,...`); empty: this one alone.
    initial_cluster: str = ""
    # TLS for clients (PEM files): see the module docstring.
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    # More etcd flags, e.g. ["--auth-token-ttl=2"].
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def tls(self) -> bool:
        return bool(self.cert_file)

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 30, wait: bool = True) -> EtcdProcess:
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
        if bool(self.cert_file) != bool(self.key_file) or (self.client_ca_file and not self.cert_file):
            raise RuntimeError("EtcdProcess: TLS needs both cert_file and key_file, and client_ca_file needs them")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        client = self.client_url
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
        if self.tls:
            cmd += [f"--cert-file={self.cert_file}", f"--key-file={self.key_file}"]
        if self.client_ca_file:
            cmd += [f"--trusted-ca-file={self.client_ca_file}", "--client-cert-auth"]
        cmd += self.extra_args
        self.log_path = self.log_path or os.path.join(self.data_dir, "etcd.log")
        logf = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        logf.close()
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30) -> EtcdProcess:
        """Until `/health` says true (for a cluster member: once it has a quorum)."""
        assert self.proc is not None
        context = None
        if self.tls:
            # Our own process on loopback: the probe wants an answer, not a
            # verified name; it shows etcd a client certificate when asked.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.load_cert_chain(self.cert_file, self.key_file)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.client_url}/health", timeout=1, context=context) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy in {timeout}s; see {self.log_path}")

    def etcdctl(self, *args: str, user: str = "", stdin: str | None = None, timeout: float = 20) -> str:
        """Run `etcdctl` against this etcd (as `user`, `name:password`, when
        given); its output, or RuntimeError with etcdctl's message."""
        binary = shutil.which("etcdctl") or "/usr/bin/etcdctl"
        if not os.path.exists(binary):
            raise RuntimeError("etcdctl not found: install the Debian package etcd-client (make install)")
        cmd = [binary, f"--endpoints={self.client_url}"]
        if self.tls:
            # as the health probe: loopback, our own process
            cmd += ["--insecure-skip-tls-verify", f"--cert={self.cert_file}", f"--key={self.key_file}"]
        if user:
            cmd.append(f"--user={user}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        env["ETCDCTL_API"] = "3"
        r = subprocess.run([*cmd, *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"etcdctl {args[0] if args else ''} failed: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def stop(self, timeout: float = 10) -> None:
        terminate(self.proc, timeout)


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
