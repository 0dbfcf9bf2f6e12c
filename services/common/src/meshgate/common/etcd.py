"""Thin asyncio adapter over aetcd for meshgate's storage needs.

It adds what aetcd 1.0 lacks or gets wrong: ranges with a limit and a start key
(for pagination), transactions that return the header revision, `failure=[]`
by default (aetcd raises TypeError on None), a larger gRPC receive limit (aetcd
does not send `fragment`, so a big catch-up watch response can exceed 4 MiB),
and errors mapped to one exception type, `EtcdUnavailable`.

All keys are bytes under one prefix (default `/meshgate`), joined with `/`.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024 * 1024


class EtcdUnavailable(Exception):
    """etcd could not be reached or refused the request; retryable."""


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


def channel_target(endpoints: str) -> tuple[str, int]:
    """(host, port) for aetcd, which dials `{host}:{port}`, from one endpoint
    (`host:port`) or several, comma-separated, which must be IP addresses: they
    become one gRPC target (`ipv4:a:p,b:p`), whose channel uses the first
    member it can reach and moves to another when that one fails. (A DNS name
    that resolves to every member works as a single endpoint too.)"""
    parts = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not parts:
        raise ValueError("no etcd endpoint given")
    parsed = []
    for e in parts:
        host, sep, port = e.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"etcd endpoint {e!r} is not host:port")
        parsed.append((host.strip("[]") or "127.0.0.1", int(port)))
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


def for_service(endpoints: str, prefix: str) -> "Etcd":
    """The adapter a service entry point uses: a bad `--etcd-endpoints` is a
    clear exit, not a traceback."""
    try:
        return Etcd(endpoints, prefix)
    except ValueError as e:
        raise SystemExit(f"--etcd-endpoints: {e}") from None


class Etcd:
    def __init__(self, endpoint: str = "127.0.0.1:2379", prefix: str = "/meshgate", timeout: float = 10) -> None:
        host, port = channel_target(endpoint)
        self.prefix = prefix.rstrip("/").encode()
        self.client = aetcd.Client(
            host=host,
            port=port,
            timeout=timeout,
            options={
                "grpc.max_receive_message_length": MAX_MESSAGE,
                "grpc.max_send_message_length": MAX_MESSAGE,
            },
        )
        self.txn_ops = self.client.transactions

    async def connect(self) -> None:
        await self.client.connect()

    async def close(self) -> None:
        await self.client.close()

    def key(self, *parts: str) -> bytes:
        return self.prefix + b"/" + "/".join(parts).encode()

    async def _call(self, coro):
        try:
            return await coro
        except (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError) as e:
            raise EtcdUnavailable(f"etcd unavailable: {e}") from e
        except aetcd.exceptions.ClientError as e:
            raise EtcdUnavailable(f"etcd error: {e}") from e
        except grpc.aio.AioRpcError as e:
            # The raw kvstub calls above bypass aetcd's error mapping: a
            # refused connection arrives as a bare gRPC error.
            raise EtcdUnavailable(f"etcd unavailable: {e.code().name}: {e.details()}") from e

    async def get(self, key: bytes) -> KV | None:
        await self.client.connect()
        resp = await self._call(self.client.kvstub.Range(rpc.RangeRequest(key=key), timeout=self.client._timeout))
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return KV(kv.key, kv.value, kv.mod_revision, kv.create_revision)

    async def range(
        self,
        start: bytes,
        end: bytes,
        limit: int = 0,
        revision: int = 0,
        keys_only: bool = False,
    ) -> tuple[list[KV], bool, int]:
        """Keys in [start, end): (kvs, more, header revision)."""
        await self.client.connect()
        req = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision, keys_only=keys_only)
        resp = await self._call(self.client.kvstub.Range(req, timeout=self.client._timeout))
        kvs = [KV(kv.key, kv.value, kv.mod_revision, kv.create_revision) for kv in resp.kvs]
        return kvs, resp.more, resp.header.revision

    async def count_prefix(self, prefix: bytes) -> int:
        """How many keys are under `prefix` (etcd counts; nothing is transferred)."""
        await self.client.connect()
        req = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix), count_only=True)
        resp = await self._call(self.client.kvstub.Range(req, timeout=self.client._timeout))
        return resp.count

    async def list_prefix(self, prefix: bytes, revision: int = 0) -> tuple[list[KV], int]:
        kvs, _, rev = await self.range(prefix, prefix_end(prefix), revision=revision)
        return kvs, rev

    async def txn(
        self, compare: Sequence[Any], success: Iterable[Any], failure: Iterable[Any] = ()
    ) -> tuple[bool, list[Any], int]:
        """Run a transaction: (succeeded, responses, revision after it)."""
        await self.client.connect()
        req = rpc.TxnRequest(
            compare=[c.build_message() for c in compare],
            success=self.client._ops_to_requests(list(success)),
            failure=self.client._ops_to_requests(list(failure)),
        )
        resp = await self._call(self.client.kvstub.Txn(req, timeout=self.client._timeout))
        return resp.succeeded, list(resp.responses), resp.header.revision

    async def put(self, key: bytes, value: bytes) -> int:
        await self.client.connect()
        resp = await self._call(self.client.kvstub.Put(rpc.PutRequest(key=key, value=value), timeout=self.client._timeout))
        return resp.header.revision

    async def revision(self) -> int:
        _, _, rev = await self.range(self.prefix, prefix_end(self.prefix), keys_only=True, limit=1)
        return rev

    async def dump(self) -> dict[bytes, bytes]:
        """Every key and value under the prefix (for tests and debugging)."""
        kvs, _ = await self.list_prefix(self.prefix + b"/")
        return {kv.key: kv.value for kv in kvs}
