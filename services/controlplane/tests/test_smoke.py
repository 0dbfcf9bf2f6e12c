from meshgate.api.v1 import network_pb2, node_pb2


async def test_create_network_and_node(cp):
    net = await cp.networks.CreateNetwork(
        network_pb2.CreateNetworkRequest(network_id="prod", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24"))
    )
    assert net.name == "networks/prod"
    node = await cp.nodes.CreateNode(node_pb2.CreateNodeRequest(parent="networks/prod", node_id="a", node=node_pb2.Node()))
    assert node.ipv4_address == "100.64.0.1"
