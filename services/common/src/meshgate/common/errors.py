"""API errors as `google.rpc.Status` with details.

Handlers raise `ApiError` (or one of the helpers below); the server kit turns it
into a gRPC status carrying `BadRequest`, `ErrorInfo` and `ResourceInfo`
details. Anything else that escapes a handler becomes INTERNAL with a generic
message: the traceback goes to the log, never to the caller.

Hazard: messages and details reach callers verbatim. Never put a secret (key,
token, enrollment secret) into one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "meshgate.io"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class ApiError(Exception):
    """An error the caller should see, with its gRPC code and details."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    violations: list[FieldViolation] = field(default_factory=list)
    resource_type: str = ""
    resource_name: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_status(self) -> status_pb2.Status:
        details: list[any_pb2.Any] = []
        if self.violations:
            br = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            details.append(_pack(br))
        if self.reason:
            details.append(
                _pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata))
            )
        if self.resource_type or self.resource_name:
            details.append(
                _pack(
                    error_details_pb2.ResourceInfo(
                        resource_type=self.resource_type, resource_name=self.resource_name
                    )
                )
            )
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


def _pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def invalid_argument(violations: Iterable[FieldViolation], message: str = "") -> ApiError:
    vs = list(violations)
    if not message:
        message = "; ".join(f"{v.field}: {v.description}" for v in vs) or "invalid request"
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, "INVALID_FIELD", vs)


def not_found(resource_type: str, name: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        f"{resource_type} {name!r} not found",
        resource_type=resource_type,
        resource_name=name,
    )


def reference_not_found(field_path: str, resource_type: str, name: str) -> ApiError:
    """A request names another resource that does not exist."""
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        f"{field_path}: {resource_type} {name!r} not found",
        "REFERENCE_NOT_FOUND",
        [FieldViolation(field_path, f"{resource_type} {name!r} does not exist")],
        resource_type=resource_type,
        resource_name=name,
    )


def already_exists(resource_type: str, name: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.ALREADY_EXISTS,
        f"{resource_type} {name!r} already exists",
        "RESOURCE_EXISTS",
        resource_type=resource_type,
        resource_name=name,
    )


def failed_precondition(message: str, reason: str, name: str = "", resource_type: str = "") -> ApiError:
    return ApiError(
        grpc.StatusCode.FAILED_PRECONDITION, message, reason, resource_type=resource_type, resource_name=name
    )


def etag_mismatch(resource_type: str, name: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.ABORTED,
        f"{resource_type} {name!r} was changed since it was read (etag mismatch); read it again and retry",
        "ETAG_MISMATCH",
        [FieldViolation("etag", "does not match the stored resource")],
        resource_type=resource_type,
        resource_name=name,
    )


def code_name(code: int) -> str:
    return code_pb2.Code.Name(code)
