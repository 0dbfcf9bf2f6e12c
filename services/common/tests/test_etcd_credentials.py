"""etcd over TLS with a client certificate and etcd's own user/password
authentication, against real etcds started here (no mocks):

- the options: incomplete combinations and bad files are clear exits, and a
  password file others may read is refused;
- the adapter against an etcd with `--client-cert-auth` and authentication
  enabled through etcdctl: KV calls, transactions, leases, `etcdwatch` and
  aetcd's watch all carry the token (the client certificate's CN is no etcd
  user, so nothing would work without it);
- the first contact names what is missing: no client certificate, no CA, a
  wrong CA, a certificate from another CA, a wrong password, no user, a user
  without a role on the prefix, a user for an etcd without authentication,
  TLS to a plaintext etcd; an etcd that cannot be reached is an outage, not
  a refusal;
- tokens that expire (`--auth-token-ttl=1`): every path authenticates again
  and carries on; concurrent calls share one re-authentication.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time

import pytest

from meshgate.common import config, etcdwatch
from meshgate.common.etcd import (
    Etcd,
    EtcdCredentials,
    EtcdRefused,
    EtcdUnavailable,
    etcd_credentials,
    read_password_file,
)
from meshgate.common.etcdproc import EtcdProcess, free_port
from meshgate.common.testing import (
    enable_etcd_auth,
    require_binaries,
    write_etcd_pki,
    write_password_file,
)

USER, PASSWORD, ROOT_PASSWORD = "meshgate", "s3cret-etcd-pw", "root-pw"
PREFIX = "/secure"


def need_etcd_tools() -> None:
    require_binaries("etcd", "etcdctl", packages="etcd-server, etcd-client")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def start_secure_etcd(base, *extra: str) -> tuple[EtcdProcess, dict[str, str]]:
    """TLS, --client-cert-auth, authentication on, `USER` with readwrite on PREFIX/."""
    need_etcd_tools()
    os.makedirs(base, exist_ok=True)
    pki = write_etcd_pki(base, client_cn="meshgate-client")
    proc = EtcdProcess(os.path.join(base, "data"), cert_file=pki["etcd.pem"], key_file=pki["etcd.key"],
                       client_ca_file=pki["ca.pem"], extra_args=list(extra))
    proc.start()
    try:
        enable_etcd_auth(proc, USER, PASSWORD, PREFIX, ROOT_PASSWORD)
    except BaseException:
        proc.stop()
        raise
    return proc, pki


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory):
    proc, pki = start_secure_etcd(str(tmp_path_factory.mktemp("secure-etcd")))
    try:
        yield proc, pki
    finally:
        proc.stop()
        shutil.rmtree(os.path.dirname(proc.data_dir), ignore_errors=True)


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    return write_etcd_pki(tmp_path_factory.mktemp("other-ca"), client_cn=USER)


def full_credentials(pki, user: str = USER, password: str = PASSWORD) -> EtcdCredentials:
    return EtcdCredentials(ca=read(pki["ca.pem"]), cert=read(pki["client.pem"]), key=read(pki["client.key"]),
                           user=user, password=password, ca_path=pki["ca.pem"], cert_path=pki["client.pem"])


# ---------------------------------------------------------------- options


def load(argv):
    return config.load(config.ServerConfig, list(argv), prog="t", environ={}, env_prefix="MESHGATE_T_").config


@pytest.mark.parametrize("argv, missing", [
    (["--etcd-ca", "ca.pem", "--etcd-cert", "c.pem"], "--etcd-key"),
    (["--etcd-ca", "ca.pem", "--etcd-key", "c.key"], "--etcd-cert"),
    (["--etcd-cert", "c.pem", "--etcd-key", "c.key"], "--etcd-ca"),
    (["--etcd-user", "u"], "--etcd-password-file"),
    (["--etcd-password-file", "pw"], "--etcd-user"),
], ids=["cert-without-key", "key-without-cert", "cert-without-ca", "user-without-password", "password-without-user"])
def test_incomplete_combination_is_a_clear_exit(argv, missing):
    with pytest.raises(SystemExit) as e:
        etcd_credentials(load(argv))
    text = str(e.value.code)
    assert text.split(" needs ")[1].startswith(missing), text
    # checked before any file is opened: none of these exist
    assert "cannot read" not in text


def test_options_read_files_and_env(tmp_path, other_pki):
    pw = write_password_file(tmp_path / "pw", "pa ss\tword")
    env = {"MESHGATE_T_ETCD_CA": other_pki["ca.pem"], "MESHGATE_T_ETCD_CERT": other_pki["client.pem"],
           "MESHGATE_T_ETCD_KEY": other_pki["client.key"], "MESHGATE_T_ETCD_USER": "u",
           "MESHGATE_T_ETCD_PASSWORD_FILE": pw}
    cfg = config.load(config.ServerConfig, [], prog="t", environ=env, env_prefix="MESHGATE_T_").config
    creds = etcd_credentials(cfg)
    assert creds.tls and creds.ca == read(other_pki["ca.pem"]) and creds.key == read(other_pki["client.key"])
    assert (creds.user, creds.password) == ("u", "pa ss\tword")  # the line, without its newline
    assert creds.cert_common_name() == USER
    assert "pa ss" not in repr(creds) and "PRIVATE" not in repr(creds)
    # the password is never an option of its own
    assert not any("password" in f and not f.endswith("_file") for f in vars(cfg))


@pytest.mark.parametrize("option, content", [
    ("--etcd-ca", b"not a certificate\n"), ("--etcd-cert", b"nope"), ("--etcd-key", b"-----BEGIN CERTIFICATE-----")])
def test_a_file_holding_the_wrong_thing_is_a_clear_exit(tmp_path, other_pki, option, content):
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    files = {"--etcd-ca": other_pki["ca.pem"], "--etcd-cert": other_pki["client.pem"],
             "--etcd-key": other_pki["client.key"], option: str(bad)}
    with pytest.raises(SystemExit) as e:
        etcd_credentials(load([a for kv in files.items() for a in kv]))
    assert str(e.value.code).startswith(f"{option}: {bad} holds no PEM")


def test_a_missing_file_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit) as e:
        etcd_credentials(load(["--etcd-ca", str(tmp_path / "nope.pem")]))
    assert str(e.value.code) == f"--etcd-ca: cannot read {tmp_path / 'nope.pem'}: No such file or directory"


@pytest.mark.parametrize("mode, refused", [(0o600, False), (0o400, False), (0o644, True), (0o604, True),
                                           (0o620, True), (0o660, True)])
def test_password_file_open_to_others_is_refused(tmp_path, mode, refused):
    p = write_password_file(tmp_path / "pw", "x")
    os.chmod(p, mode)
    if not refused:
        assert read_password_file(p) == "x"
        return
    with pytest.raises(SystemExit) as e:
        read_password_file(p)
    assert "is open to" in str(e.value.code) and f"(mode {mode:04o})" in str(e.value.code)
    assert "chmod 600" in str(e.value.code)


@pytest.mark.root
def test_group_readable_password_file_only_when_root_owns_it(tmp_path):
    """0640 passes for root's file (a Kubernetes Secret mounted with fsGroup),
    not for anyone else's."""
    p = write_password_file(tmp_path / "pw", "x")
    os.chmod(p, 0o640)
    os.chown(p, 0, -1)
    assert read_password_file(p) == "x"
    os.chown(p, 12345, -1)
    with pytest.raises(SystemExit, match=r"open to its group \(mode 0640\)"):
        read_password_file(p)


