"""The node-key signature binding (pure), and that agents can import it alone."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshgate.common import signing


def test_sign_verify_and_everything_that_must_fail():
    ca = Ed25519PrivateKey.generate()
    pub = signing.public_bytes(ca)
    key = os.urandom(32)
    b64 = base64.b64encode(key).decode()
    node = "networks/prod/nodes/a"
    sig = signing.sign(ca, node, b64)
    assert signing.verify(pub, node, b64, sig)
    assert signing.verify(pub, node, key, sig)  # raw or base64
    assert signing.verify(ca.public_key(), node, b64, sig)
    assert signing.verify_any([signing.public_bytes(Ed25519PrivateKey.generate()), pub], node, b64, sig)
    assert not signing.verify(pub, "networks/prod/nodes/b", b64, sig)  # another node
    assert not signing.verify(pub, "networks/dev/nodes/a", b64, sig)  # another network
    assert not signing.verify(pub, node, os.urandom(32), sig)  # another key
    assert not signing.verify(signing.public_bytes(Ed25519PrivateKey.generate()), node, b64, sig)
    assert not signing.verify(pub, node, b64, sig[:-1] + bytes([sig[-1] ^ 1]))
    # Garbage never raises.
    for args in [(b"short", node, b64, sig), (pub, node, "not base64!", sig), (pub, node, b64, b""),
                 (pub, "a\0b", b64, sig), (pub, node, base64.b64encode(b"x" * 31).decode(), sig)]:
        assert signing.verify(*args) is False


def test_binding_is_the_documented_format():
    key = bytes(range(32))
    assert signing.binding("networks/n/nodes/x", key) == b"meshgate-node-key-v1\0networks/n/nodes/x\0" + key
    assert signing.key_id(b"\0" * 32).startswith("ed25519:") and len(signing.key_id(b"\0" * 32)) == 24


def test_agent_can_import_it_without_the_server():
    code = ("import sys, meshgate.common.signing; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('grpc', 'aetcd', 'google') "
            "or (m.startswith('meshgate.common.') and m != 'meshgate.common.signing') "
            "or m.startswith('meshgate.api')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
