"""Authentication, authorization and the audit log, driven the way a user
drives them: real etcd, real `meshgate-controlplane` processes, the real
`meshgate` CLI as a subprocess (and the SDK where an ErrorInfo reason or an
OIDC bearer is the point).

- the bootstrap admin token file: made once, 0600, never logged, never
  overwritten, a stale one refused; the token expires after
  --bootstrap-token-ttl; bad auth flags are clear exits;
- API tokens through the CLI, on two replicas of one prefix: a viewer token,
  a refused delete, a refused token listing, no token at all, revocation
  (seen by the other replica too), and the audit records of it all;
- a network-admin token scoped to one network;
- OIDC bearers from a test issuer (a JWKS file): role mapping, each way a JWT
  is refused with its specific ErrorInfo reason, and a key rotation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import stat
import subprocess
import sys
import time
import uuid

import pytest

from meshgate.api.v1 import auth_pb2
from meshgate.common.testing import OtlpReceiver, ServiceProcess

BIN = os.path.dirname(sys.executable)
MESHGATE = os.path.join(BIN, "meshgate")
CONTROLPLANE = os.path.join(BIN, "meshgate-controlplane")
TOKEN_RE = re.compile(r"mgtk_[a-z0-9-]+\.[A-Za-z0-9_-]+")


def controlplane(etcd_server, prefix: str, *extra: str, env: dict[str, str] | None = None) -> ServiceProcess:
    return ServiceProcess(
        "meshgate-controlplane", ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", prefix, *extra],
        env=env or {},
    )


def run_controlplane(etcd_server, *args: str) -> subprocess.CompletedProcess:
    """A control plane process expected to exit at start."""
    return subprocess.run(
        [CONTROLPLANE, "--listen", "127.0.0.1:0", "--etcd-endpoints", etcd_server.endpoint,
         "--etcd-prefix", f"/t-{uuid.uuid4().hex[:12]}", *args],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_")},
    )


class Cli:
    """Runs `meshgate` with its own context file and no other MESHGATE_*."""

    def __init__(self, config_path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_")}
        self.env["MESHGATE_CONFIG"] = str(config_path)

    def run(self, *args: str, token: str | None = None, context: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        env = dict(self.env)
        if token is not None:
            env["MESHGATE_TOKEN"] = token
        argv = [MESHGATE, *(["--context", context] if context else []), *args]
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"{argv} exited {p.returncode}: {p.stderr}")
        return p

    def json(self, *args: str, **kw) -> dict:
        return json.loads(self.run(*args, "-o", "json", **kw).stdout)


def leaked(token: str, text: str) -> bool:
    """Whether `text` holds `token`, or its secret part (a meshgate token's
    random tail, a JWT's signature)."""
    tail = token.rsplit(".", 1)[1]
    return token in text or bool(tail) and tail in text


def refused(p: subprocess.CompletedProcess, code: str) -> None:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert code in p.stderr and p.stderr.count("\n") == 1, p.stderr


# ---------------------------------------------------------------- 1. bootstrap


def test_bootstrap_token_file_made_once_never_logged_never_overwritten(etcd_server, etcd_prefix, tmp_path):
    path = tmp_path / "admin.token"
    other = tmp_path / "other.token"

    first = controlplane(etcd_server, etcd_prefix, "--bootstrap-token-file", str(path))
    try:
        first.start()
        assert path.exists()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        content = path.read_text()
        lines = content.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mgtk_bootstrap-admin."), "one bootstrap-admin token"
        token = lines[0]
        assert TOKEN_RE.fullmatch(token)
        # No temporary file left beside it.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.token"]
    finally:
        first.stop()
    log = first.log(tail=0)
    assert "bootstrap" in log  # it says where the token is ...
    assert not leaked(token, log)  # ... never what it is
    before = path.stat()

    # A second start on the same prefix: the same path is left alone, another is not made.
    for again_path in (path, other):
        again = controlplane(etcd_server, etcd_prefix, "--bootstrap-token-file", str(again_path))
        try:
            again.start()
        finally:
            again.stop()
        assert not leaked(token, again.log(tail=0))
        assert path.read_text() == content
        after = path.stat()
        assert (after.st_ino, after.st_mtime_ns, stat.S_IMODE(after.st_mode)) == (
            before.st_ino, before.st_mtime_ns, 0o600)
        assert not other.exists()

    # A stale file (etcd holds no bootstrap token under a fresh prefix): a clear exit, the file kept.
    p = run_controlplane(etcd_server, "--bootstrap-token-file", str(path))
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert str(path) in out and "stale" in out and "exists" in out, out
    assert not leaked(token, out)
    assert path.read_text() == content


def test_bootstrap_token_expires_and_bad_auth_flags_exit(etcd_server, etcd_prefix, tmp_path, monkeypatch):
    from meshgate.sdk import Client, errors

    for k in list(os.environ):
        if k.startswith("MESHGATE_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MESHGATE_CONFIG", str(tmp_path / "meshgate-config.yaml"))
    path = tmp_path / "admin.token"
    proc = controlplane(etcd_server, etcd_prefix, "--bootstrap-token-file", str(path), "--bootstrap-token-ttl", "4")
    try:
        proc.start()
        with Client(proc.target, token=path.read_text().strip()) as c:
            ident = c.get_caller_identity()
            assert ident.principal == "tokens/bootstrap-admin"
            # Valid --bootstrap-token-ttl from its creation (a value, not a clock).
            made = c.get_token(name="tokens/bootstrap-admin")
            assert abs(made.expire_time.ToNanoseconds() - made.create_time.ToNanoseconds() - 4 * 10**9) < 10**8
            assert ident.expire_time == made.expire_time
            time.sleep(max(0.0, ident.expire_time.ToNanoseconds() / 1e9 - time.time()) + 0.2)
            with pytest.raises(errors.Unauthenticated) as ei:
                c.list_networks()
            assert ei.value.reason == "TOKEN_EXPIRED"
    finally:
        proc.stop()

    for args, says in [
        (["--bootstrap-token-ttl", "0"], "--bootstrap-token-ttl"),
        (["--audit-max-records", "0"], "--audit-max-records"),
        (["--audit-retention", "-1"], "--audit-retention"),
        (["--oidc-config", str(tmp_path / "missing.yaml")], "--oidc-config"),
        (["--bootstrap-token-file", str(tmp_path / "no-such-dir" / "t")], "does not exist"),
    ]:
        p = run_controlplane(etcd_server, *args)
        assert p.returncode != 0 and says in p.stdout + p.stderr, (args, p.stdout, p.stderr)


# ---------------------------------------------------------------- 2 & 3. API tokens through the CLI


@pytest.fixture(scope="module")
def cli_cp(etcd_server, tmp_path_factory):
    """One control plane for the CLI tests (tracing to an OTLP receiver, so
    audit records carry trace ids), its bootstrap token in a file, and a
    context `local` that reads it (`anon`: the same target, no token)."""
    d = tmp_path_factory.mktemp("cli-cp")
    token_file = d / "admin.token"
    otlp = OtlpReceiver().start_threaded()
    prefix = f"/t-{uuid.uuid4().hex[:12]}"
    proc = controlplane(etcd_server, prefix, "--bootstrap-token-file", str(token_file),
                        env=otlp.env("meshgate-controlplane"))
    peer = controlplane(etcd_server, prefix)  # a second replica on the same etcd prefix
    try:
        proc.start()
        peer.start()
        assert peer.admin_token == ""  # the prefix was bootstrapped already: no second admin token
        cli = Cli(d / "meshgate-config.yaml")
        cli.run("context", "add", "local", "--target", proc.target, "--token-file", str(token_file), "--use")
        cli.run("context", "add", "anon", "--target", proc.target)
        yield proc, cli, token_file.read_text().strip(), otlp, peer
    finally:
        peer.stop()
        proc.stop()
        otlp.close()


def poll(fn, what: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)


def test_viewer_token_refusals_revocation_and_audit(cli_cp):
    proc, cli, admin, otlp, peer = cli_cp
    assert "tokens/bootstrap-admin" in cli.run("token", "get-caller-identity", "-o", "json").stdout

    cli.run("network", "create", "--network-id", "x", "--network.ipv4-cidr", "100.64.1.0/24")
    out = cli.run("token", "create", "--token-id", "ann", "--token.bindings", "{role: viewer}",
                  "--token.expire-time", "+1d", "-o", "secret").stdout
    ann = out.strip()
    assert out == ann + "\n" and ann.startswith("mgtk_ann.") and TOKEN_RE.fullmatch(ann), "just the token"

    # The viewer reads ...
    listed = cli.json("network", "list", token=ann)
    assert "networks/x" in [n["name"] for n in listed["networks"]]
    assert cli.run("network", "list", "-o", "table", token=ann).stdout.count("networks/x") == 1
    # ... but may not delete, nor manage tokens.
    refused(cli.run("network", "delete", "networks/x", token=ann, check=False), "PERMISSION_DENIED")
    assert cli.json("network", "get", "networks/x")["name"] == "networks/x"
    refused(cli.run("token", "list", token=ann, check=False), "PERMISSION_DENIED")
    # No token at all.
    refused(cli.run("network", "list", context="anon", check=False), "UNAUTHENTICATED")
    refused(cli.run("network", "delete", "networks/x", context="anon", check=False), "UNAUTHENTICATED")
    # A made-up token.
    fake = "mgtk_ann.not-the-secret"
    refused(cli.run("network", "list", token=fake, check=False), "UNAUTHENTICATED")

    # The admin sees ann's token, never its secret.
    tokens = cli.json("token", "list")
    assert {"tokens/ann", "tokens/bootstrap-admin"} <= {t["name"] for t in tokens["tokens"]}
    assert not leaked(ann, json.dumps(tokens)) and not leaked(admin, json.dumps(tokens))

    got = cli.json("token", "get", "tokens/ann")
    assert got["creator"] == "tokens/bootstrap-admin" and got["bindings"] == [{"role": "viewer"}]
    assert got.get("last_use_time") and "secret" not in got and not leaked(ann, json.dumps(got))

    # The other replica knows ann's token too.
    on_peer = cli.json("--target", peer.target, "network", "list", token=ann)
    assert "networks/x" in [n["name"] for n in on_peer["networks"]]

    # Revocation: ann's next call is refused, on the replica that revoked it
    # at once, on the other one within a second or so.
    revoked = cli.json("token", "revoke", "tokens/ann")
    assert revoked["revoke_time"] and revoked["name"] == "tokens/ann" and "secret" not in revoked
    gone = cli.run("network", "list", token=ann, check=False)
    refused(gone, "UNAUTHENTICATED")
    assert "revoked" in gone.stderr
    poll(lambda: cli.run("--target", peer.target, "network", "list", token=ann, check=False).returncode == 1,
         "ann refused by the other replica after revoke", timeout=3)
    refused(cli.run("--target", peer.target, "network", "list", token=ann, check=False), "UNAUTHENTICATED")

    # The audit log.
    records = cli.json("audit", "list")["audit_records"]
    text = json.dumps(records)
    assert not leaked(ann, text) and not leaked(admin, text)
    by = lambda **kv: [r for r in records if all(r.get(k) == v for k, v in kv.items())]  # noqa: E731
    delete = by(principal="tokens/ann", method="/meshgate.api.v1.NetworkService/DeleteNetwork")
    assert len(delete) == 1, records
    assert (delete[0]["status_code"], delete[0]["resource"], delete[0]["authentication"]) == (
        "PERMISSION_DENIED", "networks/x", "token")
    assert delete[0]["network"] == "x"
    create = by(method="/meshgate.api.v1.NetworkService/CreateNetwork", resource="networks/x")
    assert len(create) == 1, records
    assert (create[0]["principal"], create[0]["status_code"]) == ("tokens/bootstrap-admin", "OK")
    trace_id = create[0].get("trace_id", "")
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id), create[0]
    # ... the id of the call's trace, as exported.
    poll(lambda: any(s.name == "/meshgate.api.v1.NetworkService/CreateNetwork"
                     for _, s in otlp.trace(bytes.fromhex(trace_id))), "the create's span at the OTLP receiver")
    assert set(create[0].get("field_paths", [])) >= {"network.ipv4_cidr"}
    made = by(method="/meshgate.api.v1.TokenService/CreateToken", resource="tokens/ann")
    assert len(made) == 1 and made[0]["returned_secret"] and made[0]["status_code"] == "OK"
    assert by(method="/meshgate.api.v1.TokenService/ListTokens", principal="tokens/ann",
              status_code="PERMISSION_DENIED")
    assert by(principal="anonymous", authentication="none", status_code="UNAUTHENTICATED",
              method="/meshgate.api.v1.NetworkService/DeleteNetwork")
    assert by(method="/meshgate.api.v1.TokenService/RevokeToken", resource="tokens/ann", status_code="OK")
    # Reads that succeed are not audited.
    assert not by(method="/meshgate.api.v1.NetworkService/ListNetworks", status_code="OK")

    mine = cli.json("audit", "list", "--principal", "tokens/ann")["audit_records"]
    assert mine and all(r["principal"] == "tokens/ann" for r in mine)
    assert [r["name"] for r in mine] == [r["name"] for r in records if r["principal"] == "tokens/ann"]
    # The viewer may not read the audit log.
    other = cli.run("token", "create", "--token-id", "vic", "--token.bindings", "{role: viewer}",
                    "--token.expire-time", "+1h", "-o", "secret").stdout.strip()
    refused(cli.run("audit", "list", token=other, check=False), "PERMISSION_DENIED")

    # None of the tokens in either replica's log.
    for log in (proc.log(tail=0), peer.log(tail=0)):
        assert "not-the-secret" not in log
        for secret in (ann, admin, other):
            assert not leaked(secret, log)
    assert "not-the-secret" not in text


