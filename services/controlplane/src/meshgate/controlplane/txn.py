"""Helpers for optimistic transactions, paging and request plumbing.

Every write is: read (remembering mod revisions), decide, then one etcd
transaction that compares what was read. A lost compare means another writer
got there first: `retrying` runs the whole read-decide-write again, a bounded
number of times with jittered backoff, then gives up with ABORTED.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from meshgate.common.errors import ApiError, FieldViolation, invalid_argument

T = TypeVar("T")

MAX_ATTEMPTS = 25


class Conflict(Exception):
    """A transaction's compare failed; the operation should run again."""


async def retrying(op: Callable[[int], Awaitable[T]], what: str) -> T:
    for attempt in range(MAX_ATTEMPTS):
        try:
            return await op(attempt)
        except Conflict:
            await asyncio.sleep(random.uniform(0, min(0.1, 0.001 * 2**attempt)))
    raise ApiError(
        grpc.StatusCode.ABORTED,
        f"{what}: too much concurrent modification; retry",
        "CONCURRENT_MODIFICATION",
    )


def encode_page_token(parent: str, after: str) -> str:
    raw = json.dumps({"p": parent, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, parent: str, field: str = "page_token") -> str:
    """The id to continue after; refuses tokens from another listing."""
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after, p = data["a"], data["p"]
        if not isinstance(after, str) or p != parent:
            raise ValueError
        return after
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise invalid_argument([FieldViolation(field, "is not a page token of this listing")]) from None
