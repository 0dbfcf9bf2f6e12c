"""External client key pairs and the internal CA, over real gRPC against real etcd."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from meshgate.api.v1 import keys_pb2
from meshgate.common import signing
from meshgate.keyservice.core import KeyServiceCore
from meshgate.keyservice.sealing import header


async def test_client_key_pair_returned_once_stored_sealed(ks, secrets):
    name = "networks/prod/externalClients/phone"
    pair = await ks.stub.IssueClientKeyPair(keys_pb2.IssueClientKeyPairRequest(external_client=name))
    private = base64.b64decode(pair.private_key)
    secrets.append(private)
    derived = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    assert base64.b64encode(derived).decode() == pair.public_key
    kv = await ks.etcd.get(ks.etcd.key("keys", "clients", "prod", "phone"))
    assert header(kv.value)["public"] == pair.public_key
    _, stored = ks.core.vault.unseal("keys/clients/prod/phone", kv.value)
    assert stored == private
    before = await ks.etcd.dump()
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await ks.stub.IssueClientKeyPair(keys_pb2.IssueClientKeyPairRequest(external_client=name))
    assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await ks.stub.IssueClientKeyPair(keys_pb2.IssueClientKeyPairRequest(external_client="networks/prod/nodes/a"))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await ks.etcd.dump() == before
    await ks.core.clients.forget(name)
    assert await ks.etcd.get(ks.etcd.key("keys", "clients", "prod", "phone")) is None
    assert await ks.etcd.get(ks.etcd.key("keys", "clientKeys", "prod", "phone")) is None


async def test_client_key_pair_replaced_on_rotation(ks, secrets):
    name = "networks/prod/externalClients/tablet"
    first = await ks.stub.IssueClientKeyPair(keys_pb2.IssueClientKeyPairRequest(external_client=name))
    second = await ks.stub.IssueClientKeyPair(keys_pb2.IssueClientKeyPairRequest(external_client=name, replace=True))
    secrets += [base64.b64decode(first.private_key), base64.b64decode(second.private_key)]
    assert second.public_key != first.public_key and second.signed.public_key == second.public_key
    kv = await ks.etcd.get(ks.etcd.key("keys", "clients", "prod", "tablet"))
    _, stored = ks.core.vault.unseal("keys/clients/prod/tablet", kv.value)
    assert stored == base64.b64decode(second.private_key)  # the old private key is gone
    sig = await ks.etcd.get(ks.etcd.key("keys", "clientKeys", "prod", "tablet"))
    assert keys_pb2.SignedNodeKey.FromString(sig.value).public_key == second.public_key


async def test_client_key_is_signed_for_the_client_and_recorded(ks, secrets):
    name = "networks/prod/externalClients/laptop"
    pair = await ks.stub.IssueClientKeyPair(keys_pb2.IssueClientKeyPairRequest(external_client=name))
    secrets.append(base64.b64decode(pair.private_key))
    authority = (await ks.stub.GetKeyAuthority(keys_pb2.GetKeyAuthorityRequest())).public_keys
    assert (pair.signed.node, pair.signed.public_key) == (name, pair.public_key)
    assert signing.verify_any(authority, name, pair.public_key, pair.signed.signature)
    # The signature binds the client's name: it is worthless for a node or another client.
    assert not signing.verify_any(authority, "networks/prod/nodes/laptop", pair.public_key, pair.signed.signature)
    assert not signing.verify_any(authority, "networks/prod/externalClients/other", pair.public_key,
                                  pair.signed.signature)
    kv = await ks.etcd.get(ks.etcd.key("keys", "clientKeys", "prod", "laptop"))
    assert keys_pb2.SignedNodeKey.FromString(kv.value) == pair.signed


def csr_for(key, cn="ignored", sans=()) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.PEM)


def load_chain(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


@pytest.mark.parametrize("keytype", ["p256", "ed25519", "rsa"])
async def test_sign_certificate(ks, keytype):
    key = {"p256": lambda: ec.generate_private_key(ec.SECP256R1()),
           "ed25519": ed25519.Ed25519PrivateKey.generate,
           "rsa": lambda: rsa.generate_private_key(65537, 2048)}[keytype]()
    identity = "networks/prod/nodes/a"
    cert = await ks.stub.SignCertificate(keys_pb2.SignCertificateRequest(
        csr=csr_for(key, cn="networks/prod/nodes/evil", sans=[x509.DNSName("evil.example")]), identity=identity))
    leaf, ca = load_chain(cert.certificate_chain)
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("meshgate://networks/prod/nodes/a")]  # no DNS for nodes
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(hours=24, minutes=1)
    assert cert.expire_time.ToDatetime(tzinfo=dt.UTC) == leaf.not_valid_after_utc
    assert leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
        == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    # The CA is the same for every certificate, and is the trust bundle.
    assert (await ks.core.ca.certificates_pem()) == ca.public_bytes(serialization.Encoding.PEM)


async def test_service_identity_keeps_dns_and_ip_sans(ks):
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("cp.internal"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = await ks.stub.SignCertificate(keys_pb2.SignCertificateRequest(csr=csr_for(key, sans=sans),
                                                                         identity="services/controlplane"))
    leaf, _ = load_chain(cert.certificate_chain)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("meshgate://services/controlplane"), *sans]


async def test_bad_csrs_and_identities(ks):
    good = csr_for(ec.generate_private_key(ec.SECP256R1()))
    tampered = x509.load_pem_x509_csr(good).tbs_certrequest_bytes  # not PEM
    der = x509.load_pem_x509_csr(good)
    # Flip a byte inside the signature of a valid CSR: parses, does not verify.
    raw = bytearray(der.public_bytes(serialization.Encoding.DER))
    raw[-3] ^= 0xFF
    import base64 as b64

    bad_sig = b"-----BEGIN CERTIFICATE REQUEST-----\n" + b64.encodebytes(bytes(raw)) + b"-----END CERTIFICATE REQUEST-----\n"
    small_rsa = csr_for(rsa.generate_private_key(65537, 1024))
    cases = [
        (b"", "networks/prod/nodes/a", {"csr"}),
        (b"garbage", "networks/prod/nodes/a", {"csr"}),
        (tampered, "networks/prod/nodes/a", {"csr"}),
        (bad_sig, "networks/prod/nodes/a", {"csr"}),
        (small_rsa, "networks/prod/nodes/a", {"csr"}),
        (b"x" * 70000, "networks/prod/nodes/a", {"csr"}),
        (good, "", {"identity"}),
        (good, "networks/prod", {"identity"}),
        (good, "services/Bad", {"identity"}),
    ]
    before = await ks.etcd.dump()
    for csr, identity, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await ks.stub.SignCertificate(keys_pb2.SignCertificateRequest(csr=csr, identity=identity))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (identity, ei.value.details())
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        br = error_details_pb2.BadRequest()
        assert any(d.Unpack(br) for d in rpc_status.from_call(ei.value).details)
        assert {v.field for v in br.field_violations} == fields
    assert await ks.etcd.dump() == before


async def test_ca_created_once_across_replicas(etcd, keks):
    keks.new("k1")
    cores = [KeyServiceCore(etcd, keks.ring("k1"), scheduler=False) for _ in range(3)]
    await asyncio.gather(*(c.start() for c in cores))
    try:
        bundles = {await c.ca.certificates_pem() for c in cores}
        assert len(bundles) == 1
        key = ec.generate_private_key(ec.SECP256R1())
        (ca,) = x509.load_pem_x509_certificates(bundles.pop())
        for c in cores:
            issued = await c.ca.sign(csr_for(key), "networks/n/nodes/x")
            load_chain(issued.chain_pem)[0].verify_directly_issued_by(ca)
    finally:
        for c in cores:
            await c.stop()