def test_network_admin_token_scoped_to_one_network(cli_cp):
    proc, cli, admin, _, _ = cli_cp
    cli.run("network", "create", "--network-id", "a", "--network.ipv4-cidr", "100.64.2.0/24")
    cli.run("network", "create", "--network-id", "b", "--network.ipv4-cidr", "100.64.3.0/24")
    na = cli.run("token", "create", "--token-id", "na", "--token.bindings",
                 "{role: network-admin, networks: [networks/a]}", "--token.expire-time", "+1d",
                 "-o", "secret").stdout.strip()
    assert na.startswith("mgtk_na.")

    node = cli.json("node", "create", "--parent", "networks/a", "--node-id", "gw", token=na)
    assert node["name"] == "networks/a/nodes/gw"
    nodes = cli.json("node", "list", "--parent", "networks/a", token=na)
    assert [n["name"] for n in nodes["nodes"]] == ["networks/a/nodes/gw"]
    assert cli.json("network", "get", "networks/a", token=na)["name"] == "networks/a"

    refused(cli.run("node", "create", "--parent", "networks/b", "--node-id", "gw", token=na, check=False),
            "PERMISSION_DENIED")
    refused(cli.run("node", "list", "--parent", "networks/b", token=na, check=False), "PERMISSION_DENIED")
    refused(cli.run("network", "get", "networks/b", token=na, check=False), "PERMISSION_DENIED")
    refused(cli.run("network", "delete", "networks/a", token=na, check=False), "PERMISSION_DENIED")
    refused(cli.run("network", "create", "--network-id", "c", "--network.ipv4-cidr", "100.64.4.0/24", token=na,
                    check=False), "PERMISSION_DENIED")
    refused(cli.run("token", "list", token=na, check=False), "PERMISSION_DENIED")
    assert not cli.json("node", "list", "--parent", "networks/b").get("nodes")  # nothing made in b

    listed = cli.json("network", "list", token=na)
    assert [n["name"] for n in listed["networks"]] == ["networks/a"]
    everything = {n["name"] for n in cli.json("network", "list")["networks"]}
    assert {"networks/a", "networks/b"} <= everything

    # The audit log, as far as network a goes.
    seen = cli.json("audit", "list", token=na)["audit_records"]
    assert seen and {r["network"] for r in seen} == {"a"}, seen
    assert any(r["resource"] == "networks/a/nodes/gw" and r["principal"] == "tokens/na" for r in seen)
    refused(cli.run("audit", "list", "--resource", "networks/b", token=na, check=False), "PERMISSION_DENIED")
    assert cli.json("audit", "list", "--resource", "networks/b", "--principal", "tokens/na")["audit_records"]

    ident = cli.json("token", "get-caller-identity", token=na)
    assert ident["principal"] == "tokens/na" and ident["authentication"] == "token"
    assert ident["bindings"] == [{"role": "network-admin", "networks": ["networks/a"]}]


