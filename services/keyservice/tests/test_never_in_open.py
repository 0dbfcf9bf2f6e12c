"""No secret in etcd (outside its envelope), in a log record, in a span or in an error message.

Every test of this directory is already checked by the autouse guard
(`secret_guard` in the root conftest: raw etcd values under the test's
prefix, every log record at DEBUG and every span, made in this process or
exported by a process the test ran, against every secret the store holds,
every secret handed to the test and every KEK). This test walks every kind
of secret through the API in one go, including the failure paths, and also
checks the error messages; the others here show the guard's search can fail.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshgate.api.v1 import keys_pb2
from meshgate.common.testing import Haystack

KS = "/meshgate.api.v1.KeyService/"


def test_the_guard_finds_a_planted_secret(leaks):
    find_leaks = leaks
    s = os.urandom(32)
    for form in (s, base64.b64encode(s), base64.urlsafe_b64encode(s).rstrip(b"="), s.hex().encode()):
        assert find_leaks([s], [b"prefix" + form + b"suffix"], [])
        assert find_leaks([s], [], ["text " + form.decode("latin-1")])
        assert find_leaks([s], [], [], [Haystack("a span", [b"x" + form], [])])
        assert find_leaks([s], [], [], [Haystack("a span", [], ["x" + form.decode("latin-1")])])
    assert not find_leaks([s], [b"nothing"], ["nothing"], [Haystack("a span", [b"nothing"], ["nothing"])])


PLANTING_CHILD = """
import sys
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from meshgate.common import telemetry
provider = telemetry.configure("meshgate-planter")
attr, exc, status = sys.argv[1:4]
with trace.get_tracer("planter").start_as_current_span("planted") as span:
    span.set_attribute("meshgate.note", attr)
    span.record_exception(ValueError("bad key " + exc))
    span.set_status(Status(StatusCode.ERROR, status))
telemetry.shutdown(provider)
"""


def test_the_guard_finds_secrets_planted_in_spans(secret_guard):
    """Secrets planted in every part of a span, made in this process and in a
    process exporting over OTLP, are found by the very search the guard runs
    at the end of every key test (those secrets are not registered with the
    guard, so this test's own check passes)."""
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    planted = [os.urandom(32) for _ in range(9)]
    b64, url, hx = (lambda s: base64.b64encode(s).decode()), (lambda s: base64.urlsafe_b64encode(s).decode()), (
        lambda s: s.hex())
    with trace.get_tracer("planter").start_as_current_span("planted") as span:
        span.set_attribute("meshgate.note", b64(planted[0]))
        span.add_event("something", {"detail": hx(planted[1])})
        try:
            raise ValueError(f"bad key {url(planted[2]).rstrip('=')}")
        except ValueError as e:
            span.record_exception(e)
        span.set_status(Status(StatusCode.ERROR, f"refused {b64(planted[3])}"))
        span.set_attribute("meshgate.raw", planted[4].decode("latin-1"))
    env = dict(os.environ)  # the guard pointed OTEL_EXPORTER_OTLP_ENDPOINT at its receiver
    env.pop("OTEL_SERVICE_NAME", None)  # the service name is configure()'s
    env["OTEL_RESOURCE_ATTRIBUTES"] = f"meshgate.planted={hx(planted[5])}"
    r = subprocess.run([sys.executable, "-c", PLANTING_CHILD, b64(planted[6]), hx(planted[7]), url(planted[8])],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert ("meshgate-planter", "planted") in secret_guard.spans()
    found = secret_guard.leaks(planted)
    for i in range(5):
        assert any(f.startswith(f"secret #{i} found in in-process span 'planted'") for f in found), (i, found)
    for i in range(5, 9):
        assert any(f.startswith(f"secret #{i} found in exported span 'planted' of meshgate-planter") for f in found), (
            i, found)
    assert not secret_guard.leaks([os.urandom(32)])


async def test_every_secret_through_the_api(ks, keks, put_network, secrets, caplog, leaks, secret_guard):
    find_leaks = leaks
    caplog.set_level(logging.DEBUG)
    # The guard searches every span too: these must have been made (server
    # spans of the in-process key service, the refused calls' with exceptions).
    for rpc, n in [("IssuePresharedKeys", 3), ("RotatePresharedKeys", 1), ("IssueClientKeyPair", 2),
                   ("SignCertificate", 2), ("RegisterNodeKey", 1), ("RotateKeyEncryptionKey", 2)]:
        secret_guard.expect_span(KS + rpc, "in-process", at_least=n)
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
    refused = [e for s in secret_guard.capture.finished() for e in s.events if e.name == "exception"]
    assert len(refused) >= 5  # exception events with messages and stack traces, searched too
