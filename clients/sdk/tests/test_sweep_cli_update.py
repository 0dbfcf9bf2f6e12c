"""`meshgate <resource> update --<resource>.<field> VALUE` for every mutable field of every resource.

The cases are generated from the descriptors: every Update RPC the CLI has,
and every field of its resource an Update may name (`masks.mutable`), so a
field added to the API is exercised here without editing this file. Each case
runs the real CLI (click's runner, in this process) against a real control
plane, and then `meshgate <resource> get` must show the new value while the
other fields stay as they were (the mask is exactly the option given).

Values come from the field's type; the few string fields with a format
(endpoints, keys, ranges, selectors, references) take one from `FORMATTED`,
and a new formatted field without an entry fails with a message saying so.
"""

from __future__ import annotations

import base64
import json
import os
import uuid

import pytest
from click.testing import CliRunner
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass

from meshgate.sdk import api, masks
from meshgate.sdk.cli import cli, field_options
from meshgate.sdk.client import Client

UPDATES = [m for s in api.services() for m in s.methods if m.name.startswith("Update")]


def resource_field(m: api.Method) -> FieldDescriptor:
    return next(fd for fd in m.input.fields if fd.message_type is not None and "name" in fd.message_type.fields_by_name)


CASES = [(m, fd) for m in UPDATES for fd in resource_field(m).message_type.fields if masks.mutable(fd)]


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


# String fields whose values have a format, by resource field name: a function
# of the world (the resources this module made) giving a new valid value.
FORMATTED = {
    "endpoint": lambda w: ["192.0.2.77:51999"],
    "public_key": lambda w: [_key()],
    "node": lambda w: [w.node_b],
    "ranges": lambda w: ["203.0.113.0/24"],
    "egress_interface": lambda w: ["eth9"],
    "used_by": lambda w: ["tag:sweep"],
    "sources": lambda w: ["tag:sweep-src"],
    "destinations": lambda w: ["tag:sweep-dst"],
    "tags": lambda w: ["sweep"],
    "domains": lambda w: ["db.sweep.example", "*.api.sweep.example"],
}
# Integers with a range, by field name.
NUMBERS = {"listen_port": 51999, "mtu": 1380, "priority": 42}
# Durations: two hours (rotation periods take at least one), or what a bounded one takes.
DURATIONS = {"persistent_keepalive": "42s"}
# Repeated messages, as the CLI takes them (one JSON or YAML object per option).
MESSAGES = {
    "meshgate.api.v1.PortRange": [{"first": 8443}],
    # inside the gateway's range (198.51.100.0/24)
    "meshgate.api.v1.EgressProbe": [{"protocol": "TCP", "target": "198.51.100.7", "port": 5432, "interval": "2s"}],
}


class World:
    def __init__(self, target: str, token: str) -> None:
        self.target, self.token = target, token
        self.net_id = f"sweep{uuid.uuid4().hex[:8]}"
        self.network = f"networks/{self.net_id}"
        self.client = Client(target, token=token)
        c = self.client
        c.create_network(network_id=self.net_id, network={"ipv4_cidr": "100.120.0.0/24"})
        self.node_a = c.create_node(parent=self.network, node_id="a", node={"endpoint": "192.0.2.10:51820"}).name
        self.node_b = c.create_node(parent=self.network, node_id="b",
                                    node={"endpoint": "192.0.2.11:51820", "public_key": _key()}).name
        self.names = {
            "meshgate.api.v1.Network": self.network,
            "meshgate.api.v1.Node": self.node_a,
            "meshgate.api.v1.EgressGateway": c.create_egress_gateway(
                parent=self.network, egress_gateway_id="gw",
                egress_gateway={"node": self.node_a, "ranges": ["198.51.100.0/24"]}).name,
            "meshgate.api.v1.ExternalClient": c.create_external_client(
                parent=self.network, external_client_id="laptop",
                external_client={"gateway_node": self.node_b}).name,
            "meshgate.api.v1.AccessPolicy": c.create_access_policy(
                parent=self.network, access_policy_id="p",
                access_policy={"sources": ["tag:a"], "destinations": ["*"], "protocol": "TCP"}).name,
        }

    def get(self, resource: str):
        """The resource as `meshgate <resource> get` prints it."""
        group = api.kebab(resource.rsplit(".", 1)[1])
        out = self.cli(group, "get", self.names[resource], "-o", "json")
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)

    def cli(self, *args: str):
        return CliRunner().invoke(cli, ["--target", self.target, *args], env={"MESHGATE_TOKEN": self.token},
                                  catch_exceptions=False)


@pytest.fixture(scope="module")
def world(controlplane):
    w = World(controlplane.target, controlplane.admin_token)
    yield w
    w.client.delete_network(name=w.network, force=True)
    w.client.close()


