"""Thin asyncio adapter over aetcd for meshgate's storage needs.

It adds what aetcd 1.0 lacks or gets wrong: ranges with a limit and a start key
(for pagination), transactions that return the header revision, `failure=[]`
by default (aetcd raises TypeError on None), a larger gRPC receive limit (aetcd
does not send `fragment`, so a big catch-up watch response can exceed 4 MiB),
and errors mapped to one exception type, `EtcdUnavailable`.

It also connects the way a production etcd wants: TLS (a CA, and a client
certificate for etcd's `--client-cert-auth`) and etcd's own user/password
authentication, with the token sent on every call and obtained again when
etcd stops accepting it. This extends aetcd rather than moving to another
client. aetcd is the project's chosen client (the maintained asyncio fork of
python-etcd3, whose protobuf code imports with protobuf 4+), and every caller
speaks its types: transactions, leases, watch events, its exceptions. What it
lacks sits in one place: `connect` opens only `grpc.aio.insecure_channel`,
and the adapter's raw stub calls sent no token. So `Client` below subclasses
`aetcd.Client`: its `connect` opens `grpc.aio.secure_channel` with
`grpc.ssl_channel_credentials(ca, key, cert)` and the same channel options,
then authenticates; the raw calls pass `metadata=client.metadata`. The
alternatives: clients of etcd's HTTP/JSON gateway (etcd3gw and its async
fork) add a translation layer in front of the same gRPC API and its watch
stream; younger grpc.aio clients (etcd3aio, etcd3-async-client) were not
evaluated beyond their descriptions, and adopting one means porting every
caller for what is, here, one method and one argument per call.

Hazards:
- etcd's simple auth tokens expire (`--auth-token-ttl`, 300 s by default)
  after going unused; etcd then answers "invalid auth token". Every call,
  lease and watch creation here re-authenticates once and retries on that
  answer (also on "revision of auth store is old", etcd's answer to a token
  or request older than a user or role change); concurrent calls that saw
  the same stale token share one re-authentication.
- A watch stream carries the token it was opened with: etcd checks it when a
  watch is created on the stream, not for the events of watches already made
  (they keep flowing after the token expires). So after a re-authentication
  aetcd's shared watch stream is replaced for new watches, and the old one
  lives on until its last watch is cancelled. aetcd also ignored a watch
  that etcd created and cancelled at once (an expired token, no permission):
  the watch then hung without events; here it raises.
- With several `--etcd-endpoints` over TLS every member's certificate is
  checked against the first endpoint's host (gRPC verifies one name per
  channel): give the members one certificate naming all of them, or use one
  DNS name for the cluster.
- `EtcdRefused` (a subclass of `EtcdUnavailable`, so run-time loops retry it
  like an outage) means etcd refused this client's TLS or credentials; its
  message says what to configure. `for_service`'s adapter turns it into a
  clear exit at start-up, before the service serves anything.

All keys are bytes under one prefix (default `/meshgate`), joined with `/`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.transactions
import aetcd.watcher
import grpc
from aetcd import rpc, rtypes

from meshgate.common import metrics

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024 * 1024
# How long a service waits at start for an etcd it cannot reach at all
# (refused connections, timeouts) before it exits; refusals exit at once.
STARTUP_WAIT_S = 30.0
GET_MANY_TXN = 120  # ranges per read-only transaction (etcd allows 128 operations per transaction)


class EtcdUnavailable(Exception):
    """etcd could not be reached or refused the request; retryable."""


class EtcdRefused(EtcdUnavailable):
    """etcd refused this client: TLS, its certificate, the user, the password or
    the user's role must change (the message says which). Retrying helps only
    once an operator fixed it, so a service exits on it at start."""


# One operation of a transaction's success or failure list (made by `Etcd.txn_ops`).
TxnOp = aetcd.transactions.Put | aetcd.transactions.Get | aetcd.transactions.Delete | aetcd.transactions.Txn


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with `prefix`."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def _split(endpoints: str) -> list[tuple[str, int]]:
    parts = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not parts:
        raise ValueError("no etcd endpoint given")
    parsed = []
    for e in parts:
        host, sep, port = e.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"etcd endpoint {e!r} is not host:port")
        parsed.append((host.strip("[]") or "127.0.0.1", int(port)))
    return parsed


def channel_target(endpoints: str) -> tuple[str, int]:
    """(host, port) for aetcd, which dials `{host}:{port}`, from one endpoint
    (`host:port`) or several, comma-separated, which must be IP addresses: they
    become one gRPC target (`ipv4:a:p,b:p`), whose channel uses the first
    member it can reach and moves to another when that one fails. (A DNS name
    that resolves to every member works as a single endpoint too.)"""
    parsed = _split(endpoints)
    if len(parsed) == 1:
        host, port = parsed[0]
        return (f"[{host}]" if ":" in host else host), port
    try:
        versions = {ipaddress.ip_address(h).version for h, _ in parsed}
    except ValueError:
        raise ValueError("several etcd endpoints must be IP addresses (or give one DNS name for all members)") from None
    if len(versions) > 1:
        raise ValueError("several etcd endpoints must all be IPv4 or all IPv6")
    fmt = (lambda h, p: f"{h}:{p}") if versions == {4} else (lambda h, p: f"[{h}]:{p}")
    head = ",".join(fmt(h, p) for h, p in parsed[:-1])
    last_host, last_port = parsed[-1]
    scheme = "ipv4" if versions == {4} else "ipv6"
    return f"{scheme}:{head},{last_host if versions == {4} else f'[{last_host}]'}", last_port


# ---------------------------------------------------------------- credentials


@dataclass(frozen=True)
class EtcdCredentials:
    """How a client proves itself to etcd and checks etcd, all optional: `ca`
    (PEM) turns TLS on; `cert` and `key` (PEM) are the client certificate for
    etcd's `--client-cert-auth`; `user` and `password` are etcd's own
    authentication. The paths are kept for messages only."""

    ca: bytes = b""
    cert: bytes = b""
    key: bytes = field(default=b"", repr=False)
    user: str = ""
    password: str = field(default="", repr=False)
    ca_path: str = ""
    cert_path: str = ""
    password_path: str = ""

    def __post_init__(self) -> None:
        check_combination(ca=bool(self.ca), cert=bool(self.cert), key=bool(self.key), user=bool(self.user),
                          password_file=bool(self.password))

    @property
    def tls(self) -> bool:
        return bool(self.ca)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.ca:
            return None
        return grpc.ssl_channel_credentials(self.ca, self.key or None, self.cert or None)

    def cert_common_name(self) -> str:
        """The client certificate's CN: with --client-cert-auth and auth on,
        etcd takes it as the user when no token is sent."""
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            cn = x509.load_pem_x509_certificate(self.cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError:
            return ""
        return str(cn[0].value) if cn else ""


def check_combination(*, ca: bool, cert: bool, key: bool, user: bool, password_file: bool) -> None:
    """ValueError naming the option missing from an incomplete combination."""
    if cert and not key:
        raise ValueError("--etcd-cert needs --etcd-key (the client certificate's private key)")
    if key and not cert:
        raise ValueError("--etcd-key needs --etcd-cert (the client certificate it belongs to)")
    if cert and not ca:
        raise ValueError("--etcd-cert needs --etcd-ca: a client certificate is sent only over TLS, and TLS to etcd "
                         "needs the CA that signed etcd's server certificate")
    if user and not password_file:
        raise ValueError("--etcd-user needs --etcd-password-file (a file holding the user's password)")
    if password_file and not user:
        raise ValueError("--etcd-password-file needs --etcd-user (the etcd user the password belongs to)")


def _read(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"{option}: cannot read {path}: {e.strerror}") from None


def _pem(data: bytes, path: str, option: str, *, key: bool = False) -> bytes:
    marker = b"PRIVATE KEY-----" if key else b"-----BEGIN CERTIFICATE-----"
    if marker not in data:
        what = "PEM private key" if key else "PEM certificate"
        raise SystemExit(f"{option}: {path} holds no {what}")
    return data


def read_password_file(path: str, option: str = "--etcd-password-file") -> str:
    """The password in `path` (its first line, without the line end). Refused
    when others may read or write the file, or its group may, unless it is
    root's and the group may only read it (PostgreSQL's rule for key files:
    what a Kubernetes Secret mounted with fsGroup looks like)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SystemExit(f"{option}: cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise SystemExit(f"{option}: {path} is not a regular file")
        group_ok = not mode & 0o070 or (st.st_uid == 0 and mode & 0o070 == 0o040)
        if mode & 0o007 or not group_ok:
            who = "others" if mode & 0o007 else "its group"
            raise SystemExit(
                f"{option}: {path} is open to {who} (mode {mode:04o}): make it readable by its owner only "
                "(chmod 600; a root-owned file may be 0640)")
        data = f.read()
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise SystemExit(f"{option}: {path} is not UTF-8 text") from None
    lines = text.splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise SystemExit(f"{option}: {path} is empty")
    return password


def etcd_credentials(cfg: Any) -> EtcdCredentials:
    """The credentials a service's `ServerConfig` names (`etcd_ca`,
    `etcd_cert`, `etcd_key`, `etcd_user`, `etcd_password_file`), with files
    read; an incomplete combination or a bad file is a clear exit."""
    try:
        check_combination(ca=bool(cfg.etcd_ca), cert=bool(cfg.etcd_cert), key=bool(cfg.etcd_key),
                          user=bool(cfg.etcd_user), password_file=bool(cfg.etcd_password_file))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    ca = _pem(_read(cfg.etcd_ca, "--etcd-ca"), cfg.etcd_ca, "--etcd-ca") if cfg.etcd_ca else b""
    cert = _pem(_read(cfg.etcd_cert, "--etcd-cert"), cfg.etcd_cert, "--etcd-cert") if cfg.etcd_cert else b""
    key = _pem(_read(cfg.etcd_key, "--etcd-key"), cfg.etcd_key, "--etcd-key", key=True) if cfg.etcd_key else b""
    password = read_password_file(cfg.etcd_password_file) if cfg.etcd_password_file else ""
    return EtcdCredentials(ca=ca, cert=cert, key=key, user=cfg.etcd_user, password=password, ca_path=cfg.etcd_ca,
                           cert_path=cfg.etcd_cert, password_path=cfg.etcd_password_file)


# ---------------------------------------------------------------- errors

_TOKEN_REJECTED = ("invalid auth token", "revision of auth store is old", "revision in header is old")


def rpc_error(exc: BaseException | None) -> grpc.aio.AioRpcError | None:
    """The gRPC error behind `exc` (aetcd raises its own, `from` the gRPC one)."""
    while exc is not None:
        if isinstance(exc, grpc.aio.AioRpcError):
            return exc
        exc = exc.__cause__
    return None


def token_rejected(exc: BaseException | str) -> bool:
    """Whether etcd refused the auth token (expired, or issued before an auth
    change): authenticating again helps."""
    if isinstance(exc, str):
        text = exc
    else:
        err = rpc_error(exc)
        text = f"{err.details() if err is not None else ''} {exc}"
    return any(m in text for m in _TOKEN_REJECTED)


# ---------------------------------------------------------------- the client


class _Watcher(aetcd.watcher.Watcher):
    """aetcd's watcher, except that a watch etcd creates and cancels at once
    (an expired token, no permission for the range) fails its creation
    instead of hanging without events, and a creation that fails before it
    is sent fails alone instead of blocking every later one."""

    async def _handle_response(self, response):
        if response.created and response.canceled and not response.compact_revision:
            async with self._lock:
                if self._new_callback is not None:
                    self._new_callback.error = aetcd.exceptions.ClientError(
                        f"etcd refused the watch: {response.cancel_reason}")
                    self._new_callback_ready.notify_all()
            return
        await super()._handle_response(response)

    async def _enqueue_watch_create(self, *args, **kwargs):
        # aetcd's add_callback marks the creation pending, then builds and
        # queues the request outside its try/finally: a request that cannot be
        # built (a start revision beyond int64) or a caller cancelled while the
        # queue is full left it pending forever, and every later watch on the
        # stream waited for it. Clear it before the error leaves (the lock is held).
        try:
            await super()._enqueue_watch_create(*args, **kwargs)
        except BaseException:
            self._new_callback = None
            self._new_callback_ready.notify_all()
            raise

    @property
    def idle(self) -> bool:
        return not self._callbacks and self._new_callback is None


def _renewing(method):
    """Wrap an aetcd.Client method: on a rejected token, authenticate again
    and call it once more."""

    @functools.wraps(method)
    async def call(self: Client, *args, **kwargs):
        await self.connect()
        token = self.metadata
        try:
            return await method(self, *args, **kwargs)
        except aetcd.exceptions.ClientError as e:
            if not self.authenticating or not token_rejected(e):
                raise
        await self.reauthenticate(token)
        return await method(self, *args, **kwargs)

    return call


class Client(aetcd.Client):
    """aetcd's client over TLS when `tls` is given (channel credentials), with
    etcd's token obtained again when etcd rejects it (see the module's
    hazards). Its methods raise aetcd's exceptions, like aetcd's."""

    def __init__(self, *, host: str, port: int, tls: grpc.ChannelCredentials | None = None, user: str = "",
                 password: str = "", timeout: float | None = None, options: dict[str, Any] | None = None) -> None:
        super().__init__(host=host, port=port, username=user or None, password=password or None,
                         # aetcd annotates int; it passes the value to gRPC, whose timeouts are float seconds
                         timeout=timeout, options=options)  # type: ignore[arg-type]
        self._tls = tls
        self._connect_lock = asyncio.Lock()
        self._renew_lock = asyncio.Lock()
        self._retired: list[_Watcher] = []

    @property
    def authenticating(self) -> bool:
        return self._username is not None

    async def _authenticate(self, channel) -> tuple[tuple[str, str], ...]:
        resp = await rpc.AuthStub(channel).Authenticate(
            rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
        return (("token", resp.token),)

    @aetcd.client._handle_errors
    async def connect(self) -> None:
        """Open the channel (TLS when configured) and authenticate; nothing
        is sent to etcd before the first call when there is no user."""
        if self._connected.is_set():
            return
        async with self._connect_lock:
            if self._connected.is_set():
                return
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            channel = (grpc.aio.secure_channel(target, self._tls, options=options) if self._tls is not None
                       else grpc.aio.insecure_channel(target, options=options))
            try:
                metadata = await self._authenticate(channel) if self.authenticating else None
            except BaseException:
                await channel.close()
                raise
            self.channel, self.metadata = channel, metadata
            self.auth_stub = rpc.AuthStub(channel)
            self.kvstub = rpc.KVStub(channel)
            self.clusterstub = rpc.ClusterStub(channel)
            self.leasestub = rpc.LeaseStub(channel)
            self.maintenancestub = rpc.MaintenanceStub(channel)
            self._watcher = _Watcher(rpc.WatchStub(channel), timeout=self._timeout, metadata=metadata)
            self._connected.set()

    @aetcd.client._handle_errors
    async def reauthenticate(self, stale: Any) -> None:
        """A new token, unless another call already replaced `stale` (the
        metadata a rejected call was sent with)."""
        if not self.authenticating:
            return
        await self.connect()
        async with self._renew_lock:
            if self.metadata != stale or self.channel is None:
                return
            log.info("etcd rejected the auth token (it expires after etcd's --auth-token-ttl unused): "
                     "authenticating again as %s", self._username)
            self.metadata = await self._authenticate(self.channel)
            # The shared watch stream keeps the old token: new watches go on
            # a new one; the old one stays for the watches it carries.
            old, self._watcher = self._watcher, _Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
            if old is not None:
                self._retired.append(old)
            await self._reap()

    async def _reap(self) -> None:
        for w in [w for w in self._retired if w.idle]:
            self._retired.remove(w)
            await w.shutdown()

    async def close(self) -> None:
        async with self._connect_lock:
            for w in self._retired:
                await w.shutdown()
            self._retired.clear()
            await super().close()

    async def watch(self, key: bytes, range_end: bytes | None = None, start_revision: int | None = None,
                    progress_notify: bool = False, kind: rtypes.EventKind | None = None, prev_kv: bool = False,
                    watch_id: int | None = None, fragment: bool = False) -> rtypes.Watch:
        """aetcd's `watch`, on the current watch stream, created again once
        after a re-authentication; cancelling it cancels it on the stream it
        was made on."""
        await self.connect()
        events: asyncio.Queue = asyncio.Queue()

        async def deliver(response):
            await events.put(response)

        for attempt in (1, 2):
            token, watcher = self.metadata, self._watcher
            assert watcher is not None, "connect() makes the watch stream"
            try:
                callback = await watcher.add_callback(
                    key, deliver, range_end=range_end, start_revision=start_revision,
                    progress_notify=progress_notify, kind=kind, prev_kv=prev_kv, watch_id=watch_id,
                    fragment=fragment)
                break
            except Exception as e:  # noqa: BLE001 - mapped below as aetcd maps them
                if attempt == 1 and self.authenticating and token_rejected(e):
                    await self.reauthenticate(token)
                    continue
                aetcd.exceptions._handle_exception(e)
        assert watcher is not None
        stream = watcher  # the stream this watch is on, for cancel()
        canceled = asyncio.Event()

        async def cancel():
            canceled.set()
            await events.put(None)
            await stream.cancel(callback.watch_id)
            if stream in self._retired:
                await self._reap()

        @aetcd.client._handle_errors
        async def iterator():
            while not canceled.is_set():
                event = await events.get()
                if event is None:
                    canceled.set()
                if isinstance(event, Exception):
                    canceled.set()
                    raise event
                if not canceled.is_set():
                    yield event

        return rtypes.Watch(iterator, cancel, callback.watch_id)


# aetcd's own calls that services make through `Etcd.client` (leases, puts
# with a lease), with the same retry on a rejected token. (`replace`,
# `watch_prefix` and the lock call these.)
for _name in ("get", "get_prefix", "get_range", "get_all", "put", "delete", "delete_prefix", "delete_range",
              "transaction", "watch_once", "lease", "revoke_lease", "refresh_lease", "get_lease_info", "status",
              "compact"):
    setattr(Client, _name, _renewing(getattr(aetcd.Client, _name)))
del _name


# ---------------------------------------------------------------- the adapter


def for_service(endpoints: str, prefix: str, credentials: EtcdCredentials | None = None) -> Etcd:
    """The adapter a service entry point uses: a bad `--etcd-endpoints` is a
    clear exit, not a traceback; so is, at `connect()`, an etcd that refuses
    this client's TLS or credentials (after waiting up to STARTUP_WAIT_S for
    an etcd that cannot be reached at all). Get `credentials` from
    `etcd_credentials(cfg)`."""
    try:
        return _ServiceEtcd(endpoints, prefix, credentials=credentials)
    except ValueError as e:
        raise SystemExit(f"--etcd-endpoints: {e}") from None


class Etcd:
    def __init__(self, endpoint: str = "127.0.0.1:2379", prefix: str = "/meshgate", timeout: float = 10, *,
                 credentials: EtcdCredentials | None = None) -> None:
        host, port = channel_target(endpoint)
        self.endpoints = endpoint
        self.prefix = prefix.rstrip("/").encode()
        self.credentials = credentials or EtcdCredentials()
        options: dict[str, Any] = {
            "grpc.max_receive_message_length": MAX_MESSAGE,
            "grpc.max_send_message_length": MAX_MESSAGE,
        }
        members = _split(endpoint)
        if self.credentials.tls and len(members) > 1:
            # An `ipv4:a,b` target has no host name to check certificates
            # against: check every member's against the first's.
            first_host, first_port = members[0]
            options["grpc.default_authority"] = (
                f"[{first_host}]:{first_port}" if ":" in first_host else f"{first_host}:{first_port}")
        if self.credentials.user and not self.credentials.tls:
            log.warning("etcd user %s authenticates without TLS: its password and token cross the network in the "
                        "clear (set --etcd-ca)", self.credentials.user)
        self.client = Client(
            host=host, port=port, tls=self.credentials.channel_credentials(), user=self.credentials.user,
            password=self.credentials.password, timeout=timeout, options=options,
        )
        self.txn_ops = self.client.transactions

    async def open(self, *, first_contact: bool = False) -> None:
        """Open the channel and authenticate (what every call does first)."""
        await self._call(self.client.connect(), first_contact=first_contact)

    async def connect(self) -> None:
        await self.open()

    async def close(self) -> None:
        await self.client.close()

    async def reauthenticate(self, stale: Any) -> None:
        """A new auth token in place of `stale` (see `Client.reauthenticate`)."""
        await self._call(self.client.reauthenticate(stale))

    def key(self, *parts: str) -> bytes:
        return self.prefix + b"/" + "/".join(parts).encode()

    def error(self, exc: BaseException, *, first_contact: bool = False) -> EtcdUnavailable:
        """`exc` (a gRPC or aetcd error) as EtcdRefused, with a message saying
        what to configure, or as EtcdUnavailable."""
        reason = self.explain(exc, first_contact=first_contact)
        if reason is not None:
            return EtcdRefused(f"etcd at {self.endpoints} {reason}")
        err = rpc_error(exc)
        if err is not None:
            return EtcdUnavailable(f"etcd unavailable: {err.code().name}: {err.details()}")
        if isinstance(exc, (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)):
            return EtcdUnavailable(f"etcd unavailable: {exc}")
        return EtcdUnavailable(f"etcd error: {exc}")

    def explain(self, exc: BaseException | str, *, first_contact: bool = False) -> str | None:
        """Why etcd refused this client and what to configure, or None when
        `exc` is an outage (unreachable, timed out, no leader) or unknown.
        `first_contact`: a closed plaintext connection then means TLS (later
        it is more likely an etcd going down)."""
        creds = self.credentials
        if isinstance(exc, str):
            code, details = None, exc
        else:
            err = rpc_error(exc)
            code, details = (err.code(), err.details() or "") if err is not None else (None, str(exc))
        user = creds.user
        prefix = self.prefix.decode() + "/"
        role_hint = f"a role with readwrite permission on the prefix {prefix} (etcdctl role grant-permission " \
                    f"--prefix ROLE readwrite {prefix})"
        if "Hostname Verification" in details or "Peer name" in details:
            return (f"presented a server certificate that does not name the host dialled ({self._first_host()}): "
                    "give etcd a certificate naming it (with several --etcd-endpoints: naming the first), "
                    "or connect by a name it holds")
        if "Handshake read failed" in details or "WRONG_VERSION_NUMBER" in details:
            return ("does not speak TLS (the handshake was cut off): it listens on http://; give etcd "
                    "--cert-file/--key-file and an https:// --listen-client-urls, or drop --etcd-ca")
        if "Tls handshake failed" in details or "CERTIFICATE_VERIFY_FAILED" in details or \
                "certificate signature failure" in details:
            return (f"presented a server certificate that --etcd-ca ({creds.ca_path or 'the CA given'}) did not "
                    "verify: give --etcd-ca the CA that signed etcd's --cert-file (and check it has not expired)")
        if creds.tls and any(m in details for m in ("TSI_DATA_CORRUPTED", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED",
                                                    "UNKNOWN_CA", "Unwrap failed")):
            if not creds.cert:
                return ("requires a client certificate (etcd's --client-cert-auth): set --etcd-cert and "
                        "--etcd-key (a certificate signed by a CA in etcd's --trusted-ca-file)")
            return (f"refused the client certificate --etcd-cert ({creds.cert_path or 'given'}): it must be "
                    "signed by a CA in etcd's --trusted-ca-file, be valid now, and allow client authentication")
        if first_contact and not creds.tls and "Socket closed" in details:
            return ("closed the plaintext connection: it probably serves TLS (https://): set --etcd-ca to the CA "
                    "that signed its certificate (and --etcd-cert/--etcd-key if it requires client certificates)")
        if "authentication failed" in details:
            where = f" in --etcd-password-file ({creds.password_path})" if creds.password_path else ""
            return f"refused user {user!r}: wrong password{where}, or no such user"
        if "authentication is not enabled" in details:
            return ("has authentication disabled, yet --etcd-user is set: enable it in etcd (etcdctl auth enable, "
                    "once users and roles exist) or drop --etcd-user and --etcd-password-file")
        denied = code == grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details
        if "user name is empty" in details or (denied and not user):
            as_cn = ""
            if creds.cert:
                as_cn = (f"; without a user etcd takes the client certificate's CN ({creds.cert_common_name()!r}) "
                         f"as the user, so giving that user {role_hint} works too")
            return ("has authentication enabled and no --etcd-user is set: set --etcd-user and "
                    f"--etcd-password-file{as_cn}")
        if denied:
            return f"denied user {user!r} access to {prefix}: grant it {role_hint}"
        if code in (grpc.StatusCode.UNIMPLEMENTED,):
            return f"is not an etcd v3 server (it answered {code.name}: {details})"
        return None

    def _first_host(self) -> str:
        return _split(self.endpoints)[0][0]

    async def _call(self, coro, *, first_contact: bool = False):
        try:
            return await coro
        except (aetcd.exceptions.ClientError, grpc.aio.AioRpcError) as e:
            # The raw stub calls below bypass aetcd's error mapping: a
            # refused connection arrives as a bare gRPC error.
            raise self.error(e, first_contact=first_contact) from e

    async def _unary(self, method: str, request, *, first_contact: bool = False):
        """One KV call (`Range`, `Txn`, `Put`) with the auth token, once more
        after a re-authentication when etcd rejected the token."""
        await self.open()
        for attempt in (1, 2):
            token = self.client.metadata
            t0 = time.perf_counter()
            try:
                resp = await getattr(self.client.kvstub, method)(request, timeout=self.client._timeout,
                                                                 metadata=token)
                wrote = method == "Put" or (method == "Txn" and resp.succeeded)
                metrics.etcd.timed(method, t0, True, resp.header.revision if wrote else 0)
                return resp
            except grpc.aio.AioRpcError as e:
                metrics.etcd.timed(method, t0, False)
                if attempt == 1 and self.client.authenticating and token_rejected(e):
                    await self.reauthenticate(token)
                    continue
                raise self.error(e, first_contact=first_contact) from e

    async def get(self, key: bytes) -> KV | None:
        resp = await self._unary("Range", rpc.RangeRequest(key=key))
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return KV(kv.key, kv.value, kv.mod_revision, kv.create_revision)

    async def get_many(self, keys: Sequence[bytes]) -> dict[bytes, KV]:
        """The keys that exist among `keys`: read-only transactions of
        GET_MANY_TXN ranges each, sent together, so N keys cost N/GET_MANY_TXN
        round trips and transfer nothing else (a range over their whole prefix
        would transfer every neighbour). Each transaction is one revision;
        different transactions may be different ones, as point reads are."""

        async def one(chunk: Sequence[bytes]) -> list[KV]:
            req = rpc.TxnRequest(success=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k)) for k in chunk])
            resp = await self._unary("Txn", req)
            return [KV(kv.key, kv.value, kv.mod_revision, kv.create_revision)
                    for r in resp.responses for kv in r.response_range.kvs]

        chunks = [keys[i : i + GET_MANY_TXN] for i in range(0, len(keys), GET_MANY_TXN)]
        found = await asyncio.gather(*(one(c) for c in chunks))
        return {kv.key: kv for kvs in found for kv in kvs}

    async def range(
        self,
        start: bytes,
        end: bytes,
        limit: int = 0,
        revision: int = 0,
        keys_only: bool = False,
    ) -> tuple[list[KV], bool, int]:
        """Keys in [start, end): (kvs, more, header revision)."""
        req = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision, keys_only=keys_only)
        resp = await self._unary("Range", req)
        kvs = [KV(kv.key, kv.value, kv.mod_revision, kv.create_revision) for kv in resp.kvs]
        return kvs, resp.more, resp.header.revision

    async def count_prefix(self, prefix: bytes) -> int:
        """How many keys are under `prefix` (etcd counts; nothing is transferred)."""
        req = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix), count_only=True)
        resp = await self._unary("Range", req)
        return resp.count

    async def list_prefix(self, prefix: bytes, revision: int = 0) -> tuple[list[KV], int]:
        kvs, _, rev = await self.range(prefix, prefix_end(prefix), revision=revision)
        return kvs, rev

    async def txn(
        self, compare: Sequence[Any], success: Iterable[Any], failure: Iterable[Any] = ()
    ) -> tuple[bool, list[Any], int]:
        """Run a transaction: (succeeded, responses, revision after it)."""
        req = rpc.TxnRequest(
            compare=[c.build_message() for c in compare],
            success=self.client._ops_to_requests(list(success)),
            failure=self.client._ops_to_requests(list(failure)),
        )
        resp = await self._unary("Txn", req)
        return resp.succeeded, list(resp.responses), resp.header.revision

    async def put(self, key: bytes, value: bytes) -> int:
        resp = await self._unary("Put", rpc.PutRequest(key=key, value=value))
        return resp.header.revision

    async def revision(self) -> int:
        # Over `prefix/` (any range gives the header revision): a role granted
        # `--prefix /meshgate/` may not read the wider [/meshgate, /meshgatf).
        start = self.prefix + b"/"
        _, _, rev = await self.range(start, prefix_end(start), keys_only=True, limit=1)
        return rev

    async def dump(self) -> dict[bytes, bytes]:
        """Every key and value under the prefix (for tests and debugging)."""
        kvs, _ = await self.list_prefix(self.prefix + b"/")
        return {kv.key: kv.value for kv in kvs}

    async def check(self) -> None:
        """One transaction that needs what a service needs: reading the prefix
        and writing under it (its compare is never true, so nothing is
        written; etcd checks the permissions of both branches). Raises
        EtcdRefused or EtcdUnavailable."""
        probe = self.prefix + b"/"
        req = rpc.TxnRequest(
            compare=[rpc.Compare(key=probe, target=rpc.Compare.VERSION, result=rpc.Compare.LESS, version=0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=probe, value=b""))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=probe, range_end=prefix_end(probe),
                                                                  count_only=True))],
        )
        await self._unary("Txn", req, first_contact=True)

    async def wait_usable(self, timeout: float = STARTUP_WAIT_S) -> None:
        """Until `check()` passes: EtcdRefused at once, EtcdUnavailable when
        etcd stayed unreachable for `timeout` seconds."""
        deadline = time.monotonic() + timeout
        warned = False
        while True:
            try:
                await self.open(first_contact=True)
                await self.check()
                return
            except EtcdRefused:
                raise
            except EtcdUnavailable as e:
                # A fresh channel each time: a failed one backs off for longer and longer.
                await self.client.close()
                if time.monotonic() >= deadline:
                    raise EtcdUnavailable(f"etcd at {self.endpoints} could not be reached for {timeout:.0f}s: "
                                          f"{e}") from e
                if not warned:
                    log.warning("waiting for etcd at %s: %s", self.endpoints, e)
                    warned = True
                await asyncio.sleep(0.5)


class _ServiceEtcd(Etcd):
    """`for_service`'s adapter: `connect()` is the service's first contact
    with etcd, checked (`wait_usable`), and a refusal is a clear exit."""

    async def connect(self) -> None:
        try:
            await self.wait_usable(STARTUP_WAIT_S)
        except EtcdUnavailable as e:
            await self.close()
            raise SystemExit(str(e)) from None
