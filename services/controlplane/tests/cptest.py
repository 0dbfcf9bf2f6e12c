"""Small builders shared by the control-plane tests."""

from __future__ import annotations

import base64
import os

import grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2

from meshgate.api.v1 import egress_pb2, network_pb2, node_pb2


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def make_network(cp, net_id="prod", cidr="100.64.0.0/24", **kw):
    return await cp.networks.CreateNetwork(
        network_pb2.CreateNetworkRequest(network_id=net_id, network=network_pb2.Network(ipv4_cidr=cidr, **kw))
    )


async def make_node(cp, net_id="prod", node_id="a", **kw):
    return await cp.nodes.CreateNode(
        node_pb2.CreateNodeRequest(parent=f"networks/{net_id}", node_id=node_id, node=node_pb2.Node(**kw))
    )


async def make_gateway(cp, net_id="prod", gw_id="gw", node="a", ranges=("198.51.100.0/24",), **kw):
    return await cp.egress.CreateEgressGateway(
        egress_pb2.CreateEgressGatewayRequest(
            parent=f"networks/{net_id}",
            egress_gateway_id=gw_id,
            egress_gateway=egress_pb2.EgressGateway(node=f"networks/{net_id}/nodes/{node}", ranges=list(ranges), **kw),
        )
    )


def details(err: grpc.aio.AioRpcError):
    """(field violations as {field: description}, ErrorInfo reason) of an error."""
    status = rpc_status.from_call(err)
    violations, reason = {}, ""
    if status is None:
        return violations, reason
    for d in status.details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            violations.update({v.field: v.description for v in br.field_violations})
        elif d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason = info.reason
    return violations, reason
