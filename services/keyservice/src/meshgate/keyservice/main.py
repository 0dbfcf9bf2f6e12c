"""Entry point: `meshgate-keyservice`."""

from __future__ import annotations

import datetime as dt
import logging
import sys
from dataclasses import dataclass

from meshgate.common import config, metrics
from meshgate.common.entrypoint import run_service
from meshgate.common.etcd import etcd_credentials, for_service
from meshgate.common.server import GrpcServer, serve, server_credentials
from meshgate.keyservice.api import bindings
from meshgate.keyservice.core import KeyServiceCore
from meshgate.keyservice.sealing import KekError, Keyring

log = logging.getLogger("meshgate.keyservice")


@dataclass
class KeyServiceConfig(config.ServerConfig):
    """Key-service settings."""

    listen: str = config.option(
        "127.0.0.1:7401",
        "addresses to serve gRPC on, comma-separated: host:port (port 0 picks a free one) or unix:/path",
    )
    kek_file: str = config.option(
        "", "file of key-encryption keys, one '<id>:<base64 of 32 bytes>' per line; the first seals a new store. "
        "Re-read when a rotation or a stored secret names a KEK this replica does not hold yet"
    )
    kek: str = config.option(
        "", "key-encryption keys given directly, '<id>:<base64>' entries separated by commas (prefer the file)",
        secret=True,
    )
    cert_validity_hours: float = config.option(24.0, "validity of certificates the internal CA signs, in hours")
    scheduler: bool = config.option(
        True, "take part in the election for running scheduled rotations and the sweep of key material left by "
        "deleted nodes and clients")
    scheduler_interval: float = config.option(
        30.0, "seconds between two scheduler ticks: rotations due, then the sweep (leader only)")
    election_ttl: int = config.option(10, "seconds of the scheduler leader's lease; a dead leader is replaced within it")


def load_keyring(cfg: KeyServiceConfig) -> Keyring:
    """The KEKs, or a clear exit: a KEK file others may read is refused, and so is a
    KEK on the command line (every user of the host sees it in `ps`)."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        argv = []
    if any(a == b"--kek" or a.startswith(b"--kek=") for a in argv):
        raise SystemExit("meshgate-keyservice: refusing a KEK given on the command line (--kek): every user "
                         "of this host can read it with `ps`. Put it in a file readable only by the service "
                         "(--kek-file, mode 0600) or in MESHGATE_KEYSERVICE_KEK")
    try:
        return Keyring.from_config(cfg.kek_file, cfg.kek, private_file=True)
    except KekError as e:
        raise SystemExit(f"meshgate-keyservice: {e}") from None


async def run(cfg: KeyServiceConfig) -> None:
    # Refuse a plaintext non-loopback address (or broken TLS files) before
    # anything else, with the server kit's own message.
    server_credentials(cfg)
    if not cfg.insecure and not (cfg.tls_cert and cfg.tls_client_ca):
        raise SystemExit(
            "meshgate-keyservice: refusing to start without mTLS: its callers are identified by their certificates. "
            "Give --tls-cert, --tls-key and --tls-client-ca (make them with `meshgate-keyservice-certs`), or "
            "--insecure to admit every caller (development only)")
    if cfg.insecure:
        log.warning("--insecure: the key service admits EVERY caller without identifying it (development only)")
    keyring = load_keyring(cfg)
    metrics.keyservice.kek_file(cfg.kek_file)  # meshgate.keyservice.kek.age
    etcd = for_service(cfg.etcd_endpoints, cfg.etcd_prefix, etcd_credentials(cfg))
    await etcd.connect()
    core = KeyServiceCore(
        etcd, keyring, cert_validity=dt.timedelta(hours=cfg.cert_validity_hours), scheduler=cfg.scheduler,
        scheduler_interval=cfg.scheduler_interval, election_ttl=cfg.election_ttl,
    )
    try:
        await core.start()
    except KekError as e:
        await etcd.close()
        raise SystemExit(f"meshgate-keyservice: {e}") from None
    except BaseException:
        await core.stop()
        await etcd.close()
        raise

    async def shutdown() -> None:
        await core.stop()
        await etcd.close()

    server = GrpcServer(cfg, bindings(core, insecure=cfg.insecure))
    await serve(server, on_shutdown=[shutdown])


def main(argv: list[str] | None = None) -> None:
    run_service(KeyServiceConfig, argv, service="keyservice", description="meshgate key service: WireGuard key signing, pre-shared keys, rotation and the internal CA.", run=run)


if __name__ == "__main__":
    main(sys.argv[1:])
