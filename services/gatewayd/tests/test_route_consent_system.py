"""The node's operator narrows what its agent installs, in network namespaces
with a real control plane and real gatewayd agents (wireguard-go, ``ip route``),
seen through the user's doors: ``gatewayd join/run --accept-routes`` and
``--no-default-route``, and ``meshgate network get-status`` (the CLI), which
says which routes each node declined and why.

Topology (``lab.build_egress`` with two clients): the gateway node carries the
egress range 198.51.100.0/24 (a real host behind it), a second range
100.100.0.0/16 and the internet gateway. client0 joined accepting only
198.51.100.0/24 and no default route; client1 accepts everything. A node
that joins with an endpoint inside an egress range is refused.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from meshgate.api.v1 import egress_pb2, enrollment_pb2, network_pb2
from meshgate.common.testing import eventually
from meshgate.gatewayd.lab import Egress, Node
from test_system_controlplane import Loop, loop_for

pytestmark = pytest.mark.root

DB = "198.51.100.0/24"
OTHER = "100.100.0.0/16"
INTERNET_HOST = "203.0.113.200"  # not on any test link: only a default route reaches it


@pytest.fixture
def loop(lab, etcd_server, etcd_prefix):
    with loop_for(lab, etcd_server, etcd_prefix) as lp:
        yield lp


def status_of(loop: Loop, fmt: str = "json") -> subprocess.CompletedProcess:
    r = loop.cli("network", "get-status", "networks/lab", "-o", fmt)
    assert r.returncode == 0, r.stderr
    return r


def table_routes(node: Node) -> str:
    """gatewayd's IPv4 routes in the node's host ('' also when its table does not exist)."""
    return node.host.ip("-4", "route", "show", "table", "51821", check=False).stdout


def setup(loop: Loop, eg: Egress, client0_flags: tuple[str, ...]) -> None:
    loop.networks.CreateNetwork(network_pb2.CreateNetworkRequest(
        network_id="lab", network=network_pb2.Network(ipv4_cidr="100.64.0.0/24")))
    key = loop.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
        parent="networks/lab", enrollment_key_id="lab", enrollment_key=enrollment_pb2.EnrollmentKey(max_uses=3)))
    eg.gw.join(loop.socket, key.secret, "gateway", endpoint=f"{eg.gw_underlay(0)}:51820",
               insecure_no_authority=True)
    eg.clients[0].join(loop.socket, key.secret, "client0", insecure_no_authority=True, extra=client0_flags)
    eg.clients[1].join(loop.socket, key.secret, "client1", insecure_no_authority=True, accept_default_route=True)
    for n in (eg.gw, *eg.clients):
        n.start()
    last = None
    for gw_id, gw in (("db", egress_pb2.EgressGateway(ranges=[DB])),
                      ("other", egress_pb2.EgressGateway(ranges=[OTHER])),
                      ("internet", egress_pb2.EgressGateway(internet_gateway=True))):
        gw.node = "networks/lab/nodes/gateway"
        last = loop.egress.CreateEgressGateway(egress_pb2.CreateEgressGatewayRequest(
            parent="networks/lab", egress_gateway_id=gw_id, egress_gateway=gw))
    loop.wait_converged(3, at_least=int(last.etag))


def declined(st: dict, node: str) -> list[dict]:
    return next(n for n in st["nodes"] if n["node"] == f"networks/lab/nodes/{node}").get("declined_routes", [])


def test_accept_routes_and_no_default_route_keep_refused_routes_off_and_the_status_says_why(loop, egress2: Egress):
    eg = egress2
    c0, c1 = eg.clients
    setup(loop, eg, ("--accept-routes", DB, "--no-default-route"))
    assert json.loads((c0.state_dir / "identity.json").read_text())["accept_routes"] == [DB]

    # client0: the accepted range is routed and carries traffic; the refused one
    # is neither routed nor in the gateway peer's allowed IPs; its own default
    # route stays although an internet gateway exists.
    routes = table_routes(c0)
    assert f"{DB} dev {c0.ifname}" in routes and OTHER not in routes and "default" not in routes, routes
    assert OTHER not in c0.peers()[eg.gw.public_key]["allowed_ips"]
    assert c0.host.route_dev(INTERNET_HOST) == "eth0"
    assert c0.host.route_dev("100.100.1.1") == "eth0"  # the host's own default route, not the tunnel
    eg.ext.whoami_server(eg.ext_addr, 7070)
    c0.host.wait_reachable("100.64.0.1")
    assert c0.host.ask(eg.ext_addr, 7070) == eg.gw_ext_addr
    st0 = c0.status()
    assert st0["accept_routes"] == [DB] and st0["accept_default_route"] is False
    assert "declined 1 default route (this node's operator declines default routes" in c0.log_path.read_text()

    # client1 took everything, the default route included.
    routes = table_routes(c1)
    assert DB in routes and OTHER in routes and "default" in routes, routes
    assert c1.host.route_dev(INTERNET_HOST) == c1.ifname

    # The network status, through the CLI, says which routes client0 declined and why.
    st = json.loads(status_of(loop).stdout)
    assert {(d["destination"], d["reason"]) for d in declined(st, "client0")} == {
        ("default route", "DEFAULT_ROUTE_DECLINED"), (OTHER, "ROUTE_NOT_ACCEPTED")}
    by_dest = {d["destination"]: d["message"] for d in declined(st, "client0")}
    assert by_dest[OTHER] == f"not within the ranges this node accepts (gatewayd --accept-routes {DB})"
    assert by_dest["default route"] == "this node's operator declines default routes (gatewayd --no-default-route)"
    assert declined(st, "client1") == [] and declined(st, "gateway") == []
    # It applied all it will apply. Handshakes with the gateway hand the clients each
    # other's learned endpoints (a new desired state), so convergence may lag a moment.
    eventually(lambda: all(n.get("converged") for n in json.loads(status_of(loop).stdout)["nodes"]),
           "every node converged, the declined routes notwithstanding")
    table = status_of(loop, "table").stdout
    assert "DECLINED ROUTES" in table.splitlines()[0]
    assert any(line.startswith("networks/lab/nodes/client0") and f"default route,{OTHER}" in line
               for line in table.splitlines()), table
    ydoc = yaml.safe_load(status_of(loop, "yaml").stdout)
    assert len(declined(ydoc, "client0")) == 2

    # `run` overrides what join saved: every route now, the default route still declined.
    c0.stop()
    c0.start(extra=("--accept-routes", "all"))
    c0.wait_status(lambda s: s.get("accept_routes") is None and s.get("state") == "applied"
                   and len(s.get("declined_routes", [])) == 1)
    assert f"{OTHER} dev {c0.ifname}" in table_routes(c0)
    assert c0.host.route_dev(INTERNET_HOST) == "eth0"

    def only_default() -> bool:
        got = declined(json.loads(status_of(loop).stdout), "client0")
        return [(d["destination"], d["reason"]) for d in got] == [("default route", "DEFAULT_ROUTE_DECLINED")]
    eventually(only_default, "the status shows only the default route declined")

    # A node joining with an endpoint inside an egress range is refused, saying why.
    key = loop.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
        parent="networks/lab", enrollment_key_id="late", enrollment_key=enrollment_pb2.EnrollmentKey(max_uses=1)))
    late = eg.lab.node(eg.ext, "late")
    r = late.join_result(loop.socket, key.secret, "late", endpoint="198.51.100.10:51820", insecure_no_authority=True)
    assert r.returncode != 0 and "INVALID_ARGUMENT" in r.stderr, r.stderr
    assert ("198.51.100.10 is inside 198.51.100.0/24, an egress range of networks/lab/egressGateways/db"
            in r.stderr), r.stderr
    assert not (late.state_dir / "identity.json").exists()
    assert json.loads(status_of(loop).stdout)["total_nodes"] == 3



def test_a_bad_accept_routes_is_refused_before_anything(loop, egress: Egress):
    c = egress.clients[0]
    r = c.join_result(loop.socket, "mg_ek_nothing", "c", insecure_no_authority=True,
                      extra=("--accept-routes", "198.51.100.0/24,nonsense"))
    assert r.returncode == 2 and "'nonsense' is not a CIDR" in r.stderr, r.stderr
    assert not (c.state_dir / "identity.json").exists()
