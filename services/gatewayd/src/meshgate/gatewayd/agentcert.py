"""The agent's mTLS identity: its TLS key, certificate and CA in the state directory.

At `join` gatewayd generates an ECDSA P-256 key (never sent anywhere) and puts
a CSR for it in the EnrollRequest; a control plane with an agent endpoint
answers with a short-lived certificate naming the node, signed by the key
service's CA, and that CA. The agent streams with them (mTLS) and renews the
certificate over its stream once two thirds of its lifetime (from when it
arrived) have passed: a
CSR for a fresh key, whose answer replaces certificate and key together on
disk; the stream carries on, and the next connection uses the new pair.

Files (0600 for keys, atomically replaced):

    agent-tls.key        the current private key
    agent-tls.key.next   the key of a renewal in flight
    agent-tls.pem        the certificate chain (leaf first)
    agent-ca.pem         the CA of the agent endpoint and of the certificate

Hazard: the private keys are secrets; nothing here logs them.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

KEY, NEXT_KEY, CERT, CA = "agent-tls.key", "agent-tls.key.next", "agent-tls.pem", "agent-ca.pem"
RENEW_AT = 2 / 3  # of the lifetime


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def new_csr(state_dir: Path, name: str, *, renewal: bool = False) -> bytes:
    """Generate a key (saved as the current key, or the next one for a
    renewal) and return a PEM CSR for it. The CA takes the identity from the
    control plane's record of the node, not from the CSR's subject."""
    key = ec.generate_private_key(ec.SECP256R1())
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(state_dir / (NEXT_KEY if renewal else KEY), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "gatewayd")])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def save(state_dir: Path, chain: bytes, ca: bytes = b"", *, renewal: bool = False) -> None:
    """Keep a certificate (and the CA); a renewal's certificate goes with the
    next key, which becomes the current one."""
    if renewal:
        nxt = state_dir / NEXT_KEY
        if not nxt.exists():
            raise FileNotFoundError(f"{nxt}: a renewed certificate arrived without its key")
        key = serialization.load_pem_private_key(nxt.read_bytes(), None)
        leaf = x509.load_pem_x509_certificate(chain)
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise ValueError("a renewed certificate for another key (an older renewal's answer); ignored")
        _write(state_dir / CERT, chain, 0o644)
        os.replace(nxt, state_dir / KEY)
    else:
        _write(state_dir / CERT, chain, 0o644)
    if ca:
        _write(state_dir / CA, ca, 0o644)


def credentials(state_dir: Path) -> grpc.ChannelCredentials:
    """mTLS credentials from the files, read now (a renewed pair is picked up
    by the next connection)."""
    return grpc.ssl_channel_credentials(
        root_certificates=(state_dir / CA).read_bytes(),
        private_key=(state_dir / KEY).read_bytes(),
        certificate_chain=(state_dir / CERT).read_bytes(),
    )


def lifetime(state_dir: Path) -> tuple[dt.datetime, dt.datetime]:
    leaf = x509.load_pem_x509_certificate((state_dir / CERT).read_bytes())
    return leaf.not_valid_before_utc, leaf.not_valid_after_utc


def renew_due(state_dir: Path, now: dt.datetime | None = None) -> bool:
    """Whether two thirds of the certificate's lifetime have passed, counted
    from when it was received (the CA backdates `not_valid_before` a little
    for clock skew, which must not count as time used)."""
    _, end = lifetime(state_dir)
    received = dt.datetime.fromtimestamp((state_dir / CERT).stat().st_mtime, dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return now >= received + (end - received) * RENEW_AT