# ---------------------------------------------------------------- 4. OIDC


ISSUER = "https://idp.test.invalid"
AUDIENCE = "meshgate-test"
KID = "k1"


def rsa_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_oidc_bearers_mapped_and_refused_with_reasons(etcd_server, etcd_prefix, tmp_path, monkeypatch):
    import jwt
    import yaml
    from cryptography.hazmat.primitives import serialization

    from meshgate.sdk import Client, errors

    key, impostor = rsa_key(), rsa_key()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=KID, use="sig", alg="RS256")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (tmp_path / "oidc.yaml").write_text(yaml.safe_dump({"issuers": [{
        "issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json",
        "roles": {"ops": [{"role": "viewer"}], "admins": [{"role": "admin"}]},
    }]}))

    def mint(sub="alice", groups=("admins",), *, iss=ISSUER, aud=AUDIENCE, exp_in=600, signer=None, kid=KID,
             **more):
        now = int(time.time())
        claims = {"iss": iss, "aud": aud, "sub": sub, "iat": now, "exp": now + exp_in, "groups": list(groups), **more}
        if sub is None:
            del claims["sub"]
        return jwt.encode(claims, signer or key, algorithm="RS256", headers={"kid": kid})

    def forged(alg: str, sign) -> str:
        """A token of the right issuer signed some other way (or not at all)."""
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        now = int(time.time())
        head = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": KID}).encode())
        body = b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 600,
                               "groups": ["admins"]}).encode())
        return f"{head}.{body}.{b64(sign(f'{head}.{body}'.encode()))}"

    for k in list(os.environ):
        if k.startswith("MESHGATE_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MESHGATE_CONFIG", str(tmp_path / "meshgate-config.yaml"))

    proc = controlplane(etcd_server, etcd_prefix, "--oidc-config", str(tmp_path / "oidc.yaml"))
    jwts: list[str] = []
    try:
        proc.start()
        admin_jwt, ops_jwt = mint("alice", ["admins"]), mint("bob", ["ops"])
        jwts += [admin_jwt, ops_jwt]

        with Client(proc.target, token=admin_jwt) as c:
            net = c.create_network(network_id="o", network={"ipv4_cidr": "100.64.9.0/24"})
            assert net.name == "networks/o"
            ident = c.get_caller_identity()
            assert (ident.principal, ident.authentication) == (f"oidc:{ISSUER}#alice", "oidc")
            assert [b.role for b in ident.bindings] == ["admin"]
            token = auth_pb2.Token(bindings=[auth_pb2.RoleBinding(role="viewer")])
            token.expire_time.FromSeconds(int(time.time()) + 3600)
            made = c.create_token(token_id="ci", token=token)
            jwts.append(made.secret)
            assert c.get_token(name="tokens/ci").creator == f"oidc:{ISSUER}#alice"

        with Client(proc.target, token=ops_jwt) as c:
            assert "networks/o" in [n.name for n in c.list_networks().networks]
            with pytest.raises(errors.PermissionDenied):
                c.create_network(network_id="p", network={"ipv4_cidr": "100.64.10.0/24"})

        # Groups that map to nothing: authenticated, allowed nothing.
        with Client(proc.target, token=mint("carol", ["strangers"])) as c:
            assert c.get_caller_identity().principal == f"oidc:{ISSUER}#carol"
            with pytest.raises(errors.PermissionDenied):
                c.list_networks()

        public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        bad = {  # what is wrong with it: (the token, the ErrorInfo reason expected)
            "wrong audience": (mint(aud="someone-else"), "OIDC_WRONG_AUDIENCE"),
            "unknown issuer": (mint(iss="https://elsewhere.test.invalid"), "OIDC_UNKNOWN_ISSUER"),
            "expired": (mint(exp_in=-300), "OIDC_EXPIRED"),
            "another key, same kid": (mint(signer=impostor), "OIDC_BAD_SIGNATURE"),
            "unknown kid": (mint(kid="k-unknown"), "OIDC_UNKNOWN_KEY"),
            "nbf in the future": (mint(nbf=int(time.time()) + 600), "OIDC_NOT_YET_VALID"),
            "no sub": (mint(sub=None), "OIDC_MISSING_CLAIM"),
            "HS256 keyed with the public key": (
                forged("HS256", lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()), "OIDC_BAD_SIGNATURE"),
            "alg none": (forged("none", lambda m: b""), "OIDC_BAD_SIGNATURE"),
        }
        jwts += [t for t, _ in bad.values()]
        got = {}
        for what, (token, _) in bad.items():
            with Client(proc.target, token=token) as c, pytest.raises(errors.Unauthenticated) as ei:
                c.list_networks()
            got[what] = ei.value.reason
            assert not leaked(token, ei.value.message), what
        assert got == {what: reason for what, (_, reason) in bad.items()}

        # The CLI says the same of the admin's JWT.
        cli = Cli(tmp_path / "meshgate-config.yaml")
        ident = json.loads(cli.run("--target", proc.target, "token", "get-caller-identity", "-o", "json",
                                   token=admin_jwt).stdout)
        assert ident["principal"] == f"oidc:{ISSUER}#alice" and ident["authentication"] == "oidc"

        # The audit log names the OIDC principals and holds no JWT.
        with Client(proc.target, token=admin_jwt) as c:
            records = list(c.iter_audit_records())
        assert any(r.principal == f"oidc:{ISSUER}#alice" and r.resource == "networks/o" and r.status_code == "OK"
                   for r in records)
        assert any(r.principal == f"oidc:{ISSUER}#bob" and r.status_code == "PERMISSION_DENIED" for r in records)
        text = "".join(str(r) for r in records)
        assert not [t for t in jwts if leaked(t, text)]

        # Key rotation: the JWKS file rewritten (replaced) is read again, no restart.
        k2 = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(impostor.public_key()))
        k2.update(kid="k2", use="sig", alg="RS256")
        new_jwks = tmp_path / "jwks.json.new"
        new_jwks.write_text(json.dumps({"keys": [jwk, k2]}))
        os.replace(new_jwks, tmp_path / "jwks.json")
        rotated = mint("dave", ["ops"], signer=impostor, kid="k2")
        jwts.append(rotated)
        with Client(proc.target, token=rotated) as c:
            assert c.get_caller_identity().principal == f"oidc:{ISSUER}#dave"
            # A broken rewrite keeps the last good keys.
            (tmp_path / "jwks.json").write_text('{"keys": [')
            assert c.get_caller_identity().principal == f"oidc:{ISSUER}#dave"
    finally:
        proc.stop()
    log = proc.log(tail=0)
    assert not [t for t in jwts if leaked(t, log)]
