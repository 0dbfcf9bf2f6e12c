"""OIDC bearer verification against a test identity provider made here.

Real keys (RSA, EC P-256, Ed25519 from `cryptography`), real JWKS files and a
real JWKS endpoint (`http.server` on 127.0.0.1, port 0); tokens are minted by
PyJWT, or by hand where PyJWT refuses to make the forgery (alg "none", HS256
keyed with the public key). Every refusal asserts its specific reason, and
that neither the token nor its signature reaches the message or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from meshgate.controlplane.auth.oidc import IssuerConfig, OidcRefused, OidcVerifier, load_config
from meshgate.controlplane.auth.principal import Binding, make_binding

ISS = "https://idp.test"
ISS_B = "https://other-idp.test"
AUD = "meshgate"
DROP = object()  # a claim value meaning "leave the claim out"

RSA_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_A2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_EVIL = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_A = ec.generate_private_key(ec.SECP256R1())
ED_A = ed25519.Ed25519PrivateKey.generate()

ADMIN = make_binding("admin", [], [])
NETOPS = make_binding("network-admin", [], ["networks/prod"])
DEPLOYER = make_binding("", ["enrollmentKeys.create", "secrets.read"], ["networks/prod"])
ROLE_MAP: tuple[tuple[str, tuple[Binding, ...]], ...] = (
    ("platform-admins", (ADMIN,)),
    ("netops", (NETOPS,)),
    ("deployer", (DEPLOYER,)),
)

_minted: list[str] = []  # every token made by the running test (for the leak check)


def jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        out = RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        out = ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        out = OKPAlgorithm.to_jwk(pub, as_dict=True)
    return {**out, "kid": kid, "alg": alg, "use": "sig"}


def jwks(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace the file atomically, as a deployment would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": now, "exp": now + 300,
                           "groups": ["netops"]}
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not DROP}


def mint(key: Any = RSA_A, kid: str | None = "a1", alg: str = "RS256", **overrides: Any) -> str:
    token = jwt.encode(claims(**overrides), key, algorithm=alg, headers={"kid": kid} if kid is not None else None)
    _minted.append(token)
    return token


def mint_raw(payload: dict[str, Any], key: Any = RSA_A, kid: str = "a1", alg: str = "RS256") -> str:
    """A properly signed token with claims PyJWT's encode() would refuse to make."""
    token = jwt.PyJWS().encode(json.dumps(payload).encode(), key, algorithm=alg, headers={"kid": kid})
    _minted.append(token)
    return token


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """A token built without PyJWT (for forgeries it refuses to make)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = b64(sign(signing_input.encode())) if sign else ""
    token = f"{signing_input}.{sig}"
    _minted.append(token)
    return token


@pytest.fixture(autouse=True)
def no_token_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """After each test: no minted token, payload or signature in any log record."""
    _minted.clear()
    caplog.set_level(logging.DEBUG, logger="meshgate.controlplane.auth.oidc")
    yield
    text = "\n".join(r.getMessage() + (caplog.handler.formatter.formatException(r.exc_info) if r.exc_info else "")
                     for r in caplog.records)
    for token in _minted:
        _, payload, sig = token.split(".")
        assert token not in text
        assert payload not in text
        assert not sig or sig not in text


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "idp-jwks.json"
    write_json(path, jwks(jwk(RSA_A, "a1", "RS256"), jwk(EC_A, "a-ec", "ES256"), jwk(ED_A, "a-ed", "EdDSA")))
    return path


def config(jwks_file: Path | str = "", **overrides: Any) -> IssuerConfig:
    kwargs: dict[str, Any] = {"issuer": ISS, "audience": AUD, "role_map": ROLE_MAP}
    if jwks_file:
        kwargs["jwks_file"] = str(jwks_file)
    kwargs.update(overrides)
    return IssuerConfig(**kwargs)


@pytest.fixture
def verifier(jwks_file: Path, tmp_path: Path) -> OidcVerifier:
    b_file = tmp_path / "b-jwks.json"
    write_json(b_file, jwks(jwk(RSA_B, "b1", "RS256")))
    return OidcVerifier([config(jwks_file), IssuerConfig(issuer=ISS_B, audience="other", jwks_file=str(b_file))])


async def refused(verifier: OidcVerifier, token: str, reason: str) -> OidcRefused:
    with pytest.raises(OidcRefused) as info:
        await verifier.verify(token)
    err = info.value
    assert err.reason == reason, err.message
    sig = token.rsplit(".", 1)[-1]
    for text in (err.message, str(err)):
        assert not token or token not in text
        assert not sig or sig not in text
    return err


# --- accepted tokens ------------------------------------------------------------

async def test_valid_token_gives_principal_with_scoped_bindings(verifier: OidcVerifier) -> None:
    exp = int(time.time()) + 600
    p = await verifier.verify(mint(groups=["netops", "deployer", "unmapped"], exp=exp))
    assert p.name == f"oidc:{ISS}#alice"
    assert p.authentication == "oidc"
    assert p.bindings == (NETOPS, DEPLOYER)
    assert p.expire_time == float(exp)
    assert NETOPS.networks == frozenset({"prod"})
    assert p.allows("nodes.update", "prod")
    assert not p.allows("nodes.update", "staging")
    assert not p.allows("networks.create", None)
    assert p.allows("secrets.read", "prod")


async def test_admin_group_and_string_roles_claim(verifier: OidcVerifier) -> None:
    p = await verifier.verify(mint(groups="platform-admins"))
    assert p.bindings == (ADMIN,)
    assert p.allows("networks.create", None)


async def test_duplicate_groups_give_one_binding(verifier: OidcVerifier) -> None:
    p = await verifier.verify(mint(groups=["netops", "netops", 7, None]))
    assert p.bindings == (NETOPS,)


async def test_unmapped_or_absent_groups_authenticate_with_no_bindings(verifier: OidcVerifier) -> None:
    for groups in (["nobody"], DROP, {"netops": True}):
        p = await verifier.verify(mint(groups=groups))
        assert p.name == f"oidc:{ISS}#alice"
        assert p.bindings == ()
        assert not p.allows("nodes.get", "prod")


@pytest.mark.parametrize(("key", "kid", "alg"), [(RSA_A, "a1", "RS256"), (EC_A, "a-ec", "ES256"),
                                                 (ED_A, "a-ed", "EdDSA")])
async def test_each_key_type_verifies(verifier: OidcVerifier, key: Any, kid: str, alg: str) -> None:
    p = await verifier.verify(mint(key, kid, alg, sub="bob"))
    assert p.name == f"oidc:{ISS}#bob"


async def test_audience_list_containing_ours_is_accepted(verifier: OidcVerifier) -> None:
    p = await verifier.verify(mint(aud=["some-api", AUD]))
    assert p.name == f"oidc:{ISS}#alice"


async def test_principal_and_roles_claims_are_configurable(jwks_file: Path) -> None:
    v = OidcVerifier([config(jwks_file, principal_claim="email", roles_claim="roles")])
    p = await v.verify(mint(email="alice@example.com", roles=["deployer"], groups=["platform-admins"]))
    assert p.name == f"oidc:{ISS}#alice@example.com"
    assert p.bindings == (DEPLOYER,)
    err = await refused(v, mint(roles=["deployer"]), "OIDC_MISSING_CLAIM")
    assert "email" in err.message


async def test_expiry_within_leeway_is_accepted(verifier: OidcVerifier) -> None:
    exp = int(time.time()) - 10  # leeway is 30 s
    p = await verifier.verify(mint(exp=exp))
    assert p.expire_time == float(exp)


# --- refusals ---------------------------------------------------------------------

async def test_unknown_issuer(verifier: OidcVerifier) -> None:
    # Issuer C is configured nowhere, even with a key of issuer A.
    err = await refused(verifier, mint(iss="https://unknown-idp.test"), "OIDC_UNKNOWN_ISSUER")
    assert "unknown-idp" in err.message
    # A verifier that only knows issuer A refuses issuer B's genuine token.
    only_a = OidcVerifier([config(verifier._issuers[ISS].jwks_file)])
    await refused(only_a, mint(RSA_B, "b1", iss=ISS_B, aud="other"), "OIDC_UNKNOWN_ISSUER")
    await refused(verifier, mint(iss=DROP), "OIDC_MISSING_CLAIM")
    await refused(verifier, mint_raw(claims(iss=[ISS])), "OIDC_UNKNOWN_ISSUER")


async def test_issuer_b_is_verified_with_its_own_keys(verifier: OidcVerifier) -> None:
    p = await verifier.verify(mint(RSA_B, "b1", iss=ISS_B, aud="other"))
    assert p.name == f"oidc:{ISS_B}#alice"
    assert p.bindings == ()  # B has no role map
    # B's key cannot sign for A: A does not publish b1, and A's a1 is not B's key.
    await refused(verifier, mint(RSA_B, "b1", iss=ISS), "OIDC_UNKNOWN_KEY")
    await refused(verifier, mint(RSA_B, "a1", iss=ISS), "OIDC_BAD_SIGNATURE")


async def test_wrong_audience(verifier: OidcVerifier) -> None:
    await refused(verifier, mint(aud="other"), "OIDC_WRONG_AUDIENCE")
    await refused(verifier, mint(aud=["x", "y"]), "OIDC_WRONG_AUDIENCE")
    # issuer B's audience on a token of issuer A
    await refused(verifier, mint(RSA_B, "b1", iss=ISS_B, aud=AUD), "OIDC_WRONG_AUDIENCE")


async def test_expired(verifier: OidcVerifier) -> None:
    await refused(verifier, mint(exp=int(time.time()) - 120), "OIDC_EXPIRED")


async def test_not_yet_valid(verifier: OidcVerifier) -> None:
    await refused(verifier, mint(nbf=int(time.time()) + 120), "OIDC_NOT_YET_VALID")
    await refused(verifier, mint(iat=int(time.time()) + 120), "OIDC_NOT_YET_VALID")


async def test_bad_signature_same_kid_other_key(verifier: OidcVerifier) -> None:
    await refused(verifier, mint(RSA_EVIL, "a1"), "OIDC_BAD_SIGNATURE")


async def test_tampered_payload(verifier: OidcVerifier) -> None:
    header, _, sig = mint(groups=["netops"]).split(".")
    forged = f"{header}.{b64(json.dumps(claims(groups=['platform-admins'])).encode())}.{sig}"
    _minted.append(forged)
    await refused(verifier, forged, "OIDC_BAD_SIGNATURE")


async def test_unknown_or_missing_kid(verifier: OidcVerifier) -> None:
    err = await refused(verifier, mint(RSA_A2, "a2"), "OIDC_UNKNOWN_KEY")
    assert "'a2'" in err.message
    await refused(verifier, mint(kid=None), "OIDC_UNKNOWN_KEY")


async def test_alg_none_is_refused(verifier: OidcVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        token = hand_made({"alg": alg, "typ": "JWT", "kid": "a1"}, claims(groups=["platform-admins"]))
        assert OidcVerifier.looks_like_jwt(token)
        await refused(verifier, token, "OIDC_BAD_SIGNATURE")


async def test_hs256_keyed_with_the_public_key_is_refused(verifier: OidcVerifier) -> None:
    """Algorithm confusion: an HMAC keyed with the (public) RSA key, in each
    form an attacker could find it."""
    pub = RSA_A.public_key()
    secrets = [
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        json.dumps(jwk(RSA_A, "a1", "RS256")).encode(),
    ]
    for secret in secrets:
        token = hand_made({"alg": "HS256", "typ": "JWT", "kid": "a1"}, claims(groups=["platform-admins"]),
                          lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest())
        await refused(verifier, token, "OIDC_BAD_SIGNATURE")


async def test_token_alg_must_match_the_keys_alg(verifier: OidcVerifier) -> None:
    # ES256 is allowed for the issuer, but a1 is an RS256 key.
    await refused(verifier, mint(EC_A, "a1", "ES256"), "OIDC_BAD_SIGNATURE")
    # RS384 is not among the issuer's algorithms at all.
    await refused(verifier, mint(RSA_A, "a1", "RS384"), "OIDC_BAD_SIGNATURE")


async def test_alg_outside_the_issuers_list(jwks_file: Path) -> None:
    v = OidcVerifier([config(jwks_file, algorithms=("RS256",))])
    assert (await v.verify(mint())).name == f"oidc:{ISS}#alice"
    await refused(v, mint(EC_A, "a-ec", "ES256"), "OIDC_BAD_SIGNATURE")


@pytest.mark.parametrize("claim", ["sub", "exp", "aud"])
async def test_missing_required_claim(verifier: OidcVerifier, claim: str) -> None:
    err = await refused(verifier, mint(**{claim: DROP}), "OIDC_MISSING_CLAIM")
    assert claim in err.message


async def test_malformed(verifier: OidcVerifier) -> None:
    for token in ("", "not-a-jwt", "a.b.c", "mgtk_abc.secret", "x" * 20000):
        await refused(verifier, token, "OIDC_MALFORMED")
    await refused(verifier, mint(sub=123), "OIDC_MALFORMED")
    await refused(verifier, mint(sub=""), "OIDC_MALFORMED")
    await refused(verifier, mint(sub="eve\nforged log line"), "OIDC_MALFORMED")
    await refused(verifier, mint(exp="soon"), "OIDC_MALFORMED")


def test_looks_like_jwt() -> None:
    assert OidcVerifier.looks_like_jwt(mint())
    assert OidcVerifier.looks_like_jwt(mint(EC_A, "a-ec", "ES256"))
    for token in ("mgtk_abc123.c2VjcmV0", "a.b", "a.b.c", "", "..", f"{b64(b'{}')}.{b64(b'{}')}.x",
                  f"{b64(b'not json')}.e30.x", "e30.e30.x!", f"{mint()}.extra"):
        assert not OidcVerifier.looks_like_jwt(token), token


# --- JWKS file ----------------------------------------------------------------------

async def test_jwks_file_rotation_without_restart(verifier: OidcVerifier, jwks_file: Path) -> None:
    old, new = mint(RSA_A, "a1"), mint(RSA_A2, "a2")
    assert (await verifier.verify(old)).name == f"oidc:{ISS}#alice"
    await refused(verifier, new, "OIDC_UNKNOWN_KEY")

    write_json(jwks_file, jwks(jwk(RSA_A, "a1", "RS256"), jwk(RSA_A2, "a2", "RS256")))
    assert (await verifier.verify(new)).name == f"oidc:{ISS}#alice"
    assert (await verifier.verify(old)).name == f"oidc:{ISS}#alice"

    write_json(jwks_file, jwks(jwk(RSA_A2, "a2", "RS256")))  # a1 retired
    await refused(verifier, old, "OIDC_UNKNOWN_KEY")
    assert (await verifier.verify(new)).name == f"oidc:{ISS}#alice"


async def test_jwks_file_rewritten_in_place_is_reloaded(verifier: OidcVerifier, jwks_file: Path) -> None:
    new = mint(RSA_A2, "a2")
    await refused(verifier, new, "OIDC_UNKNOWN_KEY")
    jwks_file.write_text(json.dumps(jwks(jwk(RSA_A, "a1", "RS256"), jwk(RSA_A2, "a2", "RS256"))))
    assert (await verifier.verify(new)).name == f"oidc:{ISS}#alice"


async def test_broken_jwks_rewrite_keeps_last_keys(verifier: OidcVerifier, jwks_file: Path) -> None:
    token = mint()
    await verifier.verify(token)
    jwks_file.write_text('{"keys": [')
    assert (await verifier.verify(token)).name == f"oidc:{ISS}#alice"
    jwks_file.unlink()
    assert (await verifier.verify(token)).name == f"oidc:{ISS}#alice"


async def test_symmetric_keys_in_the_jwks_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    secret = b"0123456789abcdef0123456789abcdef"
    write_json(path, jwks({"kty": "oct", "kid": "k", "k": b64(secret)}, jwk(RSA_A, "a1", "RS256")))
    v = OidcVerifier([config(path)])
    token = hand_made({"alg": "HS256", "kid": "k"}, claims(),
                      lambda data: hmac.new(secret, data, hashlib.sha256).digest())
    await refused(v, token, "OIDC_BAD_SIGNATURE")
    # Even if the issuer's algorithms were checked later, the oct key is no key.
    v2 = OidcVerifier([config(path)])
    token2 = hand_made({"alg": "RS256", "kid": "k"}, claims(), lambda data: b"x" * 256)
    await refused(v2, token2, "OIDC_UNKNOWN_KEY")


async def test_missing_jwks_file_is_unavailable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    v = OidcVerifier([config(tmp_path / "absent.json")])
    for _ in range(5):
        await refused(v, mint(), "OIDC_UNAVAILABLE")
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # logged once, not per token
    (tmp_path / "absent.json").write_text("not json")
    await refused(v, mint(), "OIDC_UNAVAILABLE")
    write_json(tmp_path / "absent.json", jwks(jwk(RSA_A, "a1", "RS256")))
    assert (await v.verify(mint())).name == f"oidc:{ISS}#alice"


# --- JWKS URL -----------------------------------------------------------------------

class JwksEndpoint:
    """A JWKS served over real HTTP on 127.0.0.1, counting the requests."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = jwks(jwk(RSA_A, "a1", "RS256"))
        self.body: bytes | None = None  # served instead of the JWKS when set
        self.status = 200
        self.delay = 0.0  # seconds before answering
        self.hits = 0
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with endpoint.lock:
                    endpoint.hits += 1
                    body = endpoint.body if endpoint.body is not None else json.dumps(endpoint.jwks).encode()
                    status, delay = endpoint.status, endpoint.delay
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), name="jwks-endpoint",
                                       daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/.well-known/jwks.json"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def endpoint() -> Iterator[JwksEndpoint]:
    ep = JwksEndpoint()
    ep.thread.start()
    try:
        yield ep
    finally:
        ep.close()


