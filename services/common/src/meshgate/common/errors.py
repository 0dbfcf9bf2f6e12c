"""API errors as `google.rpc.Status` with details.

Handlers raise `ApiError` (or one of the helpers below); the server kit turns it
into a gRPC status carrying `BadRequest`, `ErrorInfo` and `ResourceInfo`
details. Anything else that escapes a handler becomes INTERNAL with a generic
message: the traceback goes to the log, never to the caller.

Hazards:
- Messages and details reach callers verbatim. Never put a secret (key,
  token, enrollment secret) into one.
- They travel in the call's trailer (`grpc-message`, `grpc-status-details-bin`),
  which clients cap (8-16 KiB by default): an error echoing a megabyte of
  input reaches the caller as RESOURCE_EXHAUSTED ("Stream removed"), not as
  itself. Echo caller values through `shown` (a clipped repr); `to_status`
  clips whatever is left (message, fields, descriptions, metadata, names) and
  keeps the first violations that fit, saying how many were left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "meshgate.io"

# Bounds of what a status carries (characters; the serialized BadRequest in bytes).
MAX_SHOWN = 64
MAX_MESSAGE = 1024
MAX_FIELD = 256
MAX_DESCRIPTION = 512
MAX_METADATA_VALUE = 256
MAX_VIOLATIONS_BYTES = 2048


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """`repr(value)` for an error message, clipped: a value longer than `limit`
    characters shows its start and its length."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}... ({len(text)} characters)"


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, marked when cut."""
    if len(text) <= limit:
        return text
    return text[: limit - 40] + f"... ({len(text)} characters in all)"


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
        """The status a caller receives, bounded whatever the error holds (see
        the module's hazards)."""
        details: list[any_pb2.Any] = []
        message = self.message
        if self.violations:
            br = error_details_pb2.BadRequest()
            size = 0
            for v in self.violations:
                fv = error_details_pb2.BadRequest.FieldViolation(
                    field=clip(v.field, MAX_FIELD), description=clip(v.description, MAX_DESCRIPTION))
                size += fv.ByteSize() + 3
                if size > MAX_VIOLATIONS_BYTES and br.field_violations:
                    break
                br.field_violations.append(fv)
            left = len(self.violations) - len(br.field_violations)
            if left:
                message = f"{clip(message, MAX_MESSAGE - 60)} (and {left} more violations)"
            details.append(_pack(br))
        if self.reason:
            metadata = {clip(k, MAX_FIELD): clip(v, MAX_METADATA_VALUE) for k, v in list(self.metadata.items())[:16]}
            details.append(_pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=metadata)))
        if self.resource_type or self.resource_name:
            details.append(
                _pack(
                    error_details_pb2.ResourceInfo(
                        resource_type=self.resource_type, resource_name=clip(self.resource_name, MAX_FIELD)
                    )
                )
            )
        return status_pb2.Status(code=self.code.value[0], message=clip(message, MAX_MESSAGE), details=details)


def _pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def invalid_argument(violations: Iterable[FieldViolation], message: str = "") -> ApiError:
    vs = list(violations)
    if not message:
        # Bounded however many violations there are (to_status clips the rest).
        message = "; ".join(clip(f"{clip(v.field, MAX_FIELD)}: {v.description}", MAX_DESCRIPTION)
                            for v in vs[:8]) or "invalid request"
        if len(vs) > 8:
            message += f"; and {len(vs) - 8} more"
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, "INVALID_FIELD", vs)


def not_found(resource_type: str, name: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        f"{resource_type} {shown(name, MAX_FIELD)} not found",
        resource_type=resource_type,
        resource_name=name,
    )


def reference_not_found(field_path: str, resource_type: str, name: str) -> ApiError:
    """A request names another resource that does not exist."""
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        f"{field_path}: {resource_type} {shown(name, MAX_FIELD)} not found",
        "REFERENCE_NOT_FOUND",
        [FieldViolation(field_path, f"{resource_type} {shown(name, MAX_FIELD)} does not exist")],
        resource_type=resource_type,
        resource_name=name,
    )


def already_exists(resource_type: str, name: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.ALREADY_EXISTS,
        f"{resource_type} {shown(name, MAX_FIELD)} already exists",
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
        f"{resource_type} {shown(name, MAX_FIELD)} was changed since it was read (etag mismatch); read it again and retry",
        "ETAG_MISMATCH",
        [FieldViolation("etag", "does not match the stored resource")],
        resource_type=resource_type,
        resource_name=name,
    )


def code_name(code: int) -> str:
    return code_pb2.Code.Name(code)
