"""Metrics end to end, with a real Prometheus (Debian's `prometheus`).

The key service, the control plane (with the key service, agents on mTLS) and
two gatewayd agents in network namespaces serve `--metrics-listen`; a
Prometheus started here scrapes all four twice a second. Through its HTTP API
the test finds the convergence histogram counting a change made with the SDK
(one acknowledgement per affected node), and an agent's failure counted after
it is given a bad desired state; on the way, the gRPC status codes, the key
service's signatures, leadership and a PSK rotation, drift repaired by kind, per-peer handshakes
named by node, and a gateway failover. `promtool check metrics` passes on what
every endpoint serves, and docs/operations.md lists every metric family they serve.

Prometheus runs in the root namespace, the agents each in their own: an
agent's endpoint is reached through `NetnsProxy`, which accepts on loopback
here and connects from inside the agent's namespace (a socket belongs to the
namespace it was made in; `setns` moves only the calling thread).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from meshgate.api.v1 import desired_state_pb2 as pb
from meshgate.common.testing import ServiceProcess, in_ci, keyservice_pki, write_kek_file
from meshgate.gatewayd.lab import ControlPlaneView, Egress, Lab, build_egress

PROMETHEUS, PROMTOOL = "/usr/bin/prometheus", "/usr/bin/promtool"
AGENT_METRICS_PORT = 9464  # inside each agent's own namespace: nothing else listens there


def require_prometheus() -> None:
    if os.path.exists(PROMETHEUS) and os.path.exists(PROMTOOL):
        return
    if in_ci():
        pytest.fail("CI=true but prometheus/promtool are missing (Debian package prometheus)")
    pytest.skip("needs prometheus and promtool (Debian package prometheus)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLONE_NEWNET = 0x40000000


def setns(path: str) -> None:
    """Move the calling thread into the network namespace at `path` (os.setns is 3.12+)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


class NetnsProxy:
    """TCP on 127.0.0.1:<port> here -> 127.0.0.1:`target_port` inside network namespace `netns`."""

    def __init__(self, netns: str, target_port: int) -> None:
        self.netns, self.target_port = netns, target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{netns}").start()

    def _connect(self) -> socket.socket:
        box: dict = {}

        def inside() -> None:  # this thread enters the namespace and ends there
            try:
                setns(f"/var/run/netns/{self.netns}")
                box["s"] = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError as e:
                box["e"] = e

        t = threading.Thread(target=inside)
        t.start()
        t.join()
        if "e" in box:
            raise box["e"]
        return box["s"]

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = self._connect()
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.listener.close()