def test_empty_password_file_is_refused(tmp_path):
    p = tmp_path / "pw"
    p.touch(mode=0o600)
    with pytest.raises(SystemExit, match="is empty"):
        read_password_file(str(p))


# ---------------------------------------------------------------- a working client


async def test_every_path_works_over_tls_with_a_password(secure_etcd):
    proc, pki = secure_etcd
    etcd = Etcd(proc.endpoint, PREFIX, credentials=full_credentials(pki))
    watch_task = None
    try:
        await etcd.wait_usable(10)
        assert etcd.client.metadata and etcd.client.metadata[0][0] == "token"
        rev = await etcd.put(etcd.key("a"), b"1")
        assert (await etcd.get(etcd.key("a"))).value == b"1"
        ok, _, rev2 = await etcd.txn([etcd.txn_ops.version(etcd.key("a")) > 0],
                                     [etcd.txn_ops.put(etcd.key("b"), b"2")])
        assert ok and rev2 > rev
        assert await etcd.count_prefix(etcd.key("")) == 2
        assert await etcd.revision() == rev2
        # leases and puts under them, through aetcd's own methods
        lease = await etcd.client.lease(30)
        await etcd.client.put(etcd.key("leased"), b"x", lease=lease)
        assert (await lease.refresh()).TTL > 0
        await etcd.client.revoke_lease(lease.id)
        assert await etcd.get(etcd.key("leased")) is None

        got: list = []

        async def consume():
            async for batch in etcdwatch.watch(etcd, etcd.key(""), etcd.key("\xff"), rev2 + 1):
                got.extend(batch.events)

        watch_task = asyncio.create_task(consume())
        aw = await etcd.client.watch(etcd.key("w"))
        await etcd.put(etcd.key("w"), b"3")
        async for event in aw:
            assert event.kv.value == b"3"
            break
        await aw.cancel()
        deadline = time.monotonic() + 5
        while not any(e.key == etcd.key("w") for e in got) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert [e.key for e in got if e.put][-1] == etcd.key("w")
    finally:
        if watch_task is not None:
            watch_task.cancel()
            await asyncio.gather(watch_task, return_exceptions=True)
        await etcd.close()


