"""Egress probes as a user types them (issue 17), through the `meshgate` CLI
and the SDK against a real control plane: durations like `500ms` or `2s` and
protocol names in any case are accepted, in an option's JSON or YAML value
and in a `--from-file` request; what is truly wrong is still refused, naming
the field (by the CLI when it cannot be encoded at all, by the server with
INVALID_ARGUMENT when it can), and changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from google.protobuf import json_format

from meshgate.sdk import Client

RANGE = "198.51.100.0/24"


def run(*args: str, target: str, check: bool = True) -> subprocess.CompletedProcess:
    """`meshgate --target TARGET ARGS...` (the token is in MESHGATE_TOKEN, see conftest)."""
    exe = os.path.join(os.path.dirname(sys.executable), "meshgate")
    r = subprocess.run([exe, "--target", target, *args], capture_output=True, text=True, timeout=60)
    assert not check or r.returncode == 0, f"meshgate {' '.join(args)} exited {r.returncode}: {r.stderr}"
    return r


def _gateway(t: str, fresh) -> str:
    run("network", "create", "--network-id", fresh.net, "--network.ipv4-cidr", fresh.cidr, target=t)
    node = json.loads(run("node", "create", "--parent", fresh.network, "--node-id", "gw", "-o", "json", target=t).stdout)
    gw = json.loads(run("egress-gateway", "create", "--parent", fresh.network, "--egress-gateway-id", "db",
                        "--egress-gateway.node", node["name"], "--egress-gateway.ranges", RANGE,
                        "-o", "json", target=t).stdout)
    return gw["name"]


def _probes(t: str, name: str) -> tuple[list, str]:
    """The stored probes (in the CLI's JSON spelling) and the etag, read through the SDK."""
    with Client(t, token=os.environ["MESHGATE_TOKEN"], tls=False) as sdk:
        gw = sdk.get_egress_gateway(name=name)
    return [json_format.MessageToDict(p, preserving_proto_field_name=True) for p in gw.probes], gw.etag


def test_probe_durations_and_protocols_as_a_user_types_them(controlplane, fresh, tmp_path):
    t = controlplane.target
    name = _gateway(t, fresh)

    # An option's value in YAML flow form: lowercase protocol, durations with units.
    run("egress-gateway", "update", name, "--egress-gateway.probes",
        "{protocol: tcp, target: 198.51.100.10, port: 5432, interval: 500ms, timeout: 250ms}", target=t)
    probes, _ = _probes(t, name)
    assert probes == [{"protocol": "TCP", "target": "198.51.100.10", "port": 5432, "interval": "0.500s",
                       "timeout": "0.250s"}]

    # JSON, mixed case, and seconds as a number; two probes.
    run("egress-gateway", "update", name,
        "--egress-gateway.probes", json.dumps({"protocol": "Icmp", "target": "198.51.100.1", "interval": 2}),
        "--egress-gateway.probes", json.dumps({"protocol": "TCP", "target": "198.51.100.2", "port": 443,
                                               "interval": "1m30s", "failureThreshold": 5}), target=t)
    probes, _ = _probes(t, name)
    assert [(p["protocol"], p["interval"]) for p in probes] == [("ICMP", "2s"), ("TCP", "90s")]
    assert probes[1]["failure_threshold"] == 5

    # A whole request from a YAML file, as in the README.
    req = tmp_path / "probe.yaml"
    req.write_text(yaml.safe_dump({"egress_gateway": {"name": name, "probes": [
        {"protocol": "icmp", "target": "198.51.100.10", "interval": "2s", "timeout": "0.5s"}]}}))
    run("egress-gateway", "update", "--from-file", str(req), "--update-mask", "probes", target=t)
    probes, _ = _probes(t, name)
    assert probes == [{"protocol": "ICMP", "target": "198.51.100.10", "interval": "2s", "timeout": "0.500s"}]

    # The SDK takes the same forms.
    with Client(t, token=controlplane.admin_token, tls=False) as sdk:
        got = sdk.update_egress_gateway(egress_gateway={"name": name, "probes": [
            {"protocol": "tcp", "target": "198.51.100.3", "port": 22, "interval": "750ms"}]}, update_mask=["probes"])
    assert [(p.protocol, p.interval.ToMilliseconds()) for p in got.probes] == [(2, 750)]


def test_bad_probes_are_refused_naming_the_field_and_change_nothing(controlplane, fresh):
    t = controlplane.target
    name = _gateway(t, fresh)
    run("egress-gateway", "update", name, "--egress-gateway.probes",
        "{protocol: icmp, target: 198.51.100.10, interval: 1s}", target=t)
    before = _probes(t, name)

    # Cannot be encoded at all: the CLI refuses it (usage, exit 2), naming the field and what it takes.
    for probe, field in (("{protocol: udp, target: 198.51.100.10, interval: 1s}", "protocol"),
                         ("{protocol: icmp, target: 198.51.100.10, interval: soon}", "interval"),
                         ("{protocol: icmp, target: 198.51.100.10, interval: 5parsecs}", "interval"),
                         # not finite: YAML's .inf and .nan, JSON's 1e400 (a float too big for one)
                         ("{protocol: icmp, target: 198.51.100.10, interval: .inf}", "interval"),
                         ("{protocol: icmp, target: 198.51.100.10, interval: -.inf}", "interval"),
                         ("{protocol: icmp, target: 198.51.100.10, interval: .nan}", "interval"),
                         ('{"protocol": "icmp", "target": "198.51.100.10", "interval": 1.0e+400}', "interval"),
                         ("{protocol: icmp, target: 198.51.100.10, interval: 1%ss}" % ("9" * 400), "interval")):
        r = run("egress-gateway", "update", name, "--egress-gateway.probes", probe, target=t, check=False)
        assert r.returncode == 2 and field in r.stderr and r.stderr.count("\n") == 1, (probe, r.stderr)
        assert _probes(t, name) == before

    # The refusal names the field's path, the forms a duration takes, or that it is out of range;
    # a unit in capitals or a sign inside is not one of those forms (as in Go).
    for interval, says in (("500MS", "is not a duration"), ("1h-30m", "is not a duration"),
                           ("soon", "is not a duration"), ("true", "is not a duration"),
                           ("9999999999999h", "is out of range")):
        probe = f"{{protocol: icmp, target: 198.51.100.10, interval: {interval}}}"
        r = run("egress-gateway", "update", name, "--egress-gateway.probes", probe, target=t, check=False)
        assert r.returncode == 2 and "egress_gateway.probes[0].interval: " in r.stderr, (probe, r.stderr)
        assert says in r.stderr and "must end with letter" not in r.stderr, (probe, r.stderr)
        assert says == "is out of range" or "500ms" in r.stderr, (probe, r.stderr)
        assert _probes(t, name) == before

    # Encodable but wrong: the server's INVALID_ARGUMENT, naming the exact field.
    for probe, field in (("{protocol: icmp, target: 198.51.100.10, interval: 50ms}", "probes[0].interval"),
                         ("{protocol: icmp, target: 198.51.100.10, interval: 1s, timeout: 2s}", "probes[0].timeout"),
                         ("{protocol: tcp, target: 198.51.100.10, interval: 1s}", "probes[0].port"),
                         ("{protocol: icmp, target: 203.0.113.5, interval: 1s}", "probes[0].target"),
                         ("{protocol: icmp, target: 198.51.100.10, interval: -1s}", "probes[0].interval")):
        r = run("egress-gateway", "update", name, "--egress-gateway.probes", probe, target=t, check=False)
        assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr, (probe, r.stderr)
        assert f"egress_gateway.{field}" in r.stderr, (probe, r.stderr)
        assert _probes(t, name) == before
