"""The ``gatewayd`` command line: ``join`` (enroll into a network), ``run`` (the agent:
streams from the control plane once joined, or follows a file), ``apply`` (one
reconcile of a desired state from a file, then exit), ``plan``, ``show``, ``down``,
``public-key``.

Exit codes (also in ``--help`` and docs/gatewayd.md): 0 success; 1 apply failed (or,
for ``check``, not ready); 2 bad input: the desired state or a flag; 3 the host lacks
something gatewayd needs (or its state directory is unusable); 4 ``join`` was refused:
the control plane refused the enrollment key or the node, or presented a key authority
that is not the pinned one; 5 ``join`` could not reach the control plane.

``run`` remembers the interface name it was given (``run.json`` in the state
directory), so ``show`` and ``down`` find that interface without ``--interface``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.errors import ApplyError, EnvironmentProblem, ForeignInterface, InvalidDesiredState
from meshgate.gatewayd.sources import parse_json

log = logging.getLogger("meshgate.gatewayd")

EXIT_APPLY_FAILED, EXIT_INVALID, EXIT_ENVIRONMENT, EXIT_REFUSED, EXIT_UNREACHABLE = 1, 2, 3, 4, 5
EXIT_CODES = ("exit codes: 0 success; 1 apply failed (check: not ready); 2 invalid desired state or flags; "
              "3 the host lacks something gatewayd needs; 4 join refused (enrollment key, node or key "
              "authority); 5 join could not reach the control plane")
RUN_RECORD = "run.json"  # what `run` was told that `show` and `down` need: the interface name


def load_desired_file(path: Path) -> pb.DesiredState:
    """A DesiredState from protobuf JSON (or binary when the name ends in ``.pb``)."""
    if path.suffix == ".pb":
        msg = pb.DesiredState()
        msg.ParseFromString(path.read_bytes())
        return msg
    return parse_json(path.read_text())


def _setup_logging(level: str, fmt: str) -> None:
    from meshgate.common import logsetup

    logsetup.configure(level=level, json_format=(fmt == "json"), service="gatewayd")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, help="state directory "
                        "(default /var/lib/meshgate/gatewayd; env MESHGATE_GATEWAYD_STATE_DIR)")
    common.add_argument("--backend", choices=["auto", "kernel", "userspace"],
                        help="WireGuard backend (default auto: kernel module if present)")
    common.add_argument("--log-level", default=os.environ.get("MESHGATE_LOG_LEVEL", "info"))
    common.add_argument("--log-format", choices=["text", "json"],
                        default=os.environ.get("MESHGATE_LOG_FORMAT", "text"))
    common.add_argument("--interface", "-i", dest="default_interface", metavar="NAME",
                        help="WireGuard interface name when the desired state names none "
                        "(default mg0; env MESHGATE_GATEWAYD_DEFAULT_INTERFACE)")
    p = argparse.ArgumentParser(
        prog="gatewayd",
        description="meshgate node agent: reconciles WireGuard, routes, nftables NAT and "
                    "forwarding sysctls to a desired state.",
        epilog=EXIT_CODES.capitalize() + ".",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    a = sub.add_parser("apply", parents=[common], help="reconcile once to a desired state "
                       "from a file, then exit (like `wg syncconf`)")
    a.add_argument("--file", "-f", type=Path, required=True,
                   help="DesiredState as protobuf JSON (or binary with a .pb suffix)")
    pl = sub.add_parser("plan", parents=[common], help="print what `apply` would change, change nothing")
    pl.add_argument("--file", "-f", type=Path, required=True)
    pl.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    j = sub.add_parser("join", parents=[common], help="join a network with an enrollment key: "
                       "generate the key pair here, enroll, save the identity for `run`",
                       epilog="Exit codes: 0 joined; 2 bad flags (no key authority to pin without "
                              "--insecure-no-authority, pins that disagree, plaintext to a remote control plane "
                              "without --insecure) or a request the control plane found invalid; "
                              "3 unusable state directory; 4 refused: the control plane refused the enrollment "
                              "key (unknown, used up, expired, revoked) or the node (its id taken), or presented a "
                              "key authority other than the pinned one; nothing was saved; 5 the control plane "
                              "could not be reached (retry).")
    j.add_argument("enrollment_key", nargs="?", default=os.environ.get("MESHGATE_ENROLLMENT_KEY"),
                   help="the enrollment key's secret (or env MESHGATE_ENROLLMENT_KEY, or --key-file)")
    j.add_argument("--key-file", type=Path, help="read the enrollment key's secret from this file")
    j.add_argument("--control-plane", required=not os.environ.get("MESHGATE_CONTROL_PLANE"),
                   default=os.environ.get("MESHGATE_CONTROL_PLANE"),
                   help="control plane address, host:port or unix:/path (env MESHGATE_CONTROL_PLANE)")
    j.add_argument("--ca-file", default="", help="PEM CA to verify the control plane's TLS certificate")
    j.add_argument("--node-id", default="", help="node id to take (default: from the host name)")
    j.add_argument("--endpoint", default="", help="host:port other nodes reach this node at, if any")
    j.add_argument("--listen-port", type=int, default=0, help="WireGuard listen port (default: the network's)")
    j.add_argument("--authority-key", action="append", default=[], metavar="BASE64",
                   help="pin the key service's authority: the base64 of its raw Ed25519 public key "
                        "(repeatable); the join is refused when the control plane presents another. "
                        "Without it, the fingerprints the enrollment key carries are the pin")
    j.add_argument("--insecure-no-authority", action="store_true",
                   help="development only: join although nothing pins a key authority (a control plane "
                        "without a key service); peers' keys are then not verified, and `run` says so "
                        "with a WARNING on every start")
    j.add_argument("--insecure", action="store_true",
                   help="development only: allow plaintext to a control plane that is not loopback or a "
                        "Unix socket (saved; `run` warns on every start)")
    _route_consent_arguments(j, join=True)
    r = sub.add_parser("run", parents=[common], help="run the agent: restore the last applied "
                       "state from disk, then stream from the control plane (once joined) or "
                       "follow a file; resync periodically")
    r.add_argument("--file", "-f", type=Path, help="follow this desired-state file "
                   "(re-read when it changes) instead of the control plane; without either the "
                   "agent keeps the state on disk")
    r.add_argument("--control-plane", help="override the control plane address saved by `join`")
    r.add_argument("--resync-interval", type=float, help="seconds between full resyncs (default 60)")
    r.add_argument("--insecure", action="store_true",
                   help="development only: allow plaintext to a control plane that is not loopback or a "
                        "Unix socket (also when `join --insecure` saved it; warned about on every start)")
    _route_consent_arguments(r, join=False)
    _dns_arguments(r)
    _metrics_arguments(r)
    sub.add_parser("show", parents=[common], help="print the observed state as JSON (no secrets); "
                   "--interface defaults to the last applied one, else the one `run` was given")
    sub.add_parser("down", parents=[common], help="remove everything gatewayd owns on this host; "
                   "--interface defaults to the last applied one, else the one `run` was given")
    sub.add_parser("public-key", parents=[common],
                   help="print the node's public key, generating the key pair on first use")
    c = sub.add_parser("check", parents=[common],
                       help="exit 0 when the running agent has applied a desired state and its last "
                            "pass succeeded, 1 otherwise (for health probes); prints why")
    c.add_argument("--max-age", type=float, default=0.0, metavar="SECONDS",
                   help="also fail when the agent has not written its status for this long (it does "
                        "at least every resync interval, 60 s by default): a hung agent")
    return p


def _metrics_arguments(p: argparse.ArgumentParser) -> None:
    """--metrics-listen and the per-peer series (docs/operations.md lists the metrics)."""
    p.add_argument("--metrics-listen", default=os.environ.get("MESHGATE_GATEWAYD_METRICS_LISTEN", ""),
                   metavar="[HOST:]PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (a bare port: on loopback); "
                        "default off (env MESHGATE_GATEWAYD_METRICS_LISTEN). OTEL_METRICS_EXPORTER=otlp also "
                        "pushes them to OTLP")
    p.add_argument("--metrics-per-peer", action=argparse.BooleanOptionalAction,
                   default=os.environ.get("MESHGATE_GATEWAYD_METRICS_PER_PEER", "true").lower() not in ("0", "false", "no"),
                   help="export each peer's handshake age and traffic (up to --metrics-peer-cap peers); "
                        "--no-metrics-per-peer keeps only the totals (default on)")
    p.add_argument("--metrics-peer-cap", type=int, default=int(os.environ.get("MESHGATE_GATEWAYD_METRICS_PEER_CAP",
                                                                              "100")),
                   metavar="N", help="the most peers with series of their own (default 100)")


def _accept_routes(text: str) -> tuple[str, ...] | None:
    from meshgate.gatewayd import consent

    try:
        return consent.parse_accept_routes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--accept-routes: ")) from None


def _dns_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the DNS side of `run` (dnsagent.DnsSettings; env MESHGATE_GATEWAYD_DNS_*)."""
    p.add_argument("--no-dns", dest="dns", action="store_const", const=False, default=None,
                   help="do not answer the overlay's names (by default gatewayd answers {node}.{network}."
                        "meshgate.internal on its overlay addresses and forwards other questions)")
    p.add_argument("--dns-port", type=int, help="port of the overlay DNS server (default 53)")
    p.add_argument("--dns-upstream", action="append", metavar="HOST[:PORT]",
                   help="resolver for forwarded questions and egress domains (repeatable; default: the "
                        "host's, from /etc/resolv.conf)")
    p.add_argument("--dns-min-ttl", type=float, metavar="SECONDS",
                   help="lower bound of the TTL followed for egress domains (default 5)")
    p.add_argument("--dns-max-ttl", type=float, metavar="SECONDS",
                   help="upper bound of the TTL followed for egress domains (default 300)")
    p.add_argument("--dns-grace", type=float, metavar="SECONDS",
                   help="how long an egress-domain address stays routed after it left the answer (default 300)")
    p.add_argument("--dns-configure-resolver", action="store_const", const=True, default=None,
                   help="point this host's resolver at the overlay server for the overlay's zone "
                        "(resolvectl, where systemd-resolved runs; otherwise the log says what to configure)")


