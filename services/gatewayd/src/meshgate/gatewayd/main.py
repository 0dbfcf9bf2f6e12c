"""The ``gatewayd`` command line: ``run`` (the agent), ``apply`` (one reconcile of a
desired state from a file, then exit), ``plan``, ``show``, ``down``, ``public-key``.

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
    r = sub.add_parser("run", parents=[common], help="run the agent: restore the last applied "
                       "state from disk, follow a desired-state source, resync periodically")
    r.add_argument("--file", "-f", type=Path, help="follow this desired-state file "
                   "(re-read when it changes); without it the agent keeps the state on disk")
    r.add_argument("--resync-interval", type=float, help="seconds between full resyncs (default 60)")
    s = sub.add_parser("show", parents=[common], help="print the observed state as JSON (no secrets)")
    s.add_argument("--interface", "-i", help="interface (default: the last applied one, or mg0)")
    d = sub.add_parser("down", parents=[common], help="remove everything gatewayd owns on this host")
    d.add_argument("--interface", "-i")
    sub.add_parser("public-key", parents=[common],
                   help="print the node's public key, generating the key pair on first use")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    try:
        settings = Settings.load({
            "state_dir": args.state_dir,
            "backend": args.backend,
            "resync_interval": getattr(args, "resync_interval", None),
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


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from meshgate.gatewayd.reconciler import Reconciler
    from meshgate.gatewayd.store import StateStore

    if args.command == "public-key":
        print(StateStore(settings.state_dir).keypair()[1])
        return 0
    if args.command == "run":
        from meshgate.gatewayd.agent import Agent
        from meshgate.gatewayd.sources import FileSource

        rec = Reconciler.for_host(settings)
        source = FileSource(args.file) if args.file else None
        return asyncio.run(Agent(rec, settings, source).run_forever())

    rec = Reconciler.for_host(settings)
    if args.command in ("show", "down"):
        ifname = args.interface
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
