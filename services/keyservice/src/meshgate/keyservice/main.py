"""Entry point: `meshgate-keyservice`."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass

from meshgate.common import config, logsetup, telemetry
from meshgate.common.etcd import Etcd
from meshgate.common.server import GrpcServer, serve
from meshgate.keyservice.api import bindings

log = logging.getLogger("meshgate.keyservice")


@dataclass
class KeyServiceConfig(config.ServerConfig):
    """Key-service settings."""

    listen: str = config.option("127.0.0.1:7401", "address to serve gRPC on, host:port (port 0 picks a free one)")


async def run(cfg: KeyServiceConfig) -> None:
    etcd = Etcd(cfg.etcd_endpoints, cfg.etcd_prefix)
    await etcd.connect()
    server = GrpcServer(cfg, bindings())
    await serve(server, on_shutdown=[etcd.close])


def main(argv: list[str] | None = None) -> None:
    loaded = config.load(
        KeyServiceConfig, argv, prog="meshgate-keyservice",
        env_prefix="MESHGATE_KEYSERVICE_",
        description="meshgate key service: WireGuard key signing, pre-shared keys, rotation and the internal CA.",
    )
    cfg = loaded.config
    logsetup.configure(cfg.log_level, cfg.log_json, service="keyservice")
    for k, v in loaded.describe().items():
        log.debug("config %s = %s", k, v)
    provider = telemetry.configure("meshgate-keyservice")
    try:
        asyncio.run(run(cfg))
    finally:
        telemetry.shutdown(provider)


if __name__ == "__main__":
    main(sys.argv[1:])
