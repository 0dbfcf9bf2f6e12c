"""The control plane as a desired-state source: joining, and the Sync stream.

`join()` generates (or reuses) the node's key pair, redeems an enrollment key
with `AgentService.Enroll`, and saves the node's identity (its name, the
control plane's address, the agent credential and the join options) to
`identity.json` in the state directory, created 0600 like the private key. The
credential is a certificate when the control plane has an agent endpoint
(agentcert.py: the agent streams there with mTLS and renews the certificate
over its stream), or else a bearer token (development).

Of the key authority's public keys in the enrollment response
(`key_authority_public_keys`) it keeps only those that match a pin from outside
the control plane (the fingerprints the enrollment secret carries, or
`--authority-key`; see trust.py) and refuses to join when none matches. A
secret without fingerprints (a control plane without a key service) joins only
with `insecure_no_authority`, the development mode where nothing is verified.
An identity file of an older format (no `format: 2`: its authority keys were
taken on the control plane's word) is refused with a clear error: join again.

Plaintext (no CA file) is used only to a local control plane (`unix:`,
127.0.0.0/8, ::1, `localhost`); any other address needs `insecure`, which
`join` saves and `run` warns about on every start (`check_transport`).

`ControlPlaneSource` holds one Sync stream: Hello with the applied revision,
then a snapshot and deltas, each handed to the agent as an update carrying the
change's W3C trace context; the agent's reports become acks. A lost stream is
reopened with capped exponential backoff and full jitter; meanwhile the agent
keeps the data plane exactly as it is. A delta whose base is not the last
revision received is not applied: the source asks for a snapshot instead.
`RotateKey` becomes a `sources.RotateKey` update; the agent answers through
`announce_key`, which sends `NewKey{public_key}`.  An ack whose report names
refused peers carries `PERMISSION_DENIED`, the summary as its message and a
`google.rpc.ErrorInfo` (reason `PEER_KEY_REFUSED`) listing them.

An ack of a revision applied without some routes (consent.py) is OK and
carries the summary as its message and a `google.rpc.ErrorInfo` per kind
(reason `DEFAULT_ROUTE_DECLINED` or `ROUTE_NOT_ACCEPTED`, metadata `routes` and
`reason`) listing them.

Hazards: the token is a secret (`keys.Secret`, never logged); messages carry
pre-shared keys, so they are never logged either.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

from meshgate.api.v1 import agent_pb2, agent_pb2_grpc
from meshgate.gatewayd import agentcert, consent
from meshgate.gatewayd.backoff import Backoff
from meshgate.gatewayd.keys import Secret
from meshgate.gatewayd.sources import Delta, Report, RotateKey, Snapshot, Update
from meshgate.gatewayd.trust import ERROR_DOMAIN, ERROR_REASON, PinMismatch, fingerprint, pinned_keys, pins_of_secret

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
IDENTITY_FORMAT = 2
# Fail fast enough to notice a dead control plane, but never on a slow apply.
CHANNEL_OPTIONS = [
    # Every 2 s, 3 s to answer: a control plane that vanished is left within
    # 5 s (the control plane allows pings every second: controlplane/main.py).
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    # what recent gRPC cores actually time a keepalive ping out by (default: a minute)
    ("grpc.http2.ping_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


RENEW_CHECK_S = float(os.environ.get("MESHGATE_GATEWAYD_RENEW_CHECK_S", "60"))  # tests shorten it
RENEW_RETRY_S = 300.0  # a renewal unanswered this long is asked again (with a new key)

class IdentityError(ValueError):
    """identity.json cannot be used (unreadable, or of an older format)."""


class JoinRefused(Exception):
    """gatewayd refuses to join (before or after asking the control plane)."""


class PlaintextRefused(ValueError):
    """Plaintext to a control plane that is not local, without ``insecure``."""


@dataclass
class Identity:
    node: str
    control_plane: str
    token: Secret
    ca_file: str = ""
    authority_keys: tuple[bytes, ...] = ()
    """The key authority's Ed25519 public keys (raw) that matched a pin; empty only
    with ``insecure_no_authority``."""
    pinned_by: str = ""
    """Where the pin came from: ``enrollment key`` or ``--authority-key``."""
    insecure_no_authority: bool = False
    """Joined with ``--insecure-no-authority``: peers are not verified."""
    insecure: bool = False
    """Joined with ``--insecure``: plaintext to a non-local control plane is allowed."""
    accept_default_route: bool = False
    """Joined with ``--accept-default-route`` (``run`` may override it)."""
    no_default_route: bool = False
    """Joined with ``--no-default-route``: declined by the operator's word (the
    status says so), not for want of consent."""
    accept_routes: tuple[str, ...] | None = None
    """Joined with ``--accept-routes``: the allow-list of routes (None: all)."""
    agent_endpoint: str = ""
    """With a certificate credential (agentcert.py): where to stream, with mTLS."""
    state_dir: Path | None = None
    """Where the certificate files are (not saved: where the identity was loaded from)."""

    @property
    def certified(self) -> bool:
        return bool(self.agent_endpoint)

    @property
    def network(self) -> str:
        """``networks/<id>`` of this node."""
        return "/".join(self.node.split("/")[:2])

    def save(self, state_dir: Path) -> None:
        data = json.dumps(
            {"format": IDENTITY_FORMAT, "node": self.node, "control_plane": self.control_plane,
             "ca_file": self.ca_file,
             "credential": ({"certificate": agentcert.CERT, "agent_endpoint": self.agent_endpoint} if self.certified
                            else {"token": self.token.reveal()}),
             "key_authority_public_keys": [base64.b64encode(k).decode() for k in self.authority_keys],
             "authority_pinned_by": self.pinned_by, "insecure_no_authority": self.insecure_no_authority,
             "insecure": self.insecure, "accept_default_route": self.accept_default_route,
             "no_default_route": self.no_default_route,
             "accept_routes": None if self.accept_routes is None else list(self.accept_routes)},
            indent=1,
        ).encode()
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = state_dir / f".{IDENTITY_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, state_dir / IDENTITY_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> Identity | None:
        """The saved identity, None when there is none; raises IdentityError."""
        path = state_dir / IDENTITY_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise IdentityError(f"{path} is unreadable: {type(e).__name__}") from None
        if not isinstance(data, dict) or data.get("format") != IDENTITY_FORMAT:
            raise IdentityError(
                f"{path} was written by an older gatewayd: its key authority keys are not pinned "
                "(they were taken from the control plane's answer). Join again: remove the file and run "
                "`gatewayd join` with a new enrollment key")
        try:
            keys = tuple(base64.b64decode(k, validate=True) for k in data.get("key_authority_public_keys") or ())
            cred = data["credential"]
            ident = cls(data["node"], data["control_plane"], Secret(cred.get("token", "")),
                        data.get("ca_file", ""), keys, data.get("authority_pinned_by", ""),
                        bool(data.get("insecure_no_authority")), bool(data.get("insecure")),
                        bool(data.get("accept_default_route")), agent_endpoint=cred.get("agent_endpoint", ""),
                        state_dir=state_dir, no_default_route=bool(data.get("no_default_route")))
            routes = data.get("accept_routes")
            if routes is not None:
                ident.accept_routes = consent.parse_accept_routes(",".join(routes)) if routes else ()
            if not ident.certified and not ident.token.reveal():
                raise KeyError("credential")
        except (KeyError, TypeError, ValueError) as e:
            raise IdentityError(f"{path} is malformed: {type(e).__name__} {e}") from None
        if not ident.authority_keys and not ident.insecure_no_authority:
            raise IdentityError(f"{path} holds no key authority keys and was not joined with "
                                "--insecure-no-authority; join again")
        return ident

    def __repr__(self) -> str:
        return (f"Identity(node={self.node!r}, control_plane={self.control_plane!r}, "
                f"authority_keys={len(self.authority_keys)})")


def is_local_target(target: str) -> bool:
    """True for a control plane address plaintext may go to: a Unix socket, or a
    loopback host (127.0.0.0/8, ::1, ``localhost``).  gRPC target syntax:
    ``unix:/path``, ``host:port``, ``[v6]:port``, ``dns:///host:port``,
    ``ipv4:a.b.c.d:port``, ``ipv6:[::1]:port``."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme):]
            break
    if t.startswith("["):
        host = t[1:].partition("]")[0]
    elif t.count(":") == 1:
        host = t.partition(":")[0]
    else:
        host = t  # no port, or a bare IPv6 address
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(target: str, ca_file: str, insecure: bool) -> None:
    """Raise PlaintextRefused for plaintext to a non-local control plane without
    ``insecure``; log the WARNING when ``insecure`` allows it (on every start)."""
    if ca_file or is_local_target(target):
        return
    if not insecure:
        raise PlaintextRefused(
            f"refusing plaintext to the control plane at {target}: it is neither loopback nor a Unix "
            "socket, and the enrollment key, the agent credential and pre-shared keys would cross the "
            "network unencrypted. Give --ca-file (TLS), or --insecure for development")
    log.warning("INSECURE: plaintext to the control plane at %s (--insecure): the agent credential and "
                "pre-shared keys cross the network unencrypted; development only", target)