async def test_several_endpoints_over_tls(secure_etcd):
    """An `ipv4:a,b` target has no name to verify: the first endpoint's is used."""
    proc, pki = secure_etcd
    etcd = Etcd(f"{proc.endpoint},{proc.endpoint}", PREFIX, credentials=full_credentials(pki))
    try:
        await etcd.wait_usable(10)
        await etcd.put(etcd.key("multi"), b"1")
    finally:
        await etcd.close()


async def test_aetcd_watch_keeps_its_semantics(secure_etcd):
    """`Client.watch` replaces aetcd's (to follow re-authentication): start
    revisions, prev_kv, cancel and compaction behave as aetcd's did (the
    control plane's EventService relies on them). (This module's own etcd:
    it compacts.)"""
    proc, pki = secure_etcd
    etcd = Etcd(proc.endpoint, PREFIX, credentials=full_credentials(pki))
    try:
        await etcd.wait_usable(10)
        r1 = await etcd.put(etcd.key("x"), b"1")
        await etcd.put(etcd.key("x"), b"2")
        w = await etcd.client.watch(etcd.key("x"), start_revision=r1, prev_kv=True)
        seen = []
        async for ev in w:
            seen.append((ev.kv.value, ev.prev_kv.value if ev.prev_kv else None))
            if len(seen) == 2:
                break
        await w.cancel()
        assert seen == [(b"1", b""), (b"2", b"1")]  # aetcd: an empty prev_kv for a creation
        async for _ in w:
            raise AssertionError("a cancelled watch yields nothing")
        rev = await etcd.put(etcd.key("y"), b"3")
        await etcd.client.compact(rev)
        import aetcd.exceptions

        with pytest.raises(aetcd.exceptions.RevisionCompactedError):
            w = await etcd.client.watch(etcd.key("x"), start_revision=r1)
            async for _ in w:
                pass
    finally:
        await etcd.close()


# ---------------------------------------------------------------- what the first contact says


