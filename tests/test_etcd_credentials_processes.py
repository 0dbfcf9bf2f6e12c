"""The control plane and the key service, as real processes, against an etcd
that serves TLS only, requires client certificates (`--client-cert-auth`)
and has authentication enabled through etcdctl:

- with the CA, a client certificate and a user with its password file both
  start; an API call works (a network created and read back through the
  control plane, whose reads come from its watch-fed cache), and a watch on
  the same etcd through the secure adapter sees the write;
- without the client certificate, without the CA, with a wrong password or
  without a user, each service exits non-zero at start with one line naming
  what to configure (no traceback, no wait), before it serves anything.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid

import grpc
import pytest

from meshgate.api.v1 import network_pb2, network_pb2_grpc
from meshgate.common import etcdwatch
from meshgate.common.etcd import Etcd, EtcdCredentials, prefix_end
from meshgate.common.etcdproc import EtcdProcess
from meshgate.common.testing import (
    ServiceProcess,
    enable_etcd_auth,
    require_binaries,
    write_etcd_pki,
    write_kek_file,
    write_password_file,
)

BIN = os.path.dirname(sys.executable)
USER, PASSWORD = "meshgate", "etcd-pw-for-processes"
PREFIX = "/mg-secure"


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory):
    require_binaries("etcd", "etcdctl", packages="etcd-server, etcd-client")
    base = tmp_path_factory.mktemp("etcd-credentials")
    pki = write_etcd_pki(base, client_cn="meshgate-client")
    proc = EtcdProcess(str(base / "data"), cert_file=pki["etcd.pem"], key_file=pki["etcd.key"],
                       client_ca_file=pki["ca.pem"])
    proc.start()
    try:
        enable_etcd_auth(proc, USER, PASSWORD, PREFIX, "root-pw")
        pki["password"] = write_password_file(base / "etcd-password", PASSWORD)
        pki["wrong-password"] = write_password_file(base / "wrong-password", "not-the-password")
        pki["kek"] = str(base / "kek")
        write_kek_file(pki["kek"])
        yield proc, pki
    finally:
        proc.stop()
        shutil.rmtree(base, ignore_errors=True)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def etcd_args(proc, pki, prefix: str, *, ca=True, cert=True, user=True, password="password") -> list[str]:
    args = ["--etcd-endpoints", proc.endpoint, "--etcd-prefix", prefix]
    if ca:
        args += ["--etcd-ca", pki["ca.pem"]]
    if cert:
        args += ["--etcd-cert", pki["client.pem"], "--etcd-key", pki["client.key"]]
    if user:
        args += ["--etcd-user", USER, "--etcd-password-file", pki[password]]
    return args


def service_args(service: str, pki) -> list[str]:
    if service == "keyservice":
        # loopback, without mTLS for its own callers: this test is about etcd
        return ["--insecure", "--kek-file", pki["kek"], "--scheduler-interval", "3600"]
    return []


async def test_services_work_against_tls_client_certs_and_passwords(secure_etcd):
    proc, pki = secure_etcd
    prefix = f"{PREFIX}/{uuid.uuid4().hex[:8]}"
    ks = ServiceProcess("meshgate-keyservice", [*etcd_args(proc, pki, prefix), *service_args("keyservice", pki)])
    cp = ServiceProcess("meshgate-controlplane", etcd_args(proc, pki, prefix))
    creds = EtcdCredentials(ca=read(pki["ca.pem"]), cert=read(pki["client.pem"]), key=read(pki["client.key"]),
                            user=USER, password=PASSWORD)
    etcd = Etcd(proc.endpoint, prefix, credentials=creds)
    watch_task = None
    try:
        ks.start()
        cp.start()
        assert cp.admin_token, "the control plane bootstrapped its admin token in the secure etcd"
        await etcd.wait_usable(10)
        rev = await etcd.revision()
        seen: list[bytes] = []

        async def watch():
            start = etcd.prefix + b"/"
            async for batch in etcdwatch.watch(etcd, start, prefix_end(start), rev + 1):
                seen.extend(e.key for e in batch.events if e.put)

        watch_task = asyncio.create_task(watch())
        async with grpc.aio.insecure_channel(cp.target) as ch:
            nets = network_pb2_grpc.NetworkServiceStub(ch)
            made = await nets.CreateNetwork(network_pb2.CreateNetworkRequest(
                network_id="prod", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")),
                metadata=cp.auth_metadata, timeout=10)
            got = await nets.GetNetwork(network_pb2.GetNetworkRequest(name="networks/prod"),
                                        metadata=cp.auth_metadata, timeout=10)
        assert got.ipv4_cidr == "100.64.0.0/24" and got.etag == made.etag
        deadline = time.monotonic() + 5
        while not any(b"prod" in k for k in seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert any(b"prod" in k for k in seen), seen
        assert any(b"prod" in k for k in await etcd.dump())
        for p in (ks, cp):
            assert p.proc.poll() is None, p.log()
    finally:
        if watch_task is not None:
            watch_task.cancel()
            await asyncio.gather(watch_task, return_exceptions=True)
        await etcd.close()
        cp.stop()
        ks.stop()
    for p in (ks, cp):
        assert "Traceback" not in p.log(tail=0), p.log()
        assert PASSWORD not in p.log(tail=0)


CASES = {
    # case: (etcd_args overrides, what the one line must say)
    "no-client-cert": ({"cert": False}, ["requires a client certificate", "set --etcd-cert and --etcd-key"]),
    "no-ca": ({"ca": False, "cert": False}, ["probably serves TLS", "set --etcd-ca"]),
    "wrong-password": ({"password": "wrong-password"},
                       [f"refused user {USER!r}: wrong password in --etcd-password-file"]),
    "no-user": ({"user": False}, ["has authentication enabled and no --etcd-user is set",
                                  "set --etcd-user and --etcd-password-file"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_missing_credential_is_a_clear_exit(secure_etcd, case):
    proc, pki = secure_etcd
    overrides, expected = CASES[case]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_")}
    runs = {}
    # Both services at once (they do not share anything but etcd).
    for service in ("controlplane", "keyservice"):
        argv = [os.path.join(BIN, f"meshgate-{service}"), "--listen", "127.0.0.1:0",
                *etcd_args(proc, pki, PREFIX, **overrides), *service_args(service, pki)]
        runs[service] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out = {s: p.communicate(timeout=30) for s, p in runs.items()}
    finally:
        for p in runs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for service, (stdout, stderr) in out.items():
        assert "waiting for etcd" not in stderr, (service, "a refusal must not be waited out like an outage")
        assert runs[service].returncode not in (0, None), (service, stderr)
        assert "Traceback" not in stderr, (service, stderr)
        # gRPC's core may log TLS alerts first; the last line is ours.
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"etcd at {proc.endpoint} "), (service, stderr)
        for part in expected:
            assert part in last, (service, last)
        assert PASSWORD not in stderr + stdout and "not-the-password" not in stderr + stdout
