"""health.py's pure parts: which egress paths are broken, given links and
routes, and the probes' hysteresis (the kernel side is tested in
test_system_failover_health.py)."""

from __future__ import annotations

import ipaddress

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.api.v1 import egress_pb2
from meshgate.gatewayd.health import IFF_UP, Links, Probe, check_paths


class FakeLink(dict):
    """A netlink link message as pyroute2 gives it: fields by key, attributes by get_attr."""

    def __init__(self, index: int, name: str, up: bool = True, carrier: int = 1):
        super().__init__(index=index, flags=IFF_UP if up else 0)
        self.attrs = {"IFLA_IFNAME": name, "IFLA_CARRIER": carrier, "IFLA_OPERSTATE": "UP" if carrier else "DOWN"}

    def get_attr(self, name):
        return self.attrs.get(name)


def links(*ls: FakeLink, routes=()) -> Links:
    out = Links()
    for link in ls:
        out.by_index[link["index"]] = link
        out.by_name[link.get_attr("IFLA_IFNAME")] = link
    out.routes = [(ipaddress.ip_network(dst), metric, list(oifs)) for dst, metric, oifs in routes]
    return out


GW = "networks/n/egressGateways/g"


def cfg(**kw) -> pb.EgressConfig:
    kw.setdefault("ranges", ["198.51.100.0/24"])
    return pb.EgressConfig(gateway=GW, **kw)


def test_a_route_out_of_a_link_with_carrier_is_healthy():
    k = links(FakeLink(2, "eth1"), FakeLink(3, "mg0"),
              routes=[("fe80::/64", 256, [2]), ("198.51.100.0/24", 0, [2]), ("::/0", 0, [2])])
    assert check_paths([cfg()], "mg0", k) == {GW: ""}


def test_no_carrier_down_missing_interface_or_only_the_overlay_is_unhealthy():
    route = [("198.51.100.0/24", 0, [2])]
    assert "no carrier" in check_paths([cfg()], "mg0", links(FakeLink(2, "eth1", carrier=0), routes=route))[GW]
    assert "down" in check_paths([cfg()], "mg0", links(FakeLink(2, "eth1", up=False), routes=route))[GW]
    assert "does not exist" in check_paths([cfg(egress_interface="eth9")], "mg0",
                                           links(FakeLink(2, "eth1"), routes=route))[GW]
    only_overlay = links(FakeLink(3, "mg0"), routes=[("198.51.100.0/24", 0, [3])])
    assert "no route" in check_paths([cfg()], "mg0", only_overlay)[GW]


def test_the_most_specific_route_decides_and_a_default_route_counts():
    k = links(FakeLink(2, "eth1"), FakeLink(4, "eth2", carrier=0),
              routes=[("0.0.0.0/0", 0, [2]), ("198.51.100.0/25", 0, [4])])
    assert "no carrier" in check_paths([cfg()], "mg0", k)[GW]
    assert check_paths([cfg(ranges=["203.0.113.0/24"])], "mg0", k) == {GW: ""}


def test_a_probe_turns_unhealthy_after_its_failures_and_back_after_its_successes():
    p = Probe.of(GW, "eth1", egress_pb2.EgressProbe(protocol=egress_pb2.EgressProbe.ICMP, target="198.51.100.10",
                                                    failure_threshold=3, success_threshold=2))
    assert p.interval == 1.0 and p.timeout == 1.0
    assert not p.record(False, "no answer") and not p.record(False, "no answer") and p.healthy
    assert p.record(False, "no answer") and not p.healthy and "3 failures" in p.reason
    assert not p.record(True) and not p.record(False) and not p.record(True) and not p.healthy
    assert p.record(True) and p.healthy


def test_a_gateway_that_reaches_only_part_of_its_range_is_healthy_while_that_part_works():
    k = links(FakeLink(2, "eth1"), routes=[("198.51.100.128/25", 0, [2]), ("198.51.100.10/32", 0, [2])])
    assert check_paths([cfg()], "mg0", k) == {GW: ""}
    k = links(FakeLink(2, "eth1", carrier=0), routes=[("198.51.100.128/25", 0, [2])])
    assert "no carrier" in check_paths([cfg()], "mg0", k)[GW]


def test_an_internet_gateway_needs_a_working_default_route():
    k = links(FakeLink(2, "eth1"), FakeLink(4, "eth2"), routes=[("198.51.100.0/24", 0, [4])])
    assert "no route to 0.0.0.0/0" in check_paths([cfg(ranges=[], internet_gateway=True)], "mg0", k)[GW]
    k.routes.append((ipaddress.ip_network("0.0.0.0/0"), 0, [2]))
    assert check_paths([cfg(ranges=[], internet_gateway=True)], "mg0", k) == {GW: ""}
