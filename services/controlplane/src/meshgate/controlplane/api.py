"""gRPC handlers of the control plane: translate requests to core calls.

Handlers hold no logic: parsing, validation and transactions live in the
per-kind modules. Errors are raised as `ApiError` and turned into statuses by
the server kit's interceptor. Every servicer is wrapped by the access guard
(auth/guard.py) before it is bound: authentication, the RPC's access rule and
the audit record happen there, and listings marked `per_item` filter here by
what the caller may see.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass

from google.protobuf import empty_pb2

from meshgate.api.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    egress_pb2,
    egress_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    external_client_pb2,
    external_client_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from meshgate.common.etcd import Etcd
from meshgate.common.server import ServiceBinding
from meshgate.controlplane import admission, events, paths
from meshgate.controlplane.auth import audit as audit_mod
from meshgate.controlplane.auth.guard import Authenticator, Guard, current_principal, visible_networks
from meshgate.controlplane.auth.tokens import DEFAULT_MAX_TTL_S, TokenCache, Tokens
from meshgate.controlplane.cache import StateCache
from meshgate.controlplane.egress import EgressGateways
from meshgate.controlplane.egresshealth import DEFAULT_FAILBACK_S, Damper, EgressHealth
from meshgate.controlplane.enrollment import EnrollmentKeys
from meshgate.controlplane.externalclients import ExternalClients
from meshgate.controlplane.handoff import DrainHandoff
from meshgate.controlplane.keymaterial import KeyMaterial
from meshgate.controlplane.liveness import DEFAULT_DELAY_S, STARTUP_GRACE_S, Liveness
from meshgate.controlplane.networks import Networks
from meshgate.controlplane.nodes import Nodes
from meshgate.controlplane.policies import AccessPolicies
from meshgate.controlplane.relays import Relays
from meshgate.controlplane.sync import AgentService, Fanout, with_trace


class NetworkService(network_pb2_grpc.NetworkServiceServicer):
    def __init__(self, networks: Networks, fanout: Fanout) -> None:
        self.networks = networks
        self.fanout = fanout

    async def CreateNetwork(self, request, context):
        return await self.networks.create(request)

    async def GetNetwork(self, request, context):
        return await self.networks.get(request.name)

    async def ListNetworks(self, request, context):
        visible = visible_networks("networks.list")
        if visible is None:
            items, token = await self.networks.list(request.page_size, request.page_token)
        else:
            # A scoped caller pages over its own networks only: neither the
            # items nor the page tokens name one it may not see.
            items, token = await self.networks.list_among(sorted(visible), request.page_size, request.page_token)
        return network_pb2.ListNetworksResponse(networks=items, next_page_token=token)

    async def UpdateNetwork(self, request, context):
        return await self.networks.update(request)

    async def DeleteNetwork(self, request, context):
        await self.networks.delete(request)
        return empty_pb2.Empty()

    async def GetNetworkStatus(self, request, context):
        network, _ = await self.networks.read(request.name)
        return await self.fanout.network_status(network)


class NodeService(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, nodes: Nodes, fanout: Fanout | None = None) -> None:
        self.nodes = nodes
        self.fanout = fanout

    async def _live(self, items: list) -> list:
        """Nodes with their live state (connected, converged) instead of the stored PENDING."""
        if self.fanout is not None and items:
            by_net: dict[str, list[str]] = {}
            for n in items:
                by_net.setdefault(n.name.split("/")[1], []).append(n.name)
            states: dict[str, int] = {}
            for net_id, names_ in by_net.items():
                states.update(await self.fanout.node_states(net_id, names_))
            for n in items:
                n.state = states.get(n.name, n.state)
        return items

    async def CreateNode(self, request, context):
        return await self.nodes.create(request)

    async def GetNode(self, request, context):
        return (await self._live([await self.nodes.get(request.name)]))[0]

    async def ListNodes(self, request, context):
        items, token = await self.nodes.list_children(request.parent, request.page_size, request.page_token)
        return node_pb2.ListNodesResponse(nodes=await self._live(items), next_page_token=token)

    async def UpdateNode(self, request, context):
        updated = await self.nodes.update(request)
        return updated if request.validate_only else (await self._live([updated]))[0]

    async def DeleteNode(self, request, context):
        await self.nodes.delete(request)
        return empty_pb2.Empty()


class EgressGatewayService(egress_pb2_grpc.EgressGatewayServiceServicer):
    def __init__(self, gateways: EgressGateways) -> None:
        self.gateways = gateways

    async def CreateEgressGateway(self, request, context):
        return await self.gateways.create(request)

    async def GetEgressGateway(self, request, context):
        return await self.gateways.get(request.name)

    async def ListEgressGateways(self, request, context):
        items, token = await self.gateways.list_children(request.parent, request.page_size, request.page_token)
        return egress_pb2.ListEgressGatewaysResponse(egress_gateways=items, next_page_token=token)

    async def UpdateEgressGateway(self, request, context):
        return await self.gateways.update(request)

    async def DeleteEgressGateway(self, request, context):
        await self.gateways.delete(request)
        return empty_pb2.Empty()


class EnrollmentKeyService(enrollment_pb2_grpc.EnrollmentKeyServiceServicer):
    def __init__(self, keys: EnrollmentKeys) -> None:
        self.keys = keys

    async def CreateEnrollmentKey(self, request, context):
        return await self.keys.create(request)

    async def GetEnrollmentKey(self, request, context):
        return await self.keys.get(request.name)

    async def ListEnrollmentKeys(self, request, context):
        items, token = await self.keys.list_children(request.parent, request.page_size, request.page_token)
        return enrollment_pb2.ListEnrollmentKeysResponse(enrollment_keys=items, next_page_token=token)

    async def RevokeEnrollmentKey(self, request, context):
        return await self.keys.revoke(request)

    async def DeleteEnrollmentKey(self, request, context):
        await self.keys.delete(request)
        return empty_pb2.Empty()


class AccessPolicyService(policy_pb2_grpc.AccessPolicyServiceServicer):
    def __init__(self, policies: AccessPolicies) -> None:
        self.policies = policies

    async def CreateAccessPolicy(self, request, context):
        return await self.policies.create(request)

    async def GetAccessPolicy(self, request, context):
        return await self.policies.get(request.name)

    async def ListAccessPolicies(self, request, context):
        items, token = await self.policies.list_children(request.parent, request.page_size, request.page_token)
        return policy_pb2.ListAccessPoliciesResponse(access_policies=items, next_page_token=token)

    async def UpdateAccessPolicy(self, request, context):
        return await self.policies.update(request)

    async def DeleteAccessPolicy(self, request, context):
        await self.policies.delete(request)
        return empty_pb2.Empty()


class ExternalClientService(external_client_pb2_grpc.ExternalClientServiceServicer):
    def __init__(self, clients: ExternalClients) -> None:
        self.clients = clients

    async def CreateExternalClient(self, request, context):
        return await self.clients.create(request)

    async def GetExternalClient(self, request, context):
        return await self.clients.get(request.name)

    async def ListExternalClients(self, request, context):
        items, token = await self.clients.list_children(request.parent, request.page_size, request.page_token)
        return external_client_pb2.ListExternalClientsResponse(external_clients=items, next_page_token=token)

    async def UpdateExternalClient(self, request, context):
        return await self.clients.update(request)

    async def DeleteExternalClient(self, request, context):
        await self.clients.delete(request)
        return empty_pb2.Empty()

    async def RotateExternalClientKey(self, request, context):
        return await self.clients.rotate_key(request)


class TokenService(auth_pb2_grpc.TokenServiceServicer):
    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def CreateToken(self, request, context):
        caller = current_principal()
        return await self.tokens.create(request, creator=caller.name, principal=caller)

    async def GetToken(self, request, context):
        return await self.tokens.get(request.name)

    async def ListTokens(self, request, context):
        items, token = await self.tokens.list(request.page_size, request.page_token)
        return auth_pb2.ListTokensResponse(tokens=items, next_page_token=token)

    async def RevokeToken(self, request, context):
        return await self.tokens.revoke(request)

    async def DeleteToken(self, request, context):
        await self.tokens.delete(request)
        return empty_pb2.Empty()

    async def GetCallerIdentity(self, request, context):
        p = current_principal()
        out = auth_pb2.CallerIdentity(principal=p.name, authentication=p.authentication)
        for b in p.bindings:
            out.bindings.add(role=b.role, permissions=sorted(b.permissions),
                             networks=[f"networks/{n}" for n in sorted(b.networks)])
        if p.expire_time is not None:
            out.expire_time.FromNanoseconds(int(p.expire_time * 1e9))
        return out


class AuditRecordService(auth_pb2_grpc.AuditRecordServiceServicer):
    def __init__(self, log: audit_mod.AuditLog) -> None:
        self.log = log

    async def ListAuditRecords(self, request, context):
        items, token = await self.log.list(request, visible_networks("audit.list"))
        return auth_pb2.ListAuditRecordsResponse(audit_records=items, next_page_token=token)

    async def WatchAuditRecords(self, request, context):
        async for rec in self.log.watch(request, visible_networks("audit.watch")):
            yield rec


@dataclass
class AuthSettings:
    """How callers of the admin API are authenticated and audited."""

    bootstrap_token_file: str = ""
    """Where to write the bootstrap admin token on the first start (0600); empty: none is made."""
    bootstrap_token_ttl_s: float = 30 * 86400
    """How long the bootstrap admin token is valid."""
    token_max_ttl_s: float = DEFAULT_MAX_TTL_S
    """The longest lifetime CreateToken accepts."""
    oidc_issuers: tuple = ()
    """OIDC issuers whose JWTs are accepted (oidc.IssuerConfig); empty: API tokens only."""
    audit_retention_s: float = audit_mod.DEFAULT_RETENTION_S
    """How long audit records are kept."""
    audit_max_records: int = audit_mod.DEFAULT_MAX_RECORDS
    """The most audit records kept; the oldest go first."""


class ControlPlane:
    """The control plane's parts wired to one etcd adapter, with a lifecycle:
    `start()` loads the state cache and starts the fan-out, `stop()` ends
    agent streams and flushes status."""

    def __init__(self, etcd: Etcd, keyservice: str = "", gateway_failover_after: float = DEFAULT_DELAY_S,
                 keyservice_credentials=None, auth: AuthSettings | None = None,
                 gateway_failback_after: float = DEFAULT_FAILBACK_S,
                 gateway_startup_grace: float = STARTUP_GRACE_S,
                 path_delay: float = paths.DEFAULT_DELAY_S, path_recover_after: float = paths.DEFAULT_RECOVER_S) -> None:
        self.auth_settings = auth or AuthSettings()
        self.etcd = audit_mod.with_audit(with_trace(etcd))
        self.token_cache = TokenCache(etcd)
        self.tokens = Tokens(etcd, self.token_cache, self.auth_settings.token_max_ttl_s)
        self.audit = audit_mod.AuditLog(etcd, self.auth_settings.audit_retention_s,
                                        self.auth_settings.audit_max_records)
        oidc = None
        if self.auth_settings.oidc_issuers:
            from meshgate.controlplane.auth.oidc import OidcVerifier

            oidc = OidcVerifier(list(self.auth_settings.oidc_issuers))
        self.guard = Guard(Authenticator(self.token_cache, self.tokens, oidc), self.audit)
        self.cache = StateCache(etcd)
        replica = f"{socket.gethostname()}/{os.getpid()}"
        # One damper: a gateway that failed over for either reason waits longer to come back.
        damper = Damper(gateway_failback_after)
        self.liveness = Liveness(etcd, self.cache, gateway_failover_after, replica=replica,
                                 startup_grace_s=gateway_startup_grace, damper=damper)
        self.egress_health = EgressHealth(etcd, self.cache, replica=replica, damper=damper)
        self.key_material = KeyMaterial(keyservice, credentials=keyservice_credentials)
        self.networks = Networks(etcd)
        self.nodes = Nodes(etcd, self.networks, self.cache, self.key_material)
        self.gateways = EgressGateways(etcd, self.networks)
        self.policies = AccessPolicies(etcd, self.networks)
        self.enrollment = EnrollmentKeys(etcd, self.networks, self.nodes)
        self.external_clients = ExternalClients(etcd, self.networks, self.cache, self.key_material)
        self.fanout = Fanout(self.cache, etcd, self.key_material)
        self.relays = Relays(etcd, self.cache, self.fanout.status, path_delay, path_recover_after)
        self.fanout.paths = self.relays
        self.fanout.health = self.egress_health
        self.drain_handoff = DrainHandoff(etcd, self.cache, self.fanout, replica=replica)
        self.egress_health.close_stream = self._end_stream
        self.agent_service = AgentService(self.enrollment, self.fanout, self.cache)
        bind = self._bind
        self.bindings = [
            bind(network_pb2, network_pb2_grpc, "NetworkService", NetworkService(self.networks, self.fanout)),
            bind(node_pb2, node_pb2_grpc, "NodeService", NodeService(self.nodes, self.fanout)),
            bind(egress_pb2, egress_pb2_grpc, "EgressGatewayService", EgressGatewayService(self.gateways)),
            bind(enrollment_pb2, enrollment_pb2_grpc, "EnrollmentKeyService", EnrollmentKeyService(self.enrollment)),
            bind(policy_pb2, policy_pb2_grpc, "AccessPolicyService", AccessPolicyService(self.policies)),
            bind(external_client_pb2, external_client_pb2_grpc, "ExternalClientService",
                 ExternalClientService(self.external_clients)),
            bind(auth_pb2, auth_pb2_grpc, "TokenService", TokenService(self.tokens)),
            bind(auth_pb2, auth_pb2_grpc, "AuditRecordService", AuditRecordService(self.audit)),
            bind(agent_pb2, agent_pb2_grpc, "AgentService", self.agent_service),
            events.binding(etcd, self.guard.protect),
        ]

    def _end_stream(self, node: str, why: str) -> None:
        """End `node`'s stream on this replica (its agent reconnects if it can)."""
        import grpc

        from meshgate.common.errors import ApiError

        session = self.fanout.sessions.get(node)
        if session is not None:
            session.close(ApiError(grpc.StatusCode.UNAVAILABLE, f"{why}; reconnect", "AGENT_SILENT"))

    def serve_agent_certificates(self, endpoint: str, ca_pem: bytes, bearer_tokens: bool = False) -> None:
        """Agents enroll with a CSR and get a certificate, and stream with it at
        `endpoint` (an mTLS listener whose client CA is `ca_pem`); bearer tokens
        are refused on Sync unless `bearer_tokens` (development, migration)."""
        self.enrollment.agent_endpoint = endpoint
        self.enrollment.agent_ca = ca_pem
        self.enrollment.agent_tokens = bearer_tokens
        self.agent_service.agent_tokens = bearer_tokens

    def _bind(self, pb2_module, grpc_module, name: str, servicer) -> ServiceBinding:
        """A binding whose RPCs the access guard protects (refused without a
        rule), each request checked by admission.py before its handler."""
        service = pb2_module.DESCRIPTOR.services_by_name[name]
        return ServiceBinding.of(pb2_module, grpc_module, name,
                                 self.guard.protect(admission.wrap(servicer, service), service))

    async def start(self) -> None:
        self.token_cache.start()
        await asyncio.wait_for(self.token_cache.ready.wait(), 30)
        if self.auth_settings.bootstrap_token_file:
            await self.tokens.bootstrap(self.auth_settings.bootstrap_token_file,
                                        self.auth_settings.bootstrap_token_ttl_s)
        self.tokens.start()
        self.audit.start()
        self.liveness.start()
        self.relays.start()
        self.egress_health.start()
        self.drain_handoff.start()
        await self.fanout.start()
        await self.cache.start()
        await asyncio.wait_for(self.cache.ready.wait(), 30)

    async def stop(self) -> None:
        await self.tokens.stop()
        await self.audit.stop()
        await self.token_cache.stop()
        await self.liveness.stop()
        await self.relays.stop()
        await self.egress_health.stop()
        await self.drain_handoff.stop()
        await self.fanout.stop()
        await self.cache.stop()
        await self.key_material.close()
