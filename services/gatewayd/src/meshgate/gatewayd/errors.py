"""The error classes of gatewayd, classified as retryable or permanent.

Hazard: messages end up in logs and status files, so nothing here may carry key
material; callers describe *which* field is wrong, never its value when it is secret.
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewaydError(Exception):
    """Base class of every error gatewayd raises on purpose."""

    retryable = False


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one field of a desired state (like ``google.rpc.BadRequest``)."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class InvalidDesiredState(GatewaydError):
    """The desired state is rejected before anything is applied. Permanent."""

    def __init__(self, violations: list[FieldViolation]):
        self.violations = list(violations)
        super().__init__(
            "invalid desired state: " + "; ".join(str(v) for v in self.violations)
        )


class ApplyError(GatewaydError):
    """Changing the kernel failed part-way. Retryable: the next pass is a full one."""

    retryable = True

    def __init__(self, subsystem: str, message: str):
        self.subsystem = subsystem
        super().__init__(f"{subsystem}: {message}")


class EnvironmentProblem(GatewaydError):
    """The host lacks something gatewayd needs (a binary, a kernel feature)."""


class ForeignInterface(ApplyError):
    """The configured interface exists and gatewayd did not create it: nothing is
    touched.  Retried (with backoff) in case its owner removes it."""

    def __init__(self, ifname: str):
        self.ifname = ifname
        super().__init__(
            "interface",
            f"{ifname} already exists and gatewayd did not create it: leaving it untouched (no key, peers, "
            f"addresses or routes changed); remove it or give gatewayd another interface name")
