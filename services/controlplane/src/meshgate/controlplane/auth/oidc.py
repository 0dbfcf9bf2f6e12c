"""OIDC bearer tokens: verify an identity provider's JWT, map its claims to bindings.

An operator configures the identity providers (issuers) the control plane
trusts in a YAML file (see `load_config`). A caller presents the IdP's JWT (an
ID or access token) as its bearer; `OidcVerifier.verify` checks it with PyJWT
against the issuer's published keys (a JWKS file or URL) and returns a
`Principal` named `oidc:{issuer}#{principal claim}` whose bindings are the
union of the role map's entries for every value of the roles claim.

Hazards:
- Nothing read from the token before its signature is checked is trusted: the
  unverified `iss` only picks which configuration to check it against, `kid`
  only picks a key of that issuer, and `alg` only has to be one the issuer
  allows. `jwt.decode` then checks the signature with the key's own algorithm
  and re-checks `iss`, `aud` and the times.
- Symmetric algorithms (HS*) and "none" are never accepted, not even from
  configuration: a JWKS holds public keys, and an HS* check keyed with one is
  the classic algorithm-confusion forgery.
- A token, or any part of it, never reaches a log line; an `OidcRefused`
  message never holds the token or its signature, and echoes only the
  unverified `iss`, `alg` or `kid` that made it refuse, with `repr`,
  truncated (so control characters cannot forge lines downstream).
- A JWKS file is re-read when its mtime, ctime, size or inode changes
  (checked on every call: one `stat`, and the read is synchronous: the file
  is small and local); a broken rewrite keeps the last good keys. A JWKS
  URL is fetched by PyJWT's `PyJWKClient` in a worker thread, one fetch at a
  time per issuer, and cached for `JWKS_LIFESPAN_S`; a token naming a key the
  cache lacks causes a refetch only if no fetch happened in the last
  `unknown_kid_refetch_s` (60 s), so made-up `kid`s cannot make the control
  plane hammer the IdP, and a newly published key may wait that long. While
  the URL is unreachable and the cache has expired, every token of that
  issuer is refused with OIDC_UNAVAILABLE (no stale keys are used).
- A token whose claims map to no binding still authenticates, with no
  bindings: the access guard then refuses it with PERMISSION_DENIED. The
  token's lifetime is the IdP's: a principal is not revoked before its `exp`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import jwt
import yaml
from jwt import PyJWK, PyJWKClient, PyJWKSet

from meshgate.controlplane.auth.principal import Binding, Principal, make_binding

log = logging.getLogger(__name__)

# Asymmetric JWS algorithms an issuer may be configured with.
SUPPORTED_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
})
JWKS_LIFESPAN_S = 300.0
JWKS_TIMEOUT_S = 10.0
UNKNOWN_KID_REFETCH_S = 60.0
MAX_TOKEN_LEN = 16 * 1024  # bytes; longer bearers are refused before any parsing

OIDC_MALFORMED = "OIDC_MALFORMED"
OIDC_WRONG_ISSUER = "OIDC_WRONG_ISSUER"
OIDC_UNKNOWN_ISSUER = "OIDC_UNKNOWN_ISSUER"
OIDC_WRONG_AUDIENCE = "OIDC_WRONG_AUDIENCE"
OIDC_EXPIRED = "OIDC_EXPIRED"
OIDC_NOT_YET_VALID = "OIDC_NOT_YET_VALID"
OIDC_BAD_SIGNATURE = "OIDC_BAD_SIGNATURE"
OIDC_UNKNOWN_KEY = "OIDC_UNKNOWN_KEY"
OIDC_MISSING_CLAIM = "OIDC_MISSING_CLAIM"
OIDC_UNAVAILABLE = "OIDC_UNAVAILABLE"


class OidcRefused(Exception):
    """A bearer JWT was refused.

    `reason` is the ErrorInfo reason (one of the `OIDC_*` constants);
    `message` is for the caller and never contains the token or any part of
    its signature.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _shown(value: Any, limit: int = 80) -> str:
    """An unverified value, safe to echo in a message or log line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConfigError(ValueError):
    """An invalid IssuerConfig field (`field` is the dataclass field's name)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class IssuerConfig:
    """One identity provider the control plane trusts; ValueError when invalid."""

    issuer: str
    """The exact `iss` value of its tokens (compared as a string, no normalising)."""
    audience: str
    """The `aud` value its tokens must carry (one of, when `aud` is a list)."""
    jwks_file: str = ""
    """A JWKS JSON file with its public keys; exactly one of jwks_file / jwks_url."""
    jwks_url: str = ""
    """An https URL serving its JWKS (http only for loopback hosts, for tests)."""
    principal_claim: str = "sub"
    """The claim naming the caller; the principal is `oidc:{issuer}#{value}`."""
    roles_claim: str = "groups"
    """The claim (a string or a list of strings) whose values `role_map` maps."""
    role_map: tuple[tuple[str, tuple[Binding, ...]], ...] = ()
    """Roles claim value -> the bindings it gives (built with `make_binding`)."""
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    """The JWS algorithms accepted; asymmetric only (never "none", never HS*)."""
    leeway_s: float = 30.0
    """Clock skew allowed on exp, nbf and iat, in seconds."""

    def __post_init__(self) -> None:
        for attr in ("issuer", "audience", "principal_claim", "roles_claim"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not value:
                raise ConfigError(attr, "must be a non-empty string")
        if bool(self.jwks_file) == bool(self.jwks_url):
            raise ConfigError("jwks_file", "give exactly one of jwks_file and jwks_url")
        if self.jwks_url:
            url = urlparse(self.jwks_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError("jwks_url", f"{self.jwks_url!r} is not an https URL")
            if url.scheme == "http" and not _loopback(url.hostname):
                raise ConfigError("jwks_url", f"{self.jwks_url!r} must be https (http only for loopback hosts)")
        if not self.algorithms:
            raise ConfigError("algorithms", "must not be empty")
        for alg in self.algorithms:
            if not isinstance(alg, str) or alg.lower() == "none" or alg.upper().startswith("HS"):
                raise ConfigError("algorithms", f"{alg!r} is not allowed (symmetric and unsigned tokens never are)")
            if alg not in SUPPORTED_ALGORITHMS:
                raise ConfigError("algorithms",
                                  f"unknown algorithm {alg!r}; supported: {', '.join(sorted(SUPPORTED_ALGORITHMS))}")
        if (isinstance(self.leeway_s, bool) or not isinstance(self.leeway_s, (int, float))
                or not math.isfinite(self.leeway_s) or self.leeway_s < 0):
            raise ConfigError("leeway_s", "must be a finite number of seconds >= 0")
        for value, bindings in self.role_map:
            if not isinstance(value, str) or not all(isinstance(b, Binding) for b in bindings):
                raise ConfigError("role_map", "maps strings to tuples of Binding")


# --- configuration file ------------------------------------------------------

_ISSUER_KEYS = ("issuer", "audience", "jwks_file", "jwks_url", "principal_claim", "roles_claim", "roles",
                "algorithms", "leeway")
_BINDING_KEYS = ("role", "permissions", "networks")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping with the same key twice."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # construct_mapping refuses it
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: must be a list of strings")
    return value


def _bindings(value: Any, where: str) -> tuple[Binding, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: must be a list of bindings ({{role: ...}} or {{permissions: [...]}})")
    out = []
    for j, item in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(item, dict):
            raise ValueError(f"{at}: must be a mapping with keys {', '.join(_BINDING_KEYS)}")
        unknown = [k for k in item if k not in _BINDING_KEYS]
        if unknown:
            raise ValueError(f"{at}.{unknown[0]}: unknown key; keys: {', '.join(_BINDING_KEYS)}")
        role = item.get("role", "")
        if not isinstance(role, str):
            raise ValueError(f"{at}.role: must be a string")
        permissions = _str_list(item.get("permissions", []), f"{at}.permissions")
        networks = _str_list(item.get("networks", []), f"{at}.networks")
        try:
            out.append(make_binding(role, permissions, networks))
        except ValueError as e:
            raise ValueError(f"{at}: {e}") from None
    return tuple(out)


def _issuer(entry: Any, where: str, base_dir: str) -> IssuerConfig:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a mapping")
    unknown = [k for k in entry if k not in _ISSUER_KEYS]
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; keys: {', '.join(_ISSUER_KEYS)}")
    for key in ("issuer", "audience"):
        if key not in entry:
            raise ValueError(f"{where}.{key}: missing")
    kwargs: dict[str, Any] = {}
    for key in ("issuer", "audience", "jwks_file", "jwks_url", "principal_claim", "roles_claim"):
        if key in entry:
            if not isinstance(entry[key], str) or not entry[key]:
                raise ValueError(f"{where}.{key}: must be a non-empty string")
            kwargs[key] = entry[key]
    if ("jwks_file" in kwargs) == ("jwks_url" in kwargs):
        raise ValueError(f"{where}.jwks_file: give exactly one of jwks_file and jwks_url")
    if "jwks_file" in kwargs:
        kwargs["jwks_file"] = os.path.join(base_dir, kwargs["jwks_file"])
    if "roles" in entry:
        roles = entry["roles"]
        if not isinstance(roles, dict):
            raise ValueError(f"{where}.roles: must be a mapping of claim value -> list of bindings")
        role_map = []
        for value, bindings in roles.items():
            if not isinstance(value, str):
                raise ValueError(f"{where}.roles.{value}: claim values must be strings (quote it)")
            role_map.append((value, _bindings(bindings, f"{where}.roles.{value}")))
        kwargs["role_map"] = tuple(role_map)
    if "algorithms" in entry:
        kwargs["algorithms"] = tuple(_str_list(entry["algorithms"], f"{where}.algorithms"))
    if "leeway" in entry:
        leeway = entry["leeway"]
        if isinstance(leeway, bool) or not isinstance(leeway, (int, float)):
            raise ValueError(f"{where}.leeway: must be a number of seconds")
        kwargs["leeway_s"] = float(leeway)
    try:
        return IssuerConfig(**kwargs)
    except ConfigError as e:
        key = {"leeway_s": "leeway", "role_map": "roles"}.get(e.field, e.field)
        raise ValueError(f"{where}.{key}: {e.message}") from None


def load_config(path: str) -> list[IssuerConfig]:
    """Read the trusted issuers from a YAML file; ValueError names the file and the bad key.

    Format::

        issuers:
          - issuer: https://idp.example.com             # exact `iss`
            audience: meshgate                          # required `aud`
            jwks_file: /etc/meshgate/idp-jwks.json      # or jwks_url: https://idp.example.com/.well-known/jwks.json
            principal_claim: email                      # default sub
            roles_claim: groups                         # default groups; a string or list of strings
            roles:                                      # claim value -> bindings
              platform-admins: [{role: admin}]
              netops: [{role: network-admin, networks: [networks/prod]}]
              deployer: [{permissions: [enrollmentKeys.create, secrets.read], networks: [networks/prod]}]
            algorithms: [RS256, ES256]                  # default [RS256, ES256, EdDSA]; never none or HS*
            leeway: 30                                  # seconds of clock skew, default 30

    `issuer` and `audience` are required, and exactly one of `jwks_file` and
    `jwks_url` (a relative `jwks_file` is relative to this file's directory).
    Unknown keys, duplicate keys, unknown roles or permissions and two
    entries with the same `issuer` are errors. `issuers: []` configures none.
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or "issuers" not in doc:
        raise ValueError(f"{path}: issuers: missing (the file must be a mapping with an `issuers` list)")
    unknown = [k for k in doc if k != "issuers"]
    if unknown:
        raise ValueError(f"{path}: {unknown[0]}: unknown key; the only top-level key is issuers")
    entries = doc["issuers"]
    if not isinstance(entries, list):
        raise ValueError(f"{path}: issuers: must be a list")
    base_dir = os.path.dirname(os.path.abspath(path))
    out: list[IssuerConfig] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"issuers[{i}]"
        try:
            cfg = _issuer(entry, where, base_dir)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if cfg.issuer in seen:
            raise ValueError(f"{path}: {where}.issuer: {cfg.issuer!r} is already configured by "
                             f"issuers[{seen[cfg.issuer]}]")
        seen[cfg.issuer] = i
        out.append(cfg)
    return out


# --- key sources -------------------------------------------------------------

def _signing_keys(jwk_set: PyJWKSet) -> dict[str, PyJWK]:
    """kid -> key for the set's asymmetric signing keys."""
    out: dict[str, PyJWK] = {}
    for key in jwk_set.keys:
        if key.public_key_use not in ("sig", None) or not isinstance(key.key_id, str) or not key.key_id:
            continue
        if key.algorithm_name not in SUPPORTED_ALGORITHMS:
            continue  # e.g. an "oct" (HS*) key: never a verification key here
        out.setdefault(key.key_id, key)
    return out


class _FileKeys:
    """A JWKS file, re-read when its mtime, ctime, size or inode changes."""

    def __init__(self, issuer: str, path: str) -> None:
        self.issuer = issuer
        self.path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self._keys: dict[str, PyJWK] | None = None
        self._complaint = ""  # the last problem logged, so a broken file is logged once, not per call

    def _problem(self, problem: str) -> None:
        """Log a problem with the file once; refuse if no keys were ever read."""
        if problem != self._complaint:
            self._complaint = problem
            if self._keys is None:
                log.error("the JWKS file %s of issuer %s is unusable: %s", self.path, self.issuer, problem)
            else:
                log.warning("the JWKS file %s of issuer %s is unusable (%s); keeping its last %d keys",
                            self.path, self.issuer, problem, len(self._keys))
        if self._keys is None:
            raise OidcRefused(OIDC_UNAVAILABLE, f"the keys of issuer {self.issuer!r} cannot be read")

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._problem(e.strerror or type(e).__name__)
            return
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            keys = _signing_keys(PyJWKSet.from_dict(data))
        except (OSError, ValueError, jwt.PyJWTError) as e:
            self._stamp = stamp if self._keys is not None else None  # never read: retry on the next call
            self._problem(str(e) or type(e).__name__)
            return
        self._stamp = stamp
        self._complaint = ""
        log.info("loaded %d signing keys of issuer %s from %s", len(keys), self.issuer, self.path)
        self._keys = keys

    async def key(self, kid: str) -> PyJWK | None:
        self._refresh()
        assert self._keys is not None
        return self._keys.get(kid)


class _UrlKeys:
    """A JWKS URL, fetched and cached by PyJWKClient in a worker thread."""

    def __init__(self, issuer: str, url: str, refetch_s: float) -> None:
        self.issuer = issuer
        self.url = url
        self.refetch_s = refetch_s
        self._client = PyJWKClient(url, cache_jwk_set=True, lifespan=JWKS_LIFESPAN_S, timeout=JWKS_TIMEOUT_S,
                                   cooldown_duration=refetch_s, headers={"User-Agent": "meshgate-controlplane"})
        self._lock = threading.Lock()
        self._fetching = asyncio.Lock()
        self._last_fetch: float | None = None  # monotonic time of the last fetch we caused
        self._failed_at: float | None = None  # monotonic time the last fetch failed

    def _cached(self, kid: str) -> tuple[PyJWK | None, bool]:
        """(key, settled): settled when the cached set answers without a
        fetch (the key is in it, or it is not and a refetch is not due)."""
        cache = self._client.jwk_set_cache
        jwk_set = cache.get() if cache is not None else None
        if jwk_set is None:
            return None, False
        key = _signing_keys(jwk_set).get(kid)
        if key is not None:
            return key, True
        cooling = self._last_fetch is not None and time.monotonic() - self._last_fetch < self.refetch_s
        return None, cooling

    def _lookup(self, kid: str) -> PyJWK | None:
        """In a worker thread: the key, fetching the set when the cache is
        empty or expired, and once more for an unknown kid unless a fetch
        happened less than `refetch_s` ago."""
        with self._lock:
            cache = self._client.jwk_set_cache
            fetching = cache is None or cache.get() is None
            keys = _signing_keys(self._client.get_jwk_set())
            now = time.monotonic()
            if fetching:
                self._last_fetch = now
            if kid in keys:
                return keys[kid]
            if self._last_fetch is not None and now - self._last_fetch < self.refetch_s:
                return None
            self._last_fetch = now
            log.info("issuer %s: refetching %s for a key it did not list", self.issuer, self.url)
            return _signing_keys(self._client.get_jwk_set(refresh=True)).get(kid)

    async def key(self, kid: str) -> PyJWK | None:
        key, settled = self._cached(kid)
        if settled:
            return key
        # One fetch at a time per issuer: callers queue here, not on worker
        # threads, so a slow IdP cannot tie up the default executor; and the
        # callers that queued behind a failed fetch share its failure instead
        # of each trying again.
        arrived = time.monotonic()
        async with self._fetching:
            key, settled = self._cached(kid)
            if settled:
                return key
            if self._failed_at is not None and self._failed_at >= arrived:
                raise OidcRefused(OIDC_UNAVAILABLE, f"the keys of issuer {self.issuer!r} cannot be fetched")
            try:
                key = await asyncio.to_thread(self._lookup, kid)
            except (jwt.PyJWTError, ValueError, OSError) as e:  # unreachable, bad JSON, no usable keys
                self._failed_at = time.monotonic()
                log.warning("cannot fetch the JWKS of issuer %s from %s: %s", self.issuer, self.url, e)
                raise OidcRefused(OIDC_UNAVAILABLE, f"the keys of issuer {self.issuer!r} cannot be fetched") from None
            self._failed_at = None
            return key


# --- verification ------------------------------------------------------------

def _b64_json(segment: str) -> Any:
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    return json.loads(raw)


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class OidcVerifier:
    """Verifies bearer JWTs of the configured issuers."""

    def __init__(self, issuers: list[IssuerConfig], *, unknown_kid_refetch_s: float = UNKNOWN_KID_REFETCH_S) -> None:
        self._issuers: dict[str, IssuerConfig] = {}
        self._keys: dict[str, _FileKeys | _UrlKeys] = {}
        for cfg in issuers:
            if cfg.issuer in self._issuers:
                raise ValueError(f"issuer {cfg.issuer!r} is configured twice")
            self._issuers[cfg.issuer] = cfg
            self._keys[cfg.issuer] = (_FileKeys(cfg.issuer, cfg.jwks_file) if cfg.jwks_file
                                      else _UrlKeys(cfg.issuer, cfg.jwks_url, unknown_kid_refetch_s))
        self._roles = {cfg.issuer: dict(cfg.role_map) for cfg in issuers}

    @staticmethod
    def looks_like_jwt(token: str) -> bool:
        """Whether `token` has the shape of a JWS compact JWT (three base64url
        segments, a JSON header with "alg"); cheap, verifies nothing."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN:
            return False
        parts = token.split(".")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            return False
        if any(c not in _B64URL for part in parts for c in part):
            return False
        try:
            header = _b64_json(parts[0])
        except (ValueError, binascii.Error):
            return False
        return isinstance(header, dict) and isinstance(header.get("alg"), str)

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token of a configured issuer; OidcRefused otherwise."""
        if not isinstance(token, str) or not token:
            raise OidcRefused(OIDC_MALFORMED, "the bearer is not a JWT")
        if len(token) > MAX_TOKEN_LEN:
            raise OidcRefused(OIDC_MALFORMED, f"the bearer is longer than {MAX_TOKEN_LEN} bytes")
        try:
            unverified = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise OidcRefused(OIDC_MALFORMED, "the bearer is not a well-formed JWT") from None
        header, claims = unverified["header"], unverified["payload"]

        # Unverified: only picks the configuration; decode() re-checks iss.
        iss = claims.get("iss")
        if iss is None:
            raise OidcRefused(OIDC_MISSING_CLAIM, "the token has no iss claim")
        cfg = self._issuers.get(iss) if isinstance(iss, str) else None
        if cfg is None:
            log.debug("refused a token of an issuer that is not configured")
            raise OidcRefused(OIDC_UNKNOWN_ISSUER, f"issuer {_shown(iss)} is not a configured identity provider")

        alg = header.get("alg")
        if alg not in cfg.algorithms:
            log.debug("refused a token of issuer %s: its algorithm is not one of %s", cfg.issuer, cfg.algorithms)
            raise OidcRefused(OIDC_BAD_SIGNATURE, f"issuer {cfg.issuer!r} tokens must be signed with one of "
                                                  f"{', '.join(cfg.algorithms)}, not {_shown(alg, 20)}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise OidcRefused(OIDC_UNKNOWN_KEY, "the token names no signing key (kid)")
        key = await self._keys[cfg.issuer].key(kid)
        if key is None:
            log.debug("refused a token of issuer %s: signed by a key the issuer does not publish", cfg.issuer)
            raise OidcRefused(OIDC_UNKNOWN_KEY, f"issuer {cfg.issuer!r} publishes no key {_shown(kid, 60)}")

        claims = self._decode(token, key, cfg)

        principal = claims[cfg.principal_claim]
        if not isinstance(principal, str) or not principal or not principal.isprintable():
            raise OidcRefused(OIDC_MALFORMED, f"the {cfg.principal_claim} claim is not a non-empty printable string")
        try:
            expire_time = float(claims["exp"])
        except (TypeError, ValueError, OverflowError):
            raise OidcRefused(OIDC_MALFORMED, "the exp claim is not a number") from None
        if not math.isfinite(expire_time):
            raise OidcRefused(OIDC_MALFORMED, "the exp claim is not a number")

        bindings: dict[Binding, None] = {}
        for value in self._role_values(claims.get(cfg.roles_claim)):
            for b in self._roles[cfg.issuer].get(value, ()):
                bindings[b] = None
        return Principal(name=f"oidc:{cfg.issuer}#{principal}", authentication="oidc",
                         bindings=tuple(bindings), expire_time=expire_time)

    @staticmethod
    def _role_values(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)]
        return []

    @staticmethod
    def _decode(token: str, key: PyJWK, cfg: IssuerConfig) -> dict[str, Any]:
        require = ["exp", "iss", "aud"]
        if cfg.principal_claim not in require:
            require.append(cfg.principal_claim)
        try:
            return jwt.decode(token, key=key, algorithms=list(cfg.algorithms), audience=cfg.audience,
                              issuer=cfg.issuer, leeway=cfg.leeway_s, options={"require": require})
        except jwt.ExpiredSignatureError:
            raise OidcRefused(OIDC_EXPIRED, "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise OidcRefused(OIDC_NOT_YET_VALID, "the token is not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise OidcRefused(OIDC_WRONG_AUDIENCE, f"the token is not meant for audience {cfg.audience!r}") from None
        except jwt.InvalidIssuerError:  # defensive: the configuration was picked by this very iss
            raise OidcRefused(OIDC_WRONG_ISSUER, f"the token's issuer is not {cfg.issuer!r}") from None
        except jwt.MissingRequiredClaimError as e:
            raise OidcRefused(OIDC_MISSING_CLAIM, f"the token has no {e.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise OidcRefused(OIDC_BAD_SIGNATURE, "the token's signature does not verify") from None
        except jwt.InvalidAlgorithmError:
            raise OidcRefused(OIDC_BAD_SIGNATURE, f"the token's algorithm does not match its key's "
                                                  f"({key.algorithm_name})") from None
        except jwt.PyJWTError as e:  # DecodeError, bad iat, non-string sub, key errors
            log.debug("refused a malformed token of issuer %s: %s", cfg.issuer, type(e).__name__)
            raise OidcRefused(OIDC_MALFORMED, "the token is malformed") from None
