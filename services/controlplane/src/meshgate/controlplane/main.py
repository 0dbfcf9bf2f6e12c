"""Entry point: `meshgate-controlplane`."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import grpc

from meshgate.common import config
from meshgate.common.entrypoint import run_service
from meshgate.common.etcd import etcd_credentials, for_service
from meshgate.common.server import GrpcServer, listen_addresses, read_file, serve
from meshgate.controlplane import gctune
from meshgate.controlplane.api import AuthSettings, ControlPlane
from meshgate.controlplane.egress import control_plane_ips

log = logging.getLogger("meshgate.controlplane")


# HTTP/2 keepalive on agents' streams: a node that vanished without closing
# its connection (power loss, a cut link, a stopped agent) is noticed within
# about 2.5 s (a ping every second, 1.5 s to answer), its session ends, and
# gateway failover (liveness.py) can start counting: cable pull to traffic
# through the standby within 5 s. Pings are answered by gRPC's core, not by
# the event loop, so a busy control plane does not time its agents out.
# Agents ping every 2 s themselves (gatewayd/stream.py), which the server
# must accept (a client pinging more often than allowed is disconnected).
AGENT_KEEPALIVE = (
    ("grpc.keepalive_time_ms", 1_000),
    ("grpc.keepalive_timeout_ms", 1_500),
    # Recent gRPC cores time a keepalive ping out by this, not by
    # keepalive_timeout (whose default, a minute, would hide a dead agent).
    ("grpc.http2.ping_timeout_ms", 1_500),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
)


@dataclass
class ControlPlaneConfig(config.ServerConfig):
    """Control-plane settings: the server kit's, and where the key service is."""

    listen: str = config.option(
        "127.0.0.1:7400",
        "addresses to serve gRPC on, comma-separated: host:port (port 0 picks a free one) or unix:/path",
    )
    gateway_failover_after: float = config.option(
        1.0,
        "seconds an egress gateway node's agent may be disconnected before its ranges move to a standby gateway "
        "(another gateway declaring the same range); 0 turns failover off",
    )
    gateway_failback_after: float = config.option(
        10.0,
        "seconds a gateway that failed over (unhealthy, or its agent away) must stay well before it takes its "
        "ranges back; doubled for each further failover within ten minutes, at most 300 s (no flapping)",
    )
    gateway_startup_grace: float = config.option(
        15.0,
        "seconds after this control plane starts during which no gateway node is marked down for want of its "
        "agent (agents reconnect within 10 s of a control-plane restart or outage)",
    )
    path_delay: float = config.option(
        5.0,
        "seconds a pair of nodes' direct path may stay unhealthy (never connected, or its traffic unanswered) "
        "before the pair goes through a relay, and before the network status calls it unhealthy",
    )
    path_recover_after: float = config.option(
        30.0,
        "seconds a relayed pair's direct path must stay up before the pair moves back to it; doubled for every "
        "move of the pair in the last ten minutes (at most 32 times)",
    )
    keyservice_ca: str = config.option(
        "", "PEM CA bundle that signed the key service's certificate: the link to it uses TLS when set",
    )
    keyservice_cert: str = config.option("", "PEM client certificate for the key service (when it requires mTLS)")
    keyservice_key: str = config.option("", "PEM private key of --keyservice-cert")
    keyservice: str = config.option(
        "",
        "the key service's address (host:port or unix:/path); it signs node keys and issues pre-shared "
        "keys. Empty: nothing is signed and no pre-shared keys are used (development only)",
    )
    agent_listen: str = config.option(
        "",
        "addresses of the mTLS agent endpoint, comma-separated (host:port with a fixed port, or unix:/path): agents "
        "enroll with a CSR, get a certificate naming their node, and stream here with it. Needs --keyservice, "
        "--agent-client-ca and a server certificate. Empty: agents get bearer tokens (development)",
    )
    agent_endpoint: str = config.option(
        "", "the agent endpoint as agents reach it (host:port, or unix:/path); default: the first --agent-listen",
    )
    agent_tls_cert: str = config.option("", "PEM server certificate of the agent endpoint (default: --tls-cert)")
    agent_tls_key: str = config.option("", "PEM private key of --agent-tls-cert (default: --tls-key)")
    agent_client_ca: str = config.option(
        "", "PEM CA that signs agents' certificates: the key service's internal CA (ca.pem of meshgate-keyservice-certs)",
    )
    agent_bearer_tokens: bool = config.option(
        False, "give and accept agents' bearer tokens (no expiry) instead of, or with --agent-listen besides, "
        "certificates: development, migrating old agents. Without --keyservice tokens are all there is",
    )
    bootstrap_token_file: str = config.option(
        "",
        "on the first start against an empty etcd prefix, create the admin token tokens/bootstrap-admin and "
        "write it to this file (mode 0600, never overwritten, never logged)",
    )
    bootstrap_token_ttl: float = config.option(30 * 86400.0, "seconds the bootstrap admin token is valid")
    token_max_ttl: float = config.option(366 * 86400.0, "the longest lifetime, in seconds, CreateToken accepts")
    oidc_config: str = config.option(
        "", "YAML file of OIDC issuers whose JWT bearer tokens are accepted (docs/security.md); empty: API tokens only",
    )
    audit_retention: float = config.option(90 * 86400.0, "seconds audit records are kept")
    audit_max_records: int = config.option(1_000_000, "the most audit records kept; the oldest are deleted first")


