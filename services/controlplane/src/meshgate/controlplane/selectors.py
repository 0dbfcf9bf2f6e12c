"""Selectors of access policies and egress gateways: their syntax, and that what they name exists.

A selector is `*`, `tag:{tag}`, `node:{node id}`, `egress:{egress gateway id}`,
`client:{external client id}` or (policy destinations) `domain:{name}`, a name
or `*.` wildcard an egress gateway declares; each use allows a subset of the kinds.  `node:`,
`egress:` and `client:` must name an object of the network when the selector is
written (a typo would otherwise match nothing, silently); a tag may be one no
node has yet.  The existence check returns etcd compares that keep it true until
the write commits (a concurrent delete makes the write retry and fail).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from meshgate.common.errors import FieldViolation, invalid_argument
from meshgate.controlplane import domains, names

# kind -> etcd collection of the objects it names (tags name nothing)
COLLECTIONS = {"node": "nodes", "egress": "egressGateways", "client": "externalClients"}
NOUNS = {"node": "node", "egress": "egress gateway", "client": "external client"}
MAX_SELECTORS = 64


def syntax(field: str, values: Sequence[str], kinds: Sequence[str], required: bool = True) -> list[FieldViolation]:
    """Violations of the selectors `values` of `field` (each `*` or `{kind}:{id}`)."""
    out = []
    if required and not values:
        out.append(FieldViolation(field, "needs at least one selector"))
    if len(values) > MAX_SELECTORS:
        out.append(FieldViolation(field, f"has more than {MAX_SELECTORS} selectors"))
        return out
    for i, s in enumerate(values):
        if s == "*":
            continue
        kind, sep, value = s.partition(":")
        if sep and kind == "domain" and kind in kinds:
            why = domains.problem(domains.canonical(value))
            if why is not None:
                out.append(FieldViolation(f"{field}[{i}]", f"domain: {why}"))
            continue
        if not sep or kind not in kinds or not names.valid_id(value):
            shown = s if len(s) <= 80 else s[:80] + "..."
            out.append(FieldViolation(
                f"{field}[{i}]", f"{shown!r} is not '*' or one of {', '.join(k + ':{id}' for k in kinds)}"))
    return out


async def require_existing(etcd, net_id: str, fields: Iterable[tuple[str, Sequence[str]]]):
    """Check that every `node:`/`egress:`/`client:` selector names an object of
    network `net_id`. Raises INVALID_ARGUMENT (reason SELECTOR_NOT_FOUND) with one
    violation per missing object; returns the compares that keep them existing."""
    compares, missing = [], []
    seen: dict[bytes, Any] = {}  # key -> its KV, or None
    for field, values in fields:
        for i, s in enumerate(values):
            kind, _, value = s.partition(":")
            if kind not in COLLECTIONS:
                continue
            key = etcd.key(COLLECTIONS[kind], net_id, value)
            if key not in seen:
                seen[key] = await etcd.get(key)
                kv = seen[key]
                if kv is not None:
                    compares.append(etcd.txn_ops.mod(key) == kv.mod_revision)
            if seen[key] is None:
                missing.append(FieldViolation(
                    f"{field}[{i}]", f"no {NOUNS[kind]} {value!r} in {names.network_name(net_id)!r}"))
    if missing:
        err = invalid_argument(missing)
        err.reason = "SELECTOR_NOT_FOUND"
        raise err
    return compares
