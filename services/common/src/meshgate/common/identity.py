"""Identities in certificates: the `meshgate://` URI SAN of a verified peer.

Services and agents are identified by the URI SAN of the client certificate
the internal CA issued them: `meshgate://services/{name}` or
`meshgate://networks/{net}/nodes/{node}`. gRPC hands over the verified peer
certificate in the call's auth context (`x509_pem_cert`); the identity is read
from there, never from a request field.
"""

from __future__ import annotations

from cryptography import x509

SCHEME = "meshgate://"
SERVICE_PREFIX = SCHEME + "services/"


def spki_sha256(public_key) -> str:
    """Hex SHA-256 of a public key's SubjectPublicKeyInfo: what binds an agent's
    certificate to the node record (a recreated node has another)."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def peer_spki_sha256(context) -> str:
    """`spki_sha256` of the caller's verified certificate, or ''."""
    try:
        pems = context.auth_context().get("x509_pem_cert") or []
        return spki_sha256(x509.load_pem_x509_certificate(pems[0]).public_key()) if pems else ""
    except Exception:  # noqa: BLE001 - no TLS, or not a certificate
        return ""


def peer_identity(context) -> str:
    """The meshgate URI SAN of the caller's verified certificate, or '' (no
    TLS, no certificate, or not exactly one meshgate identity in it)."""
    try:
        auth = context.auth_context()
    except Exception:  # noqa: BLE001 - no transport security at all
        return ""
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return ""
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return ""
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(SCHEME)]
    return uris[0] if len(uris) == 1 else ""


def node_of(identity: str) -> str:
    """`networks/{net}/nodes/{node}` for a node identity; '' otherwise."""
    if not identity.startswith(SCHEME):
        return ""
    parts = identity[len(SCHEME):].split("/")
    if len(parts) == 4 and parts[0] == "networks" and parts[2] == "nodes" and parts[1] and parts[3]:
        return "/".join(parts)
    return ""
