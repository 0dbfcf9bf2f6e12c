"""Resource names (`networks/{network}/nodes/{node}`) and ids.

Ids are 1-63 characters of lowercase letters, digits and hyphens, starting with
a letter and not ending with a hyphen (RFC 1123 labels, as in AIP-122), so they
are safe as etcd key segments, interface suffixes and DNS labels.
"""

from __future__ import annotations

import re

ID_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")

ID_RULE = "must be 1-63 lowercase letters, digits or hyphens, start with a letter and not end with a hyphen"


def valid_id(value: str) -> bool:
    return bool(ID_RE.match(value))


def network_name(network: str) -> str:
    return f"networks/{network}"


def child_name(network: str, collection: str, child: str) -> str:
    return f"networks/{network}/{collection}/{child}"


def parse_network(name: str) -> str | None:
    """The network id of `networks/{network}`, or None if malformed."""
    parts = name.split("/")
    if len(parts) == 2 and parts[0] == "networks" and valid_id(parts[1]):
        return parts[1]
    return None


def parse_child(name: str, collection: str) -> tuple[str, str] | None:
    """(network, child) of `networks/{network}/{collection}/{child}`, or None."""
    parts = name.split("/")
    if (
        len(parts) == 4
        and parts[0] == "networks"
        and parts[2] == collection
        and valid_id(parts[1])
        and valid_id(parts[3])
    ):
        return parts[1], parts[3]
    return None
