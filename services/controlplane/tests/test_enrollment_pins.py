"""The key authority's fingerprints on enrollment secrets (issue 11): a control
plane without a key service mints secrets that pin nothing; the pins are not
part of what is hashed, so enrollment ignores them, while the secret's random
part is still checked. (With a key service, the secret pins its authority:
services/gatewayd/tests/test_system_keys_e2e.py joins real agents with it.)"""

import grpc
import pytest

from cptest import key, make_key, make_network
from meshgate.api.v1 import agent_pb2
from meshgate.controlplane.enrollment import authority_fingerprint, without_pins


def _enroll(cp, secret, node_id):
    return cp.agents.Enroll(agent_pb2.EnrollRequest(enrollment_secret=secret, node_id=node_id, public_key=key()))


async def test_without_a_key_service_the_secret_pins_nothing_and_pins_are_not_hashed(cp):
    await make_network(cp)
    ek = await make_key(cp, max_uses=3)
    assert ".ka_" not in ek.secret and without_pins(ek.secret) == ek.secret
    pin = ".ka_" + authority_fingerprint(b"\x01" * 32)
    resp = await _enroll(cp, ek.secret + pin, "n1")
    assert resp.node.name == "networks/prod/nodes/n1"
    assert not resp.key_authority_public_keys
    # the random part is still what counts
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _enroll(cp, ek.secret[:-3] + ("AAA" if not ek.secret.endswith("AAA") else "BBB") + pin, "n2")
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
