"""The ``gatewayd`` command line: ``join`` (enroll into a network), ``run`` (the agent:
streams from the control plane once joined, or follows a file), ``apply`` (one
reconcile of a desired state from a file, then exit), ``plan``, ``show``, ``down``,
``public-key``.

Exit codes: 0 success, 1 apply failed, 2 bad input (the desired state or a flag),
3 the host lacks something gatewayd needs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.errors import ApplyError, EnvironmentProblem, InvalidDesiredState
from meshgate.gatewayd.sources import parse_json

log = logging.getLogger("meshgate.gatewayd")

EXIT_APPLY_FAILED, EXIT_INVALID, EXIT_ENVIRONMENT = 1, 2, 3


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
                       "generate the key pair here, enroll, save the identity for `run`")
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
    r = sub.add_parser("run", parents=[common], help="run the agent: restore the last applied "
                       "state from disk, then stream from the control plane (once joined) or "
                       "follow a file; resync periodically")
    r.add_argument("--file", "-f", type=Path, help="follow this desired-state file "
                   "(re-read when it changes) instead of the control plane; without either the "
                   "agent keeps the state on disk")
    r.add_argument("--control-plane", help="override the control plane address saved by `join`")
    r.add_argument("--resync-interval", type=float, help="seconds between full resyncs (default 60)")
    sub.add_parser("show", parents=[common], help="print the observed state as JSON (no secrets); "
                   "--interface defaults to the last applied one")
    sub.add_parser("down", parents=[common], help="remove everything gatewayd owns on this host; "
                   "--interface defaults to the last applied one")
    sub.add_parser("public-key", parents=[common],
                   help="print the node's public key, generating the key pair on first use")
    c = sub.add_parser("check", parents=[common],
                       help="exit 0 when the running agent has applied a desired state and its last "
                            "pass succeeded, 1 otherwise (for health probes); prints why")
    c.add_argument("--max-age", type=float, default=0.0, metavar="SECONDS",
                   help="also fail when the agent has not written its status for this long (it does "
                        "at least every resync interval, 60 s by default): a hung agent")
    return p


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
    from meshgate.gatewayd.stream import join

    secret = args.enrollment_key
    if args.key_file:
        secret = args.key_file.read_text().strip()
    if not secret:
        print("gatewayd: join needs an enrollment key (argument, --key-file or MESHGATE_ENROLLMENT_KEY)",
              file=sys.stderr)
        return EXIT_INVALID
    _, public_key = StateStore(settings.state_dir).keypair()
    try:
        identity, resp = asyncio.run(join(
            args.control_plane, secret, public_key, settings.state_dir, node_id=args.node_id,
            hostname=socket.gethostname(), endpoint=args.endpoint, listen_port=args.listen_port,
            ca_file=args.ca_file,
        ))
    except grpc.aio.AioRpcError as e:
        code = e.code()
        print(f"gatewayd: join refused: {code.name}: {e.details()}", file=sys.stderr)
        return EXIT_INVALID if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                        grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS) else 1
    node = resp.node
    print(f"joined as {node.name}: {node.ipv4_address}" + (f", {node.ipv6_address}" if node.ipv6_address else ""))
    print(f"identity saved in {settings.state_dir}; start the agent with `gatewayd run`")
    return 0


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
        from meshgate.common import telemetry
        from meshgate.gatewayd.agent import Agent
        from meshgate.gatewayd.sources import FileSource
        from meshgate.gatewayd.stream import ControlPlaneSource, Identity

        rec = Reconciler.for_host(settings)
        source = None
        authority_keys: tuple[bytes, ...] = ()
        if args.file:
            source = FileSource(args.file)
        else:
            try:
                identity = Identity.load(settings.state_dir)
            except (ValueError, KeyError) as e:
                raise EnvironmentProblem(f"{settings.state_dir}/identity.json is unreadable: "
                                         f"{type(e).__name__}") from None
            if identity is not None:
                if args.control_plane:
                    identity.control_plane = args.control_plane
                last = rec.store.load_desired()
                source = ControlPlaneSource(identity, last.revision if last else 0)
                authority_keys = identity.authority_keys
                log.info("node %s, control plane %s", identity.node, identity.control_plane)
            else:
                log.info("not joined and no --file: keeping the state on disk")
        provider = telemetry.configure("meshgate-gatewayd")
        try:
            if authority_keys:
                log.info("peer keys are verified against %d key authority key(s)", len(authority_keys))
            else:
                log.warning("development mode: peer keys are not verified (no key authority keys)")
            try:
                agent = Agent(rec, settings, source, authority_keys=authority_keys)
            except ValueError as e:
                raise EnvironmentProblem(f"identity.json: bad key authority key: {e}") from None
            return asyncio.run(agent.run_forever())
        finally:
            telemetry.shutdown(provider)

    rec = Reconciler.for_host(settings)
    if args.command in ("show", "down"):
        ifname = args.default_interface
        if not ifname:
            last = rec.store.load_desired()
            ifname = (last.interface.name if last else "") or settings.default_interface
        if args.command == "show":
            print(json.dumps(rec.show(ifname), indent=1, sort_keys=True))
        else:
            rec.down(ifname)
            print(f"removed interface {ifname}, table inet meshgate, gatewayd's routes and rules")
        return 0

    msg = load_desired_file(args.file)
    desired = rec.compile(msg)
    if args.command == "plan":
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
