"""No secret in etcd (outside its envelope), in a log record or in an error message.

Every test of this directory is already checked by the autouse guard in
conftest.py (raw etcd values under the test's prefix and every log record at
DEBUG, against every secret the store holds, every secret handed to the
test and every KEK). This test walks every kind of secret through the API in
one go, including the failure paths, and also checks the error messages.
"""

from __future__ import annotations

import base64
import logging
import os

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshgate.api.v1 import keys_pb2


def test_the_guard_finds_a_planted_secret(leaks):
    find_leaks = leaks
    s = os.urandom(32)
    for form in (s, base64.b64encode(s), base64.urlsafe_b64encode(s).rstrip(b"="), s.hex().encode()):
        assert find_leaks([s], [b"prefix" + form + b"suffix"], [])
        assert find_leaks([s], [], ["text " + form.decode("latin-1")])
    assert not find_leaks([s], [b"nothing"], ["nothing"])


async def test_every_secret_through_the_api(ks, keks, put_network, secrets, caplog, leaks):
    find_leaks = leaks
    caplog.set_level(logging.DEBUG)
    await put_network("prod")
    errors: list[str] = []

    async def refused(call, req):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await call(req)
        errors.append(ei.value.details() + repr(ei.value.trailing_metadata()))

    pairs = [f"networks/prod/nodes/a|networks/prod/nodes/n{i}" for i in range(50)]
    got = await ks.stub.IssuePresharedKeys(keys_pb2.IssuePresharedKeysRequest(network="networks/prod", pairs=pairs))
    secrets += [base64.b64decode(k.key) for k in got.keys]
    await ks.stub.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(network="networks/prod"))
    got = await ks.stub.IssuePresharedKeys(keys_pb2.IssuePresharedKeysRequest(network="networks/prod", pairs=pairs))
    secrets += [base64.b64decode(k.key) for k in got.keys]
    pair = await ks.stub.IssueClientKeyPair(keys_pb2.IssueClientKeyPairRequest(
        external_client="networks/prod/externalClients/phone"))
    secrets.append(base64.b64decode(pair.private_key))
    await refused(ks.stub.IssueClientKeyPair, keys_pb2.IssueClientKeyPairRequest(
        external_client="networks/prod/externalClients/phone"))
    await refused(ks.stub.IssuePresharedKeys, keys_pb2.IssuePresharedKeysRequest(
        network="networks/prod", pairs=[pairs[0], "bad"]))
    csr_key = ec.generate_private_key(ec.SECP256R1())
    secrets.append(csr_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(csr_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    await ks.stub.SignCertificate(keys_pb2.SignCertificateRequest(csr=csr, identity="networks/prod/nodes/a"))
    await refused(ks.stub.SignCertificate, keys_pb2.SignCertificateRequest(csr=csr[:200], identity="networks/prod/nodes/a"))
    node_key = base64.b64encode(os.urandom(32)).decode()
    await ks.stub.RegisterNodeKey(keys_pb2.RegisterNodeKeyRequest(node="networks/prod/nodes/a", public_key=node_key))
    keks.new("k2")
    await refused(ks.stub.RotateKeyEncryptionKey, keys_pb2.RotateKeyEncryptionKeyRequest(new_key_id="k2"))
    ks.core.vault.keyring = keks.ring("k1", "k2")
    await ks.stub.RotateKeyEncryptionKey(keys_pb2.RotateKeyEncryptionKeyRequest(new_key_id="k2"))
    # The signing key and the CA key are secrets too: the guard opens them from the store.
    stored = {k: v for k, v in (await ks.etcd.dump()).items() if b"/keys/authority/keys/" in k or b"/keys/ca/keys/" in k}
    assert len(stored) == 2
    everything = [*secrets, *keks.made.values()]
    assert not find_leaks(everything, [], errors), errors
    assert len(caplog.records) > 10  # something was logged, and the guard checks all of it
