"""gRPC handlers of the key service (first slice: the surface only)."""

from __future__ import annotations

import grpc

from meshgate.api.v1 import keys_pb2, keys_pb2_grpc
from meshgate.common.errors import ApiError
from meshgate.common.server import ServiceBinding


def _not_yet(method: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.UNIMPLEMENTED,
        f"KeyService.{method} is part of the API but not implemented in this release",
        "NOT_IMPLEMENTED",
    )


class KeyService(keys_pb2_grpc.KeyServiceServicer):
    async def RegisterNodeKey(self, request, context):
        raise _not_yet("RegisterNodeKey")

    async def GetKeyAuthority(self, request, context):
        raise _not_yet("GetKeyAuthority")

    async def IssuePresharedKeys(self, request, context):
        raise _not_yet("IssuePresharedKeys")

    async def RotatePresharedKeys(self, request, context):
        raise _not_yet("RotatePresharedKeys")

    async def RotateNodeKey(self, request, context):
        raise _not_yet("RotateNodeKey")

    async def IssueClientKeyPair(self, request, context):
        raise _not_yet("IssueClientKeyPair")

    async def SignCertificate(self, request, context):
        raise _not_yet("SignCertificate")

    async def RotateKeyEncryptionKey(self, request, context):
        raise _not_yet("RotateKeyEncryptionKey")


def bindings() -> list[ServiceBinding]:
    return [ServiceBinding.of(keys_pb2, keys_pb2_grpc, "KeyService", KeyService())]