def refusal_cases(pki, other):
    ca, cert, key = read(pki["ca.pem"]), read(pki["client.pem"]), read(pki["client.key"])
    return {
        "no-client-cert": (EtcdCredentials(ca=ca, user=USER, password=PASSWORD),
                           ["requires a client certificate", "--etcd-cert and --etcd-key"]),
        "no-ca": (EtcdCredentials(user=USER, password=PASSWORD),
                  ["probably serves TLS", "set --etcd-ca"]),
        "wrong-ca": (EtcdCredentials(ca=read(other["ca.pem"]), cert=cert, key=key, user=USER, password=PASSWORD,
                                     ca_path=other["ca.pem"]),
                     [f"--etcd-ca ({other['ca.pem']}) did not verify"]),
        "cert-of-another-ca": (EtcdCredentials(ca=ca, cert=read(other["client.pem"]), key=read(other["client.key"]),
                                               user=USER, password=PASSWORD, cert_path=other["client.pem"]),
                               [f"refused the client certificate --etcd-cert ({other['client.pem']})",
                                "--trusted-ca-file"]),
        "wrong-password": (EtcdCredentials(ca=ca, cert=cert, key=key, user=USER, password="Wr0ng-Pass",
                                           password_path="/run/pw"),
                           [f"refused user {USER!r}: wrong password in --etcd-password-file (/run/pw)"]),
        "no-user": (EtcdCredentials(ca=ca, cert=cert, key=key),
                    ["authentication enabled and no --etcd-user is set", "--etcd-password-file",
                     "CN ('meshgate-client')"]),
    }


@pytest.mark.parametrize("case", ["no-client-cert", "no-ca", "wrong-ca", "cert-of-another-ca", "wrong-password",
                                  "no-user"])
async def test_first_contact_names_what_is_missing(secure_etcd, other_pki, case, caplog):
    proc, pki = secure_etcd
    creds, expected = refusal_cases(pki, other_pki)[case]
    etcd = Etcd(proc.endpoint, PREFIX, credentials=creds)
    try:
        with pytest.raises(EtcdRefused) as e:
            await etcd.wait_usable(20)
    finally:
        await etcd.close()
    # A refusal is not waited out like an outage: no "waiting for etcd" at all.
    assert not [r for r in caplog.records if r.getMessage().startswith("waiting for etcd")]
    text = str(e.value)
    assert text.startswith(f"etcd at {proc.endpoint} ")
    for part in expected:
        assert part in text, text
    assert PASSWORD not in text and "Wr0ng-Pass" not in text


async def test_a_user_without_a_role_on_the_prefix(secure_etcd):
    proc, pki = secure_etcd
    etcd = Etcd(proc.endpoint, "/elsewhere", credentials=full_credentials(pki))
    try:
        with pytest.raises(EtcdRefused) as e:
            await etcd.wait_usable(10)
    finally:
        await etcd.close()
    assert f"denied user {USER!r} access to /elsewhere/" in str(e.value)
    assert "readwrite" in str(e.value)


async def test_a_read_only_role_is_refused_at_first_contact(secure_etcd):
    """The check writes nothing but needs write permission: a read-only user
    would otherwise start and fail every write."""
    proc, pki = secure_etcd
    root = f"root:{ROOT_PASSWORD}"
    proc.etcdctl("user", "add", "reader", "--interactive=false", stdin="rpw\n", user=root)
    proc.etcdctl("role", "add", "reader", user=root)
    proc.etcdctl("role", "grant-permission", "reader", "--prefix=true", "read", PREFIX + "/", user=root)
    proc.etcdctl("user", "grant-role", "reader", "reader", user=root)
    etcd = Etcd(proc.endpoint, PREFIX, credentials=full_credentials(pki, "reader", "rpw"))
    try:
        with pytest.raises(EtcdRefused, match="denied user 'reader' access"):
            await etcd.wait_usable(10)
        assert await etcd.dump() is not None  # reading is allowed
    finally:
        await etcd.close()


async def test_user_for_an_etcd_without_authentication(etcd_server):
    etcd = Etcd(etcd_server.endpoint, "/plain", credentials=EtcdCredentials(user=USER, password=PASSWORD))
    try:
        with pytest.raises(EtcdRefused, match="has authentication disabled, yet --etcd-user is set"):
            await etcd.wait_usable(10)
    finally:
        await etcd.close()


async def test_tls_to_a_plaintext_etcd(etcd_server, other_pki):
    etcd = Etcd(etcd_server.endpoint, "/plain", credentials=EtcdCredentials(ca=read(other_pki["ca.pem"])))
    try:
        with pytest.raises(EtcdRefused, match="does not speak TLS"):
            await etcd.wait_usable(10)
    finally:
        await etcd.close()