def channel(target: str, ca_file: str = "", insecure: bool = False) -> grpc.aio.Channel:
    if ca_file:
        with open(ca_file, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        return grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)
    if not insecure and not is_local_target(target):
        raise PlaintextRefused(f"refusing plaintext to the control plane at {target} without --insecure")
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def pins_for(secret: str, authority_keys: tuple[bytes, ...], insecure_no_authority: bool) -> tuple[set[str], str]:
    """(the fingerprints to require, where they come from) for a join; raises
    JoinRefused before anything is sent when there is nothing to pin and no
    ``insecure_no_authority``, or when the two sources of pins disagree."""
    _, from_secret = pins_of_secret(secret)
    if authority_keys:
        given = {fingerprint(k) for k in authority_keys}
        if from_secret and not given & set(from_secret):
            raise JoinRefused(
                f"the enrollment key pins key authority fingerprint(s) {', '.join(from_secret)}, "
                f"but --authority-key gives {', '.join(sorted(given))}: they name different authorities")
        return given, "--authority-key"
    if from_secret:
        return set(from_secret), "enrollment key"
    if not insecure_no_authority:
        raise JoinRefused(
            "the enrollment key carries no key authority fingerprint (a control plane without a key "
            "service makes such keys), so peers' keys could not be verified: give --authority-key "
            "<base64 Ed25519 public key of the key service's authority>, or --insecure-no-authority to "
            "join in the development mode where nothing is verified")
    return set(), ""


