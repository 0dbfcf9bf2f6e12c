"""The container image, compose file, Kubernetes manifests and cloud-init say
only what the code accepts.

Every command line that starts a meshgate program goes through that program's
own argument parser (and the environment variables it is given through the
service's own config loader), so a renamed flag or variable fails here. Shell
snippets (join once, then run) are run by a real shell with a stub standing in
for gatewayd, and the arguments the stub received are parsed the same way.
The image itself cannot be built here (no Docker daemon); the Dockerfile is
checked as text against the Makefile's bootstrap.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys

import pytest
import yaml

from meshgate.common import config
from meshgate.controlplane.main import ControlPlaneConfig
from meshgate.gatewayd.config import Settings
from meshgate.gatewayd.main import build_parser as gatewayd_parser
from meshgate.keyservice.main import KeyServiceConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
HEALTHCHECK = DEPLOY / "container/meshgate-healthcheck"

SERVICES = {
    "meshgate-controlplane": (ControlPlaneConfig, "MESHGATE_CONTROLPLANE_"),
    "meshgate-keyservice": (KeyServiceConfig, "MESHGATE_KEYSERVICE_"),
}
# variables gatewayd reads besides MESHGATE_GATEWAYD_<setting> (meshgate/gatewayd/main.py)
GATEWAYD_ENV = {"MESHGATE_CONTROL_PLANE", "MESHGATE_ENROLLMENT_KEY", "MESHGATE_LOG_LEVEL", "MESHGATE_LOG_FORMAT"}
HEALTHCHECK_ENV = {"MESHGATE_HEALTHCHECK_CA_FILE", "MESHGATE_HEALTHCHECK_SERVER_NAME"}


def bootstrap_dists() -> list[str]:
    text = (ROOT / "scripts/bootstrap.sh").read_text()
    m = re.search(r"^DISTS=\(([^)]*)\)", text, re.M)
    assert m, "scripts/bootstrap.sh no longer lists DISTS=(...)"
    return m.group(1).split()


def sdk_env() -> set[str]:
    from meshgate.sdk import config as sdkconfig

    return {"MESHGATE_" + n.upper() for n in sdkconfig.FIELDS} | {"MESHGATE_CONTEXT", "MESHGATE_CONFIG"}


def known_env(prog: str) -> set[str]:
    """Every MESHGATE_* variable `prog` (or the tools beside it in a container) reads."""
    out = set(HEALTHCHECK_ENV) | sdk_env()
    for cls, prefix in SERVICES.values():
        import dataclasses

        out |= {prefix + f.name.upper() for f in dataclasses.fields(cls)} | {prefix + "CONFIG"}
    import dataclasses

    out |= {"MESHGATE_GATEWAYD_" + f.name.upper() for f in dataclasses.fields(Settings) if f.name != "origins"}
    return out | GATEWAYD_ENV


def check_service_argv(argv: list[str], env: dict[str, str]) -> config.Loaded:
    """Parse a control plane or key service command line with its environment,
    exactly as its entry point does; every MESHGATE_<SERVICE>_* variable given
    must be one the loader takes."""
    prog = pathlib.Path(argv[0]).name
    cls, prefix = SERVICES[prog]
    loaded = config.load(cls, argv[1:], prog=prog, environ=env, env_prefix=prefix)
    for k in env:
        if k.startswith(prefix) and k != prefix + "CONFIG":
            field = k[len(prefix):].lower()
            assert loaded.sources.get(field) in (f"env {k}", "flag"), f"{k} is not an option of {prog}"
    return loaded


def check_gatewayd_argv(argv: list[str], env: dict[str, str], monkeypatch) -> object:
    """Parse a gatewayd command line with its environment (the parser reads
    MESHGATE_CONTROL_PLANE and friends when it is built)."""
    assert pathlib.Path(argv[0]).name == "gatewayd", argv
    for k in list(os.environ):
        if k.startswith("MESHGATE_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ns = gatewayd_parser().parse_args(argv[1:])  # SystemExit(2) on an option it does not take
    Settings.load({"state_dir": ns.state_dir, "backend": ns.backend,
                   "resync_interval": getattr(ns, "resync_interval", None),
                   "default_interface": ns.default_interface}, env=env)
    return ns


def check_env_names(env: dict[str, str], where: str) -> None:
    known = known_env("")
    for k in env:
        if k.startswith("MESHGATE_"):
            assert k in known, f"{where}: {k} is read by no meshgate program"


def check_healthcheck_argv(argv: list[str]) -> None:
    assert argv[0] == "meshgate-healthcheck", argv
    r = subprocess.run([sys.executable, str(HEALTHCHECK), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    opts = set(re.findall(r"--[a-z-]+", r.stdout))
    for a in argv[1:]:
        if a.startswith("--"):
            assert a.split("=")[0] in opts, f"meshgate-healthcheck takes no {a}"
    positional = [a for a in argv[1:] if not a.startswith("--")]
    assert len(positional) == 1 and re.fullmatch(r"127\.0\.0\.1:\d+", positional[0]), argv


class Stub:
    """A real shell runs a deploy snippet; `gatewayd` (and curl) are stubs that
    record their arguments."""

    def __init__(self, tmp: pathlib.Path):
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.log = tmp / "calls.jsonl"
        self.state = tmp / "state/gatewayd"
        (self.state).mkdir(parents=True)
        rec = (f"#!{sys.executable}\nimport json, os, sys\n"
               "with open(os.environ['STUB_LOG'], 'a') as f:\n"
               "    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n")
        for name in ("gatewayd", "curl"):
            p = self.bin / name
            p.write_text(rec + ("print('203.0.113.7', end='')\n" if name == "curl" else ""))
            p.chmod(0o755)

    def run(self, script: str, env: dict[str, str], shell: str = "sh",
            paths: dict[str, str] | None = None) -> list[list[str]]:
        script = script.replace("/opt/meshgate/.venv/bin/gatewayd", str(self.bin / "gatewayd"))
        script = script.replace("/var/lib/meshgate/gatewayd", str(self.state))
        for a, b in (paths or {}).items():
            script = script.replace(a, b)
        self.log.write_text("")
        full = {"PATH": f"{self.bin}:/usr/bin:/bin", "STUB_LOG": str(self.log), **env}
        r = subprocess.run([shell, "-c", script], env=full, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [c for c in calls if c[0] == "gatewayd"]

    def joined(self) -> None:
        (self.state / "identity.json").write_text("{}")


# --------------------------------------------------------------------------- YAML


YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_every_deploy_file_we_ship_exists():
    for rel in ("container/Dockerfile", "container/meshgate-healthcheck", "compose/compose.yaml",
                "kubernetes/kustomization.yaml", "cloud-init/egress-node.yaml"):
        assert (DEPLOY / rel).is_file(), rel
    assert (ROOT / ".dockerignore").is_file()
    assert (ROOT / "docs/deploy.md").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_no_secret_is_committed_in_deploy():
    """No KEK line, no enrollment key secret, no private key in any deploy file."""
    kek = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}:[A-Za-z0-9+/]{43}=")
    for p in DEPLOY.rglob("*"):
        if not p.is_file():
            continue
        text = p.read_text(errors="replace")
        assert not kek.search(text), f"{p}: looks like a KEK"
        assert "PRIVATE KEY-----" not in text, p
        for m in re.finditer(r"mgek_[A-Za-z0-9_.~-]+", text):
            assert "REPLACE" in m.group(0) or m.group(0) == "mgek_", f"{p}: an enrollment key? {m.group(0)}"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "container/Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_base_packages_and_user():
    ins = dockerfile_instructions()
    args = {r.split("=", 1)[0]: r.split("=", 1)[1] for op, r in ins if op == "ARG" and "=" in r}
    froms = [r.split()[0] for op, r in ins if op == "FROM"]
    assert froms, "no FROM"
    for f in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f)
        assert re.fullmatch(r"python:3\.11-slim(-bookworm)?|debian:bookworm-slim", image), image
    runs = [r for op, r in ins if op == "RUN"]
    apt = [r for r in runs if "apt-get install" in r]
    assert len(apt) == 1
    words = apt[0].split()
    assert "--no-install-recommends" in words
    # iputils-ping: gatewayd measures its round trips to relays with ping
    for pkg in ("wireguard-go", "wireguard-tools", "nftables", "iproute2", "iputils-ping"):
        assert pkg in words, f"the image lacks {pkg}"
    users = [r for op, r in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image's default user must not be root"
    assert any(re.search(r"useradd .*--uid 10001", r) for r in runs)
    entry = [r for op, r in ins if op == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1])[0] == "/usr/bin/tini"
    assert "tini" in words


def test_dockerfile_installs_every_distribution_with_the_constraints():
    ins = dockerfile_instructions()
    dists = bootstrap_dists()
    copies = [r.split() for op, r in ins if op == "COPY" and not r.startswith("--from")]
    copied = {c[-2] for c in copies if not c[0].startswith("--")} | {c[-2] for c in copies if c[0].startswith("--")}
    pip = [r for op, r in ins if op == "RUN" and "pip install" in r]
    assert len(pip) == 1
    words = shlex.split(pip[0].split("pip install", 1)[1].split("&&")[0])
    assert words[:2] == ["-c", "constraints.txt"], words
    installed = {w.removeprefix("./").rstrip("/") for w in words[2:]}
    assert installed == set(dists), f"image installs {sorted(installed)}, bootstrap installs {sorted(dists)}"
    for d in dists:
        assert d in copied, f"{d} is not copied into the build stage"
        assert (ROOT / d / "pyproject.toml").is_file()
    assert "constraints.txt" in copied
    for c in copies:
        src = c[-2]
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"


def test_dockerfile_smoke_runs_every_entry_point():
    """The build runs each entry point's --help: each is a real entry point."""
    runs = " ".join(r for op, r in dockerfile_instructions() if op == "RUN")
    bin_dir = pathlib.Path(sys.executable).parent
    for prog in ("meshgate-controlplane", "meshgate-keyservice", "gatewayd", "meshgate"):
        assert f"{prog} --help" in runs
        assert (bin_dir / prog).exists(), prog


