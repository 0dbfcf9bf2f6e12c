"""The dev stack behind `make run`: a local etcd, the control plane and the key
service on loopback, an example network, then the egress demonstration.

Everything it starts runs as a child process with its state under `state/` in
the checkout, and is stopped by PID on Ctrl-C (or at the end with `--once`).
Running it again reuses the same etcd data, so the example network is found,
not created twice. Once the demonstration has shown every step, its network,
agents and namespaces stay until Ctrl-C (with `--once` they are removed), and
the last thing printed is how to call the `meshgate` CLI (the context it
saved, how to put the CLI on the PATH) with commands to explore them. Both
services serve Prometheus metrics on loopback; it prints where
(docs/operations.md lists them).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import grpc

from meshgate.api.v1 import network_pb2, network_pb2_grpc
from meshgate.common.etcdproc import EtcdProcess, free_port
from meshgate.common.testing import ServiceProcess, keyservice_pki

ROOT = pathlib.Path(__file__).resolve().parent.parent


def say(msg: str = "") -> None:
    print(msg, flush=True)


def ensure_network(target: str, token: str) -> network_pb2.Network:
    md = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(target) as ch:
        stub = network_pb2_grpc.NetworkServiceStub(ch)
        try:
            return stub.CreateNetwork(
                network_pb2.CreateNetworkRequest(
                    network_id="demo",
                    network=network_pb2.Network(
                        display_name="meshgate demo network",
                        ipv4_cidr="100.64.0.0/24",
                        ipv6_cidr="fd00:64::/64",
                    ),
                ),
                timeout=10, metadata=md,
            )
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            return stub.GetNetwork(network_pb2.GetNetworkRequest(name="networks/demo"), timeout=10, metadata=md)


DEMO_NETWORK = "networks/egress-demo"  # meshgate.gatewayd.demo's
KEEP_FOREVER = 10 * 365 * 86400.0  # the demo's --keep: until we stop it
MESHGATE = pathlib.Path(sys.executable).parent / "meshgate"


class Demo:
    """The egress demonstration as a child process: `start` returns once it has
    shown every step (True when they all worked), leaving its network, agents and
    namespaces in place unless `once`; `stop` has it clean up (SIGTERM)."""

    def __init__(self, control_plane: str, agent_socket: str, token_file: pathlib.Path, once: bool) -> None:
        self.argv = [sys.executable, "-m", "meshgate.gatewayd.demo", "--control-plane", control_plane,
                     "--agent-socket", agent_socket, "--token-file", str(token_file),
                     *([] if once else ["--keep", str(KEEP_FOREVER)])]
        self.proc: subprocess.Popen | None = None
        self.kept = False

    def start(self) -> bool:
        # its own session: a Ctrl-C reaches only us, and we stop it once, with SIGTERM
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
        assert self.proc.stdout is not None
        good = False
        for line in self.proc.stdout:
            say(line.rstrip("\n"))
            if line.startswith("result: "):
                good = line.strip() == "result: the egress gateway works"
            if line.startswith("keeping everything"):
                self.kept = True
                return good
        return self.proc.wait() == 0 and good

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        for line in (out or "").splitlines():
            say(line)
        self.proc = None


def cli_context(target: str, token_file: pathlib.Path) -> str:
    """A CLI context `local` that uses the bootstrap admin token (by its file); returns the context file."""
    from meshgate.sdk.config import config_path

    subprocess.run([str(MESHGATE), "context", "add", "local", "--target", target, "--token-file", str(token_file),
                    "--use"], check=True, stdout=subprocess.DEVNULL)
    return str(config_path())


def how_to_call(target: str, token_file: pathlib.Path, context_file: str, net: network_pb2.Network,
                demo: bool) -> None:
    """The CLI, as a newcomer needs it: how to get it, which context it uses, what to try."""
    venv = MESHGATE.parent
    say()
    say("the CLI is `meshgate`, in this checkout's virtual environment: put it on your PATH with")
    say(f"  . {venv / 'activate'}")
    say(f"or call it by its full path, {MESHGATE}. It uses the context `local` (current, saved in {context_file}):")
    say(f"the control plane at {target} with the bootstrap admin token in {token_file} (mode 0600).")
    say(f"  meshgate network list                                      # {net.name} and the demo's network")
    if demo:
        say(f"  meshgate node list --parent {DEMO_NETWORK}               # the demo's agents: STATE READY")
        say(f"  meshgate network get-status {DEMO_NETWORK}               # converged? connected?")
        say(f"  meshgate egress-gateway create --parent {DEMO_NETWORK} --egress-gateway-id db \\")
        say(f"      --egress-gateway.node {DEMO_NETWORK}/nodes/gateway --egress-gateway.ranges 198.51.100.0/24")
        say(f"  meshgate watch --parent {DEMO_NETWORK}                   # changes as they happen (Ctrl-C)")
    say("  meshgate token create --token-id ann --token.bindings '{role: viewer}' "
        "--token.expire-time +1d -o secret > ann.token")
    say(f"  MESHGATE_TOKEN=$(cat ann.token) meshgate network delete {net.name}   # PERMISSION_DENIED")
    say("  meshgate audit list")
    say("  meshgate --help                                            # every command; docs/cli.md")


def ensure_kek(path: pathlib.Path) -> None:
    """The key service's key-encryption key: generated once, kept 0600 in the
    state directory (a new one would not open the secrets already in etcd)."""
    if path.exists():
        return
    out = subprocess.run([sys.executable, "-m", "meshgate.keyservice.sealing", "new", "dev"],
                         capture_output=True, text=True, check=True).stdout
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, out.encode())
    finally:
        os.close(fd)
    say(f"generated the key service's key-encryption key in {path} (back it up with the etcd data)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", default=str(ROOT / "state"), help="where etcd data and logs live")
    p.add_argument("--etcd-port", type=int, default=23790, help="etcd client port on 127.0.0.1 (0: a free one)")
    p.add_argument("--controlplane-port", type=int, default=7400, help="control plane port (0: a free one)")
    p.add_argument("--keyservice-port", type=int, default=7401, help="key service port (0: a free one)")
    p.add_argument("--controlplane-metrics-port", type=int, default=9400,
                   help="port of the control plane's Prometheus metrics on 127.0.0.1 (0, or a free control plane "
                        "port: a free one)")
    p.add_argument("--keyservice-metrics-port", type=int, default=9401,
                   help="port of the key service's Prometheus metrics on 127.0.0.1 (0, or a free key service "
                        "port: a free one)")
    p.add_argument("--no-demo", action="store_true", help="do not run the egress demonstration")
    p.add_argument("--once", action="store_true", help="stop everything after the demonstration instead of waiting")
    args = p.parse_args()

    state = pathlib.Path(args.state_dir)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    etcd = EtcdProcess(
        str(state / "etcd"),
        client_port=args.etcd_port or free_port(),
        peer_port=args.etcd_port + 1 if args.etcd_port else 0,
        name="meshgate-dev",
        log_path=str(state / "logs" / "etcd.log"),
    )
    procs: list[ServiceProcess] = []
    demo: Demo | None = None
    stopping = False

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        say(f"starting etcd on 127.0.0.1:{etcd.client_port} (data in {etcd.data_dir})")
        etcd.start()
        common = ["--etcd-endpoints", etcd.endpoint, "--log-json"]
        kek = state / "kek"
        ensure_kek(kek)
        agent_socket = f"unix:{state / 'controlplane.sock'}"
        # The key service first: the control plane has it sign node keys and
        # issue the pre-shared keys of every peer pair.
        # Its certificates (mTLS: the key service identifies its callers by
        # them), made once by the offline command into state/pki.
        pki = keyservice_pki(str(state / "pki"), etcd.endpoint, "/meshgate", str(kek))
        ks_metrics = args.keyservice_metrics_port if args.keyservice_port else 0
        ks = ServiceProcess("meshgate-keyservice", common + ["--kek-file", str(kek), *pki.server_args,
                                                             "--metrics-listen", f"127.0.0.1:{ks_metrics}"],
                            credentials=pki.credentials(),
                            listen=f"127.0.0.1:{args.keyservice_port}",
                            log_path=str(state / "logs" / "meshgate-keyservice.log"))
        procs.append(ks.start())
        say(f"started meshgate-keyservice on {ks.target} (pid {ks.proc.pid}, log {ks.log_path})")
        token_file = state / "admin-token"
        cp = ServiceProcess("meshgate-controlplane", common + [
                                "--keyservice", ks.target, *pki.controlplane_args,
                                # agents stream with certificates on this socket (mTLS)
                                *pki.agent_args(f"unix:{state / 'agents.sock'}"),
                                "--bootstrap-token-file", str(token_file),
                                "--bootstrap-token-ttl", str(365 * 86400),
                                "--metrics-listen",
                                f"127.0.0.1:{args.controlplane_metrics_port if args.controlplane_port else 0}"],
                            listen=f"127.0.0.1:{args.controlplane_port},{agent_socket}",
                            log_path=str(state / "logs" / "meshgate-controlplane.log"))
        procs.append(cp.start())
        say(f"started meshgate-controlplane on {cp.target} (pid {cp.proc.pid}, log {cp.log_path})")
        for sp in (ks, cp):  # the URL each logged (a free port when asked for 0)
            m = re.search(r"metrics served at (http://[^\s\"]+/metrics)", sp.log(tail=0))
            say(f"{sp.entry_point} serves Prometheus metrics at {m.group(1) if m else '(not found in its log)'}")
        if not token_file.exists():
            say(f"the API needs a token, and {token_file} (the bootstrap admin token of the first start) is gone: "
                "run `make clean-state` to start over")
            return 1
        token = token_file.read_text().strip()
        net = ensure_network(cp.target, token)
        context_file = cli_context(cp.target, token_file)
        say()
        say(f"example network {net.name}: {net.ipv4_cidr} and {net.ipv6_cidr}, listen port {net.listen_port}")
        demo_ran = False
        if args.no_demo:
            pass
        elif os.geteuid() != 0:
            say("(skipping the egress demonstration: it needs root to create network namespaces)")
        else:
            say("== egress demonstration through this control plane (network namespaces, wireguard-go, nftables) ==")
            demo = Demo(cp.target, agent_socket, token_file, once=args.once)
            if not demo.start():
                say("the egress demonstration failed")
                return 1
            demo_ran = demo.kept
        how_to_call(cp.target, token_file, context_file, net, demo_ran)
        if args.once:
            return 0
        say()
        say("running" + (f" (the demo's network {DEMO_NETWORK}, its agents and namespaces too)" if demo_ran else "")
            + "; press Ctrl-C to stop everything")
        while all(sp.proc.poll() is None for sp in procs) and (demo is None or not demo_ran or demo.alive()):
            time.sleep(0.5)
        say("a service exited unexpectedly; see the logs in " + str(state / "logs"))
        return 1
    except KeyboardInterrupt:
        stopping = True
        return 0
    finally:
        if stopping:
            say("\nstopping")
        if demo is not None:
            demo.stop()  # it removes its network through the API: before the control plane stops
        for sp in reversed(procs):
            sp.stop()
        etcd.stop()
        say("stopped everything the dev stack started")


if __name__ == "__main__":
    sys.exit(main())