async def join(
    target: str,
    secret: str,
    public_key: str,
    state_dir: Path,
    *,
    node_id: str = "",
    hostname: str = "",
    endpoint: str = "",
    listen_port: int = 0,
    ca_file: str = "",
    authority_keys: tuple[bytes, ...] = (),
    insecure_no_authority: bool = False,
    insecure: bool = False,
    accept_default_route: bool = False,
    timeout: float = 30,
    no_default_route: bool = False,
    accept_routes: tuple[str, ...] | None = None,
) -> tuple[Identity, agent_pb2.EnrollResponse]:
    """Redeem `secret` for this node and save its identity (see the module
    docstring for the pin); raises JoinRefused, PlaintextRefused or the RPC's error."""
    pins, pinned_by = pins_for(secret, authority_keys, insecure_no_authority)
    # A key for the agent's mTLS identity, and a CSR the control plane has
    # signed when it serves an agent endpoint (it ignores it otherwise).
    csr = agentcert.new_csr(state_dir, node_id or hostname)
    async with channel(target, ca_file, insecure) as ch:
        resp = await agent_pb2_grpc.AgentServiceStub(ch).Enroll(
            agent_pb2.EnrollRequest(
                enrollment_secret=secret, node_id=node_id, hostname=hostname, public_key=public_key,
                endpoint=endpoint, listen_port=listen_port, agent_version="gatewayd", csr=csr,
            ),
            timeout=timeout,
        )
    presented = tuple(bytes(k) for k in resp.key_authority_public_keys)
    if pins:
        try:
            kept = pinned_keys(presented, pins)
        except PinMismatch as e:
            raise JoinRefused(f"{e}; nothing was saved (the control plane may show {resp.node.name} as "
                              "enrolled: delete it there)") from None
        dropped = len(presented) - len(kept)
        if dropped:
            log.warning("ignoring %d key authority key(s) the control plane presented that match no pin", dropped)
    else:
        kept = ()
        if presented:
            log.warning("the control plane presented %d key authority key(s), but none is pinned "
                        "(--insecure-no-authority): they are not used, peers are not verified", len(presented))
    certified = resp.credential.WhichOneof("credential") == "certificate_chain"
    if certified:
        agentcert.save(state_dir, resp.credential.certificate_chain, resp.ca_certificates)
    identity = Identity(resp.node.name, target, Secret(resp.credential.token), ca_file, kept, pinned_by,
                        insecure_no_authority=not kept, insecure=insecure,
                        accept_default_route=accept_default_route and not no_default_route,
                        no_default_route=no_default_route, accept_routes=accept_routes,
                        agent_endpoint=(resp.agent_endpoint or target) if certified else "", state_dir=state_dir)
    identity.save(state_dir)
    return identity, resp


