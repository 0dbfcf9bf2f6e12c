"""gRPC handlers of the control plane: translate requests to core calls.

Handlers hold no logic: parsing, validation and transactions live in the
per-kind modules. Errors are raised as `ApiError` and turned into statuses by
the server kit's interceptor.
"""

from __future__ import annotations

from google.protobuf import empty_pb2

from meshgate.api.v1 import (
    egress_pb2,
    egress_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from meshgate.common.etcd import Etcd
from meshgate.common.server import ServiceBinding
from meshgate.controlplane.egress import EgressGateways
from meshgate.controlplane.networks import Networks
from meshgate.controlplane.nodes import Nodes


class NetworkService(network_pb2_grpc.NetworkServiceServicer):
    def __init__(self, networks: Networks, nodes: Nodes) -> None:
        self.networks = networks
        self.nodes = nodes

    async def CreateNetwork(self, request, context):
        return await self.networks.create(request)

    async def GetNetwork(self, request, context):
        return await self.networks.get(request.name)

    async def ListNetworks(self, request, context):
        items, token = await self.networks.list(request.page_size, request.page_token)
        return network_pb2.ListNetworksResponse(networks=items, next_page_token=token)

    async def UpdateNetwork(self, request, context):
        return await self.networks.update(request)

    async def DeleteNetwork(self, request, context):
        await self.networks.delete(request)
        return empty_pb2.Empty()

    async def GetNetworkStatus(self, request, context):
        network, _ = await self.networks.read(request.name)
        rev = await self.networks.etcd.revision()
        status = network_pb2.NetworkStatus(name=network.name, revision=rev)
        token = ""
        while True:
            nodes, token = await self.nodes.list_children(network.name, 1000, token)
            for n in nodes:
                # Agents do not stream yet: nothing is desired or applied.
                status.nodes.add(node=n.name)
            if not token:
                break
        status.total_nodes = len(status.nodes)
        return status


class NodeService(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes

    async def CreateNode(self, request, context):
        return await self.nodes.create(request)

    async def GetNode(self, request, context):
        return await self.nodes.get(request.name)

    async def ListNodes(self, request, context):
        items, token = await self.nodes.list_children(request.parent, request.page_size, request.page_token)
        return node_pb2.ListNodesResponse(nodes=items, next_page_token=token)

    async def UpdateNode(self, request, context):
        return await self.nodes.update(request)

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


def bindings(etcd: Etcd) -> list[ServiceBinding]:
    """The control plane's services, wired to one etcd adapter."""
    networks = Networks(etcd)
    nodes = Nodes(etcd, networks)
    gateways = EgressGateways(etcd, networks)
    return [
        ServiceBinding.of(network_pb2, network_pb2_grpc, "NetworkService", NetworkService(networks, nodes)),
        ServiceBinding.of(node_pb2, node_pb2_grpc, "NodeService", NodeService(nodes)),
        ServiceBinding.of(egress_pb2, egress_pb2_grpc, "EgressGatewayService", EgressGatewayService(gateways)),
    ]