def dockerignored(rel: str) -> bool:
    """Docker's rule: the last matching pattern wins (enough of it for our file)."""
    import fnmatch

    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line.lstrip("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        pats = [pat] if not pat.startswith("**/") else [pat, pat[3:]]
        if pat == "**" or any(fnmatch.fnmatchcase(p, q) or fnmatch.fnmatchcase(p, "*/" + q.removeprefix("**/"))
                              for p in prefixes for q in pats):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest():
    ins = dockerfile_instructions()
    for op, r in ins:
        if op == "COPY" and not r.startswith("--from"):
            src = r.split()[-2]
            assert not dockerignored(src), f".dockerignore drops {src}, which the Dockerfile copies"
    for d in bootstrap_dists():
        assert not dockerignored(f"{d}/pyproject.toml")
        assert dockerignored(f"{d}/tests/test_x.py")
    for rel in (".venv/bin/python", "state/kek", "deploy/compose/kek", ".git/config", "README.md"):
        assert dockerignored(rel), rel


# --------------------------------------------------------------------------- health check script


@pytest.fixture
def health_server():
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    h = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(h, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    h.set("", health_pb2.HealthCheckResponse.SERVING)
    yield port, h, health_pb2
    srv.stop(0)


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})


def test_healthcheck_follows_the_health_service(health_server):
    port, h, pb = health_server
    assert healthcheck(f"127.0.0.1:{port}").returncode == 0
    h.set("", pb.HealthCheckResponse.NOT_SERVING)
    r = healthcheck(f"127.0.0.1:{port}")
    assert r.returncode == 1 and "NOT_SERVING" in r.stderr
    r = healthcheck("--service", "meshgate.api.v1.NoSuch", f"127.0.0.1:{port}")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr
    h.set("", pb.HealthCheckResponse.SERVING)
    assert healthcheck("--timeout=2", f"127.0.0.1:{port}").returncode == 0


