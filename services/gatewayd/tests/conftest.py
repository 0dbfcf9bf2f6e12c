"""Fixtures for gatewayd's tests.

System tests need root, network namespaces, wireguard-go and nft.  Where those are
missing they are skipped with the reason, except under ``CI=true``, where a missing
prerequisite is a failure: CI must never pass by skipping the real tests.
"""

from __future__ import annotations

import pytest

from meshgate.common.testing import in_ci
from meshgate.gatewayd.lab import Lab, build_egress, can_run


def require_lab() -> None:
    reason = can_run()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"CI=true but system tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture
def lab():
    require_lab()
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()
        left = lab.leftovers()
        assert not left, f"the test left things behind: {left}"


@pytest.fixture
def egress(lab):
    return build_egress(lab, clients=1)


@pytest.fixture
def egress2(lab):
    return build_egress(lab, clients=2)
