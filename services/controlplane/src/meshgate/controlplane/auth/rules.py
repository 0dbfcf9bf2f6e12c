"""The control plane's access rules: every RPC it serves, from the protos.

The generic parts (Rule, reading the method options, deny by default) are in
`meshgate.common.access`, shared with the key service.
"""

from __future__ import annotations

from functools import cache

from meshgate.api.v1 import (
    agent_pb2,
    auth_pb2,
    egress_pb2,
    enrollment_pb2,
    events_pb2,
    external_client_pb2,
    network_pb2,
    node_pb2,
    policy_pb2,
)
from meshgate.common.access import MissingRule, Rule, method_path, network_of, rule_of, rules_for

__all__ = ["CONTROL_PLANE_MODULES", "MissingRule", "Rule", "all_permissions", "control_plane_rules", "method_path",
           "network_of", "rule_of", "rules_for"]

# Every module whose services the control plane serves.
CONTROL_PLANE_MODULES = (network_pb2, node_pb2, egress_pb2, enrollment_pb2, external_client_pb2, policy_pb2,
                         events_pb2, auth_pb2, agent_pb2)


@cache
def control_plane_rules() -> dict[str, Rule]:
    """Method path -> rule over every service the control plane serves."""
    out = {}
    for mod in CONTROL_PLANE_MODULES:
        for sd in mod.DESCRIPTOR.services_by_name.values():
            for rule in rules_for(sd).values():
                out[rule.method] = rule
    return out


@cache
def all_permissions() -> frozenset[str]:
    return frozenset(r.permission for r in control_plane_rules().values() if r.permission)