class Permanent(Exception):
    """The control plane refused this agent (unknown credential, node deleted)."""


class ControlPlaneSource:
    def __init__(
        self,
        identity: Identity,
        applied_revision: int = 0,
        *,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.applied_revision = applied_revision
        self.backoff = Backoff(backoff_initial, backoff_max, rng)
        self.last_revision = 0  # the revision of the last message received on this stream
        self.connected = asyncio.Event()
        self.streams_opened = 0
        self._out: asyncio.Queue | None = None
        self._resync_asked_at = -1
        self.renew_check_s = RENEW_CHECK_S
        self._renew_sent_at = -RENEW_RETRY_S
        self.certificates_renewed = 0
        self._egress_health: agent_pb2.SyncRequest | None = None  # the last report, sent again on reconnect

    async def updates(self) -> AsyncIterator[Update]:
        while True:
            try:
                async for update in self._stream():
                    yield update
                log.warning("control plane closed the stream; reconnecting")
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND):
                    # Keep the data plane and keep trying slowly: an operator may
                    # fix the control plane's view; nothing here is torn down.
                    log.error("control plane refused %s: %s (%s); the data plane stays as it is",
                              self.identity.node, code.name, e.details())
                    self.backoff.attempt = max(self.backoff.attempt, 8)
                else:
                    log.warning("stream to the control plane lost: %s", code.name)
            finally:
                self.connected.clear()
                self._out = None
            delay = self.backoff.next_delay()
            await asyncio.sleep(delay)

    async def _stream(self) -> AsyncIterator[Update]:
        out: asyncio.Queue = asyncio.Queue()
        self._out = out
        hello = agent_pb2.SyncRequest(
            hello=agent_pb2.SyncRequest.Hello(
                node=self.identity.node, applied_revision=self.applied_revision,
                agent_version="gatewayd", backend="",
            )
        )

        async def requests():
            yield hello
            while True:
                item = await out.get()
                if item is None:
                    return
                yield item

        if self.identity.certified:
            assert self.identity.state_dir is not None
            metadata = None
            options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
            if self.identity.agent_endpoint.startswith("unix:"):
                # A Unix socket has no host name to check: its certificate names localhost.
                options.append(("grpc.ssl_target_name_override", "localhost"))
            ch = grpc.aio.secure_channel(self.identity.agent_endpoint, agentcert.credentials(self.identity.state_dir),
                                         options=options)
        else:
            metadata = (("authorization", f"Bearer {self.identity.token.reveal()}"),)
            ch = channel(self.identity.control_plane, self.identity.ca_file, self.identity.insecure)
        renewer: asyncio.Task | None = None
        async with ch:
            call = agent_pb2_grpc.AgentServiceStub(ch).Sync(requests(), metadata=metadata)
            self.streams_opened += 1
            try:
                async for msg in call:
                    if not self.connected.is_set():
                        self.connected.set()
                        self.backoff.reset()
                        if self._egress_health is not None:
                            out.put_nowait(self._egress_health)
                        log.info("streaming desired state from %s",
                                 self.identity.agent_endpoint or self.identity.control_plane)
                        if self.identity.certified:
                            renewer = asyncio.create_task(self._renew_when_due(out), name="certificate-renewal")
                    kind = msg.WhichOneof("message")
                    tp = msg.trace_context.traceparent
                    if kind == "snapshot":
                        self.last_revision = msg.revision
                        yield Snapshot(msg.snapshot.state, traceparent=tp)
                    elif kind == "delta":
                        d = msg.delta.delta
                        if d.base_revision != self.last_revision:
                            self._ask_resync(f"delta base {d.base_revision} != last revision {self.last_revision}")
                            continue
                        self.last_revision = msg.revision
                        yield Delta(d, msg.revision, traceparent=tp)
                    elif kind == "rotate_key":
                        yield RotateKey(msg.rotate_key.reason)
                    elif kind == "certificate":
                        self._renewed(msg.certificate)
            finally:
                if renewer is not None:
                    renewer.cancel()
                out.put_nowait(None)
                call.cancel()

    async def _renew_when_due(self, out: asyncio.Queue) -> None:
        """Ask for a new certificate once two thirds of the current one's
        lifetime have passed (checked every RENEW_CHECK_S; again after a
        renewal that got no answer)."""
        state_dir = self.identity.state_dir
        assert state_dir is not None
        while True:
            try:
                due = agentcert.renew_due(state_dir)
            except (OSError, ValueError) as e:
                log.error("cannot read the agent certificate: %s", e)
                due = False
            loop = asyncio.get_running_loop()
            if due and loop.time() - self._renew_sent_at > RENEW_RETRY_S:
                self._renew_sent_at = loop.time()
                csr = agentcert.new_csr(state_dir, self.identity.node.rsplit("/", 1)[-1], renewal=True)
                log.info("renewing the agent certificate of %s", self.identity.node)
                out.put_nowait(agent_pb2.SyncRequest(renew_certificate=agent_pb2.SyncRequest.RenewCertificate(csr=csr)))
            await asyncio.sleep(self.renew_check_s)

    def _renewed(self, credential) -> None:
        state_dir = self.identity.state_dir
        assert state_dir is not None
        try:
            agentcert.save(state_dir, credential.certificate_chain, renewal=True)
        except (OSError, ValueError) as e:
            log.error("could not keep the renewed agent certificate: %s", e)
            return
        self._renew_sent_at = -RENEW_RETRY_S
        self.certificates_renewed += 1
        log.info("agent certificate renewed (until %s); the next connection uses it",
                 credential.expire_time.ToJsonString())

    async def announce_key(self, public_key: str) -> None:
        """Send `NewKey` (the answer to `RotateKey`); lost with the stream, in which case
        the control plane asks again after the agent reconnects."""
        if self._out is None:
            log.warning("no stream to announce the new key on; it is sent when asked again")
            return
        self._out.put_nowait(agent_pb2.SyncRequest(new_key=agent_pb2.SyncRequest.NewKey(public_key=public_key)))

    def send_domains(self, report: agent_pb2.SyncRequest.Domains) -> None:
        """Send what the agent learned of its egress domains (dnsagent.py); dropped
        without a stream: the agent sends it all again after each snapshot."""
        if self._out is not None:
            self._out.put_nowait(agent_pb2.SyncRequest(domains=report))

    async def send_egress_health(self, gateways) -> None:
        """Send `EgressHealth` (health.py's report, a list of GatewayHealth);
        kept, and sent again as soon as a new stream is up."""
        report = agent_pb2.SyncRequest.EgressHealth()
        for g in gateways:
            report.gateways.add(gateway=g.gateway, healthy=g.healthy, reason=g.reason)
        self._egress_health = agent_pb2.SyncRequest(egress_health=report)
        if self._out is not None and self.connected.is_set():
            self._out.put_nowait(self._egress_health)

    async def send_health(self, peers, complete: bool = True) -> bool:
        """Send `Health` with the given peers' handshake times, endpoints,
        reachability and counters (pathwatch.PeerReport); False when there is no
        stream to send it on (the caller reports everything on the next one)."""
        if self._out is None or not self.connected.is_set():
            return False
        health = agent_pb2.SyncRequest.Health(complete=complete)
        for r in peers:
            p = health.peers.add(public_key=r.public_key, rx_bytes=r.rx_bytes, tx_bytes=r.tx_bytes,
                                 endpoint=r.endpoint, rtt_us=r.rtt_us)
            if r.handshake_ns:
                p.latest_handshake_time.FromNanoseconds(r.handshake_ns)
            if r.unanswered_since_ns:
                p.unanswered_since_time.FromNanoseconds(r.unanswered_since_ns)
            if r.configure_ns:
                p.configure_time.FromNanoseconds(r.configure_ns)
        self._out.put_nowait(agent_pb2.SyncRequest(health=health))
        return True

    def _ask_resync(self, reason: str) -> None:
        if self._out is not None and self._resync_asked_at != self.last_revision:
            self._resync_asked_at = self.last_revision
            log.warning("asking for a snapshot: %s", reason)
            self._out.put_nowait(agent_pb2.SyncRequest(resync=agent_pb2.SyncRequest.ResyncRequest(reason=reason)))

    async def report(self, report: Report) -> None:
        if report.applied_revision is not None:
            self.applied_revision = report.applied_revision
        if self._out is None:
            return
        ack = agent_pb2.SyncRequest.Ack(revision=report.applied_revision or self.last_revision)
        ack.apply_time.GetCurrentTime()
        declined = tuple(report.declined)
        if report.error:
            code = getattr(grpc.StatusCode, report.code or "FAILED_PRECONDITION", grpc.StatusCode.FAILED_PRECONDITION)
            message = report.error
            if declined:
                message += "; " + consent.summary(declined)
            ack.status.CopyFrom(status_pb2.Status(code=code.value[0], message=message[:1024]))
            if report.refused:
                info = error_details_pb2.ErrorInfo(reason=ERROR_REASON, domain=ERROR_DOMAIN)
                info.metadata["peers"] = ",".join(sorted(r.resource or r.public_key for r in report.refused))[:4096]
                ack.status.details.add().Pack(info)
        elif declined:
            # applied: all the node will install; the message says what it left out
            ack.status.CopyFrom(status_pb2.Status(code=0, message=consent.summary(declined)[:1024]))
        for code, these in consent.by_code(declined).items():
            # one per kind: DEFAULT_ROUTE_DECLINED, ROUTE_NOT_ACCEPTED (the control
            # plane shows them in the network status)
            info = error_details_pb2.ErrorInfo(reason=code, domain=ERROR_DOMAIN)
            info.metadata["routes"] = ",".join(d.route for d in these)[:4096]
            info.metadata["reason"] = "; ".join(dict.fromkeys(d.reason for d in these))[:1024]
            ack.status.details.add().Pack(info)
        if report.drift is not None:
            d = report.drift
            ack.drift.repairs, ack.drift.fighting, ack.drift.fights = d["repairs"], d["fighting"], d["fights"]
            ack.drift.last_drift.extend(d["last_drift"])
            if d["last_drift_time"]:
                ack.drift.last_drift_time.FromNanoseconds(int(d["last_drift_time"] * 1e9))
        self._out.put_nowait(agent_pb2.SyncRequest(ack=ack))
        if report.error and report.applied_revision is None and "snapshot is needed" in report.error:
            self._ask_resync(report.error)