async def test_unreachable_etcd_is_an_outage_waited_for_then_reported(other_pki, caplog):
    port = free_port()
    etcd = Etcd(f"127.0.0.1:{port}", PREFIX, credentials=EtcdCredentials(ca=read(other_pki["ca.pem"])))
    try:
        with pytest.raises(EtcdUnavailable) as e:
            await etcd.wait_usable(1.0)
    finally:
        await etcd.close()
    assert not isinstance(e.value, EtcdRefused)
    # An outage is waited for (said once), then reported.
    assert len([r for r in caplog.records if r.getMessage().startswith("waiting for etcd")]) == 1
    assert f"etcd at 127.0.0.1:{port} could not be reached for 1s" in str(e.value)


# ---------------------------------------------------------------- tokens that expire


TTL = 1  # etcd --auth-token-ttl (seconds unused); its keeper checks every second
IDLE = TTL + 1.5


@pytest.fixture(scope="module")
def short_token_etcd(tmp_path_factory):
    proc, pki = start_secure_etcd(str(tmp_path_factory.mktemp("ttl-etcd")), "--auth-token=simple",
                                  f"--auth-token-ttl={TTL}")
    try:
        yield proc, pki
    finally:
        proc.stop()
        shutil.rmtree(os.path.dirname(proc.data_dir), ignore_errors=True)


class Renewals(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record) -> None:
        if "authenticating again" in record.getMessage():
            self.count += 1


@pytest.fixture
def renewals():
    h = Renewals()
    logger = logging.getLogger("meshgate.common.etcd")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(h)
    yield h
    logger.removeHandler(h)
    logger.setLevel(old)


async def test_expired_tokens_are_renewed_on_every_path(short_token_etcd, renewals):
    """One client per path, all idle past the TTL together: each path meets
    its own expired token, authenticates again once and carries on."""
    proc, pki = short_token_etcd
    paths = ["kv", "txn", "lease", "etcdwatch", "aetcd-watch", "concurrent"]
    clients = {p: Etcd(proc.endpoint, PREFIX, credentials=full_credentials(pki)) for p in paths}
    tasks: list[asyncio.Task] = []
    try:
        for c in clients.values():
            await c.wait_usable(10)
        etcd = clients["kv"]
        rev = await etcd.put(etcd.key("k"), b"0")
        tokens = {p: c.client.metadata for p, c in clients.items()}

        async def consume(client, into, start_rev):
            async for batch in etcdwatch.watch(client, etcd.key(""), etcd.key("\xff"), start_rev):
                into.extend(batch.events)

        # A watch made now keeps delivering after its token expired.
        early: list = []
        tasks.append(asyncio.create_task(consume(clients["etcdwatch"], early, rev + 1)))
        await asyncio.sleep(0.2)
        renewals.count = 0

        await asyncio.sleep(IDLE)

        assert (await etcd.get(etcd.key("k"))).value == b"0"
        c = clients["txn"]
        ok, _, _ = await c.txn([c.txn_ops.value(c.key("k")) == b"0"], [c.txn_ops.put(c.key("k"), b"1")])
        assert ok
        c = clients["lease"]
        lease = await c.client.lease(30)  # aetcd's own method
        await c.client.put(c.key("leased"), b"x", lease=lease)
        late: list = []
        tasks.append(asyncio.create_task(consume(clients["etcdwatch"], late, 0)))
        c = clients["aetcd-watch"]  # what the control plane's EventService uses
        aw = await c.client.watch(c.key("aw"))
        c = clients["concurrent"]
        values = await asyncio.gather(*(c.get(c.key("k")) for _ in range(8)))
        assert {v.value for v in values} == {b"1"}

        await etcd.put(etcd.key("aw"), b"seen")
        async for event in aw:
            assert event.kv.value == b"seen"
            break
        await aw.cancel()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (
                any(e.key == etcd.key("aw") for e in early) and any(e.key == etcd.key("aw") for e in late)):
            await asyncio.sleep(0.02)
        assert any(e.key == etcd.key("aw") for e in early), "the first watch stopped when its token expired"
        assert any(e.key == etcd.key("aw") for e in late)
        assert all(not t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        assert renewals.count == len(paths), "one re-authentication per client, the concurrent calls' shared"
        assert all(clients[p].client.metadata != tokens[p] for p in paths)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients.values():
            await c.close()
