"""Client settings: the context file shared with the CLI, `MESHGATE_*`, overrides.

Precedence, highest first: arguments to the constructor (or CLI flags), then
environment variables, then the selected context of the context file, then
defaults. `ClientConfig.sources` records where each value came from.

The context file is YAML, at `$MESHGATE_CONFIG` or
`$XDG_CONFIG_HOME/meshgate/config.yaml` (`~/.config/meshgate/config.yaml`):

    current-context: local
    contexts:
      local:
        target: 127.0.0.1:7400
        timeout: 30
      prod:
        target: cp.example.net:443
        tls: true
        ca-file: /etc/meshgate/ca.pem
        token-file: ~/.config/meshgate/prod.token

Hazards:
- A token is a secret. It is never logged or shown (`describe()` masks it),
  the file is written with mode 0600, and a token is refused over plaintext to
  anything but loopback.
- Keys in the file use dashes (`ca-file`); environment variables use
  `MESHGATE_` plus the upper-case name with underscores (`MESHGATE_CA_FILE`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """The configuration is unusable (unknown context, unsafe token use, bad value)."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ClientConfig:
    """How to reach the meshgate API."""

    target: str = _opt("127.0.0.1:7400", "control plane address, host:port")
    key_service_target: str = _opt("", "key service address for KeyService calls; empty means `target`")
    tls: bool = _opt(False, "use TLS (implied by ca-file or cert-file)")
    ca_file: str = _opt("", "PEM CA certificates to trust instead of the system roots")
    cert_file: str = _opt("", "PEM client certificate for mTLS")
    key_file: str = _opt("", "PEM private key of cert-file")
    server_name: str = _opt("", "TLS server name to expect, if not the target's host")
    token: str = _opt("", "bearer token sent as `authorization` metadata (secret)")
    token_file: str = _opt("", "file holding the bearer token")
    timeout: float = _opt(30.0, "default deadline of a call, in seconds (streams have none)")
    wait_for_ready: bool = _opt(True, "wait for the server to come up (until the deadline) instead of failing at once")
    connect_timeout: float = _opt(5.0, "how long the CLI waits for a first connection before saying that nothing "
                                       "answers at the target, in seconds")
    context: str = _opt("", "the context of the context file these settings came from")
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> dict[str, str]:
        """Each setting with its source, the token masked."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "sources":
                continue
            v = getattr(self, f.name)
            if f.name == "token" and v:
                v = "<set>"
            out[f.name] = f"{v} ({self.sources.get(f.name, 'default')})"
        return out

    def resolved_token(self) -> str:
        if self.token:
            return self.token
        if self.token_file:
            try:
                return pathlib.Path(self.token_file).expanduser().read_text().strip()
            except OSError as e:
                raise ConfigError(f"token-file {self.token_file}: {e.strerror}") from None
        return ""

    @property
    def use_tls(self) -> bool:
        return self.tls or bool(self.ca_file or self.cert_file)

    def check(self) -> None:
        if (self.token or self.token_file) and not self.use_tls and not is_loopback(self.target):
            raise ConfigError(
                f"refusing to send a token in plaintext to {self.target}: configure tls/ca-file, or use a loopback target"
            )
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("cert-file and key-file go together")
        if self.timeout <= 0:
            raise ConfigError("timeout must be positive")
        if self.connect_timeout <= 0:
            raise ConfigError("connect-timeout must be positive")


FIELDS = {f.name: f for f in dataclasses.fields(ClientConfig) if f.name not in ("sources", "context")}


def is_loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_path(environ: Mapping[str, str] | None = None) -> pathlib.Path:
    env = os.environ if environ is None else environ
    if env.get("MESHGATE_CONFIG"):
        return pathlib.Path(env["MESHGATE_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return pathlib.Path(base) / "meshgate" / "config.yaml"


def _convert(name: str, value: Any, where: str) -> Any:
    f = FIELDS.get(name)
    if f is None:
        raise ConfigError(f"{where}: unknown setting {name!r}; known: {', '.join(k.replace('_', '-') for k in FIELDS)}")
    try:
        if f.type in ("bool", bool):
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if f.type in ("float", float):
            return float(value)
        return str(value)
    except ValueError:
        raise ConfigError(f"{where}: {name.replace('_', '-')}: {value!r} is not a valid {f.type}") from None


class ContextFile:
    """The YAML context file: read, change, write back (mode 0600)."""

    def __init__(self, path: pathlib.Path | None = None) -> None:
        self.path = path or config_path()
        self.data: dict[str, Any] = {"current-context": "", "contexts": {}}
        if self.path.exists():
            loaded = yaml.safe_load(self.path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{self.path}: not a mapping")
            self.data.update(loaded)
            self.data.setdefault("contexts", {})

    @property
    def current(self) -> str:
        return self.data.get("current-context") or ""

    @property
    def contexts(self) -> dict[str, dict[str, Any]]:
        return self.data["contexts"]

    def get(self, name: str) -> dict[str, Any]:
        if name not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none"
            raise ConfigError(f"no context {name!r} in {self.path} (known: {known})")
        return dict(self.contexts[name] or {})

    def set(self, name: str, settings: Mapping[str, Any]) -> None:
        for k, v in settings.items():
            _convert(k.replace("-", "_"), v, f"context {name}")
        self.contexts[name] = {k.replace("_", "-"): v for k, v in settings.items()}

    def use(self, name: str) -> None:
        self.get(name)
        self.data["current-context"] = name

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(self.data, f, sort_keys=False)
        os.replace(tmp, self.path)


def load(
    overrides: Mapping[str, Any] | None = None,
    *,
    context: str | None = None,
    environ: Mapping[str, str] | None = None,
    path: pathlib.Path | None = None,
) -> ClientConfig:
    """Settings from overrides, then `MESHGATE_*`, then the context file, then defaults."""
    env = os.environ if environ is None else environ
    cfg = ClientConfig()
    sources: dict[str, str] = {}
    file_path = path or config_path(env)
    ctx_name = context or env.get("MESHGATE_CONTEXT", "")
    if file_path.exists() or ctx_name:
        cf = ContextFile(file_path)
        ctx_name = ctx_name or cf.current
        if ctx_name:
            for k, v in cf.get(ctx_name).items():
                name = k.replace("-", "_")
                setattr(cfg, name, _convert(name, v, f"{file_path} context {ctx_name}"))
                sources[name] = f"context {ctx_name}"
            cfg.context = ctx_name
            sources["context"] = "MESHGATE_CONTEXT" if not context and env.get("MESHGATE_CONTEXT") else ("argument" if context else str(file_path))
    for name in FIELDS:
        var = "MESHGATE_" + name.upper()
        if env.get(var):
            setattr(cfg, name, _convert(name, env[var], var))
            sources[name] = var
    for name, v in (overrides or {}).items():
        if v is None:
            continue
        setattr(cfg, name, _convert(name, v, "argument"))
        sources[name] = "argument"
    cfg.sources = sources
    cfg.check()
    return cfg