def _dns_source(args: argparse.Namespace, settings: Settings, source, rec):
    """`source` wrapped by dnsagent.DnsSource (egress domains, the overlay DNS server)."""
    from meshgate.gatewayd.dnsagent import DnsSettings, DnsSource

    dns = DnsSettings.load({k: getattr(args, k, None) for k in (  # ValueError: bad flags or env
        "dns", "dns_port", "dns_upstream", "dns_min_ttl", "dns_max_ttl", "dns_grace", "dns_configure_resolver")})
    identity_node = getattr(getattr(source, "identity", None), "node", "")
    return DnsSource(source, dns, node=identity_node, interface=settings.default_interface,
                     initial=rec.store.load_desired())


def _route_consent_arguments(p: argparse.ArgumentParser, join: bool) -> None:
    """--accept-routes and the default-route consent (consent.py), for join (saved) and run (for this run)."""
    saved = ("saved; `run` flags override it" if join else
             "for this run; default: what `join` saved")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--accept-default-route", dest="accept_default_route", action="store_const", const=True,
                   default=None,
                   help="install default routes (an internet gateway) the control plane sends; without it they "
                        f"are declined and reported in the network status ({saved})")
    g.add_argument("--no-default-route", "--no-accept-default-route", dest="accept_default_route",
                   action="store_const", const=False,
                   help="decline the default routes the control plane sends, keeping this host's own default "
                        f"route; reported in the network status ({saved})")
    p.add_argument("--accept-routes", type=_accept_routes, default=False, metavar="CIDRS",
                   help="install only the routes (egress ranges) that lie within one of these comma-separated "
                        "ranges, e.g. 10.0.0.0/8,198.51.100.0/24; 'none' accepts none, 'all' every one (the "
                        "default); refused routes are left out with their allowed IPs and reported in the "
                        f"network status; default routes follow --accept-default-route ({saved})"
                        + ("" if join else ". States from --file are the operator's own: they apply as written "
                                           "unless these flags are given"))


