"""Resource names the key service accepts, and pre-shared key pair ids.

Ids follow the control plane's rule (RFC 1123 labels: 1-63 lowercase letters,
digits and hyphens, starting with a letter), so they are safe as etcd key
segments and never contain `.`, `~` or `|`, which the pair ids below use.
"""

from __future__ import annotations

import re

ID_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
ID_RULE = "1-63 lowercase letters, digits or hyphens, starting with a letter and not ending with a hyphen"
# Peers of a pre-shared key: nodes, and external clients (marked `~` in pair ids).
PEER_COLLECTIONS = {"nodes": "", "externalClients": "~"}


def node_rule() -> str:
    return f"must be a node resource name, networks/{{network}}/nodes/{{node}}, each id {ID_RULE}"


def valid_id(value: str) -> bool:
    return bool(ID_RE.match(value))


def parse_network(name: str) -> str | None:
    parts = name.split("/")
    if len(parts) == 2 and parts[0] == "networks" and valid_id(parts[1]):
        return parts[1]
    return None


def parse_child(name: str, collection: str) -> tuple[str, str] | None:
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == "networks" and parts[2] == collection and valid_id(parts[1]) and valid_id(parts[3]):
        return parts[1], parts[3]
    return None


def parse_peer(name: str) -> tuple[str, str] | None:
    """(network, pair segment) of a node or external client resource name."""
    parts = name.split("/")
    if len(parts) == 4 and parts[2] in PEER_COLLECTIONS:
        parsed = parse_child(name, parts[2])
        if parsed:
            return parsed[0], PEER_COLLECTIONS[parts[2]] + parsed[1]
    return None


def peer_name(network: str, segment: str) -> str:
    if segment.startswith("~"):
        return f"networks/{network}/externalClients/{segment[1:]}"
    return f"networks/{network}/nodes/{segment}"


def pair_id(a: str, b: str) -> str:
    """The id of an unordered pair of peer segments: both, sorted, joined by `.`."""
    x, y = sorted((a, b))
    return f"{x}.{y}"


def pair_peers(network: str, pair: str) -> tuple[str, str]:
    a, _, b = pair.partition(".")
    return peer_name(network, a), peer_name(network, b)


def identity_rule() -> str:
    return ("must be a node or external client resource name (networks/{network}/nodes/{node}) "
            "or a service identity (services/{service})")


def parse_identity(name: str) -> str | None:
    """The URI SAN for a certificate identity, or None if it is not one."""
    parts = name.split("/")
    if parse_peer(name) is not None or (len(parts) == 2 and parts[0] == "services" and valid_id(parts[1])):
        return f"meshgate://{name}"
    return None