async def test_jwks_url_is_fetched_once_and_cached(endpoint: JwksEndpoint) -> None:
    v = OidcVerifier([config(jwks_url=endpoint.url)])
    assert endpoint.hits == 0  # nothing fetched before the first token
    p = await v.verify(mint())
    assert p.name == f"oidc:{ISS}#alice" and p.bindings == (NETOPS,)
    assert endpoint.hits == 1
    for _ in range(5):
        await v.verify(mint(sub="bob"))
    assert endpoint.hits == 1


async def test_concurrent_first_verifies_fetch_once(endpoint: JwksEndpoint) -> None:
    v = OidcVerifier([config(jwks_url=endpoint.url)])
    out = await asyncio.gather(*(v.verify(mint(sub=f"u{i}")) for i in range(20)))
    assert sorted(p.name for p in out) == sorted(f"oidc:{ISS}#u{i}" for i in range(20))
    assert endpoint.hits == 1


async def test_unknown_kid_refetches_at_most_once_per_interval(endpoint: JwksEndpoint) -> None:
    v = OidcVerifier([config(jwks_url=endpoint.url)], unknown_kid_refetch_s=0.3)
    await v.verify(mint())
    assert endpoint.hits == 1
    endpoint.jwks = jwks(jwk(RSA_A, "a1", "RS256"), jwk(RSA_A2, "a2", "RS256"))
    new = mint(RSA_A2, "a2")
    # Right after a fetch: no refetch, however many tokens name the new kid.
    for _ in range(5):
        await refused(v, new, "OIDC_UNKNOWN_KEY")
    assert endpoint.hits == 1
    await asyncio.sleep(0.35)
    assert (await v.verify(new)).name == f"oidc:{ISS}#alice"
    assert endpoint.hits == 2
    # Made-up kids: one refetch per interval at most.
    for _ in range(5):
        await refused(v, mint(RSA_EVIL, "made-up"), "OIDC_UNKNOWN_KEY")
    assert endpoint.hits == 2
    await asyncio.sleep(0.35)
    for _ in range(5):
        await refused(v, mint(RSA_EVIL, "made-up"), "OIDC_UNKNOWN_KEY")
    assert endpoint.hits == 3
    assert (await v.verify(mint())).name == f"oidc:{ISS}#alice"
    assert endpoint.hits == 3