def _check(args: argparse.Namespace, settings: Settings) -> int:
    path = settings.state_dir / "status.json"  # read only: a probe creates nothing
    try:
        status = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        print(f"not ready: no readable status in {settings.state_dir} (is `gatewayd run` running?)")
        return 1
    if status.get("applied_revision") is None:
        print(f"not ready: nothing applied yet ({status.get('state', 'waiting')})")
        return 1
    if status.get("state") != "applied":
        print(f"not ready: the last pass failed: {status.get('last_error') or status.get('state')}")
        return 1
    if args.max_age and age > args.max_age:
        print(f"stale: the agent last wrote its status {age:.0f}s ago (limit {args.max_age:.0f}s)")
        return 1
    print(f"ok: revision {status['applied_revision']} applied")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    try:
        settings = Settings.load({
            "state_dir": args.state_dir,
            "backend": args.backend,
            "resync_interval": getattr(args, "resync_interval", None),
            "default_interface": args.default_interface,
        })
    except ValueError as e:
        print(f"gatewayd: {e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        return _dispatch(args, settings)
    except InvalidDesiredState as e:
        print(f"gatewayd: {e}", file=sys.stderr)
        return EXIT_INVALID
    except ApplyError as e:
        print(f"gatewayd: apply failed: {e}", file=sys.stderr)
        return EXIT_APPLY_FAILED
    except EnvironmentProblem as e:
        print(f"gatewayd: {e}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except OSError as e:  # a missing file, an unusable state directory, a missing binary
        print(f"gatewayd: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        return 130


def _join(args: argparse.Namespace, settings: Settings) -> int:
    import socket

    import grpc

    from meshgate.gatewayd.store import StateStore
    from meshgate.gatewayd.stream import JoinRefused, PlaintextRefused, check_transport, join, pins_for
    from meshgate.gatewayd.trust import fingerprint, parse_authority_key

    secret = args.enrollment_key
    if args.key_file:
        secret = args.key_file.read_text().strip()
    if not secret:
        print("gatewayd: join needs an enrollment key (argument, --key-file or MESHGATE_ENROLLMENT_KEY)",
              file=sys.stderr)
        return EXIT_INVALID
    try:
        authority_keys = tuple(parse_authority_key(k) for k in args.authority_key)
        check_transport(args.control_plane, args.ca_file, args.insecure)
        # Nothing to pin, or pins that disagree: the flags' problem, found before anything is sent.
        pins_for(secret, authority_keys, args.insecure_no_authority)
    except ValueError as e:
        print(f"gatewayd: {e}", file=sys.stderr)
        return EXIT_INVALID
    except JoinRefused as e:
        print(f"gatewayd: join refused: {e}", file=sys.stderr)
        return EXIT_INVALID
    if args.insecure_no_authority and not authority_keys:
        log.warning("INSECURE: joining with --insecure-no-authority: unless the enrollment key pins a key "
                    "authority, peers' keys will not be verified (development only)")
    _, public_key = StateStore(settings.state_dir).keypair()
    try:
        identity, resp = asyncio.run(join(
            args.control_plane, secret, public_key, settings.state_dir, node_id=args.node_id,
            hostname=socket.gethostname(), endpoint=args.endpoint, listen_port=args.listen_port,
            ca_file=args.ca_file, authority_keys=authority_keys,
            insecure_no_authority=args.insecure_no_authority, insecure=args.insecure,
            accept_default_route=bool(args.accept_default_route),
            no_default_route=args.accept_default_route is False,
            accept_routes=None if args.accept_routes is False else args.accept_routes,
        ))
    except PlaintextRefused as e:  # a flag problem, found before a byte was sent
        print(f"gatewayd: join refused: {e}", file=sys.stderr)
        return EXIT_INVALID
    except JoinRefused as e:  # what the control plane presented is not the pinned key authority
        print(f"gatewayd: join refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except grpc.aio.AioRpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            print(f"gatewayd: join failed: the control plane at {args.control_plane} did not answer "
                  f"({code.name}: {e.details()}); nothing was saved, try again", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"gatewayd: join refused: {code.name}: {e.details()}", file=sys.stderr)
        return EXIT_INVALID if code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_REFUSED
    node = resp.node
    print(f"joined as {node.name}: {node.ipv4_address}" + (f", {node.ipv6_address}" if node.ipv6_address else ""))
    if identity.authority_keys:
        print(f"key authority pinned by the {identity.pinned_by}: "
              + ", ".join(fingerprint(k) for k in identity.authority_keys))
    else:
        print("WARNING: no key authority: peers' keys are not verified (--insecure-no-authority)")
    print(f"identity saved in {settings.state_dir}; start the agent with `gatewayd run`")
    return 0


def _run_source(args: argparse.Namespace, settings: Settings, rec):
    """(source, authority keys, network, consent.Consent) for `run`, with
    the WARNINGs of every insecure choice; raises EnvironmentProblem (an unusable
    identity) or PlaintextRefused."""
    from meshgate.gatewayd.consent import Consent
    from meshgate.gatewayd.sources import FileSource
    from meshgate.gatewayd.stream import ControlPlaneSource, Identity, IdentityError, check_transport
    from meshgate.gatewayd.trust import fingerprint

    if args.file:
        log.warning("development mode: following %s; peer keys are not verified and its default routes "
                    "apply as written (the file is the operator's own) unless --no-default-route/--accept-routes "
                    "say otherwise", args.file)
        return FileSource(args.file), (), "", _consent(args, Consent(True))
    try:
        identity = Identity.load(settings.state_dir)
    except IdentityError as e:
        raise EnvironmentProblem(str(e)) from None
    if identity is None:
        log.info("not joined and no --file: keeping the state on disk")
        return None, (), "", _consent(args, Consent())
    if args.control_plane:
        identity.control_plane = args.control_plane
    identity.insecure = identity.insecure or args.insecure
    check_transport(identity.control_plane, identity.ca_file, identity.insecure)  # PlaintextRefused
    if identity.authority_keys:
        log.info("peer keys are verified against %d key authority key(s) pinned by the %s: %s",
                 len(identity.authority_keys), identity.pinned_by or "join",
                 ", ".join(fingerprint(k) for k in identity.authority_keys))
    else:
        log.warning("INSECURE: development mode (joined with --insecure-no-authority): peer keys are NOT "
                    "verified; any key the control plane sends is applied")
    accept = _consent(args, Consent(identity.accept_default_route, identity.no_default_route,
                                    identity.accept_routes))
    bypass = control_plane_addresses(identity.control_plane)
    if bypass:
        rec.settings = dataclasses.replace(rec.settings, bypass=tuple(sorted({*rec.settings.bypass, *bypass})))
    last = rec.store.load_desired()
    source = ControlPlaneSource(identity, last.revision if last else 0)
    log.info("node %s, control plane %s", identity.node, identity.control_plane)
    return source, identity.authority_keys, identity.network, accept


def control_plane_addresses(target: str) -> list[str]:
    """The IP addresses of a gRPC target (``host:port``, ``[v6]:port``; none for a
    ``unix:`` socket), resolved once at start; none when the name does not resolve."""
    import ipaddress
    import socket

    if target.startswith("unix:"):
        return []
    host = target.rsplit(":", 1)[0] if not target.startswith("[") else target[1:].split("]", 1)[0]
    host = host.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as e:
        log.warning("control plane %s does not resolve (%s): a default route through a peer may carry "
                    "the agent's own stream", host, e)
        return []
    return sorted({str(ipaddress.ip_address(i[4][0])) for i in infos})


def _consent(args: argparse.Namespace, saved):
    """The routes this run accepts: the saved consent, overridden by run's flags; logged."""
    from dataclasses import replace

    from meshgate.gatewayd.consent import describe_accept_routes

    out = saved
    if args.accept_default_route is not None:
        out = replace(out, accept_default_route=args.accept_default_route,
                      explicit=args.accept_default_route is False)
    if args.accept_routes is not False:
        out = replace(out, accept_routes=args.accept_routes)
    log.info("default routes from the control plane: %s (%s); other routes accepted: %s (%s)",
             "accepted" if out.accept_default_route else "declined",
             "run --accept-default-route/--no-default-route" if args.accept_default_route is not None
             else "saved by join",
             describe_accept_routes(out.accept_routes),
             "run --accept-routes" if args.accept_routes is not False else "saved by join")
    return out


def _remember_interface(settings: Settings) -> None:
    """Record the interface `run` uses when a desired state names none, for `show` and `down`."""
    path = settings.state_dir / RUN_RECORD
    data = json.dumps({"default_interface": settings.default_interface}).encode()
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _remembered_interface(settings: Settings) -> str:
    try:
        return str(json.loads((settings.state_dir / RUN_RECORD).read_text()).get("default_interface") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from meshgate.gatewayd.reconciler import Reconciler
    from meshgate.gatewayd.store import StateStore

    if args.command == "check":
        return _check(args, settings)
    if args.command == "public-key":
        print(StateStore(settings.state_dir).keypair()[1])
        return 0
    if args.command == "join":
        return _join(args, settings)
    if args.command == "run":
        from meshgate.common import metrics, telemetry
        from meshgate.gatewayd.agent import Agent
        from meshgate.gatewayd.stream import PlaintextRefused

        rec = Reconciler.for_host(settings)
        _remember_interface(settings)
        try:
            source, authority_keys, network, accept = _run_source(args, settings, rec)
        except PlaintextRefused as e:
            print(f"gatewayd: {e}", file=sys.stderr)
            return EXIT_INVALID
        if source is not None:
            try:
                source = _dns_source(args, settings, source, rec)
            except ValueError as e:
                print(f"gatewayd: DNS settings: {e}", file=sys.stderr)
                return EXIT_INVALID
        provider = telemetry.configure("meshgate-gatewayd")
        meters = metrics.configure("meshgate-gatewayd", args.metrics_listen)
        metrics.gatewayd.per_peer, metrics.gatewayd.peer_cap = args.metrics_per_peer, max(0, args.metrics_peer_cap)
        try:
            try:
                agent = Agent(rec, settings, source, authority_keys=authority_keys, network=network,
                              accept_default_route=accept.accept_default_route,
                              accept_routes=accept.accept_routes, no_default_route=accept.explicit)
            except ValueError as e:
                raise EnvironmentProblem(f"identity.json: bad key authority key or node: {e}") from None
            return asyncio.run(agent.run_forever())
        finally:
            metrics.shutdown(meters)
            telemetry.shutdown(provider)

    rec = Reconciler.for_host(settings)
    if args.command in ("show", "down"):
        ifname = args.default_interface
        if not ifname:
            last = rec.store.load_desired()
            ifname = (last.interface.name if last else "") or _remembered_interface(settings) \
                or settings.default_interface
        if args.command == "show":
            print(json.dumps(rec.show(ifname), indent=1, sort_keys=True))
        else:
            if rec.down(ifname):
                print(f"removed interface {ifname}, table inet meshgate, gatewayd's routes and rules")
            else:
                print(f"removed table inet meshgate, gatewayd's routes and rules; left {ifname} alone: "
                      "gatewayd did not create it")
        return 0

    from meshgate.gatewayd import consent

    msg = load_desired_file(args.file)
    # the file is the operator's own: its default routes apply, except through a
    # peer of a node that is the internet gateway itself
    declined = consent.declined_routes(msg, accept_default_route=True)
    if declined:
        print(f"gatewayd: {consent.summary(declined)}", file=sys.stderr)
    desired = rec.compile(consent.without_declined(msg, declined))
    if args.command == "plan":
        if not rec.owns(desired.interface) and rec.interface_exists(desired.interface):
            print(f"gatewayd: {ForeignInterface(desired.interface)}", file=sys.stderr)
            return EXIT_APPLY_FAILED
        observed = rec.observe(desired)
        from meshgate.gatewayd.planner import plan

        lines = plan(desired, observed).changes()
        print("\n".join(lines) if lines else "no changes")
        return 0
    result = rec.reconcile(desired, full=True)
    rec.store.save_desired(msg)
    rec.nft.settle()
    rec.store.write_status({
        "node": desired.node, "applied_revision": desired.revision, "state": "applied",
        "last_error": None, "changes": len(result.plan.changes()),
    })
    lines = result.plan.changes()
    print(f"applied revision {desired.revision} to {desired.interface}: "
          f"{len(lines)} change(s) in {result.seconds * 1000:.1f} ms")
    for line in lines:
        print("  " + line)
    return 0
