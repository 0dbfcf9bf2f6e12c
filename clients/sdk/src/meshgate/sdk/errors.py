"""One error hierarchy for every failed call.

Every gRPC failure becomes a `MeshgateError` subclass chosen by status code,
with the `google.rpc.Status` details read into attributes: field violations
(`violations`, and `fields` as a dict), the `ErrorInfo` reason and metadata,
and the `ResourceInfo` type and name. `retryable` says whether trying the same
call again later can succeed without changing it.

Hazard: messages come from the server verbatim; the server never puts secrets
in them, and neither does this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "meshgate.io"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class MeshgateError(Exception):
    """A call failed. Subclasses name the gRPC status code."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[FieldViolation] = field(default_factory=list)
    resource_type: str = ""
    resource_name: str = ""
    retryable: bool = False

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @property
    def fields(self) -> dict[str, str]:
        """Field violations as {field path: description}."""
        return {v.field: v.description for v in self.violations}

    def one_line(self) -> str:
        """A single line for people: the code, and each offending field."""
        if self.violations:
            return f"{self.code.name}: " + "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        return str(self).replace("\n", " ")


class InvalidArgument(MeshgateError):
    """The request is malformed; `violations` name the fields."""


class NotFound(MeshgateError):
    pass


class AlreadyExists(MeshgateError):
    pass


class FailedPrecondition(MeshgateError):
    pass


class Aborted(MeshgateError):
    """A stale etag or a lost race: read again, then retry."""


class OutOfRange(MeshgateError):
    pass


class ResourceExhausted(MeshgateError):
    pass


class PermissionDenied(MeshgateError):
    pass


class Unauthenticated(MeshgateError):
    pass


class Unavailable(MeshgateError):
    """The server or its storage could not be reached; retryable."""


class DeadlineExceeded(MeshgateError):
    """The call did not finish before its deadline; it may or may not have taken effect."""


class Cancelled(MeshgateError):
    pass


class Unimplemented(MeshgateError):
    pass


class Internal(MeshgateError):
    pass


class Unknown(MeshgateError):
    pass


BY_CODE: dict[grpc.StatusCode, type[MeshgateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Unknown,
    grpc.StatusCode.DATA_LOSS: Internal,
}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}


def from_status(code: grpc.StatusCode, message: str, status: status_pb2.Status | None = None) -> MeshgateError:
    kw: dict = {}
    violations: list[FieldViolation] = []
    for d in status.details if status is not None else ():
        kind = d.TypeName()
        if kind == error_details_pb2.BadRequest.DESCRIPTOR.full_name:
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            violations += [FieldViolation(v.field, v.description) for v in br.field_violations]
        elif kind == error_details_pb2.ErrorInfo.DESCRIPTOR.full_name:
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            kw.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        elif kind == error_details_pb2.ResourceInfo.DESCRIPTOR.full_name:
            ri = error_details_pb2.ResourceInfo()
            d.Unpack(ri)
            kw.update(resource_type=ri.resource_type, resource_name=ri.resource_name)
    cls = BY_CODE.get(code, Unknown)
    return cls(code, message, violations=violations, retryable=code in RETRYABLE, **kw)


def from_rpc_error(err: grpc.RpcError) -> MeshgateError:
    """The `MeshgateError` for a failed sync or asyncio call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else "") or code.name.lower()
    try:
        # A failed call's RpcError is the call (sync) or carries its trailing
        # metadata (asyncio's AioRpcError): all that from_call reads.
        status = rpc_status.from_call(cast(grpc.Call, err))
    except ValueError:  # code/message in the status detail disagree with the call's
        status = None
    e = from_status(code, message, status)
    e.__cause__ = None
    return e