async def test_unknown_kid_with_default_interval_does_not_refetch(endpoint: JwksEndpoint) -> None:
    v = OidcVerifier([config(jwks_url=endpoint.url)])
    await v.verify(mint())
    for _ in range(10):
        await refused(v, mint(RSA_A2, "a2"), "OIDC_UNKNOWN_KEY")
    assert endpoint.hits == 1


async def test_jwks_url_refusals_are_specific(endpoint: JwksEndpoint) -> None:
    v = OidcVerifier([config(jwks_url=endpoint.url)])
    await refused(v, mint(RSA_EVIL, "a1"), "OIDC_BAD_SIGNATURE")
    await refused(v, mint(aud="other"), "OIDC_WRONG_AUDIENCE")
    await refused(v, mint(exp=int(time.time()) - 120), "OIDC_EXPIRED")


async def test_unreachable_or_broken_jwks_url_is_unavailable(endpoint: JwksEndpoint) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    v = OidcVerifier([config(jwks_url=f"http://127.0.0.1:{closed_port}/jwks.json")])
    await refused(v, mint(), "OIDC_UNAVAILABLE")

    endpoint.status = 500
    v = OidcVerifier([config(jwks_url=endpoint.url)])
    await refused(v, mint(), "OIDC_UNAVAILABLE")
    endpoint.status, endpoint.body = 200, b"<html>not json</html>"
    await refused(v, mint(), "OIDC_UNAVAILABLE")
    endpoint.body = b'{"keys": []}'
    await refused(v, mint(), "OIDC_UNAVAILABLE")
    endpoint.body = None  # recovered: the next token fetches again
    assert (await v.verify(mint())).name == f"oidc:{ISS}#alice"