def keyservice_credentials(cfg: ControlPlaneConfig) -> grpc.ChannelCredentials | None:
    """TLS (or mTLS) credentials for the key service link; None for plaintext."""
    if not (cfg.keyservice_ca or cfg.keyservice_cert or cfg.keyservice_key):
        return None
    if not cfg.keyservice_ca:
        raise SystemExit("--keyservice-cert/--keyservice-key need --keyservice-ca (the key service's CA)")
    if bool(cfg.keyservice_cert) != bool(cfg.keyservice_key):
        raise SystemExit("--keyservice-cert and --keyservice-key go together")

    return grpc.ssl_channel_credentials(
        root_certificates=read_file(cfg.keyservice_ca, "key service CA"),
        private_key=read_file(cfg.keyservice_key, "key service client key") if cfg.keyservice_key else None,
        certificate_chain=(read_file(cfg.keyservice_cert, "key service client certificate")
                           if cfg.keyservice_cert else None),
    )


def agent_listener(cfg: ControlPlaneConfig) -> tuple[list[tuple[str, grpc.ServerCredentials]], str, bytes]:
    """(the agent endpoint's ports with their mTLS credentials, the endpoint
    agents are told, the client CA) for --agent-listen; clear exits."""
    if not cfg.agent_listen:
        for name in ("agent_endpoint", "agent_tls_cert", "agent_tls_key", "agent_client_ca"):
            if getattr(cfg, name):
                raise SystemExit(f"--{name.replace('_', '-')} needs --agent-listen")
        if cfg.keyservice and not cfg.agent_bearer_tokens:
            # With a key service agents can have certificates: bearer tokens
            # (no expiry) only when the operator says so.
            raise SystemExit("--keyservice without --agent-listen would give agents bearer tokens without expiry: "
                             "serve an mTLS agent endpoint (--agent-listen, --agent-client-ca), or pass "
                             "--agent-bearer-tokens to allow tokens (development)")
        return [], "", b""
    if not cfg.keyservice:
        raise SystemExit("--agent-listen needs --keyservice: the key service's CA issues agents' certificates")
    if not cfg.agent_client_ca:
        raise SystemExit("--agent-listen needs --agent-client-ca (the key service's internal CA, ca.pem)")
    cert, key = cfg.agent_tls_cert or cfg.tls_cert, cfg.agent_tls_key or cfg.tls_key
    if not cert or not key:
        raise SystemExit("--agent-listen needs a server certificate: --agent-tls-cert/--agent-tls-key (or --tls-cert/--tls-key)")
    addresses = listen_addresses(cfg.agent_listen)
    for a in addresses:
        if not a.startswith("unix:") and a.rsplit(":", 1)[-1] in ("", "0"):
            raise SystemExit(f"--agent-listen {a}: give a fixed port (agents are told where to connect)")
    ca = read_file(cfg.agent_client_ca, "agent client CA")
    creds = grpc.ssl_server_credentials([(read_file(key, "agent endpoint key"), read_file(cert, "agent endpoint certificate"))],
                                        root_certificates=ca, require_client_auth=True)
    return [(a, creds) for a in addresses], cfg.agent_endpoint or addresses[0], ca


