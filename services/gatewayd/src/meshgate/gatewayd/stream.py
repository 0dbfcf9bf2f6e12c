"""The control plane as a desired-state source: joining, and the Sync stream.

`join()` generates (or reuses) the node's key pair, redeems an enrollment key
with `AgentService.Enroll`, and saves the node's identity (its name, the
control plane's address and the agent credential) to `identity.json` in the
state directory, created 0600 like the private key. The credential is a
bearer token today; an mTLS certificate would be another `credential` kind in
the same file.  It also keeps the key authority's public keys from the
enrollment response (`key_authority_public_keys`, base64 in the file): with at
least one, the agent applies only peers whose keys they signed; an identity
without them (joined to a control plane without a key service, or written by an
older gatewayd) means the development mode, where nothing is verified.

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

Hazards: the token is a secret (`keys.Secret`, never logged); messages carry
pre-shared keys, so they are never logged either.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import grpc
from google.rpc import error_details_pb2, status_pb2

from meshgate.api.v1 import agent_pb2, agent_pb2_grpc
from meshgate.gatewayd.backoff import Backoff
from meshgate.gatewayd.keys import Secret
from meshgate.gatewayd.sources import Delta, Report, RotateKey, Snapshot, Update
from meshgate.gatewayd.trust import ERROR_DOMAIN, ERROR_REASON

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
# Fail fast enough to notice a dead control plane, but never on a slow apply.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # what recent gRPC cores actually time a keepalive ping out by (default: a minute)
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


@dataclass
class Identity:
    node: str
    control_plane: str
    token: Secret
    ca_file: str = ""
    authority_keys: tuple[bytes, ...] = ()
    """The key authority's Ed25519 public keys (raw); empty: nothing is verified."""

    def save(self, state_dir: Path) -> None:
        data = json.dumps(
            {"node": self.node, "control_plane": self.control_plane, "ca_file": self.ca_file,
             "credential": {"token": self.token.reveal()},
             "key_authority_public_keys": [base64.b64encode(k).decode() for k in self.authority_keys]},
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
    def load(cls, state_dir: Path) -> "Identity | None":
        try:
            data = json.loads((state_dir / IDENTITY_FILE).read_text())
        except FileNotFoundError:
            return None
        keys = tuple(base64.b64decode(k, validate=True) for k in data.get("key_authority_public_keys") or ())
        return cls(data["node"], data["control_plane"], Secret(data["credential"]["token"]),
                   data.get("ca_file", ""), keys)

    def __repr__(self) -> str:
        return (f"Identity(node={self.node!r}, control_plane={self.control_plane!r}, "
                f"authority_keys={len(self.authority_keys)})")


def channel(target: str, ca_file: str = "") -> grpc.aio.Channel:
    if ca_file:
        with open(ca_file, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        return grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


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
    timeout: float = 30,
) -> tuple[Identity, agent_pb2.EnrollResponse]:
    """Redeem `secret` for this node and save its identity."""
    async with channel(target, ca_file) as ch:
        resp = await agent_pb2_grpc.AgentServiceStub(ch).Enroll(
            agent_pb2.EnrollRequest(
                enrollment_secret=secret, node_id=node_id, hostname=hostname, public_key=public_key,
                endpoint=endpoint, listen_port=listen_port, agent_version="gatewayd",
            ),
            timeout=timeout,
        )
    identity = Identity(resp.node.name, target, Secret(resp.credential.token), ca_file,
                        tuple(bytes(k) for k in resp.key_authority_public_keys))
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

        metadata = (("authorization", f"Bearer {self.identity.token.reveal()}"),)
        async with channel(self.identity.control_plane, self.identity.ca_file) as ch:
            call = agent_pb2_grpc.AgentServiceStub(ch).Sync(requests(), metadata=metadata)
            self.streams_opened += 1
            try:
                async for msg in call:
                    if not self.connected.is_set():
                        self.connected.set()
                        self.backoff.reset()
                        log.info("streaming desired state from %s", self.identity.control_plane)
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
            finally:
                out.put_nowait(None)
                call.cancel()

    async def announce_key(self, public_key: str) -> None:
        """Send `NewKey` (the answer to `RotateKey`); lost with the stream, in which case
        the control plane asks again after the agent reconnects."""
        if self._out is None:
            log.warning("no stream to announce the new key on; it is sent when asked again")
            return
        self._out.put_nowait(agent_pb2.SyncRequest(new_key=agent_pb2.SyncRequest.NewKey(public_key=public_key)))

    async def send_health(self, stats) -> None:
        """Send `Health` with every peer's handshake time and counters (public key ->
        PeerStats); dropped when there is no stream (the next report follows)."""
        if self._out is None or not self.connected.is_set():
            return
        health = agent_pb2.SyncRequest.Health()
        for key in sorted(stats):
            st = stats[key]
            p = health.peers.add(public_key=key, rx_bytes=st.rx_bytes, tx_bytes=st.tx_bytes)
            if st.last_handshake_sec:
                p.latest_handshake_time.seconds = st.last_handshake_sec
                p.latest_handshake_time.nanos = st.last_handshake_nsec
        self._out.put_nowait(agent_pb2.SyncRequest(health=health))

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
        if report.error:
            code = getattr(grpc.StatusCode, report.code or "FAILED_PRECONDITION", grpc.StatusCode.FAILED_PRECONDITION)
            ack.status.CopyFrom(status_pb2.Status(code=code.value[0], message=report.error[:1024]))
            if report.refused:
                info = error_details_pb2.ErrorInfo(reason=ERROR_REASON, domain=ERROR_DOMAIN)
                info.metadata["peers"] = ",".join(sorted(r.resource or r.public_key for r in report.refused))[:4096]
                ack.status.details.add().Pack(info)
        self._out.put_nowait(agent_pb2.SyncRequest(ack=ack))
        if report.error and report.applied_revision is None and "snapshot is needed" in report.error:
            self._ask_resync(report.error)