class Prometheus:
    """A Prometheus server on a free loopback port with a temporary data directory."""

    def __init__(self, workdir: Path, jobs: dict[str, list[tuple[str, dict[str, str]]]]) -> None:
        self.dir = workdir
        self.port = free_port()
        lines = ["global:", "  scrape_interval: 500ms", "  scrape_timeout: 450ms", "scrape_configs:"]
        for job, targets in jobs.items():
            lines += [f"  - job_name: {job}", "    static_configs:"]
            for target, labels in targets:
                lines.append(f"      - targets: [{json.dumps(target)}]")
                if labels:
                    lines.append(f"        labels: {json.dumps(labels)}")
        self.config = workdir / "prometheus.yml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = open(workdir / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait(lambda: self._get("/-/ready") is not None, 60, "Prometheus ready")

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.read()
        except OSError:
            return None

    def query(self, q: str) -> list[dict]:
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": q}))
        if body is None:
            return []
        out = json.loads(body)
        assert out["status"] == "success", out
        return out["data"]["result"]

    def value(self, q: str) -> float | None:
        res = self.query(q)
        return float(res[0]["value"][1]) if res else None

    def wait_value(self, q: str, pred, timeout: float = 60) -> float:
        box: dict = {}

        def ok() -> bool:
            box["v"] = self.value(q)
            return box["v"] is not None and pred(box["v"])
        self._wait(ok, timeout, f"{q} (last {box.get('v')})")
        return box["v"]

    def _wait(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {(self.dir / 'prometheus.log').read_text()[-3000:]}")
            if pred():
                return
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def metrics_url(log: str) -> str:
    m = re.search(r"metrics served at (http://\S+/metrics)", log)
    return m.group(1) if m else ""


def wait_url(read_log, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = metrics_url(read_log())
        if url:
            return url
        time.sleep(0.1)
    raise AssertionError(f"no 'metrics served at' in the log:\n{read_log()[-3000:]}")


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


OPERATIONS_DOC = Path(__file__).resolve().parents[3] / "docs/operations.md"


def families(text: str) -> set[str]:
    """The metric families an endpoint serves, as Prometheus names (counters with
    `_total`, as docs/operations.md lists them), without the exporter's target_info."""
    out = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        out.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
    return out - {"target_info"}


def promtool_check_metrics(text: str, what: str) -> None:
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"promtool check metrics on {what}: {r.stdout}{r.stderr}"


@pytest.fixture
def lab16(lab: Lab) -> Lab:
    """The lab, its names carrying this issue's prefix (mg-m16xxxx-role, mgm16xxxxrole)."""
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    while True:
        t = "m16" + secrets.token_hex(2)
        if f"mg-{t}-" not in existing and not any(p.name.startswith(f"mg{t}") for p in Path("/var/run/wireguard").glob("*")):
            break
    lab.token = t
    return lab


def test_prometheus_scrapes_services_and_agents(lab16: Lab, etcd_server, etcd_prefix):
    require_prometheus()
    lab = lab16
    eg: Egress = build_egress(lab, clients=1)
    kek = lab.dir / "kek"
    write_kek_file(kek)
    common = ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix, "--metrics-listen", "0"]
    pki = keyservice_pki(str(lab.dir / "pki"), etcd_server.endpoint, etcd_prefix, str(kek))
    ks = ServiceProcess("meshgate-keyservice", common + ["--kek-file", str(kek), *pki.server_args],
                        credentials=pki.credentials()).start()
    cp_socket = lab.dir / "cp.sock"
    cp = ServiceProcess("meshgate-controlplane", common + ["--keyservice", ks.target, *pki.controlplane_args,
                                                           "--gateway-failover-after", "1",
                                                           *pki.agent_args(f"unix:{lab.dir / 'agents.sock'}")],
                        listen=f"127.0.0.1:0,unix:{cp_socket}").start()
    proxies: list[NetnsProxy] = []
    prom = None
    view = ControlPlaneView(cp.target, f"unix:{cp_socket}", token=cp.admin_token)
    try:
        urls = {"keyservice": wait_url(ks.log), "controlplane": wait_url(cp.log)}
        assert all(u.startswith("http://127.0.0.1:") for u in urls.values()), urls  # a bare port: loopback

        from meshgate.sdk import Client

        sdk = Client(cp.target, token=cp.admin_token)
        sdk.create_network(network_id="lab", network={"ipv4_cidr": "100.64.0.0/24"})
        key = sdk.create_enrollment_key(parent="networks/lab", enrollment_key_id="lab", enrollment_key={})
        eg.gw.join(view.agent_target, key.secret, "gateway", endpoint=f"{eg.gw_underlay(0)}:51820")
        eg.clients[0].join(view.agent_target, key.secret, "client0")
        metrics_flags = ("--metrics-listen", str(AGENT_METRICS_PORT), "--metrics-peer-cap", "10")
        for n in (eg.gw, eg.clients[0]):
            n.start(extra=metrics_flags)
        view.wait_converged(2)
        agents = []
        for n, node in ((eg.gw, "gateway"), (eg.clients[0], "client0")):
            url = wait_url(lambda n=n: n.log_path.read_text(errors="replace"))
            assert url == f"http://127.0.0.1:{AGENT_METRICS_PORT}/metrics", url
            proxy = NetnsProxy(n.host.name, AGENT_METRICS_PORT)
            proxies.append(proxy)
            agents.append((f"127.0.0.1:{proxy.port}", {"node": node}))

        def target(url: str) -> str:
            return url.removeprefix("http://").removesuffix("/metrics")

        prom = Prometheus(lab.dir, {
            "meshgate-keyservice": [(target(urls["keyservice"]), {})],
            "meshgate-controlplane": [(target(urls["controlplane"]), {})],
            "meshgate-gatewayd": agents,
        })
        try:
            prom.wait_value("count(up == 1)", lambda v: v == 4)
        except AssertionError:
            raise AssertionError(f"targets: {prom.query('up')}\n{prom._get('/api/v1/targets')!r}") from None

        # What every endpoint serves is valid exposition text.
        endpoints = [*urls.items(), *((f"gatewayd {a[1]['node']}", f"http://{a[0]}/metrics") for a in agents)]
        for what, url in endpoints:
            promtool_check_metrics(fetch(url), what)

        conv = 'sum(meshgate_controlplane_convergence_duration_seconds_count{job="meshgate-controlplane"})'
        before = prom.wait_value(conv, lambda v: v >= 2)  # the two first snapshots were acknowledged
        # A change through the SDK that affects both nodes: an egress gateway.
        gw = sdk.create_egress_gateway(parent="networks/lab", egress_gateway_id="db",
                                       egress_gateway={"node": "networks/lab/nodes/gateway",
                                                       "ranges": ["198.51.100.0/24"]})
        view.wait_converged(2, at_least=int(gw.etag))
        after = prom.wait_value(conv, lambda v: v >= before + 2)
        assert after >= before + 2
        # ... and it is a histogram Prometheus can take quantiles of.
        q = ('histogram_quantile(0.5, sum by (le) (rate(meshgate_controlplane_convergence_duration_seconds_bucket'
             '[1m])))')
        prom.wait_value(q, lambda v: v > 0)
        prom.wait_value('sum(meshgate_controlplane_agents_connected{network="lab"})', lambda v: v == 2)
        prom.wait_value('sum(meshgate_controlplane_nodes_converged{network="lab"})', lambda v: v == 2)
        prom.wait_value('sum(meshgate_controlplane_sync_messages_total{kind="delta"})', lambda v: v >= 2)
        prom.wait_value('max(meshgate_controlplane_nodes_desired{network="lab"})', lambda v: v == 2)
        prom.wait_value('sum(meshgate_controlplane_sync_acks_total{result="applied"})', lambda v: v >= 4)
        prom.wait_value('sum(meshgate_controlplane_sync_change_bytes_sum)', lambda v: v > 0)
        prom.wait_value('count(meshgate_etcd_watch_lag{job="meshgate-controlplane"})', lambda v: v == 1)
        prom.wait_value('sum(rpc_server_duration_seconds_count{rpc_method="CreateEgressGateway",'
                        'rpc_grpc_status_code="0"})', lambda v: v >= 1)
        # A call the API refuses is counted with its status code (INVALID_ARGUMENT = 3), not as OK.
        from meshgate.sdk.errors import MeshgateError

        with pytest.raises(MeshgateError):
            sdk.create_network(network_id="bad", network={"ipv4_cidr": "not-a-cidr"})
        prom.wait_value('sum(rpc_server_duration_seconds_count{rpc_method="CreateNetwork",rpc_grpc_status_code="3"})',
                        lambda v: v >= 1)
        prom.wait_value('sum(meshgate_keyservice_signatures_total{kind="node_key"})', lambda v: v >= 2)
        prom.wait_value('sum(meshgate_keyservice_psk_issued_total)', lambda v: v >= 1)
        prom.wait_value('sum(meshgate_keyservice_signatures_total{kind="certificate"})', lambda v: v >= 2)  # agents' mTLS
        prom.wait_value('max(meshgate_keyservice_scheduler_leader)', lambda v: v == 1)
        # The operator rotates the network's pre-shared keys (a whole-network epoch).
        import grpc

        from meshgate.api.v1 import keys_pb2, keys_pb2_grpc

        with grpc.secure_channel(ks.target, pki.credentials()) as ch:
            keys_pb2_grpc.KeyServiceStub(ch).RotatePresharedKeys(
                keys_pb2.RotatePresharedKeysRequest(network="networks/lab"), timeout=30)
        prom.wait_value('sum(meshgate_keyservice_psk_rotations_total{trigger="epoch"})', lambda v: v >= 1)
        prom.wait_value('count(meshgate_keyservice_kek_age_seconds)', lambda v: v == 1)
        prom.wait_value('sum(meshgate_etcd_operation_duration_seconds_count{job="meshgate-controlplane"})',
                        lambda v: v > 0)
        prom.wait_value('sum(meshgate_etcd_watch_delay_seconds_count{job="meshgate-controlplane"})', lambda v: v > 0)
        prom.wait_value('min(meshgate_gatewayd_stream_connected)', lambda v: v == 1)
        prom.wait_value('min(meshgate_gatewayd_peers)', lambda v: v == 1)
        # per peer, named by its node (client0 keeps its tunnel to the gateway alive: a handshake)
        prom.wait_value('count(meshgate_gatewayd_peer_handshake_age_seconds{node="client0",'
                        'resource="networks/lab/nodes/gateway"})', lambda v: v == 1)
        prom.wait_value('sum(meshgate_gatewayd_peers_traffic_bytes_total{node="client0",direction="tx"})',
                        lambda v: v > 0)
        prom.wait_value('sum(meshgate_gatewayd_peer_traffic_bytes_total{node="client0",'
                        'resource="networks/lab/nodes/gateway",direction="tx"})', lambda v: v > 0)
        # Both agents applied (the change above too), say since when and which revision, and count reconnects.
        prom.wait_value('count(sum by (node) (meshgate_gatewayd_applies_total{result="applied"}) >= 2)',
                        lambda v: v == 2)
        prom.wait_value('count(meshgate_gatewayd_apply_since_success_seconds >= 0)', lambda v: v == 2)
        prom.wait_value(f'min(meshgate_gatewayd_applied_revision) >= {int(gw.etag)}', lambda v: v >= int(gw.etag))
        prom.wait_value('count(meshgate_gatewayd_stream_reconnects_total)', lambda v: v == 2)
        prom.wait_value('count(meshgate_gatewayd_apply_duration_seconds_count{subsystem="wireguard"})',
                        lambda v: v == 2)

        # Drift: someone deletes the gateway's table; the repair (by the drift
        # watcher, or the full pass SIGHUP asks for) is counted by kind.
        eg.gw.host.run("nft", "delete", "table", "inet", "meshgate")
        eg.gw.signal(signal.SIGHUP)
        prom.wait_value('sum(meshgate_gatewayd_drift_repairs_total{node="gateway",kind="nftables"})',
                        lambda v: v >= 1)
        assert eg.gw.host.run("nft", "list", "table", "inet", "meshgate").returncode == 0

        # A bad desired state for client0: its agent, restarted to follow a file
        # (the operator's own state), rejects it and counts the failure.
        client = eg.clients[0]
        good = pb.DesiredState.FromString((client.state_dir / "desired.pb").read_bytes())
        bad = pb.DesiredState()
        bad.CopyFrom(good)
        # An address that does not parse: the DNS side sees the state before the
        # agent validates it, and must hand it on (it once ended the feed here).
        bad.interface.addresses[0] = "100.64.0.999/24"
        fails = 'sum(meshgate_gatewayd_apply_failures_total{node="client0"})'
        assert not prom.query(fails) or prom.value(fails) == 0
        client.stop()
        client.start(bad, extra=metrics_flags)
        try:
            prom.wait_value(fails, lambda v: v >= 1)
        except AssertionError:
            raise AssertionError(client.log_path.read_text(errors="replace")[-4000:]
                                 + str(prom.query("up"))) from None
        assert (prom.value('sum(meshgate_gatewayd_apply_failures_total{node="client0",reason="rejected"})') or 0) >= 1
        assert prom.value('sum(meshgate_gatewayd_apply_failures_total{node="gateway"})') in (None, 0.0)
        promtool_check_metrics(fetch(f"http://{agents[1][0]}/metrics"), "gatewayd client0 after the failure")

        # docs/operations.md lists every metric family the endpoints really serve.
        doc = OPERATIONS_DOC.read_text()
        served = set().union(*(families(fetch(url)) for _, url in endpoints))
        assert len(served) >= 25, sorted(served)
        assert not [n for n in served if f"`{n}`" not in doc], \
            f"served but not in docs/operations.md: {sorted(n for n in served if f'`{n}`' not in doc)}"

        # The gateway's agent goes away: after --gateway-failover-after its node
        # is marked down (its ranges would move to a standby), and that is counted.
        eg.gw.stop()
        prom.wait_value('sum(meshgate_controlplane_gateway_failovers_total{direction="down"})', lambda v: v >= 1)
    finally:
        if prom is not None:
            prom.stop()
        for p in proxies:
            p.close()
        view.close()
        for n in lab.nodes:
            n.stop()
        cp.stop()
        ks.stop()
        shutil.rmtree(lab.dir / "data", ignore_errors=True)