async def test_callers_queued_behind_a_failed_fetch_share_its_failure(endpoint: JwksEndpoint) -> None:
    endpoint.status, endpoint.delay = 503, 0.1
    v = OidcVerifier([config(jwks_url=endpoint.url)])
    out = await asyncio.gather(*(v.verify(mint()) for _ in range(10)), return_exceptions=True)
    assert all(isinstance(e, OidcRefused) and e.reason == "OIDC_UNAVAILABLE" for e in out), out
    assert endpoint.hits == 1
    endpoint.status, endpoint.delay = 200, 0.0
    assert (await v.verify(mint())).name == f"oidc:{ISS}#alice"
    assert endpoint.hits == 2


# --- configuration ------------------------------------------------------------------

def test_issuer_config_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        IssuerConfig(issuer=ISS, audience=AUD)
    with pytest.raises(ValueError, match="exactly one"):
        IssuerConfig(issuer=ISS, audience=AUD, jwks_file="/x", jwks_url="https://idp.test/jwks")
    with pytest.raises(ValueError, match="https"):
        IssuerConfig(issuer=ISS, audience=AUD, jwks_url="http://idp.test/jwks")
    with pytest.raises(ValueError, match="https"):
        IssuerConfig(issuer=ISS, audience=AUD, jwks_url="file:///etc/passwd")
    for alg in ("none", "HS256", "hs512", "XYZ"):
        with pytest.raises(ValueError, match="algorithm"):
            IssuerConfig(issuer=ISS, audience=AUD, jwks_file="/x", algorithms=("RS256", alg))
    IssuerConfig(issuer=ISS, audience=AUD, jwks_url="http://127.0.0.1:1/jwks")
    IssuerConfig(issuer=ISS, audience=AUD, jwks_url="http://localhost:1/jwks")
    IssuerConfig(issuer=ISS, audience=AUD, jwks_url="http://[::1]:1/jwks")
    with pytest.raises(ValueError, match="twice"):
        OidcVerifier([config("/x"), config("/y")])


