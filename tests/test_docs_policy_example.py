"""docs/gatewayd.md shows the nftables table of an example network: it must be what
the compiler and gatewayd's renderer make of that network today."""

import base64
import re
from pathlib import Path

from meshgate.api.v1 import egress_pb2, network_pb2, node_pb2, policy_pb2
from meshgate.controlplane import compiler
from meshgate.gatewayd import model
from meshgate.gatewayd.config import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "gatewayd.md"


def _key(i: int) -> str:
    return base64.b64encode(i.to_bytes(32, "big")).decode()


def example_table() -> str:
    st = compiler.NetworkState(network_pb2.Network(
        name="networks/lab", ipv4_cidr="100.64.0.0/24", ipv6_cidr="fd00:64::/64", listen_port=51820, mtu=1420,
        default_policy=network_pb2.DENY))
    for i, (n, tags) in enumerate((("gateway", []), ("laptop", ["ops"]), ("ci", ["ops"]), ("web", []))):
        st.nodes[f"networks/lab/nodes/{n}"] = node_pb2.Node(
            name=f"networks/lab/nodes/{n}", ipv4_address=f"100.64.0.{i + 1}", ipv6_address=f"fd00:64::{i + 1}",
            public_key=_key(i + 1), tags=tags)
    st.gateways["networks/lab/egressGateways/db"] = egress_pb2.EgressGateway(
        name="networks/lab/egressGateways/db", node="networks/lab/nodes/gateway", ranges=["198.51.100.0/24"],
        nat=True, egress_interface="eth1")
    for pid, src, dst, proto, ports, action, prio in (
            ("ops-db", "tag:ops", "egress:db", policy_pb2.TCP, [5432], policy_pb2.ACCEPT, 100),
            ("ping", "*", "node:gateway", policy_pb2.ICMP, [], policy_pb2.ACCEPT, 200),
            ("no-ci", "node:ci", "egress:db", policy_pb2.PROTOCOL_UNSPECIFIED, [], policy_pb2.DROP, 10)):
        name = f"networks/lab/accessPolicies/{pid}"
        st.policies[name] = policy_pb2.AccessPolicy(
            name=name, sources=[src], destinations=[dst], protocol=proto, action=action, priority=prio,
            ports=[policy_pb2.PortRange(first=p) for p in ports])
    out = compiler.compile_node(st, "networks/lab/nodes/gateway")
    return model.compile_desired(out, settings=Settings(), public_key=_key(1)).nft.text


def test_the_documented_table_is_the_rendered_one():
    blocks = re.findall(r"```\n(table inet meshgate \{.*?)\n```", DOC.read_text(), re.S)
    assert blocks, "docs/gatewayd.md has no example table"
    assert blocks[0] + "\n" == example_table()
