"""`meshgate-keyservice-certs`: the first service certificates, made offline.

The key service requires mTLS, and only the operator may obtain service
identities from it, so the first certificates cannot come through its API:
this command opens the same etcd and KEK the key service uses, creates the
internal CA if it does not exist yet (the key service would create the same
one), and writes into `--out-dir`:

    ca.pem                                   the internal CA (trust anchor for all three)
    keyservice.pem, keyservice.key           server: meshgate://services/keyservice, with --server-name SANs
    controlplane.pem, controlplane.key       meshgate://services/controlplane: client of the key
                                             service, and server of the agent endpoint
                                             (--agent-listen), with --controlplane-name SANs
    operator.pem, operator.key               client: meshgate://services/operator (KEK rotation,
                                             service certificates through the API)

Private keys are generated here and written with mode 0600; files that exist
are left alone (run it again to fill in what is missing; delete a pair to make
it anew), so it is safe to run twice. Certificates are valid `--validity-days`.

Hazard: whoever holds operator.key may rotate the KEK and mint service
identities: keep it off the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshgate.common.etcd import EtcdCredentials, etcd_credentials, for_service
from meshgate.keyservice.ca import CertificateAuthority
from meshgate.keyservice.sealing import KekError, Keyring
from meshgate.keyservice.vault import Vault

IDENTITIES = ("keyservice", "controlplane", "operator")


def _csr(key: ec.EllipticCurvePrivateKey, name: str, server_names: list[str]) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"services/{name}")]))
    if server_names:
        sans: list[x509.GeneralName] = []
        for n in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


async def make(etcd_endpoints: str, etcd_prefix: str, keyring: Keyring, out: Path, server_names: list[str],
               validity: dt.timedelta, credentials: EtcdCredentials | None = None,
               controlplane_names: list[str] | None = None) -> list[str]:
    """Write what is missing in `out`; returns the files written."""
    etcd = for_service(etcd_endpoints, etcd_prefix, credentials)
    await etcd.connect()
    written: list[str] = []
    try:
        vault = Vault(etcd, keyring)
        await vault.open()
        ca = CertificateAuthority(vault, validity)
        await ca.ensure()
        out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - an offline command: nothing else runs on its loop
        sans = {"keyservice": server_names, "controlplane": controlplane_names or [], "operator": []}
        for name in IDENTITIES:
            cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
            if cert_path.exists() and key_path.exists():
                continue
            key = ec.generate_private_key(ec.SECP256R1())
            issued = await ca.sign(_csr(key, name, sans[name]), f"services/{name}")
            leaf_end = issued.chain_pem.index(b"-----END CERTIFICATE-----") + len(b"-----END CERTIFICATE-----\n")
            for p in (cert_path, key_path):
                if p.exists():
                    p.unlink()
            _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), 0o600)
            _write(cert_path, issued.chain_pem[:leaf_end], 0o644)
            written += [str(cert_path), str(key_path)]
            ca_pem = issued.chain_pem[leaf_end:]
            ca_path = out / "ca.pem"
            if not ca_path.exists():
                _write(ca_path, ca_pem, 0o644)
                written.append(str(ca_path))
    finally:
        await etcd.close()
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshgate-keyservice-certs", description=__doc__.split("\n")[0])
    p.add_argument("--etcd-endpoints", default=os.environ.get("MESHGATE_KEYSERVICE_ETCD_ENDPOINTS", "127.0.0.1:2379"))
    p.add_argument("--etcd-prefix", default=os.environ.get("MESHGATE_KEYSERVICE_ETCD_PREFIX", "/meshgate"))
    p.add_argument("--kek-file", default=os.environ.get("MESHGATE_KEYSERVICE_KEK_FILE", ""),
                   help="the key service's KEK file (the CA's key is sealed under it)")
    p.add_argument("--out-dir", required=True, type=Path, help="where to write the certificates and keys")
    p.add_argument("--server-name", action="append", default=[],
                   help="a DNS name or IP address clients reach the key service at (repeatable; default 127.0.0.1)")
    p.add_argument("--controlplane-name", action="append", default=[],
                   help="a DNS name or IP address agents reach the control plane's agent endpoint at (repeatable; "
                        "default 127.0.0.1 and localhost, which is also the name a unix: endpoint is checked against)")
    p.add_argument("--validity-days", type=float, default=365.0)
    for opt, what in (("ca", "PEM CA of etcd's server certificate (TLS)"), ("cert", "client certificate for etcd"),
                      ("key", "its private key"), ("user", "etcd user"), ("password-file", "file holding its password")):
        name = "etcd_" + opt.replace("-", "_")
        p.add_argument(f"--etcd-{opt}", dest=name, default=os.environ.get(f"MESHGATE_KEYSERVICE_{name.upper()}", ""),
                       help=f"{what}, as for meshgate-keyservice")
    args = p.parse_args(argv)
    if not args.kek_file:
        p.error("--kek-file is required (the key service's, or MESHGATE_KEYSERVICE_KEK_FILE)")
    try:
        keyring = Keyring.from_config(args.kek_file, "")
    except KekError as e:
        p.error(str(e))
    written = asyncio.run(make(args.etcd_endpoints, args.etcd_prefix, keyring, args.out_dir,
                               args.server_name or ["127.0.0.1", "localhost"],
                               dt.timedelta(days=args.validity_days), etcd_credentials(args),
                               args.controlplane_name or ["127.0.0.1", "localhost"]))
    for w in written:
        print(f"wrote {w}")
    if not written:
        print(f"{args.out_dir}: every certificate is there already")
    return 0


if __name__ == "__main__":
    sys.exit(main())
