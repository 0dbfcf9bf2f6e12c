"""Authorization benchmark: what a checked token and an audit record add to CreateNode.

Run as `.venv/bin/python tests/bench/bench_authz.py`. It starts its own etcd
(temporary data directory, free loopback ports) and two control planes against
it, each in its own process and on its own etcd prefix, and prints one line
per figure on stdout, `BENCH <name> <value> <unit>`; everything else goes to
stderr.

The two control planes are the same code, built in-process by this script's
`--serve` mode (`ControlPlane` and `GrpcServer`, as `meshgate-controlplane`
builds them, logging at warning, tracing off, the startup heap frozen):

- `auth`: as shipped. Every call is authenticated by the access guard
  (`Guard.protect`: bearer token checked against the token cache, the RPC's
  access rule checked) and every mutation carries its audit record in its own
  etcd transaction (`audit.with_audit`). The client sends an admin API token
  minted in-process (`Tokens.create`) as `authorization: Bearer <token>`.
- `noauth`: `Guard.protect` patched to return the servicer unchanged and
  `audit.with_audit` patched to the identity before `ControlPlane` is built:
  no authentication, no authorization, no audit record.

Figures, all from one client making sequential calls (no queueing), measured
after a warm-up, the calls alternating between the two servers in rounds
(auth, noauth, noauth, auth, ...) so that drift of the machine (etcd's
compaction and fsync, CPU frequency, the other process) falls on both alike:

- `cp_create_node_authz_1client_p50_ms`: CreateNode p50 (automatic IPv4
  address in a /16) against the `auth` server, token checked, call audited.
- `cp_create_node_noauth_1client_p50_ms`: the same against `noauth`.
- `cp_authz_overhead_ratio`: the first divided by the second (goal <= 1.15).
- `cp_token_revocation_other_replica_p50_ms` and `..._max_ms`: from a
  revocation starting on one replica (its etcd transaction included) until
  another replica on the same prefix refuses the token (its token cache, fed
  by its own etcd connection and watch), over 20 revocations (the issue's
  goal: within a second). Two in-process replicas.

The server processes do not share the client's event loop or thread, but on
a 2-core machine the client, both control planes and etcd share the cores:
only one server is busy at a time (the calls are sequential), so the idle one
costs little. The ratio is what an operator sees from one client; the
absolute figures are an upper bound of the latency on a dedicated host.

The script also reports (stderr) p90/p99/mean of both series and each
server's CPU time (user + system, from /proc) per measured call.

`--round N` sets the calls per round (default 10). On a shared machine a
burst of foreign load can land on a few rounds of one server and move the
ratio by several hundredths; smaller rounds (10) cancel it better.

`--profile DIR` runs both servers under cProfile (CPU time, not wall time) and
writes `auth.prof` and `noauth.prof` there (read them with `python -m
pstats`); the figures of such a run are inflated by the profiler and are not
comparable to a plain run.

Everything the script starts (etcd, both servers, temporary directories) is
stopped by its handle and removed, also on failure or SIGTERM. It exits
non-zero if any call fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchkit import bench, info, percentile

from meshgate.common.etcdproc import terminate

NETWORK_ID = "bench"
CIDR = "100.64.0.0/16"
MODES = ("auth", "noauth")


def token_path(port_file: str) -> str:
    return port_file + ".token"


# --- server mode ------------------------------------------------------------------


def _disable_auth() -> None:
    """No guard, no audit: patched where ControlPlane looks them up (api.py calls
    `audit_mod.with_audit(...)` and `self.guard.protect(...)` at construction)."""
    from meshgate.controlplane.auth import audit as audit_mod
    from meshgate.controlplane.auth import guard as guard_mod

    def passthrough(self, servicer, service):
        return servicer

    guard_mod.Guard.protect = passthrough  # type: ignore[method-assign]
    audit_mod.with_audit = lambda etcd: etcd  # type: ignore[assignment]


async def _serve(mode: str, endpoint: str, prefix: str, port_file: str) -> None:
    from meshgate.common.config import ServerConfig
    from meshgate.common.etcd import Etcd
    from meshgate.common.server import GrpcServer, serve
    from meshgate.controlplane import gctune
    from meshgate.controlplane.api import ControlPlane

    if mode == "noauth":
        _disable_auth()
    etcd = Etcd(endpoint, prefix)
    await etcd.connect()
    app = ControlPlane(etcd)
    if mode == "noauth":
        # The patches took: no audit wrapper on the adapter, no guard around the handlers.
        assert not getattr(app.etcd, "_meshgate_audited", False), "audit wrapper still installed"
        node_binding = next(b for b in app.bindings if b.full_name.endswith(".NodeService"))
        assert "CreateNode" not in vars(node_binding.servicer), "guard still installed"  # it sets instance attributes
    await app.start()
    if mode == "auth":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                        "services", "controlplane", "tests"))
        from cptest import mint_token

        secret = await mint_token(app, token_id="bench-admin", ttl_s=3600)
        path = token_path(port_file)
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.replace(tmp, path)  # before the port file: the port file means "ready"
    gctune.freeze_startup_heap()
    server = GrpcServer(ServerConfig(listen="127.0.0.1:0", port_file=port_file, shutdown_grace=1.0), app.bindings)
    await serve(server, before_drain=[app.fanout.close_sessions], on_shutdown=[app.stop, etcd.close])


def serve_main(args: argparse.Namespace) -> int:
    import asyncio

    from meshgate.common import logsetup

    logsetup.configure("warning", service=f"bench-{args.serve}")
    if not args.profile:
        asyncio.run(_serve(args.serve, args.etcd_endpoint, args.etcd_prefix, args.port_file))
        return 0
    import cProfile

    # CPU time, not wall time: the machine is shared, and a descheduled
    # process would otherwise charge the wait to whatever function was running.
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    try:
        asyncio.run(_serve(args.serve, args.etcd_endpoint, args.etcd_prefix, args.port_file))
    finally:
        prof.disable()
        prof.dump_stats(os.path.join(args.profile, f"{args.serve}.prof"))
    return 0


# --- driver -------------------------------------------------------------------------


class Server:
    """One `--serve` child process, stopped by its handle."""

    def __init__(self, mode: str, endpoint: str, tmp: str, profile: str) -> None:
        self.mode = mode
        self.port_file = os.path.join(tmp, f"{mode}.port")
        self.log_path = os.path.join(tmp, f"{mode}.log")
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", mode, "--etcd-endpoint", endpoint,
               "--etcd-prefix", f"/bench-{mode}", "--port-file", self.port_file]
        if profile:
            cmd += ["--profile", profile]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MESHGATE_"))}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        self.port = 0
        self.token = ""

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.mode} server exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.port_file):
                with open(self.port_file) as f:
                    self.port = int(f.read().strip())
                if self.mode == "auth":
                    with open(token_path(self.port_file)) as f:
                        self.token = f.read().strip()
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.mode} server not ready after {timeout:.0f}s:\n{self.log()}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) the process has used so far; None off Linux."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 15) -> None:
        terminate(self.proc, timeout)


def measure(servers: dict[str, Server], warmup: int, ops: int, round_size: int) -> dict[str, list[float]]:
    """Latencies (ms) of sequential CreateNode calls per server, interleaved in rounds."""
    import grpc

    from meshgate.api.v1 import network_pb2, network_pb2_grpc, node_pb2, node_pb2_grpc

    channels = {m: grpc.insecure_channel(s.target) for m, s in servers.items()}
    try:
        metadata = {m: ((("authorization", f"Bearer {s.token}"),) if s.token else ()) for m, s in servers.items()}
        stubs = {m: node_pb2_grpc.NodeServiceStub(c) for m, c in channels.items()}
        for m, c in channels.items():
            network_pb2_grpc.NetworkServiceStub(c).CreateNetwork(
                network_pb2.CreateNetworkRequest(network_id=NETWORK_ID, network=network_pb2.Network(ipv4_cidr=CIDR)),
                metadata=metadata[m], timeout=10,
            )
        parent = f"networks/{NETWORK_ID}"
        addresses: dict[str, set[str]] = {m: set() for m in servers}

        def run(mode: str, prefix: str, start: int, n: int, record: list[float] | None) -> None:
            stub, md = stubs[mode], metadata[mode]
            for i in range(start, start + n):
                req = node_pb2.CreateNodeRequest(parent=parent, node_id=f"{prefix}-{i:05d}", node=node_pb2.Node())
                t0 = time.perf_counter()
                try:
                    node = stub.CreateNode(req, metadata=md, timeout=10)
                except grpc.RpcError as e:
                    raise RuntimeError(f"CreateNode on the {mode} server failed: {e.code().name}: {e.details()}") from e
                elapsed = (time.perf_counter() - t0) * 1000
                if node.ipv4_address in addresses[mode]:
                    raise RuntimeError(f"{mode} server handed out {node.ipv4_address} twice")
                addresses[mode].add(node.ipv4_address)
                if record is not None:
                    record.append(elapsed)

        order = list(servers)
        done = 0
        while done < warmup:
            n = min(round_size, warmup - done)
            for m in order:
                run(m, "warm", done, n, None)
            done += n
        lat: dict[str, list[float]] = {m: [] for m in servers}
        cpu0 = {m: s.cpu_s() for m, s in servers.items()}
        done, r = 0, 0
        while done < ops:
            n = min(round_size, ops - done)
            # ABBA: the first server of a round alternates, so a linear drift cancels.
            for m in (order if r % 2 == 0 else order[::-1]):
                run(m, "n", done, n, lat[m])
            done += n
            r += 1
        for m, s in servers.items():
            before, after = cpu0[m], s.cpu_s()
            if before is not None and after is not None:
                info(f"{m} server: {(after - before) / ops * 1e6:.0f} us of CPU per measured call "
                     "(user + system, whole process)")
        return lat
    finally:
        for c in channels.values():
            c.close()


async def measure_revocation(endpoint: str, samples: int = 20) -> list[float]:
    """Milliseconds from a revocation committed through replica A until
    replica B refuses the token."""
    import grpc

    from meshgate.api.v1 import auth_pb2
    from meshgate.common.errors import ApiError
    from meshgate.common.etcd import Etcd
    from meshgate.controlplane.api import ControlPlane

    etcd_a, etcd_b = Etcd(endpoint, "/revocation"), Etcd(endpoint, "/revocation")
    await etcd_a.connect()
    await etcd_b.connect()
    a, b = ControlPlane(etcd_a), ControlPlane(etcd_b)
    await a.start()
    await b.start()
    out = []
    try:
        for i in range(samples):
            t = auth_pb2.Token(bindings=[auth_pb2.RoleBinding(role="viewer")])
            t.expire_time.FromNanoseconds(int((time.time() + 600) * 1e9))
            made = await a.tokens.create(auth_pb2.CreateTokenRequest(token_id=f"t{i}", token=t), creator="bench")
            tid = f"t{i}"
            await b.token_cache.wait_for_revision(int(made.etag))
            b.token_cache.check(made.secret, tid, time.time())  # valid on B
            t0 = time.perf_counter()
            await a.tokens.revoke(auth_pb2.RevokeTokenRequest(name=made.name))
            while True:
                try:
                    b.token_cache.check(made.secret, tid, time.time())
                except ApiError as e:
                    if e.code == grpc.StatusCode.UNAUTHENTICATED:
                        break
                    raise
                await asyncio.sleep(0.0005)
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        await a.stop()
        await b.stop()
        await etcd_a.close()
        await etcd_b.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", type=int, default=1000, help="measured CreateNode calls per server")
    ap.add_argument("--warmup", type=int, default=200, help="CreateNode calls per server before measuring")
    ap.add_argument("--round", type=int, default=10, help="consecutive calls to one server before switching")
    ap.add_argument("--profile", default="", metavar="DIR",
                    help="run both servers under cProfile, writing DIR/auth.prof and DIR/noauth.prof")
    ap.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--etcd-endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--etcd-prefix", help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        if not (args.etcd_endpoint and args.etcd_prefix and args.port_file):
            ap.error("--serve needs --etcd-endpoint, --etcd-prefix and --port-file")
        return serve_main(args)
    if args.ops <= 0 or args.warmup < 0 or args.round <= 0:
        ap.error("--ops and --round must be positive, --warmup not negative")
    if args.profile:
        args.profile = os.path.abspath(args.profile)
        os.makedirs(args.profile, exist_ok=True)

    # Turn SIGTERM into an exception so the finally-block below stops the children.
    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    from meshgate.common.etcdproc import EtcdProcess

    tmp = tempfile.mkdtemp(prefix="meshgate-bench-authz-")
    etcd_proc: EtcdProcess | None = None
    servers: dict[str, Server] = {}
    ok = False
    try:
        etcd_proc = EtcdProcess(os.path.join(tmp, "etcd")).start()
        info(f"etcd on {etcd_proc.endpoint} (pid {etcd_proc.proc.pid})")
        for mode in MODES:
            servers[mode] = Server(mode, etcd_proc.endpoint, tmp, args.profile)
        for s in servers.values():
            s.wait_ready()
            info(f"{s.mode} control plane on {s.target} (pid {s.proc.pid})")

        t0 = time.perf_counter()
        lat = measure(servers, args.warmup, args.ops, args.round)
        info(f"{2 * (args.warmup + args.ops)} sequential CreateNode calls in {time.perf_counter() - t0:.1f} s")
        for m in MODES:
            s = lat[m]
            info(f"{m}: {len(s)} calls, p50 {statistics.median(s):.3f} ms, p90 {percentile(s, 90):.3f} ms, "
                 f"p99 {percentile(s, 99):.3f} ms, mean {statistics.fmean(s):.3f} ms")
        auth_p50 = statistics.median(lat["auth"])
        noauth_p50 = statistics.median(lat["noauth"])
        bench("cp_create_node_authz_1client_p50_ms", auth_p50, "ms")
        bench("cp_create_node_noauth_1client_p50_ms", noauth_p50, "ms")
        bench("cp_authz_overhead_ratio", auth_p50 / noauth_p50, "ratio")
        rev = asyncio.run(measure_revocation(etcd_proc.endpoint))
        bench("cp_token_revocation_other_replica_p50_ms", statistics.median(rev), "ms")
        bench("cp_token_revocation_other_replica_max_ms", max(rev), "ms")
        ok = True
    except Exception as e:  # report, then clean up below
        info(f"benchmark failed: {e}")
        for s in servers.values():
            info(f"{s.mode} server log tail:\n{s.log()}")
    finally:
        for s in servers.values():
            s.stop()
        if etcd_proc is not None:
            etcd_proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.profile:
        info(f"profiles in {args.profile}/auth.prof and {args.profile}/noauth.prof")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
