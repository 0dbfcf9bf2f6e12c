"""gRPC handlers of the key service: request in, core call, response out; no logic.

Every RPC is wrapped by `access.protect` before it is bound: only the callers
its rule names (by their certificate's identity) get through.
"""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from meshgate.api.v1 import keys_pb2, keys_pb2_grpc
from meshgate.common.errors import ApiError, FieldViolation, invalid_argument
from meshgate.common.server import ServiceBinding
from meshgate.keyservice import access, names
from meshgate.keyservice.core import KeyServiceCore
from meshgate.keyservice.scheduler import request_node_rotation


class KeyService(keys_pb2_grpc.KeyServiceServicer):
    def __init__(self, core: KeyServiceCore) -> None:
        self.core = core

    async def RegisterNodeKey(self, request, context):
        return await self.core.authority.register(request.node, request.public_key, detached=request.detached)

    async def GetKeyAuthority(self, request, context):
        keys = await self.core.authority.public_keys()
        return keys_pb2.KeyAuthority(public_keys=[k.public_key for k in keys], key_ids=[k.key_id for k in keys])

    async def IssuePresharedKeys(self, request, context):
        psks = await self.core.psk.issue(request.network, list(request.pairs))
        return keys_pb2.IssuePresharedKeysResponse(keys=[p.to_proto() for p in psks])

    async def RotatePresharedKeys(self, request, context):
        if request.pairs:
            n = await self.core.psk.rotate(request.network, list(request.pairs))
        else:
            n = await self.core.psk.rotate_all(request.network)
        return keys_pb2.RotatePresharedKeysResponse(rotated=n)

    async def RotateNodeKey(self, request, context):
        parsed = names.parse_child(request.node, "nodes")
        if parsed is None:
            raise invalid_argument([FieldViolation("node", names.node_rule())])
        resp = await request_node_rotation(self.core.vault, *parsed)
        if resp is None:  # a concurrent request won: it is the answer
            kv = await self.core.vault.etcd.get(self.core.vault.key("keys/nodeRotation/" + "/".join(parsed)))
            resp = keys_pb2.RotateNodeKeyResponse.FromString(kv.value) if kv else keys_pb2.RotateNodeKeyResponse()
        return resp

    async def IssueClientKeyPair(self, request, context):
        pair = await self.core.clients.issue(request.external_client, replace=request.replace)
        return keys_pb2.ClientKeyPair(public_key=pair.public_key, private_key=pair.private_key, signed=pair.signed)

    async def SignCertificate(self, request, context):
        caller = access.current_caller()
        if request.identity.startswith("services/") and caller not in (access.INSECURE,
                                                                         access.SERVICE_PREFIX + "operator"):
            # A service identity is the power to call this service (or to be
            # the control plane): only the operator hands those out.
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                           f"{caller} may not obtain a certificate for a service identity ({request.identity})",
                           "SERVICE_IDENTITY_REFUSED")
        issued = await self.core.ca.sign(request.csr, request.identity)
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(issued.not_after)
        return keys_pb2.Certificate(certificate_chain=issued.chain_pem, expire_time=ts)

    async def RotateKeyEncryptionKey(self, request, context):
        if not request.new_key_id:
            raise invalid_argument([FieldViolation("new_key_id", "is required")])
        return keys_pb2.RotateKeyEncryptionKeyResponse(rewrapped=await self.core.vault.rotate_kek(request.new_key_id))


def bindings(core: KeyServiceCore, *, insecure: bool = False) -> list[ServiceBinding]:
    """The key service's bindings; `insecure` admits every caller (development)."""
    servicer = access.protect(KeyService(core), keys_pb2.DESCRIPTOR.services_by_name["KeyService"], insecure=insecure)
    return [ServiceBinding.of(keys_pb2, keys_pb2_grpc, "KeyService", servicer)]