def test_healthcheck_fails_on_nothing_listening():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = healthcheck("--timeout=2", f"127.0.0.1:{port}")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr


def test_healthcheck_speaks_tls_with_the_name_from_the_environment(tmp_path):
    """The Kubernetes probes reach a TLS control plane on 127.0.0.1 and verify
    the certificate's DNS name given by MESHGATE_HEALTHCHECK_SERVER_NAME."""
    import datetime as dt
    from concurrent import futures

    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    name = "meshgate-controlplane.meshgate.svc"
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (tmp_path / "ca.crt").write_bytes(pem(ca))
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    h = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(h, srv)
    port = srv.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, pem(cert))]))
    srv.start()
    try:
        h.set("", health_pb2.HealthCheckResponse.SERVING)
        env = {"MESHGATE_HEALTHCHECK_CA_FILE": str(tmp_path / "ca.crt"), "MESHGATE_HEALTHCHECK_SERVER_NAME": name}
        assert healthcheck(f"127.0.0.1:{port}", env=env).returncode == 0
        wrong = dict(env, MESHGATE_HEALTHCHECK_SERVER_NAME="other.example")
        assert healthcheck("--timeout=3", f"127.0.0.1:{port}", env=wrong).returncode == 1
        assert healthcheck("--timeout=3", f"127.0.0.1:{port}").returncode == 1  # plaintext to a TLS server
    finally:
        srv.stop(0)


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "compose/compose.yaml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?err}; $$ is a literal $."""
    def sub(m):
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        v = env.get(name, "")
        if op == ":-":
            return v or arg
        if op == ":?":
            assert v, f"compose needs {name}: {arg}"
        return v
    value = re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", sub, value.replace("$$", "\0"))
    return value.replace("\0", "$")


