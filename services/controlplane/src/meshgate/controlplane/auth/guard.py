"""The access guard: every admin RPC authenticated, authorized and audited.

`Guard.protect(servicer, service_descriptor)` wraps each RPC of a servicer
with its access rule (rules.py): authenticate the bearer credential (an API
token, or an OIDC token when issuers are configured), check the rule's
permission for the network the request names, run the handler with the
caller in `current_principal()`, and leave the audit record the rule asks for.
It wraps the servicer itself rather than sitting in a server interceptor, so
any server built from the control plane's bindings enforces it, and the
handler's request is at hand for the scope check.

Hazards:
- A method without a rule makes `protect` raise: the server does not start.
- Agent RPCs (Enroll, Sync) pass through untouched: they authenticate by the
  agent protocol, and an API token grants nothing there. Conversely an agent
  credential is no API token and is refused here.
- Listings and watches marked `per_item` must filter by
  `visible_networks(permission)`; the guard cannot filter a response itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import trace

from meshgate.api.v1 import auth_pb2
from meshgate.common.errors import ApiError, FieldViolation, invalid_argument
from meshgate.common.etcd import EtcdUnavailable
from meshgate.controlplane.auth import audit as audit_mod
from meshgate.controlplane.auth.principal import SECRETS, Principal
from meshgate.controlplane.auth.rules import Rule, network_of, rules_for
from meshgate.controlplane.auth.tokens import TokenCache, Tokens, parse_bearer, unauthenticated

log = logging.getLogger(__name__)

REVALIDATE_S = 0.5

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("meshgate_principal", default=None)


def current_principal() -> Principal:
    p = _principal.get()
    if p is None:  # pragma: no cover - a handler outside the guard is a wiring bug
        raise RuntimeError("no authenticated caller in this context")
    return p


def visible_networks(permission: str) -> frozenset[str] | None:
    """The networks whose items the caller may see (None: all)."""
    return current_principal().networks_for(permission)


def denied(message: str, reason: str = "PERMISSION_DENIED", metadata: dict[str, str] | None = None) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, message, reason, metadata=metadata or {})


class Authenticator:
    """Turns a call's `authorization` metadata into a principal."""

    def __init__(self, cache: TokenCache, tokens: Tokens, oidc=None) -> None:
        self.cache = cache
        self.tokens = tokens
        self.oidc = oidc  # oidc.OidcVerifier or None

    async def authenticate(self, metadata) -> Principal:
        header = ""
        for k, v in metadata or ():
            if k == "authorization":
                header = v if isinstance(v, str) else v.decode()
                break
        if not header:
            raise unauthenticated("CREDENTIALS_MISSING",
                                  "this call needs a bearer token (authorization: Bearer <token>); none was sent")
        scheme, _, bearer = header.partition(" ")
        bearer = bearer.strip()
        if scheme.lower() != "bearer" or not bearer:
            raise unauthenticated("CREDENTIALS_MALFORMED", "the authorization header is not 'Bearer <token>'")
        token_id = parse_bearer(bearer)
        if token_id is not None:
            principal = self.cache.check(bearer, token_id, time.time())
            self.tokens.used(token_id)
            return principal
        if self.oidc is not None and self.oidc.looks_like_jwt(bearer):
            from meshgate.controlplane.auth.oidc import OidcRefused

            try:
                return await self.oidc.verify(bearer)
            except OidcRefused as e:
                raise unauthenticated(e.reason, f"OIDC token refused: {e.message}") from None
        raise unauthenticated("TOKEN_INVALID", "not a meshgate API token"
                              + (" or a token of a configured OIDC issuer" if self.oidc is not None else ""))

    def still_valid(self, principal: Principal) -> bool:
        """Whether a principal authenticated earlier may go on (a stream's
        caller): its token not revoked or deleted, its credential not expired."""
        if principal.expire_time is not None and time.time() >= principal.expire_time:
            return False
        if principal.token_id:
            entry = self.cache.entries.get(principal.token_id)
            return entry is not None and not entry.token.HasField("revoke_time")
        return True


def authorize(rule: Rule, principal: Principal, request) -> str | None:
    """Check `rule` for `principal` and `request`; returns the network the
    call is about (None when it is about no single network)."""
    network: str | None = None
    value = rule.scope_value(request) if rule.scope_field else ""
    if value:
        network = network_of(value)
        if network is None and not rule.per_item:
            # A name outside any network: the handler would refuse it; say so
            # here, before anything about the caller's rights is told.
            field = ".".join(rule.scope_field)
            raise invalid_argument([FieldViolation(field, f"{value!r} is not a name inside a network (networks/{{network}}/...)")])
    if rule.permission:
        if network is not None:
            ok = principal.allows(rule.permission, network)
        elif rule.per_item:
            ok = principal.networks_for(rule.permission) != frozenset()
        else:
            ok = principal.allows(rule.permission, None)
        if not ok:
            where = f"network {network!r}" if network else ("any network" if rule.per_item else "every network")
            raise denied(f"{principal.name} lacks {rule.permission} on {where}",
                         metadata={"permission": rule.permission})
    if rule.returns_secret and not principal.allows(SECRETS, network):
        raise denied(f"{principal.name} lacks {SECRETS}: this call returns secret material",
                     metadata={"permission": SECRETS})
    return network


