"""Typed configuration read once at an entry point from flags, env and a file.

A service declares a dataclass whose fields carry their help text in
`metadata["help"]`. `load()` builds the command line from it and resolves each
field with this precedence: command-line flag, environment variable
(`<PREFIX><FIELD>` in upper case, the prefix naming the service, e.g.
`MESHGATE_CONTROLPLANE_LISTEN`), config file (TOML, `--config` or
`<PREFIX>CONFIG`), default. `Loaded.sources` says where each value came from,
so a service can log its effective configuration without guessing.

Hazard: fields marked `metadata["secret"] = True` are never printed by
`describe()`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

ENV_PREFIX = "MESHGATE_"


def option(default: Any, help: str, *, secret: bool = False, choices: Sequence[str] | None = None) -> Any:
    """A config field with its help text."""
    md = {"help": help, "secret": secret, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.copy, default), metadata=md)
    return field(default=default, metadata=md)


@dataclass
class ServerConfig:
    """Settings every meshgate gRPC server has."""

    listen: str = option(
        "127.0.0.1:0",
        "addresses to serve gRPC on, comma-separated: host:port (port 0 picks a free one) or unix:/path",
    )
    etcd_endpoints: str = option(
        "127.0.0.1:2379",
        "etcd endpoints, host:port, comma-separated for the members of a cluster (IP addresses; or one DNS name "
        "that resolves to every member)",
    )
    etcd_prefix: str = option("/meshgate", "key prefix under which all meshgate state lives in etcd")
    etcd_ca: str = option(
        "", "PEM CA bundle that signed etcd's server certificates: connect to etcd with TLS when set "
        "(with several --etcd-endpoints each member's certificate must also name the first one)",
    )
    etcd_cert: str = option(
        "", "PEM client certificate for etcd (for etcd's --client-cert-auth); needs --etcd-key and --etcd-ca",
    )
    etcd_key: str = option("", "PEM private key of --etcd-cert")
    etcd_user: str = option(
        "", "etcd user to authenticate as (etcd's own authentication); needs --etcd-password-file",
    )
    etcd_password_file: str = option(
        "", "file holding --etcd-user's password (one line; mode 0600, or 0640 when owned by root); the password "
        "itself is never an option",
    )
    tls_cert: str = option("", "PEM certificate file for TLS; without it the server speaks plaintext")
    tls_key: str = option("", "PEM private key file for TLS")
    tls_client_ca: str = option("", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)")
    insecure: bool = option(
        False, "allow plaintext on a non-loopback address (development only; never the default)"
    )
    shutdown_grace: float = option(10.0, "seconds to let in-flight calls finish after SIGTERM")
    log_level: str = option("info", "log level", choices=["debug", "info", "warning", "error"])
    log_json: bool = option(False, "log one JSON object per line")
    port_file: str = option("", "write the bound port to this file once serving (for scripts and tests)")
    metrics_listen: str = option(
        "", "serve Prometheus metrics at http://HOST:PORT/metrics (a bare port: on loopback; port 0 picks a free "
        "one); empty: off. OTEL_METRICS_EXPORTER=otlp also pushes them to OTLP (docs/operations.md)",
    )


@dataclass
class Loaded(Generic[T]):
    config: T
    sources: dict[str, str]

    def describe(self) -> dict[str, str]:
        """Effective values and their sources, secrets hidden."""
        out = {}
        for f in dataclasses.fields(self.config):  # type: ignore[arg-type]
            v = getattr(self.config, f.name)
            shown = "<secret>" if f.metadata.get("secret") and v else repr(v)
            out[f.name] = f"{shown} ({self.sources[f.name]})"
        return out


def _parse(value: str, typ: Any, name: str) -> Any:
    if typ is bool:
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}: not a boolean: {value!r}")
    if typ is int:
        return int(value)
    if typ is float:
        return float(value)
    return value


def build_parser(cls: type, prog: str, description: str, env_prefix: str = ENV_PREFIX) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config", default=None, help=f"TOML config file (env {env_prefix}CONFIG); its keys are the option names"
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        env = env_prefix + f.name.upper()
        typ = hints[f.name]
        default_shown = f.default if f.default is not dataclasses.MISSING else "[]"
        help_text = f"{f.metadata.get('help', '')} (env {env}; default {default_shown!r})"
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(
                flag, dest=f.name, default=None, help=help_text, choices=f.metadata.get("choices"),
                type=str,
            )
    return parser


def load(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str = "",
    environ: Mapping[str, str] | None = None,
    env_prefix: str = ENV_PREFIX,
) -> Loaded[T]:
    """Resolve `cls` from flags, environment and file. Exits with status 2 on bad input."""
    environ = os.environ if environ is None else environ
    parser = build_parser(cls, prog, description, env_prefix)
    ns = parser.parse_args(argv)
    file_values: dict[str, Any] = {}
    path = ns.config or environ.get(env_prefix + "CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                file_values = {k.replace("-", "_"): v for k, v in tomllib.load(fh).items()}
        except (OSError, tomllib.TOMLDecodeError) as e:
            parser.error(f"cannot read config file {path}: {e}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(file_values) - names
    if unknown:
        parser.error(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        typ = hints[f.name]
        env = env_prefix + f.name.upper()
        cli = getattr(ns, f.name)
        try:
            if cli is not None:
                values[f.name] = cli if typ is bool else _parse(cli, typ, f.name)
                sources[f.name] = "flag"
            elif env in environ:
                values[f.name] = _parse(environ[env], typ, env)
                sources[f.name] = f"env {env}"
            elif f.name in file_values:
                v = file_values[f.name]
                # TOML is typed: take a value of the option's own type (an
                # integer where a float is wanted), and nothing else.
                if isinstance(v, bool) != (typ is bool) or not (
                    isinstance(v, typ) or (typ is float and isinstance(v, int))
                ):
                    raise ValueError(f"{f.name} in {path} must be a {typ.__name__}, not {type(v).__name__}")
                values[f.name] = typ(v)
                sources[f.name] = f"file {path}"
            else:
                sources[f.name] = "default"
        except ValueError as e:
            parser.error(f"--{f.name.replace('_', '-')}: {e}")
        choices = f.metadata.get("choices")
        if choices and f.name in values and values[f.name] not in choices:
            parser.error(f"--{f.name.replace('_', '-')}: {values[f.name]!r} is not one of {', '.join(choices)}")
    return Loaded(cls(**values), sources)