def test_compose_services_network_and_ports(compose):
    s = compose["services"]
    assert set(s) == {"etcd", "keyservice", "controlplane", "gatewayd"}
    assert s["etcd"]["image"].startswith("quay.io/coreos/etcd:v3.")
    for name in ("etcd", "keyservice", "controlplane"):
        assert s[name].get("networks") == ["meshgate"], name
        assert "network_mode" not in s[name]
        for port in s[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert "meshgate" in compose["networks"]
    assert [p.split(":")[-1] for p in s["controlplane"]["ports"]] == ["7400"]
    assert [p.split(":")[-1] for p in s["keyservice"]["ports"]] == ["7401"]
    assert "ports" not in s["etcd"]
    for name in ("keyservice", "controlplane"):
        assert s[name]["depends_on"]["etcd"]["condition"] == "service_healthy"
    assert s["controlplane"]["depends_on"]["keyservice"]["condition"] == "service_healthy"


def test_compose_etcd_has_auto_compaction_and_flags_etcd_knows(compose):
    cmd = compose["services"]["etcd"]["command"]
    assert cmd[0] == "/usr/local/bin/etcd"
    flags = dict(a.lstrip("-").split("=", 1) for a in cmd[1:])
    assert flags["auto-compaction-mode"] == "periodic" and flags["auto-compaction-retention"]
    assert flags["data-dir"] in [v.split(":")[1] for v in compose["services"]["etcd"]["volumes"]]
    etcd = shutil.which("etcd")
    # etcd-server is one of the packages `make install` puts on every machine that runs the tests.
    assert etcd is not None, "etcd is not installed: run `make install` (Debian package etcd-server)"
    out = subprocess.run([etcd, "--help"], capture_output=True, text=True).stdout
    for f in flags:
        assert f"--{f} " in out or f"--{f}\n" in out or f"--{f} '" in out, f"etcd takes no --{f}"
    hc = compose["services"]["etcd"]["healthcheck"]["test"]
    assert hc[:2] == ["CMD", "/usr/local/bin/etcdctl"] and "endpoint" in hc and "health" in hc


@pytest.mark.parametrize("name", ["keyservice", "controlplane"])
def test_compose_service_command_and_environment_parse(compose, name):
    svc = compose["services"][name]
    env = {k: interpolate(str(v), {}) for k, v in svc["environment"].items()}
    check_env_names(env, f"compose {name}")
    loaded = check_service_argv(svc["command"], env)
    cfg = loaded.config
    assert cfg.listen.startswith("0.0.0.0:") and cfg.etcd_endpoints == "etcd:2379"
    assert cfg.insecure  # plaintext on the private network; published on loopback only
    assert svc["image"] == "${MESHGATE_IMAGE:-meshgate:dev}"
    assert svc.get("user") in (None,), "the services keep the image's non-root user"
    assert svc["cap_drop"] == ["ALL"] and svc["read_only"] is True
    port = cfg.listen.rsplit(":", 1)[1]
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD"
    check_healthcheck_argv(test[1:])
    assert test[-1] == f"127.0.0.1:{port}"
    if name == "keyservice":
        assert cfg.kek_file == "/run/secrets/kek" and not cfg.kek
        assert svc["secrets"] == ["kek"]
    else:
        assert cfg.keyservice == "keyservice:7401"


def test_compose_secrets_come_from_files_never_inline(compose):
    assert compose["secrets"]["kek"] == {"file": "./kek"}
    assert set(compose["secrets"]) == {"kek", "enrollment_key"}
    for sec in compose["secrets"].values():
        assert set(sec) == {"file"}, "a secret given inline or from the environment"
    ignored = (DEPLOY / "compose/.gitignore").read_text().split()
    for sec in compose["secrets"].values():
        assert sec["file"].removeprefix("./") in ignored
    for name, svc in compose["services"].items():
        for k in svc.get("environment") or {}:
            assert "KEK" not in k or k.endswith("_FILE"), f"{name}: {k} puts a KEK in the environment"
            assert "ENROLLMENT_KEY" not in k, f"{name}: {k} puts an enrollment key in the environment"
    tracked = subprocess.run(["git", "ls-files", "deploy/compose"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert "deploy/compose/kek" not in tracked and "deploy/compose/enrollment-key" not in tracked


def test_compose_kek_one_liner_makes_a_kek_the_key_service_loads(tmp_path):
    from meshgate.keyservice.sealing import Keyring

    line = next(ln for ln in (DEPLOY / "compose/compose.yaml").read_text().splitlines()
                if "/dev/urandom" in ln)
    cmd = line.lstrip("# ").split(" && sudo chown")[0]
    r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kek = tmp_path / "kek"
    assert stat.S_IMODE(kek.stat().st_mode) == 0o600
    ring = Keyring.from_config(str(kek), "")
    assert ring.ids == ["kek1"]
    assert "chown 10001:10001 kek" in line  # the image's meshgate user reads the bind-mounted file


def test_compose_gatewayd_profile_host_network_and_join_once(compose, tmp_path, monkeypatch):
    g = compose["services"]["gatewayd"]
    assert g["profiles"] == ["gatewayd"]
    assert g["network_mode"] == "host" and "networks" not in g and "ports" not in g
    # NET_RAW: ping's ICMP socket (round trips to relays)
    assert g["cap_add"] == ["NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"] and g["cap_drop"] == ["ALL"]
    assert g["devices"] == ["/dev/net/tun:/dev/net/tun"]
    assert g["user"] == "0:0"
    assert "gatewayd-state:/var/lib/meshgate/gatewayd" in g["volumes"]
    env = {k: str(v) for k, v in g["environment"].items()}
    check_env_names(env, "compose gatewayd")
    assert g["command"][:2] == ["sh", "-c"]
    script = interpolate(g["command"][2], {"MESHGATE_NODE_ENDPOINT": "203.0.113.7:51820"})
    stub = Stub(tmp_path)
    calls = stub.run(script.replace("/run/secrets/enrollment_key", str(tmp_path / "key")), env)
    assert [c[1] for c in calls] == ["join", "run"]
    join = check_gatewayd_argv(calls[0], env, monkeypatch)
    assert join.control_plane == "127.0.0.1:7400" and join.endpoint == "203.0.113.7:51820"
    assert str(join.key_file) == str(tmp_path / "key")
    run = check_gatewayd_argv(calls[1], env, monkeypatch)
    assert run.log_format == "json" and run.file is None
    stub.joined()
    calls = stub.run(script, env)
    assert [c[1] for c in calls] == ["run"], "joined again although the identity exists"


# --------------------------------------------------------------------------- Kubernetes


# The kustomization features deploy/kubernetes uses, and nothing more: a
# namespace for namespaced objects, labels on metadata only (no selectors, no
# templates), and image replacement by name. Rendered here so the checks need
# no kubectl (not a Debian package); test_render_knows_every_feature_used keeps
# the kustomization inside this subset.
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
CLUSTER_SCOPED = {"Namespace"}


def kustomize(directory: pathlib.Path) -> list[dict]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in k.get("images", [])}
    labels: dict[str, str] = {}
    for group in k.get("labels", []):
        assert group.get("includeSelectors") is False and not group.get("includeTemplates"), group
        labels.update(group["pairs"])
    docs = []
    for res in k["resources"]:
        for d in yaml.safe_load_all((directory / res).read_text()):
            if not d:
                continue
            meta = d.setdefault("metadata", {})
            if d["kind"] not in CLUSTER_SCOPED and "namespace" in k:
                meta["namespace"] = k["namespace"]
            meta["labels"] = {**meta.get("labels", {}), **labels}
            spec = d.get("spec", {}).get("template", {}).get("spec", {})
            for c in [*spec.get("containers", []), *spec.get("initContainers", [])]:
                name, _, tag = c["image"].partition(":")
                if name in images:
                    c["image"] = images[name]
            docs.append(d)
    return docs


def test_render_knows_every_feature_used():
    k = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    assert set(k) <= KUSTOMIZE_FIELDS, f"kustomization uses {set(k) - KUSTOMIZE_FIELDS}: extend kustomize()"
    kinds = {d["kind"] for d in kustomize(DEPLOY / "kubernetes")}
    assert kinds & CLUSTER_SCOPED == {"Namespace"}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume"}


@pytest.fixture(scope="module")
def rendered():
    docs = kustomize(DEPLOY / "kubernetes")
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def by_kind(rendered, kind):
    return {name: d for (k, name), d in rendered.items() if k == kind}


def container_env(c: dict, rendered: dict) -> dict[str, str]:
    cms = by_kind(rendered, "ConfigMap")
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        src = e["valueFrom"]
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            assert ref["name"] in cms, f"no ConfigMap {ref['name']}"
            assert ref["key"] in cms[ref["name"]]["data"], f"ConfigMap {ref['name']} has no {ref['key']}"
            env[e["name"]] = cms[ref["name"]]["data"][ref["key"]]
        elif "fieldRef" in src:
            assert src["fieldRef"]["fieldPath"] in ("status.hostIP", "spec.nodeName", "metadata.name")
            env[e["name"]] = "192.0.2.10"
        else:
            pytest.fail(f"{e['name']}: unexpected source {src}")
    return env


def mounted(pod: dict, c: dict, path: str) -> dict:
    """The volume behind `path` in container `c`."""
    vols = {v["name"]: v for v in pod["volumes"]}
    best = None
    for m in c.get("volumeMounts", []):
        on = path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
        if on and (best is None or len(m["mountPath"]) > len(best["mountPath"])):
            best = m
    assert best, f"{c['name']}: {path} is on no volume"
    return vols[best["name"]]


def test_kustomize_renders_the_expected_objects(rendered):
    kinds = sorted({k for k, _ in rendered})
    assert kinds == sorted(["Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment",
                            "PodDisruptionBudget", "DaemonSet", "NetworkPolicy"])
    assert set(by_kind(rendered, "Deployment")) == {"meshgate-controlplane", "meshgate-keyservice"}
    assert set(by_kind(rendered, "DaemonSet")) == {"meshgate-gatewayd"}
    assert not by_kind(rendered, "Secret"), "secrets are the operator's, never in the manifests"
    for (kind, name), d in rendered.items():
        if kind != "Namespace":
            assert d["metadata"]["namespace"] == "meshgate", (kind, name)
    cm = by_kind(rendered, "ConfigMap")["meshgate-config"]["data"]
    assert re.fullmatch(r"[\w.-]+:\d+", cm["etcd-endpoints"]), "one etcd host:port (external etcd)"


def pod_specs(rendered):
    for kind in ("Deployment", "DaemonSet"):
        for name, d in by_kind(rendered, kind).items():
            yield kind, name, d["spec"]["template"]["spec"]


def test_no_container_replaces_the_entrypoint(rendered):
    for _kind, name, pod in pod_specs(rendered):
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert "command" not in c, f"{name}/{c['name']}: use args so tini stays PID 1"
            assert c["image"].startswith("registry.example.com/meshgate:"), c["image"]
            assert "requests" in c.get("resources", {}), f"{name}/{c['name']} has no resource requests"


@pytest.mark.parametrize("name", ["meshgate-controlplane", "meshgate-keyservice"])
def test_service_deployments(rendered, name):
    dep = by_kind(rendered, "Deployment")[name]
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["fsGroup"] == 10001
    [c] = pod["containers"]
    csc = c["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"]["drop"] == ["ALL"] and "add" not in csc["capabilities"]
    env = container_env(c, rendered)
    check_env_names(env, name)
    cfg = check_service_argv(c["args"], env).config
    assert cfg.etcd_endpoints == by_kind(rendered, "ConfigMap")["meshgate-config"]["data"]["etcd-endpoints"]
    port = int(cfg.listen.rsplit(":", 1)[1])
    assert [p["containerPort"] for p in c["ports"]] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        argv = c[probe]["exec"]["command"]
        check_healthcheck_argv(argv)
        assert argv[-1] == f"127.0.0.1:{port}"
    files = [cfg.tls_cert, cfg.tls_key, env.get("MESHGATE_HEALTHCHECK_CA_FILE", "")]
    files += [cfg.kek_file] if name == "meshgate-keyservice" else []
    for f in filter(None, files):
        vol = mounted(pod, c, f)
        assert "secret" in vol, f"{f} is not from a Secret"
    if name == "meshgate-keyservice":
        vol = mounted(pod, c, cfg.kek_file)
        assert vol["secret"]["secretName"] == "meshgate-kek" and vol["secret"]["defaultMode"] == 0o440
        assert cfg.kek_file.endswith("/kek") and not cfg.kek
        assert cfg.insecure  # see the NetworkPolicy test
    else:
        assert cfg.tls_cert and cfg.tls_key and not cfg.insecure
        assert cfg.keyservice == "meshgate-keyservice:7401"
        assert env["MESHGATE_HEALTHCHECK_SERVER_NAME"] in \
            by_kind(rendered, "ConfigMap")["meshgate-config"]["data"]["control-plane"]
    svc = by_kind(rendered, "Service")[name]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["port"] == port and svc["spec"]["ports"][0]["targetPort"] == "grpc"
    pdb = by_kind(rendered, "PodDisruptionBudget")[name]
    assert pdb["spec"]["minAvailable"] == 1
    assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())


def test_controlplane_address_in_config_matches_its_service(rendered):
    cm = by_kind(rendered, "ConfigMap")["meshgate-config"]["data"]
    host, port = cm["control-plane"].rsplit(":", 1)
    svc = by_kind(rendered, "Service")["meshgate-controlplane"]
    assert host.split(".")[:2] == [svc["metadata"]["name"], svc["metadata"]["namespace"]]
    assert int(port) == svc["spec"]["ports"][0]["port"]


def test_keyservice_admits_only_the_control_plane(rendered):
    np = by_kind(rendered, "NetworkPolicy")["meshgate-keyservice"]
    ks = by_kind(rendered, "Deployment")["meshgate-keyservice"]["spec"]["template"]["metadata"]["labels"]
    cp = by_kind(rendered, "Deployment")["meshgate-controlplane"]["spec"]["template"]["metadata"]["labels"]
    assert all(ks.get(k) == v for k, v in np["spec"]["podSelector"]["matchLabels"].items())
    [rule] = np["spec"]["ingress"]
    [peer] = rule["from"]
    assert all(cp.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())
    assert not all(ks.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())


def test_gatewayd_daemonset(rendered, tmp_path, monkeypatch):
    ds = by_kind(rendered, "DaemonSet")["meshgate-gatewayd"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    vols = {v["name"]: v for v in pod["volumes"]}
    [c] = pod["containers"]
    csc = c["securityContext"]
    assert csc["runAsUser"] == 0 and csc.get("privileged") is False
    # NET_RAW: ping's ICMP socket (round trips to relays)
    assert csc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"]}
    tun = mounted(pod, c, "/dev/net/tun")
    assert tun["hostPath"] == {"path": "/dev/net/tun", "type": "CharDevice"}
    env = container_env(c, rendered)
    check_env_names(env, "gatewayd")
    run = check_gatewayd_argv(c["args"], env, monkeypatch)
    assert run.command == "run" and run.file is None
    state = mounted(pod, c, str(run.state_dir))
    assert state["hostPath"]["path"] == "/var/lib/meshgate"
    assert mounted(pod, c, "/var/run/wireguard"[4:]) == vols["run"]  # /run: wireguard-go's sockets
    for probe_name in ("readinessProbe", "livenessProbe"):
        probe = check_gatewayd_argv(c[probe_name]["exec"]["command"], env, monkeypatch)
        assert probe.command == "check" and probe.state_dir == run.state_dir
    assert check_gatewayd_argv(c["livenessProbe"]["exec"]["command"], env, monkeypatch).max_age > 0

    inits = {i["name"]: i for i in pod["initContainers"]}
    assert list(inits) == ["sysctls", "join"]
    sysctl_script = inits["sysctls"]["args"][2]
    for key in re.findall(r"/proc/sys/(\S+)", sysctl_script):
        assert key.replace("/", ".") in ("net.ipv4.ip_forward", "net.ipv4.conf.all.src_valid_mark"), key
    join_c = inits["join"]
    assert join_c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = container_env(join_c, rendered)
    check_env_names(env, "gatewayd join")
    assert join_c["args"][:2] == ["sh", "-c"]
    stub = Stub(tmp_path)
    calls = stub.run(join_c["args"][2], env)
    assert [c_[1] for c_ in calls] == ["join"]
    join = check_gatewayd_argv(calls[0], env, monkeypatch)
    cm = by_kind(rendered, "ConfigMap")["meshgate-config"]["data"]
    assert join.control_plane == cm["control-plane"]
    assert join.endpoint == f"192.0.2.10:{cm['wireguard-port']}" and join.listen_port == int(cm["wireguard-port"])
    key = mounted(pod, join_c, str(join.key_file))
    assert key["secret"]["secretName"] == "meshgate-enrollment" and key["secret"]["defaultMode"] == 0o400
    assert "secret" in mounted(pod, join_c, join.ca_file)
    assert mounted(pod, join_c, "/var/lib/meshgate/gatewayd") == state
    # the CA path join saves in identity.json must exist in the run container too
    assert mounted(pod, c, join.ca_file) == mounted(pod, join_c, join.ca_file)
    stub.joined()
    assert stub.run(join_c["args"][2], env) == [], "joined again although the identity exists"


# --------------------------------------------------------------------------- cloud-init


@pytest.fixture(scope="module")
def cloudinit():
    path = DEPLOY / "cloud-init/egress-node.yaml"
    assert path.read_text().startswith("#cloud-config\n")
    return yaml.safe_load(path.read_text())


def files(ci):
    return {f["path"]: f for f in ci["write_files"]}


def test_cloudinit_files(cloudinit):
    fs = files(cloudinit)
    assert cloudinit["write_files"][0]["path"] == "/etc/meshgate/node.env", "the operator's variables come first"
    assert fs["/etc/meshgate/enrollment-key"]["permissions"] == "0600"
    unit = fs["/etc/systemd/system/meshgate-gatewayd.service"]["content"]
    assert unit == (DEPLOY / "systemd/meshgate-gatewayd.service").read_text()
    install = fs["/usr/local/sbin/meshgate-install"]["content"].replace("\\\n", " ")
    apt = next(ln for ln in install.splitlines() if "apt-get install" in ln).split()
    assert "--no-install-recommends" in apt
    for pkg in ("wireguard-go", "wireguard-tools", "nftables", "iproute2", "iputils-ping", "python3-venv"):
        assert pkg in apt
    pip = next(ln for ln in install.splitlines() if "pip install" in ln and "constraints.txt" in ln).split()
    dists = {w.removeprefix("./") for w in pip if w.startswith("./")}
    assert dists <= set(bootstrap_dists())
    assert {"clients/api", "services/common", "services/gatewayd"} <= dists
    r = subprocess.run(["bash", "-n"], input=fs["/usr/local/sbin/meshgate-install"]["content"], text=True)
    assert r.returncode == 0


def test_cloudinit_node_env_names_are_defined_and_used(cloudinit):
    fs = files(cloudinit)
    env_text = fs["/etc/meshgate/node.env"]["content"]
    defined = set(re.findall(r"^(MESHGATE_\w+)=", env_text, re.M))
    used_text = fs["/usr/local/sbin/meshgate-install"]["content"] + json.dumps(cloudinit["runcmd"])
    used = set(re.findall(r"\$\{?(MESHGATE_\w+)", used_text))
    assert used <= defined, f"used but not defined in node.env: {used - defined}"
    assert defined <= used | {"MESHGATE_CONTROL_PLANE"}, f"defined but unused: {defined - used}"


def test_cloudinit_runcmd_joins_with_a_real_command_line_then_enables_the_unit(cloudinit, tmp_path, monkeypatch):
    fs = files(cloudinit)
    runcmd = cloudinit["runcmd"]
    assert runcmd[-1] == ["systemctl", "enable", "--now", "meshgate-gatewayd.service"]
    joins = [c for c in runcmd if "gatewayd join" in json.dumps(c)]
    assert len(joins) == 1
    [cmd] = joins
    assert cmd[:2] == ["bash", "-c"]
    assert runcmd.index(cmd) < runcmd.index(["systemctl", "enable", "--now", "meshgate-gatewayd.service"])
    node_env = tmp_path / "node.env"
    node_env.write_text(fs["/etc/meshgate/node.env"]["content"])
    key = tmp_path / "enrollment-key"
    key.write_text("mgek_x")
    stub = Stub(tmp_path)
    paths = {"/etc/meshgate/node.env": str(node_env), "/etc/meshgate/enrollment-key": str(key)}
    calls = stub.run(cmd[2], {}, shell="bash", paths=paths)
    assert len(calls) == 1
    env = dict(re.findall(r"^(MESHGATE_\w+)=(.*)$", node_env.read_text(), re.M))
    join = check_gatewayd_argv(calls[0], env, monkeypatch)
    assert join.command == "join"
    assert join.control_plane == env["MESHGATE_CONTROL_PLANE"] and join.ca_file == env["MESHGATE_CA_FILE"]
    assert join.endpoint == "203.0.113.7:51820" and join.listen_port == 51820  # curl stub: the metadata IP
    assert join.node_id == ""
    assert not key.exists(), "the enrollment key is removed once used"
    # an operator-set address and node id, no CA (plaintext)
    node_env.write_text(node_env.read_text().replace("MESHGATE_PUBLIC_IP=\n", "MESHGATE_PUBLIC_IP=198.51.100.4\n")
                        .replace("MESHGATE_NODE_ID=\n", "MESHGATE_NODE_ID=edge-1\n")
                        .replace("MESHGATE_CA_FILE=/etc/meshgate/ca.pem\n", "MESHGATE_CA_FILE=\n"))
    calls = stub.run(cmd[2], {}, shell="bash", paths=paths)
    join = check_gatewayd_argv(calls[0], env, monkeypatch)
    assert join.endpoint == "198.51.100.4:51820" and join.node_id == "edge-1" and join.ca_file == ""
    stub.joined()
    assert stub.run(cmd[2], {}, shell="bash", paths=paths) == []
    # the unit it enables runs gatewayd with options gatewayd takes
    unit = fs["/etc/systemd/system/meshgate-gatewayd.service"]["content"]
    exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", unit, re.M).group(1))
    assert exec_start[0] == "/opt/meshgate/.venv/bin/gatewayd"
    check_gatewayd_argv(exec_start, {}, monkeypatch)