def new_value(w: World, fd: FieldDescriptor, current: dict) -> list[str]:
    """The option values that give `fd` a valid value other than `current`'s."""
    cur = current.get(fd.name)
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        return ["sweep=yes"]
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return ["false" if cur else "true"]
    if fd.enum_type is not None:
        choices = [v.name for v in fd.enum_type.values if v.number != 0 and v.name != cur]
        return [choices[0]]
    if fd.message_type is not None:
        if fd.message_type.full_name == "google.protobuf.Duration":
            return [DURATIONS.get(fd.name, "7200s")]
        if fd.message_type.full_name in MESSAGES:
            return [json.dumps(v) for v in MESSAGES[fd.message_type.full_name]]
        raise AssertionError(f"no test value for {fd.full_name} ({fd.message_type.full_name}): add one to MESSAGES")
    if fd.type == FieldDescriptor.TYPE_STRING:
        if fd.name in FORMATTED:
            return FORMATTED[fd.name](w)
        if fd.name in ("display_name", "description") or fd.name.endswith("_name"):
            return [f"Sweep {fd.name} {uuid.uuid4().hex[:4]}"]
        raise AssertionError(f"no test value for {fd.full_name}: add its format to FORMATTED")
    if fd.name in NUMBERS:
        return [str(NUMBERS[fd.name])]
    raise AssertionError(f"no test value for {fd.full_name}: add it to NUMBERS")


def expected(fd: FieldDescriptor, values: list[str]):
    """The field's value in JSON form, from the option values given."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        return dict(v.split("=", 1) for v in values)
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return values[0] == "true"
    if fd.message_type is not None and fd.is_repeated:
        return [json.loads(v) for v in values]
    if fd.is_repeated:
        return values
    if fd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_MESSAGE):
        return values[0]
    return int(values[0])


def field_value(desc, data: dict, field: str):
    """A field of a resource's JSON form as a comparable proto value (presence included)."""
    msg = json_format.ParseDict({k: v for k, v in data.items() if k == field}, GetMessageClass(desc)())
    fd = desc.fields_by_name[field]
    v = getattr(msg, field)
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        return dict(v)
    if fd.is_repeated:
        return list(v)
    return (msg.HasField(field), v) if fd.has_presence else v


@pytest.mark.parametrize("method,field", CASES, ids=[f"{resource_field(m).name}.{fd.name}" for m, fd in CASES])
def test_update_sets_each_mutable_field_through_the_cli(world, method, field):
    res = resource_field(method).message_type
    before = world.get(res.full_name)
    option = next(fo for fo in field_options(method.input, update=True)
                  if fo.path == (resource_field(method).name, field.name))
    values = new_value(world, field, before)
    args = [a for v in values for a in (option.flag, v)]
    if field.type == FieldDescriptor.TYPE_BOOL and not field.is_repeated:
        args = [option.flag if values[0] == "true" else "--no-" + option.flag[2:]]
    group = api.kebab(res.name)
    out = world.cli(group, "update", world.names[res.full_name], *args, "-o", "json")
    assert out.exit_code == 0, f"{group} update {' '.join(args)}: {out.output}"

    after = world.get(res.full_name)
    assert field_value(res, after, field.name) == field_value(res, {field.name: expected(field, values)}, field.name)
    assert field_value(res, after, field.name) != field_value(res, before, field.name), (
        f"{option.flag} {values} did not change {field.name}")
    # The mask was just that field: every other mutable field kept its value.
    for other in res.fields:
        if other.name != field.name and masks.mutable(other):
            assert field_value(res, after, other.name) == field_value(res, before, other.name), other.name


def test_every_update_has_cases():
    """The generated cases cover each resource an Update exists for, and the
    fields the issue named."""
    ids = {f"{resource_field(m).name}.{fd.name}" for m, fd in CASES}
    assert {"network.display_name", "network.default_policy", "egress_gateway.egress_interface",
            "egress_gateway.internet_gateway", "node.display_name"} <= ids
    assert {resource_field(m).name for m in UPDATES} == {
        "network", "node", "egress_gateway", "external_client", "access_policy"}


def test_an_explicit_mask_in_any_spelling(world):
    """--update-mask in proto, CLI or JSON spelling names the same field."""
    for i, mask in enumerate(["display_name", "display-name", "displayName"]):
        out = world.cli("network", "update", world.network, "--network.display-name", f"Mask {i}",
                        "--network.description", "not in the mask", "--update-mask", mask, "-o", "json")
        assert out.exit_code == 0, out.output
        got = world.get("meshgate.api.v1.Network")
        assert got["display_name"] == f"Mask {i}" and got.get("description") != "not in the mask"
