"""The `meshgate` command against a real control plane process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

MESHGATE = os.path.join(os.path.dirname(sys.executable), "meshgate")


def run(*args, target=None, check=True, input=None):
    argv = [MESHGATE, *(["--target", target] if target else []), *args]
    p = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} exited {p.returncode}: {p.stderr}")
    return p


def test_round_trip_create_list_update_delete(controlplane, fresh, tmp_path):
    t = controlplane.target
    net = json.loads(run("network", "create", "--network-id", fresh.net, "--network.ipv4-cidr", fresh.cidr,
                         "--network.display-name", "First", "--network.labels", "env=test", "-o", "json", target=t).stdout)
    assert net["name"] == fresh.network and net["labels"] == {"env": "test"}
    node = json.loads(run("node", "create", "--parent", fresh.network, "--node-id", "gw1",
                          "--node.endpoint", "192.0.2.10:51820", "--node.tags", "edge", "--node.tags", "db", target=t).stdout)
    assert node["tags"] == ["edge", "db"] and node["ipv4_address"]

    # The request from a YAML file; an option overrides one of its fields.
    req = tmp_path / "gw.yaml"
    req.write_text(yaml.safe_dump({"parent": fresh.network, "egress_gateway_id": "db",
                                   "egress_gateway": {"node": node["name"], "ranges": ["198.51.100.0/24"], "priority": 1}}))
    gw = yaml.safe_load(run("egress-gateway", "create", "--from-file", str(req), "--egress-gateway.priority", "7",
                            "-o", "yaml", target=t).stdout)
    assert (gw["priority"], gw["ranges"]) == (7, ["198.51.100.0/24"])

    # List in every output format.
    table = run("node", "list", "--parent", fresh.network, "-o", "table", target=t).stdout.splitlines()
    assert table[0].split() == ["NAME", "IPV4", "IPV6", "ENDPOINT", "STATE", "ETAG"]
    assert table[1].startswith(node["name"]) and "192.0.2.10:51820" in table[1]
    listed = json.loads(run("node", "list", "--parent", fresh.network, "-o", "json", target=t).stdout)
    assert [n["name"] for n in listed["nodes"]] == [node["name"]]
    listed = yaml.safe_load(run("node", "list", "--parent", fresh.network, "-o", "yaml", target=t).stdout)
    assert [n["name"] for n in listed["nodes"]] == [node["name"]]

    # Update: the mask is exactly the options given, so other fields stay.
    upd = json.loads(run("network", "update", fresh.network, "--network.description", "second", "-o", "json", target=t).stdout)
    assert (upd["display_name"], upd["description"], upd["labels"]) == ("First", "second", {"env": "test"})
    assert upd["etag"] != net["etag"]
    # A stale etag is refused by the server: exit 1, one line.
    stale = run("network", "update", fresh.network, "--network.description", "x", "--network.etag", net["etag"],
                target=t, check=False)
    assert stale.returncode == 1 and stale.stderr.count("\n") == 1 and "ABORTED" in stale.stderr

    assert run("egress-gateway", "delete", gw["name"], "-o", "table", target=t).stdout.strip() == "ok"
    run("network", "delete", fresh.network, "--force", target=t)
    gone = run("network", "get", fresh.network, target=t, check=False)
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr


def test_errors_are_one_line_with_the_right_exit_code(controlplane, fresh):
    t = controlplane.target
    bad = run("network", "create", "--network-id", fresh.net, "--network.ipv4-cidr", "10.0.0.0/33", target=t, check=False)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "INVALID_ARGUMENT" in bad.stderr and "network.ipv4_cidr" in bad.stderr
    usage = run("network", "create", "--network.default-policy", "MAYBE", target=t, check=False)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "--network.default-policy" in usage.stderr
    usage = run("network", "create", "--network.mtu", "lots", target=t, check=False)
    assert usage.returncode == 2 and "--network.mtu" in usage.stderr
    usage = run("network", "create", "--network.labels", "novalue", target=t, check=False)
    assert usage.returncode == 2 and "--network.labels" in usage.stderr
    assert run("network", "frobnicate", target=t, check=False).returncode == 2


def test_contexts_select_the_target(controlplane, fresh, mgconfig):
    run("context", "add", "dead", "--target", "127.0.0.1:9", "--timeout", "1")
    run("context", "add", "live", "--target", controlplane.target)
    lines = run("context", "list").stdout.splitlines()
    assert lines[1].split() == ["*", "dead", "127.0.0.1:9"]  # the first one added became current
    run("context", "use", "live")
    run("network", "create", "--network-id", fresh.net, "--network.ipv4-cidr", fresh.cidr)
    assert "context live" in run("context", "show").stdout
    got = json.loads(run("network", "get", fresh.network, "-o", "json").stdout)
    assert got["ipv4_cidr"] == fresh.cidr
    assert run("context", "use", "nope", check=False).returncode == 2


def test_watch_prints_events_and_completion_scripts(controlplane, fresh):
    t = controlplane.target
    net = json.loads(run("network", "create", "--network-id", fresh.net, "--network.ipv4-cidr", fresh.cidr, target=t).stdout)
    run("node", "create", "--parent", fresh.network, "--node-id", "a", target=t)
    run("node", "create", "--parent", fresh.network, "--node-id", "b", target=t)
    out = run("watch", "--parent", fresh.network, "--start-revision", net["etag"], "--type", "meshgate.io/Node",
              "--count", "2", "-o", "json", target=t).stdout.splitlines()
    events = [json.loads(line) for line in out]
    assert [(e["type"], e["resource_name"]) for e in events] == [
        ("CREATED", f"{fresh.network}/nodes/a"), ("CREATED", f"{fresh.network}/nodes/b")]

    assert "_MESHGATE_COMPLETE" in run("completion", "bash").stdout
    assert "compdef" in run("completion", "zsh").stdout
    env = dict(os.environ, _MESHGATE_COMPLETE="bash_complete", COMP_WORDS="meshgate egress-gateway cr", COMP_CWORD="2")
    p = subprocess.run([MESHGATE], capture_output=True, text=True, env=env, timeout=30)
    assert "create" in p.stdout


def test_help_on_every_level():
    assert "Manages networks." in run("--help").stdout
    assert "Creates a network." in run("network", "--help").stdout
    h = run("network", "create", "--help").stdout
    assert "--network.ipv4-cidr" in h and "CIDR notation" in h and "--from-file" in h


def test_secrets_returned_once_are_printed_in_table_output(controlplane, fresh):
    """A table shows a few columns; the enrollment secret and an external
    client's configuration exist only in the create response, so the table
    output prints them in full below it."""
    t = controlplane.target
    run("network", "create", "--network-id", fresh.net, "--network.ipv4-cidr", fresh.cidr, target=t)
    out = run("enrollment-key", "create", "--parent", fresh.network, "--enrollment-key-id", "k", "-o", "table",
              target=t).stdout
    assert "returned only now" in out and f"mgek_{fresh.net}.k." in out
    node = json.loads(run("node", "create", "--parent", fresh.network, "--node-id", "gw", "--node.endpoint",
                          "192.0.2.10:51820", "--node.public-key", "A" * 43 + "=", "-o", "json", target=t).stdout)
    out = run("external-client", "create", "--parent", fresh.network, "--external-client-id", "phone",
              "--external-client.gateway-node", node["name"], "-o", "table", target=t).stdout
    head, _, config = out.partition("returned only now; keep it safe, it holds secrets):\n")
    assert head.splitlines()[0].split() == ["NAME", "GATEWAY", "IPV4", "DISABLED", "LAST", "HANDSHAKE"]
    assert config.startswith("# meshgate external client") and "PrivateKey = " in config
    assert "Endpoint = 192.0.2.10:51820" in config
    # -o secret: the configuration alone, ready for a file; -o qr: a QR code of it.
    raw = run("external-client", "create", "--parent", fresh.network, "--external-client-id", "laptop",
              "--external-client.gateway-node", node["name"], "-o", "secret", target=t).stdout
    assert raw.startswith("# meshgate external client") and raw.endswith("\n") and "PrivateKey = " in raw
    qr = run("external-client", "create", "--parent", fresh.network, "--external-client-id", "tablet",
             "--external-client.gateway-node", node["name"], "-o", "qr", target=t).stdout
    assert len(qr.splitlines()) > 20 and set(qr) <= set(" \n\u2580\u2584\u2588") | {"\x1b"} | set("[0-9;m")
    # ... refused before the call where there is no secret: nothing is created.
    bad = run("node", "create", "--parent", fresh.network, "--node-id", "x", "-o", "secret", target=t, check=False)
    assert bad.returncode == 2 and "returns no secret" in bad.stderr
    assert run("node", "get", f"{fresh.network}/nodes/x", target=t, check=False).returncode == 1
    # Get never returns it.
    got = run("external-client", "get", f"{fresh.network}/externalClients/phone", "-o", "table", target=t).stdout
    assert "PrivateKey" not in got and "returned only now" not in got
    run("network", "delete", fresh.network, "--force", target=t)