def _status_of(exc: BaseException, context) -> tuple[str, str]:
    if isinstance(exc, ApiError):
        return exc.code.name, exc.message
    if isinstance(exc, EtcdUnavailable):
        return "UNAVAILABLE", "storage (etcd) is unavailable"
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code() if hasattr(context, "code") else None
        return (code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"), ""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED", "the caller went away"
    return "INTERNAL", "internal error"


class Guard:
    def __init__(self, authenticator: Authenticator, audit: audit_mod.AuditLog) -> None:
        self.authn = authenticator
        self.audit = audit

    def protect(self, servicer: Any, service) -> Any:
        """`servicer` with every RPC of `service` (a ServiceDescriptor) guarded."""
        rules = rules_for(service)  # raises MissingRule
        for md in service.methods:
            rule = rules[md.name]
            if rule.agent:
                continue
            fn = getattr(servicer, md.name)
            wrapped = self._stream(rule, fn) if md.server_streaming else self._unary(rule, fn)
            setattr(servicer, md.name, wrapped)
        return servicer

    def _begin(self, rule: Rule, request, context) -> audit_mod.AuditScope:
        span = trace.get_current_span().get_span_context()
        rec = auth_pb2.AuditRecord(
            principal="anonymous", authentication="none", method=rule.method, resource=rule.resource(request),
            peer=context.peer() or "", trace_id=format(span.trace_id, "032x") if span.is_valid else "",
            returned_secret=rule.returns_secret,
        )
        rec.network = network_of(rec.resource) or ""
        if rule.mutation:
            rec.field_paths.extend(audit_mod.changed_paths(request, rule.id_field))
        return self.audit.new_scope(rec)

    async def _enter(self, rule: Rule, request, context, scope: audit_mod.AuditScope) -> Principal:
        principal = await self.authn.authenticate(context.invocation_metadata())
        scope.record.principal = principal.name
        scope.record.authentication = principal.authentication
        authorize(rule, principal, request)
        return principal

    async def _end(self, rule: Rule, scope: audit_mod.AuditScope, exc: BaseException | None, context) -> None:
        if exc is None:
            code, message = "OK", ""
        else:
            code, message = _status_of(exc, context)
        scope.record.status_code = code
        scope.record.status_message = message
        refused = code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
        if rule.mutation or rule.returns_secret or refused:
            await self.audit.finish(scope)
        else:
            scope.active = False

    def _unary(self, rule: Rule, fn: Callable[..., Awaitable[Any]]):
        @functools.wraps(fn)
        async def guarded(request, context):
            scope = self._begin(rule, request, context)
            token = audit_mod.current.set(scope if (rule.mutation or rule.returns_secret) else None)
            ptoken = _principal.set(None)
            exc: BaseException | None = None
            try:
                _principal.set(await self._enter(rule, request, context, scope))
                return await fn(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                scope.active = False
                await self._end(rule, scope, exc, context)
                audit_mod.current.reset(token)
                _principal.reset(ptoken)

        return guarded

    def _stream(self, rule: Rule, fn):
        @functools.wraps(fn)
        async def guarded(request, context):
            # Each call runs in its own task (and context): no reset needed,
            # and none is safe in a generator that may be closed elsewhere.
            scope = self._begin(rule, request, context)
            exc: BaseException | None = None
            try:
                _principal.set(await self._enter(rule, request, context, scope))
            except BaseException as e:
                exc = e
                raise
            finally:
                scope.active = False
                if exc is not None:
                    await self._end(rule, scope, exc, context)
            principal = _principal.get()
            assert principal is not None
            items = fn(request, context).__aiter__()
            try:
                while True:
                    nxt = asyncio.ensure_future(items.__anext__())
                    # A stream outlives no revocation or expiry of its caller's
                    # credential: checked every REVALIDATE_S while it waits.
                    while not (await asyncio.wait({nxt}, timeout=REVALIDATE_S))[0]:
                        if not self.authn.still_valid(principal):
                            nxt.cancel()
                            await asyncio.gather(nxt, return_exceptions=True)
                            raise unauthenticated("CREDENTIALS_ENDED", f"the credential of {principal.name} was "
                                                  "revoked or expired; this stream ends")
                    try:
                        item = nxt.result()
                    except StopAsyncIteration:
                        return
                    if not self.authn.still_valid(principal):
                        raise unauthenticated("CREDENTIALS_ENDED", f"the credential of {principal.name} was "
                                              "revoked or expired; this stream ends")
                    yield item
            finally:
                await items.aclose() if hasattr(items, "aclose") else None

        return guarded
