"""Only the identities each key-service RPC admits get through, over real mTLS.

A real `meshgate-keyservice` process with the certificates the offline
command makes; every RPC of the service, from its descriptors, is called with
no client certificate, with a node's certificate, as the control plane and as
the operator. Refusals change nothing in etcd.
"""

from __future__ import annotations

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.message_factory import GetMessageClass

from meshgate.api.v1 import keys_pb2, keys_pb2_grpc
from meshgate.common.access import rules_for
from meshgate.common.testing import ServiceProcess, keyservice_pki

SERVICE = keys_pb2.DESCRIPTOR.services_by_name["KeyService"]


def csr(identity: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    req = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)])).sign(key, hashes.SHA256())
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return req.public_bytes(serialization.Encoding.PEM), pem_key


@pytest.fixture
def secured(etcd_server, etcd_prefix, tmp_path, keks, kek_env):
    keks.new("k1")
    env = kek_env("k1", path=str(tmp_path / "kek"))
    pki = keyservice_pki(str(tmp_path / "pki"), etcd_server.endpoint, etcd_prefix, env["MESHGATE_KEYSERVICE_KEK_FILE"])
    proc = ServiceProcess("meshgate-keyservice",
                          ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix, *pki.server_args],
                          env=env, credentials=pki.credentials()).start()
    yield proc, pki
    assert proc.stop() == 0, proc.log()


def call(channel, md, request):
    fn = channel.unary_unary(f"/{SERVICE.full_name}/{md.name}", request_serializer=type(request).SerializeToString,
                             response_deserializer=GetMessageClass(md.output_type).FromString)
    try:
        fn(request, timeout=10)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def test_every_rpc_has_a_rule_naming_its_callers():
    rules = rules_for(SERVICE)
    assert set(rules) == {m.name for m in SERVICE.methods}
    for name, rule in rules.items():
        assert rule.callers and rule.callers <= {"controlplane", "operator"}, name
    assert rules["RotateKeyEncryptionKey"].callers == {"operator"}
    assert rules["IssuePresharedKeys"].callers == {"controlplane"}


async def test_each_identity_gets_exactly_what_its_rule_admits(secured, etcd):
    proc, pki = secured
    ca = open(pki.path("ca.pem"), "rb").read()
    # A node's certificate, obtained the way the control plane gets one for an agent.
    with grpc.secure_channel(proc.target, pki.credentials("controlplane")) as ch:
        req, node_key = csr("anything")
        cert = keys_pb2_grpc.KeyServiceStub(ch).SignCertificate(
            keys_pb2.SignCertificateRequest(csr=req, identity="networks/prod/nodes/a"))
    node_creds = grpc.ssl_channel_credentials(ca, node_key, cert.certificate_chain)

    rules = rules_for(SERVICE)
    for md in SERVICE.methods:
        request = GetMessageClass(md.input_type)()
        before = await etcd.dump()
        # No client certificate: refused by the TLS handshake itself.
        with grpc.secure_channel(proc.target, grpc.ssl_channel_credentials(ca)) as ch:
            code, _ = call(ch, md, request)
        assert code == grpc.StatusCode.UNAVAILABLE, md.name
        # A node's identity: never admitted.
        with grpc.secure_channel(proc.target, node_creds) as ch:
            code, details = call(ch, md, request)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (md.name, code, details)
        assert "meshgate://networks/prod/nodes/a" in details
        assert await etcd.dump() == before, md.name  # refusals change nothing
        for who in ("controlplane", "operator"):
            with grpc.secure_channel(proc.target, pki.credentials(who)) as ch:
                code, details = call(ch, md, request)
            if who in rules[md.name].callers:
                # Past the guard: an empty request is refused for what it is.
                assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), (md.name, who)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (md.name, who, code, details)


def test_service_identities_only_for_the_operator_and_kek_rotation_only_by_it(secured):
    proc, pki = secured
    req, _ = csr("x")
    with grpc.secure_channel(proc.target, pki.credentials("controlplane")) as ch:
        stub = keys_pb2_grpc.KeyServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.SignCertificate(keys_pb2.SignCertificateRequest(csr=req, identity="services/controlplane"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            stub.RotateKeyEncryptionKey(keys_pb2.RotateKeyEncryptionKeyRequest(new_key_id="k1"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.secure_channel(proc.target, pki.credentials("operator")) as ch:
        cert = keys_pb2_grpc.KeyServiceStub(ch).SignCertificate(
            keys_pb2.SignCertificateRequest(csr=req, identity="services/backup"))
    leaf = x509.load_pem_x509_certificate(cert.certificate_chain)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["meshgate://services/backup"]


def test_the_key_service_refuses_to_start_without_mtls(etcd_server, etcd_prefix, tmp_path, keks, kek_env):
    import os
    import subprocess
    import sys

    keks.new("k1")
    env = {**os.environ, **kek_env("k1", path=str(tmp_path / "kek"))}
    exe = os.path.join(os.path.dirname(sys.executable), "meshgate-keyservice")
    r = subprocess.run([exe, "--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix,
                        "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0
    assert "refusing to start without mTLS" in r.stderr and "--tls-client-ca" in r.stderr
    assert "Traceback" not in r.stderr