def auth_settings(cfg: ControlPlaneConfig) -> AuthSettings:
    """The API's authentication settings; bad values are clear exits."""
    for name in ("bootstrap_token_ttl", "token_max_ttl", "audit_retention"):
        if getattr(cfg, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if cfg.audit_max_records <= 0:
        raise SystemExit("--audit-max-records must be positive")
    issuers: tuple = ()
    if cfg.oidc_config:
        from meshgate.controlplane.auth.oidc import load_config

        try:
            issuers = tuple(load_config(cfg.oidc_config))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--oidc-config: {e}") from None
    if cfg.bootstrap_token_file:
        parent = os.path.dirname(os.path.abspath(cfg.bootstrap_token_file))
        if not os.path.isdir(parent):
            raise SystemExit(f"--bootstrap-token-file: directory {parent} does not exist")
    return AuthSettings(
        bootstrap_token_file=cfg.bootstrap_token_file, bootstrap_token_ttl_s=cfg.bootstrap_token_ttl,
        token_max_ttl_s=cfg.token_max_ttl, oidc_issuers=issuers, audit_retention_s=cfg.audit_retention,
        audit_max_records=cfg.audit_max_records,
    )


async def run(cfg: ControlPlaneConfig) -> None:
    agent_ports, agent_endpoint, agent_ca = agent_listener(cfg)  # refused before anything starts
    etcd = for_service(cfg.etcd_endpoints, cfg.etcd_prefix, etcd_credentials(cfg))
    await etcd.connect()
    if cfg.gateway_failover_after < 0:
        raise SystemExit("--gateway-failover-after must be 0 (off) or a number of seconds")
    if cfg.gateway_failback_after < 0 or cfg.gateway_startup_grace < 0:
        raise SystemExit("--gateway-failback-after and --gateway-startup-grace must be 0 or a number of seconds")
    if cfg.path_delay <= 0 or cfg.path_recover_after <= 0:
        raise SystemExit("--path-delay and --path-recover-after must be positive numbers of seconds")
    app = ControlPlane(etcd, cfg.keyservice, gateway_failover_after=cfg.gateway_failover_after,
                       gateway_failback_after=cfg.gateway_failback_after,
                       gateway_startup_grace=cfg.gateway_startup_grace,
                       keyservice_credentials=keyservice_credentials(cfg), auth=auth_settings(cfg),
                       path_delay=cfg.path_delay, path_recover_after=cfg.path_recover_after)
    # egress ranges may not cover where agents reach the control plane (egress.py)
    app.gateways.control_plane_addresses = control_plane_ips([cfg.listen, cfg.agent_listen, agent_endpoint])
    if not cfg.keyservice:
        log.warning("no --keyservice: node keys are not signed and no pre-shared keys are used (development only)")
    settings = app.auth_settings
    await app.start()
    if not settings.bootstrap_token_file and not settings.oidc_issuers and not await app.tokens.any():
        log.warning("no API token exists and no --bootstrap-token-file or --oidc-config is given: "
                    "every call to the admin API will be refused")
    gctune.freeze_startup_heap()  # the cache is loaded: keep its objects out of GC passes
    if agent_ports:
        app.serve_agent_certificates(agent_endpoint, agent_ca, bearer_tokens=cfg.agent_bearer_tokens)
        log.info("agents get certificates and stream with them on %s%s", agent_endpoint,
                 " (bearer tokens still accepted: --agent-bearer-tokens)" if cfg.agent_bearer_tokens else "")
    else:
        log.warning("no --agent-listen: agents get bearer tokens, without expiry (development only)")
    server = GrpcServer(cfg, app.bindings, options=AGENT_KEEPALIVE, extra_ports=agent_ports)
    await serve(server, before_drain=[app.fanout.close_sessions], on_shutdown=[app.stop, etcd.close])


def main(argv: list[str] | None = None) -> None:
    run_service(ControlPlaneConfig, argv, service="controlplane", description="meshgate control plane: the network API, with all state in etcd.", run=run)


if __name__ == "__main__":
    main(sys.argv[1:])
