"""The internal certificate authority for mTLS between services and agents.

One ECDSA P-256 root, created once (race-safe, like the key authority) and
stored sealed at `keys/ca/keys/{id}`; its certificate (public) rides in the
envelope header. `SignCertificate` turns a CSR into a short-lived leaf whose
identity is a URI SAN, `meshgate://networks/{net}/nodes/{node}` or
`meshgate://services/{service}`: the identity comes from the request, never
from the CSR's subject, so a CSR cannot ask for somebody else's name. For
service identities the CSR's DNS and IP SANs are kept (servers need them);
for nodes they are dropped.

`build_leaf()` and `new_root()` are pure and tested without etcd.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshgate.common import metrics
from meshgate.common.errors import FieldViolation, invalid_argument
from meshgate.keyservice import names
from meshgate.keyservice.sealing import header
from meshgate.keyservice.vault import Retry, Vault, optimistic

log = logging.getLogger(__name__)

CURRENT = "keys/ca/current"
KEYS = "keys/ca/keys/"
MAX_CSR = 64 * 1024
ROOT_VALIDITY = dt.timedelta(days=3650)


@dataclass(frozen=True)
class Issued:
    chain_pem: bytes  # leaf first, then the CA certificate
    not_after: dt.datetime


def new_root(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "meshgate internal CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A CSR that parses, whose self-signature verifies and whose key is acceptable."""
    if not csr_pem:
        raise invalid_argument([FieldViolation("csr", "is required")])
    if len(csr_pem) > MAX_CSR:
        raise invalid_argument([FieldViolation("csr", f"is larger than {MAX_CSR} bytes")])
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise invalid_argument([FieldViolation("csr", "is not a PEM certificate signing request")]) from None
    try:
        valid = csr.is_signature_valid
        public = csr.public_key()
    except Exception:  # noqa: BLE001 - unsupported algorithms raise various errors
        raise invalid_argument([FieldViolation("csr", "uses an unsupported key or signature algorithm")]) from None
    if not valid:
        raise invalid_argument([FieldViolation("csr", "its signature does not verify")])
    ok = (
        (isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in ("secp256r1", "secp384r1"))
        or isinstance(public, ed25519.Ed25519PublicKey)
        or (isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048)
    )
    if not ok:
        raise invalid_argument([FieldViolation("csr", "key must be ECDSA P-256/P-384, Ed25519 or RSA of 2048 bits or more")])
    return csr


def build_leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, csr: x509.CertificateSigningRequest,
    identity: str, uri: str, now: dt.datetime, validity: dt.timedelta,
) -> x509.Certificate:
    public = csr.public_key()
    not_after = min(now + validity, ca_cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    if identity.startswith("services/"):
        try:
            requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans += [g for g in requested if isinstance(g, (x509.DNSName, x509.IPAddress))]
        except x509.ExtensionNotFound:
            pass
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate")]
    if len(identity) <= 64:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, identity))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs)).issuer_name(ca_cert.subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=isinstance(public, rsa.RSAPublicKey), data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


class CertificateAuthority:
    def __init__(self, vault: Vault, validity: dt.timedelta = dt.timedelta(hours=24)) -> None:
        self.vault = vault
        self.validity = validity
        self._cached: tuple[str, ec.EllipticCurvePrivateKey, x509.Certificate] | None = None

    async def ensure(self) -> str:
        """The current CA id, creating the CA if there is none (race-safe)."""
        v = self.vault

        async def attempt() -> str:
            kv = await v.etcd.get(v.key(CURRENT))
            if kv is not None:
                return kv.value.decode()
            key, cert = new_root(dt.datetime.now(dt.UTC))
            der = cert.public_bytes(serialization.Encoding.DER)
            ca_id = "p256:" + hashlib.sha256(der).hexdigest()[:16]
            path = KEYS + ca_id
            secret = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
            pem = cert.public_bytes(serialization.Encoding.PEM).decode()
            sealed = v.seal(path, {"certificate": pem}, secret)
            await v.commit([v.t.create(v.key(CURRENT)) == 0],
                           [v.t.put(v.key(CURRENT), ca_id.encode()), v.t.put(v.key(path), sealed)])
            log.info("created the internal CA %s", ca_id)
            return ca_id

        return await optimistic(attempt, "creating the internal CA")

    async def certificates_pem(self) -> bytes:
        """The CA certificates (PEM), the current first: the trust bundle for mTLS."""
        current = await self.ensure()
        kvs, _ = await self.vault.etcd.list_prefix(self.vault.key(KEYS))
        certs = sorted(((self.vault.path(kv.key)[len(KEYS):], header(kv.value)["certificate"]) for kv in kvs),
                       key=lambda c: c[0] != current)
        return "".join(pem for _, pem in certs).encode()

    async def _load(self) -> tuple[str, ec.EllipticCurvePrivateKey, x509.Certificate]:
        ca_id = await self.ensure()
        if self._cached and self._cached[0] == ca_id:
            return self._cached
        path = KEYS + ca_id
        kv = await self.vault.etcd.get(self.vault.key(path))
        if kv is None:
            raise Retry()
        meta, der = self.vault.unseal(path, kv.value)
        key = serialization.load_der_private_key(der, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._cached = (ca_id, key, x509.load_pem_x509_certificate(meta["certificate"].encode()))
        return self._cached

    async def sign(self, csr_pem: bytes, identity: str) -> Issued:
        errs = []
        uri = names.parse_identity(identity)
        if not identity:
            errs.append(FieldViolation("identity", "is required"))
        elif uri is None:
            errs.append(FieldViolation("identity", names.identity_rule()))
        if errs:
            raise invalid_argument(errs)
        csr = parse_csr(csr_pem)
        assert uri is not None
        _, key, ca_cert = await optimistic(self._load, "loading the internal CA")
        leaf = build_leaf(key, ca_cert, csr, identity, uri, dt.datetime.now(dt.UTC), self.validity)
        log.info("signed a certificate for %s (serial %x)", identity, leaf.serial_number)
        metrics.keyservice.signatures.add(1, {"kind": "certificate"})
        chain = leaf.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
        return Issued(chain, leaf.not_valid_after_utc)