EXAMPLE = """\
issuers:
  - issuer: https://idp.test
    audience: meshgate
    jwks_file: idp-jwks.json
    principal_claim: email
    roles_claim: groups
    roles:
      platform-admins: [{role: admin}]
      netops: [{role: network-admin, networks: [networks/prod]}]
      deployer: [{permissions: [enrollmentKeys.create, secrets.read], networks: [networks/prod]}]
    algorithms: [RS256, ES256]
    leeway: 10
  - issuer: https://other-idp.test
    audience: other
    jwks_url: https://other-idp.test/.well-known/jwks.json
"""


async def test_load_config_example(tmp_path: Path, jwks_file: Path) -> None:
    path = tmp_path / "oidc.yaml"
    path.write_text(EXAMPLE)
    a, b = load_config(str(path))
    assert a == IssuerConfig(issuer=ISS, audience=AUD, jwks_file=str(jwks_file), principal_claim="email",
                             roles_claim="groups", role_map=ROLE_MAP, algorithms=("RS256", "ES256"), leeway_s=10.0)
    assert b == IssuerConfig(issuer=ISS_B, audience="other", jwks_url="https://other-idp.test/.well-known/jwks.json")
    assert (b.principal_claim, b.roles_claim, b.algorithms, b.leeway_s, b.role_map) == \
        ("sub", "groups", ("RS256", "ES256", "EdDSA"), 30.0, ())
    # end to end: the loaded configuration verifies a token
    p = await OidcVerifier([a]).verify(mint(email="ops@example.com", groups=["platform-admins", "deployer"]))
    assert p.name == f"oidc:{ISS}#ops@example.com"
    assert p.bindings == (ADMIN, DEPLOYER)


