"""Converge the control plane to a YAML manifest of networks and egress gateways.

    python -m meshgate.sdk.examples.converge manifest.yaml [--prune] [--dry-run]

The kind of service-to-service automation users write: read the desired
state, compare it with what the API has, and change only what differs.
Running it twice changes nothing the second time (every comparison is on the
fields the manifest names, so fields it does not mention are left alone, and
an update sends exactly the changed fields with the etag it read).

Manifest (see manifest.yaml beside this file):

    networks:
      - id: demo
        ipv4_cidr: 100.64.0.0/24      # any Network field, by its proto name
        nodes: [{id: gw1, endpoint: "192.0.2.10:51820"}]
        egress_gateways:
          - {id: db, node: gw1, ranges: [198.51.100.0/24]}

With `--prune`, egress gateways of the listed networks that the manifest does
not list are deleted. Networks and nodes are never deleted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Any

import yaml
from google.protobuf import field_mask_pb2, json_format

from meshgate.api.v1 import egress_pb2, network_pb2, node_pb2
from meshgate.sdk import Client, errors, masks

log = logging.getLogger("meshgate.examples.converge")


@dataclass(frozen=True)
class Action:
    verb: str  # create, update, delete, unchanged
    name: str
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.verb} {self.name}" + (f" ({', '.join(self.fields)})" if self.fields else "")


def _desired(cls, spec: dict[str, Any], drop: tuple[str, ...]) -> tuple[Any, list[str]]:
    body = {k: v for k, v in spec.items() if k not in drop}
    return json_format.ParseDict(body, cls()), list(body)


def _ensure(client: Client, *, name: str, cls, spec: dict, drop: tuple[str, ...], get, create, dry_run: bool) -> Action:
    desired, named = _desired(cls, spec, drop)
    try:
        current = get(name=name)
    except errors.NotFound:
        if not dry_run:
            create(desired)
        return Action("create", name)

    mask = field_mask_pb2.FieldMask(paths=named)

    def mutate(res):
        mask.MergeMessage(desired, res, replace_message_field=True, replace_repeated_field=True)

    # Compare only the named fields: ones the manifest omits keep their value.
    probe = type(current)()
    probe.CopyFrom(current)
    mutate(probe)
    changed = tuple(masks.diff(current, probe).paths)
    if not changed:
        return Action("unchanged", name)
    if not dry_run:
        client.modify(name, mutate)
    return Action("update", name, changed)


def converge(client: Client, manifest: dict[str, Any], *, prune: bool = False, dry_run: bool = False) -> list[Action]:
    """Make the API match `manifest`; returns what was (or, dry, would be) done."""
    actions: list[Action] = []
    for net in manifest.get("networks") or []:
        net = dict(net)
        net_id = net.pop("id")
        nodes = net.pop("nodes", None) or []
        gateways = net.pop("egress_gateways", None) or []
        parent = f"networks/{net_id}"
        actions.append(_ensure(
            client, name=parent, cls=network_pb2.Network, spec=net, drop=(), get=client.get_network,
            create=lambda m, i=net_id: client.create_network(network_id=i, network=m), dry_run=dry_run,
        ))
        for node in nodes:
            node = dict(node)
            node_id = node.pop("id")
            actions.append(_ensure(
                client, name=f"{parent}/nodes/{node_id}", cls=node_pb2.Node, spec=node, drop=(), get=client.get_node,
                create=lambda m, i=node_id, p=parent: client.create_node(parent=p, node_id=i, node=m), dry_run=dry_run,
            ))
        wanted = set()
        for gw in gateways:
            gw = dict(gw)
            gw_id = gw.pop("id")
            if "/" not in gw.get("node", "/"):
                gw["node"] = f"{parent}/nodes/{gw['node']}"
            wanted.add(f"{parent}/egressGateways/{gw_id}")
            actions.append(_ensure(
                client, name=f"{parent}/egressGateways/{gw_id}", cls=egress_pb2.EgressGateway, spec=gw, drop=(),
                get=client.get_egress_gateway,
                create=lambda m, i=gw_id, p=parent: client.create_egress_gateway(parent=p, egress_gateway_id=i,
                                                                           egress_gateway=m),
                dry_run=dry_run,
            ))
        if prune:
            try:
                existing = list(client.iter_egress_gateways(parent=parent))
            except errors.NotFound:  # a dry run of a network not created yet
                existing = []
            for gw in existing:
                if gw.name not in wanted:
                    if not dry_run:
                        client.delete_egress_gateway(name=gw.name, etag=gw.etag)
                    actions.append(Action("delete", gw.name))
    return actions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest", help="YAML manifest ('-' for stdin)")
    p.add_argument("--prune", action="store_true", help="delete egress gateways the manifest does not list")
    p.add_argument("--dry-run", action="store_true", help="only print what would change")
    p.add_argument("--target", help="control plane address (default: context / MESHGATE_TARGET)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = sys.stdin.read() if args.manifest == "-" else open(args.manifest).read()
    manifest = yaml.safe_load(text) or {}
    with Client(args.target) as client:
        try:
            actions = converge(client, manifest, prune=args.prune, dry_run=args.dry_run)
        except errors.MeshgateError as e:
            log.error("error: %s", e.one_line())
            return 1
    for a in actions:
        log.info("%s", a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
