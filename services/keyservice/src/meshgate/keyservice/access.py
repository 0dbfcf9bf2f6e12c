"""Who may call the key service: caller identities from client certificates.

The key service requires mTLS: every caller presents a certificate from the
internal CA (or the operator's), whose URI SAN is its identity,
`meshgate://services/{name}` for services and operators or
`meshgate://networks/{net}/nodes/{node}` for nodes. Each RPC's access rule
(`callers` in keys.proto) lists the service identities it admits; anyone
else, a node included, is refused with PERMISSION_DENIED, and a caller with no
identity with UNAUTHENTICATED. `SignCertificate` additionally issues service
identities only to the operator (`certs.py` makes the first ones offline).

Hazards:
- `--insecure` (development) admits every caller as `insecure-development`,
  logged loudly at start: the guard then checks nothing but the rule's
  existence.
- The identity is read from the verified peer certificate gRPC hands over
  (`x509_pem_cert` in the auth context), never from request fields.
"""

from __future__ import annotations

import contextvars
import functools
import logging

import grpc

from meshgate.common.access import Rule, rules_for
from meshgate.common.errors import ApiError
from meshgate.common.identity import SERVICE_PREFIX, peer_identity

log = logging.getLogger(__name__)

INSECURE = "insecure-development"

_caller: contextvars.ContextVar[str] = contextvars.ContextVar("meshgate_keyservice_caller", default="")


def current_caller() -> str:
    """The identity of the caller being served (`meshgate://...`, or INSECURE)."""
    return _caller.get()


def service_name(identity: str) -> str:
    """`controlplane` for `meshgate://services/controlplane`; '' for others."""
    return identity[len(SERVICE_PREFIX):] if identity.startswith(SERVICE_PREFIX) else ""


def check(rule: Rule, identity: str) -> None:
    if identity == INSECURE:
        return
    if not identity:
        raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "the key service needs a client certificate with a "
                       "meshgate identity (mTLS)", "CALLER_UNIDENTIFIED")
    if service_name(identity) not in rule.callers:
        raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                       f"{identity} may not call {rule.method}; it admits "
                       f"{', '.join(SERVICE_PREFIX + c for c in sorted(rule.callers))}",
                       "CALLER_NOT_ADMITTED", metadata={"caller": identity})


def protect(servicer, service, *, insecure: bool):
    """`servicer` with each RPC of `service` checked against its rule's callers
    (raises MissingRule for an RPC without one: the server does not start)."""
    rules = rules_for(service)
    for md in service.methods:
        rule = rules[md.name]
        fn = getattr(servicer, md.name)

        def wrap(fn=fn, rule=rule):
            @functools.wraps(fn)
            async def guarded(request, context):
                identity = INSECURE if insecure else peer_identity(context)
                check(rule, identity)
                _caller.set(identity)
                return await fn(request, context)

            return guarded

        setattr(servicer, md.name, wrap())
    return servicer