def test_load_config_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "oidc.yaml"
    path.write_text("issuers: []\n")
    assert load_config(str(path)) == []


def _entry(extra: str = "", source: str = "jwks_file: /etc/jwks.json") -> str:
    return textwrap.dedent("""\
        issuers:
          - issuer: https://idp.test
            audience: meshgate
        """) + "".join(f"    {line}\n" for line in (source + "\n" + extra).strip("\n").splitlines())


@pytest.mark.parametrize(("text", "key", "detail"), [
    ("issuers: []\nextra: 1\n", "extra", "unknown key"),
    ("issuer: x\n", "issuers", "missing"),
    ("issuers: {a: 1}\n", "issuers", "list"),
    (_entry("audiences: [x]"), "issuers[0].audiences", "unknown key"),
    (_entry("roles:\n  ops: [{role: superuser}]"), "issuers[0].roles.ops[0]", "unknown role"),
    (_entry("roles:\n  ops: [{permissions: [nodes.fly]}]"), "issuers[0].roles.ops[0]", "unknown permission"),
    (_entry("roles:\n  ops: [{role: viewer, scope: x}]"), "issuers[0].roles.ops[0].scope", "unknown key"),
    (_entry("roles:\n  ops: [{role: viewer, networks: [prod]}]"), "issuers[0].roles.ops[0]", "network name"),
    (_entry("roles:\n  ops: [{role: admin, networks: [networks/prod]}]"), "issuers[0].roles.ops[0]", "never scoped"),
    (_entry("roles:\n  ops: {role: viewer}"), "issuers[0].roles.ops", "list of bindings"),
    (_entry("jwks_url: https://idp.test/jwks"), "issuers[0].jwks_file", "exactly one"),
    (_entry(source="principal_claim: sub"), "issuers[0].jwks_file", "exactly one"),
    (_entry(source="jwks_url: http://idp.test/jwks"), "issuers[0].jwks_url", "https"),
    (_entry("algorithms: [RS256, none]"), "issuers[0].algorithms", "not allowed"),
    (_entry("algorithms: [HS256]"), "issuers[0].algorithms", "not allowed"),
    (_entry("algorithms: RS256"), "issuers[0].algorithms", "list of strings"),
    (_entry("leeway: -1"), "issuers[0].leeway", ">= 0"),
    (_entry("leeway: soon"), "issuers[0].leeway", "number"),
    (_entry("audience: again"), "", "duplicate key"),
    ("issuers:\n  - audience: meshgate\n    jwks_file: /x\n", "issuers[0].issuer", "missing"),
    ("issuers:\n  - issuer: https://idp.test\n    jwks_file: /x\n", "issuers[0].audience", "missing"),
    ("issuers:\n  - issuer: https://idp.test\n    audience: ''\n    jwks_file: /x\n",
     "issuers[0].audience", "non-empty"),
    (_entry() + "  - issuer: https://idp.test\n    audience: again\n    jwks_url: https://idp.test/jwks\n",
     "issuers[1].issuer", "already configured"),
    ("issuers: [\n", "", "not valid YAML"),
])
def test_load_config_errors(tmp_path: Path, text: str, key: str, detail: str) -> None:
    path = tmp_path / "oidc.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert key in msg and detail in msg, msg


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read") as info:
        load_config(str(tmp_path / "nope.yaml"))
    assert str(tmp_path / "nope.yaml") in str(info.value)
