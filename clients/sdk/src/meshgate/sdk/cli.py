"""The `meshgate` CLI, built at run time from the API's service descriptors.

Every RPC of every service is `meshgate <resource> <verb>` (`NodeService.
CreateNode` is `meshgate node create`). Request fields become options: scalars
typed, enums as choices, repeated fields repeatable, maps as `KEY=VALUE`,
nested messages flattened with dotted names (`--network.ipv4-cidr`), durations
as seconds or with units (`25`, `500ms`, `2s`, `1m30s`), timestamps as RFC 3339.
An Update's field mask is made from the options actually given. `--from-file`
reads the request as JSON or YAML (options override it). In a message given as
JSON or YAML (a file, or an option's value such as `--egress-gateway.probes`),
durations take the same forms and enum names any case (`protocol: tcp`).
Help text is the proto comments (from `_comments.py`).

Hand-written on top: `context` (kubectl-like contexts in the file the SDK
reads), `watch` (resumable event stream) and `completion` (bash, zsh).

Before its first call to an address the CLI checks that something answers
there (`connect_timeout`, 5 s): a wrong or dead target gets one line naming
it, not a bare DEADLINE_EXCEEDED after the call's whole deadline.

Exit codes: 0 success, 1 the server refused or could not be reached (one line
naming the code and the offending fields or the address), 2 usage errors (one
line naming the option).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import click
import yaml
from google.api import field_behavior_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from meshgate.sdk import _build, api, errors, masks
from meshgate.sdk import _descriptors as descriptors
from meshgate.sdk import config as config_mod
from meshgate.sdk._comments import COMMENTS

OUTPUTS = ("table", "json", "yaml", "secret", "qr")
STREAM_OUTPUTS = ("table", "json", "yaml")
MAX_DEPTH = 3
WKT_SCALAR = {"google.protobuf.Duration", "google.protobuf.Timestamp", "google.protobuf.FieldMask"}
EVENT_TYPES = ["meshgate.io/Network", "meshgate.io/Node", "meshgate.io/EgressGateway", "meshgate.io/EnrollmentKey",
               "meshgate.io/ExternalClient", "meshgate.io/AccessPolicy"]

# The columns a person wants per resource in table output.
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "meshgate.api.v1.Network": [("NAME", "name"), ("IPV4", "ipv4_cidr"), ("IPV6", "ipv6_cidr"),
                                ("POLICY", "default_policy"), ("ETAG", "etag")],
    "meshgate.api.v1.Node": [("NAME", "name"), ("IPV4", "ipv4_address"), ("IPV6", "ipv6_address"),
                             ("ENDPOINT", "endpoint"), ("STATE", "state"), ("ETAG", "etag")],
    "meshgate.api.v1.EgressGateway": [("NAME", "name"), ("NODE", "node"), ("RANGES", "ranges"), ("NAT", "nat"),
                                      ("PRIORITY", "priority"), ("ETAG", "etag")],
    "meshgate.api.v1.EnrollmentKey": [("NAME", "name"), ("USES", "uses"), ("MAX USES", "max_uses"),
                                      ("EXPIRES", "expire_time"), ("REVOKED", "revoke_time")],
    "meshgate.api.v1.ExternalClient": [("NAME", "name"), ("GATEWAY", "gateway_node"), ("IPV4", "ipv4_address"),
                                       ("DISABLED", "disabled"), ("LAST HANDSHAKE", "last_handshake_time")],
    "meshgate.api.v1.AccessPolicy": [("NAME", "name"), ("SOURCES", "sources"), ("DESTINATIONS", "destinations"),
                                     ("PROTOCOL", "protocol"), ("ACTION", "action"), ("PRIORITY", "priority")],
    "meshgate.api.v1.Token": [("NAME", "name"), ("BINDINGS", "bindings"), ("EXPIRES", "expire_time"),
                              ("REVOKED", "revoke_time"), ("LAST USED", "last_use_time")],
    "meshgate.api.v1.AuditRecord": [("TIME", "time"), ("PRINCIPAL", "principal"), ("METHOD", "method"),
                                    ("RESOURCE", "resource"), ("STATUS", "status_code"), ("TRACE", "trace_id")],
    "meshgate.api.v1.WatchEvent": [("REVISION", "revision"), ("TYPE", "type"), ("RESOURCE", "resource_name")],
    "meshgate.api.v1.NodeConvergence": [("NODE", "node"), ("DESIRED", "desired_revision"),
                                        ("APPLIED", "applied_revision"), ("CONVERGED", "converged"),
                                        ("CONNECTED", "connected"), ("FAILED OVER", "failed_over"),
                                        ("DECLINED ROUTES", "declined_routes"), ("DRIFT", "drift"),
                                        ("HEALTHY", "healthy"), ("UNREACHABLE PEERS", "unreachable_peers")],
}

# Messages of a repeated field shown in one table cell by this field of each.
CELL_FIELD = {"meshgate.api.v1.DeclinedRoute": "destination", "meshgate.api.v1.PeerPath": "summary"}

# Fields holding secrets the server returns once (on create), which table
# output prints in full under the table.
ONCE = {"meshgate.api.v1.ExternalClient": "config", "meshgate.api.v1.EnrollmentKey": "secret",
        "meshgate.api.v1.Token": "secret"}
SECRET_CALLS = ("only creating an external client or rotating its key, creating an enrollment key, or creating an "
                "API token returns one")


class Refused(click.ClickException):
    """The server refused the call: exit code 1, one line."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _usage(message: str) -> click.UsageError:
    return click.UsageError(message)


# --- request fields as options ----------------------------------------------


@dataclass(frozen=True)
class FieldOption:
    param: str  # the click parameter name
    path: tuple[str, ...]  # proto field names from the request
    field: FieldDescriptor
    in_update: bool = False  # a field of the resource an Update changes: nothing is required there

    @property
    def flag(self) -> str:
        return "--" + ".".join(p.replace("_", "-") for p in self.path)


def _behaviors(fd: FieldDescriptor) -> set[int]:
    # googleapis-common-protos' stub types the extension as a plain FieldDescriptor
    return set(fd.GetOptions().Extensions[field_behavior_pb2.field_behavior])  # type: ignore[index]


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _help_for(fd: FieldDescriptor, in_update: bool = False) -> str:
    text = " ".join(COMMENTS.get(fd.full_name, "").split())
    if field_behavior_pb2.REQUIRED in _behaviors(fd) and not in_update:
        text = (text + " (required)").strip()
    return text


def field_options(desc: Descriptor, prefix: tuple[str, ...] = (), depth: int = 0, update: bool = False) -> list[FieldOption]:
    """One option per settable leaf of the request, nested messages flattened.

    Output-only fields of a nested resource are left out (the server ignores
    them), and so are immutable ones in an Update (the server refuses them).
    """
    out: list[FieldOption] = []
    for fd in desc.fields:
        b = _behaviors(fd)
        if prefix and field_behavior_pb2.OUTPUT_ONLY in b:
            continue
        if prefix and update and field_behavior_pb2.IMMUTABLE in b:
            continue
        path = (*prefix, fd.name)
        nested = (
            fd.message_type is not None
            and not _is_map(fd)
            and not fd.is_repeated
            and fd.message_type.full_name not in WKT_SCALAR
            and depth < MAX_DEPTH
            and fd.message_type.fields
        )
        if nested and fd.message_type is not None:
            out += field_options(fd.message_type, path, depth + 1, update)
        else:
            out.append(FieldOption("f__" + "__".join(path), path, fd, in_update=bool(prefix) and update))
    return out


def _click_type(fd: FieldDescriptor):
    if fd.enum_type is not None:
        return click.Choice([v.name for v in fd.enum_type.values], case_sensitive=False)
    if fd.message_type is not None:
        return click.STRING
    return {
        FieldDescriptor.TYPE_BOOL: click.BOOL,
        FieldDescriptor.TYPE_DOUBLE: click.FLOAT,
        FieldDescriptor.TYPE_FLOAT: click.FLOAT,
        FieldDescriptor.TYPE_UINT32: click.IntRange(min=0),
        FieldDescriptor.TYPE_UINT64: click.IntRange(min=0),
        FieldDescriptor.TYPE_STRING: click.STRING,
        FieldDescriptor.TYPE_BYTES: click.STRING,
    }.get(fd.type, click.INT)


def _metavar(fd: FieldDescriptor) -> str | None:
    if _is_map(fd):
        return "KEY=VALUE"
    if fd.message_type is None:
        return "@FILE|TEXT" if fd.type == FieldDescriptor.TYPE_BYTES else None
    return {
        "google.protobuf.Duration": "DURATION",
        "google.protobuf.Timestamp": "RFC3339|+30d",
        "google.protobuf.FieldMask": "PATHS",
    }.get(fd.message_type.full_name, "JSON|YAML")


def make_option(fo: FieldOption) -> click.Option:
    fd = fo.field
    help_text = _help_for(fd, fo.in_update)
    if fd.type == FieldDescriptor.TYPE_BOOL and not fd.is_repeated:
        neg = "--no-" + fo.flag[2:]
        return click.Option([f"{fo.flag}/{neg}", fo.param], default=None, help=help_text)
    repeat = fd.is_repeated or _is_map(fd)
    if repeat:
        help_text = (help_text + " Repeatable.").strip()
    return click.Option([fo.flag, fo.param], type=_click_type(fd), multiple=repeat, default=None,
                        metavar=_metavar(fd), help=help_text)


def _json_value(fd: FieldDescriptor, value: Any, flag: str) -> Any:
    """An option's value in protobuf JSON form, for json_format.ParseDict."""
    if fd.type == FieldDescriptor.TYPE_BYTES:
        raw = open(value[1:], "rb").read() if value.startswith("@") else value.encode()
        return base64.b64encode(raw).decode()
    if fd.message_type is None:
        return _build.enum_name(fd, value) if fd.enum_type is not None else value
    name = fd.message_type.full_name
    if name == "google.protobuf.Duration":
        try:
            return _build.duration_json(value, flag)  # seconds, or 500ms, 2s, 1m30s
        except _build.DurationError as e:
            raise _usage(str(e)) from None
    if name == "google.protobuf.FieldMask":
        return value
    if name == "google.protobuf.Timestamp":
        return _timestamp(value, flag)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise _usage(f"{flag}: not valid JSON or YAML: {e}") from None
    if not isinstance(parsed, dict):
        raise _usage(f"{flag}: expected a JSON or YAML object")
    return parsed


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _timestamp(value: str, flag: str) -> str:
    """RFC 3339 as is; `+30d`, `+12h`, `+90m`, `+45s` as that long from now."""
    if not value.startswith("+"):
        return value
    num, unit = value[1:-1], value[-1:]
    try:
        seconds = float(num) * _UNITS[unit]
    except (KeyError, ValueError):
        raise _usage(f"{flag}: {value!r} is neither RFC 3339 nor +N[s|m|h|d]") from None
    import datetime

    at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return at.isoformat().replace("+00:00", "Z")


def options_to_dict(opts: list[FieldOption], values: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """The request as a dict from the options given, and the paths that were given."""
    out: dict[str, Any] = {}
    given: list[tuple[str, ...]] = []
    for fo in opts:
        v = values.get(fo.param)
        if v is None or (isinstance(v, tuple) and not v):
            continue
        fd = fo.field
        if _is_map(fd):
            m = {}
            for item in v:
                k, sep, val = item.partition("=")
                if not sep:
                    raise _usage(f"{fo.flag}: expected KEY=VALUE, got {item!r}")
                m[k] = val
            v = m
        elif fd.is_repeated:
            if fd.message_type is not None and fd.message_type.full_name == "google.protobuf.FieldMask":
                v = ",".join(v)
            else:
                v = [_json_value(fd, x, fo.flag) for x in v]
        elif fd.message_type is not None and fd.message_type.full_name == "google.protobuf.FieldMask":
            v = ",".join(p.strip() for p in v.split(","))
        else:
            v = _json_value(fd, v, fo.flag)
        d = out
        for p in fo.path[:-1]:
            d = d.setdefault(p, {})
        d[fo.path[-1]] = v
        given.append(fo.path)
    return out, given


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and not k.endswith("labels"):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def read_request_file(path: str) -> Any:
    text = sys.stdin.read() if path == "-" else open(path).read()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise _usage(f"--from-file: not valid JSON or YAML: {e}") from None
    return docs


# --- output -----------------------------------------------------------------


def to_dict(msg: Message) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _cell(msg: Message, field: str) -> str:
    fd = descriptors.of(msg).fields_by_name[field]
    v = getattr(msg, field)
    if fd.is_repeated and not _is_map(fd):
        if fd.message_type is not None and fd.message_type.full_name in CELL_FIELD:
            # a list of messages in one cell: each by one field (-o yaml shows all)
            return ",".join(str(getattr(x, CELL_FIELD[fd.message_type.full_name])) for x in v)
        return ",".join(str(x) for x in v)
    if fd.enum_type is not None:
        return fd.enum_type.values_by_number[v].name if v in fd.enum_type.values_by_number else str(v)
    if fd.message_type is not None:
        if fd.has_presence and not msg.HasField(field):
            return ""
        if fd.message_type.full_name == "google.protobuf.Timestamp":
            return v.ToJsonString()
        if fd.message_type.full_name == "google.protobuf.Duration":
            return v.ToJsonString()
        if fd.message_type.full_name == "meshgate.api.v1.DriftStatus":
            # the agent's drift repairs; a fight first (-o yaml shows what drifted)
            return ("FIGHTING, " if v.fighting else "") + f"{v.repairs} repaired"
        return json.dumps(json_format.MessageToDict(v, preserving_proto_field_name=True), separators=(",", ":"))
    if fd.has_presence and not msg.HasField(field):
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def table_of(msgs: list[Message], desc: Descriptor) -> str:
    cols = COLUMNS.get(desc.full_name)
    if cols is None:
        if len(msgs) == 1:
            # A single message without a preset: one FIELD VALUE row per set field.
            m = msgs[0]
            rows = [["FIELD", "VALUE"]] + [[fd.name, _cell(m, fd.name)] for fd, _ in m.ListFields()]
            return _table(rows)
        cols = [(fd.name.upper(), fd.name) for fd in desc.fields if not fd.message_type or not fd.is_repeated][:6]
    rows = [[h for h, _ in cols]] + [[_cell(m, f) for _, f in cols] for m in msgs]
    return _table(rows)


def list_items(msg: Message) -> tuple[str, FieldDescriptor] | None:
    """The repeated resource field of a List response (or of a status with rows)."""
    desc = descriptors.of(msg)
    reps = [fd for fd in desc.fields if fd.is_repeated and fd.message_type is not None and not _is_map(fd)]
    if len(reps) == 1 and "next_page_token" in desc.fields_by_name:
        return reps[0].name, reps[0]
    # a status with rows: its first repeated field with a preset (NetworkStatus.nodes;
    # -o yaml shows the others, e.g. its gateways)
    for fd in reps:
        if fd.message_type is not None and fd.message_type.full_name in COLUMNS:
            return fd.name, fd
    return None


class Printer:
    def __init__(self, output: str | None) -> None:
        self.output = output or ("table" if sys.stdout.isatty() else "json")
        self.header_done = False

    def one(self, msg: Message) -> None:
        if self.output in ("secret", "qr"):
            # Just the secret a create returns once: a file's content (an
            # external client's configuration) or a QR code of it for a phone.
            once = ONCE.get(msg.DESCRIPTOR.full_name)
            if not once or not getattr(msg, once):
                raise _usage(f"-o {self.output}: this call returns no secret ({SECRET_CALLS})")
            value = getattr(msg, once)
            if self.output == "secret":
                click.echo(value, nl=not value.endswith("\n"))
            else:
                import segno

                qr = segno.make(value, error="m")
                qr.terminal(compact=True)
            return
        if self.output == "json":
            click.echo(json.dumps(to_dict(msg), indent=2, sort_keys=True))
        elif self.output == "yaml":
            click.echo(yaml.safe_dump(to_dict(msg), sort_keys=True).rstrip())
        else:
            if msg.DESCRIPTOR.full_name == "google.protobuf.Empty":
                click.echo("ok")
                return
            items = list_items(msg)
            if items is not None:
                name, fd = items
                rows = list(getattr(msg, name))
                if not rows:
                    click.echo(f"no {name.replace('_', ' ')}")
                    return
                assert fd.message_type is not None  # list_items finds message fields
                click.echo(table_of(rows, fd.message_type))
                return
            click.echo(table_of([msg], descriptors.of(msg)))
            once = ONCE.get(msg.DESCRIPTOR.full_name)
            if once and getattr(msg, once):
                # Secret material the server returns once: a table must not swallow it.
                click.echo(f"\n# {once} (returned only now; keep it safe, it holds secrets):")
                value = getattr(msg, once)
                click.echo(value, nl=not value.endswith("\n"))

    def stream(self, msg: Message) -> None:
        """One message of a stream, as soon as it arrives."""
        if self.output == "json":
            click.echo(json.dumps(to_dict(msg), sort_keys=True, separators=(",", ":")))
        elif self.output == "yaml":
            click.echo("---\n" + yaml.safe_dump(to_dict(msg), sort_keys=True).rstrip())
        else:
            cols = COLUMNS.get(msg.DESCRIPTOR.full_name) or [(fd.name.upper(), fd.name) for fd in msg.DESCRIPTOR.fields[:4]]
            if not self.header_done:
                click.echo("\t".join(h for h, _ in cols))
                self.header_done = True
            click.echo("\t".join(_cell(msg, f) for _, f in cols))
        sys.stdout.flush()


# --- connection -------------------------------------------------------------


@dataclass
class State:
    overrides: dict[str, Any]
    context: str | None
    _client: Any = None
    _reachable: set = field(default_factory=set)

    def config(self) -> config_mod.ClientConfig:
        try:
            return config_mod.load(self.overrides, context=self.context)
        except config_mod.ConfigError as e:
            raise _usage(str(e)) from None

    def client(self, service: str = ""):
        """The client, once the server for `service` answers (else a one-line
        refusal naming the address, after `connect_timeout`, not the deadline)."""
        from meshgate.sdk.client import Client

        if self._client is None:
            try:
                self._client = Client(config=self.config())
            except config_mod.ConfigError as e:
                raise _usage(str(e)) from None
        target = self._client._target_for(service)
        if target not in self._reachable:
            _call(lambda: self._client.check_reachable(service))
            self._reachable.add(target)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _state() -> State:
    st = click.get_current_context().find_object(State)
    assert st is not None, "the meshgate group makes the State"
    return st


def _call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except errors.MeshgateError as e:
        raise Refused(e.one_line()) from None


# --- generated commands -----------------------------------------------------


def _positional_path(m: api.Method) -> tuple[str, ...] | None:
    fields = m.input.fields_by_name
    if "name" in fields and fields["name"].type == FieldDescriptor.TYPE_STRING:
        return ("name",)
    for fd in m.input.fields:
        if fd.message_type is not None and "name" in fd.message_type.fields_by_name and m.name.startswith("Update"):
            return (fd.name, "name")
    return None


def _update_mask(m: api.Method, request: dict, given: list[tuple[str, ...]]) -> None:
    """Fill `update_mask` from the resource fields actually given, unless set."""
    fields = m.input.fields_by_name
    if "update_mask" not in fields or request.get("update_mask"):
        return
    res = next((fd for fd in m.input.fields if fd.message_type is not None and fd.name != "update_mask"), None)
    if res is None or res.message_type is None or res.name not in request:
        return
    by_name = res.message_type.fields_by_name
    by_json = {fd.json_name: fd for fd in res.message_type.fields}
    paths = {p[1] for p in given if len(p) > 1 and p[0] == res.name}
    # Keys of a --from-file resource, in proto (display_name) or JSON (displayName) spelling.
    paths |= {(by_name.get(k) or by_json[k]).name for k in request[res.name] if k in by_name or k in by_json}
    paths = {p for p in paths if masks.mutable(by_name[p])}
    if paths:
        request["update_mask"] = sorted(paths)


def _mask_json(value: Any) -> str:
    """A field mask in protobuf JSON form (`displayName,labels`) from the paths
    as a person or `_update_mask` writes them: a list or a comma-separated
    string, each path in proto (`display_name`), CLI (`display-name`) or JSON
    (`displayName`) spelling. json_format refuses anything but the JSON form."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out = []
    for path in items:
        path = str(path).strip()
        if not path:
            continue
        out.append(".".join(re.sub(r"[_-]+([a-z0-9])", lambda mo: mo.group(1).upper(), seg)
                            for seg in path.split(".")))
    return ",".join(out)


def _masks_to_json(desc: Descriptor, request: dict) -> None:
    """Every field mask at the top of a request, in the form `_parse` needs."""
    for fd in desc.fields:
        if fd.message_type is None or fd.message_type.full_name != "google.protobuf.FieldMask":
            continue
        for key in (fd.name, fd.json_name):
            if request.get(key) not in (None, ""):
                request[key] = _mask_json(request[key])


def make_command(m: api.Method) -> click.Command:
    opts = [] if m.client_streaming else field_options(m.input, update=m.name.startswith("Update"))
    params: list[click.Parameter] = []
    pos = None if m.client_streaming else _positional_path(m)
    if pos is not None:
        params.append(click.Argument(["positional_name"], required=False, metavar="NAME"))
    params += [make_option(fo) for fo in opts]
    params.append(click.Option(["--from-file", "from_file"], metavar="PATH",
                               help="Read the request from a JSON or YAML file ('-' for stdin); options override it."
                               + (" For this stream: one request per YAML document or JSON line." if m.client_streaming else "")))
    params.append(click.Option(["-o", "--output", "output"], type=click.Choice(OUTPUTS), default=None,
                               help="Output format (default: table on a terminal, json otherwise). secret, qr: only "
                                    "the secret a create returns once (an external client's configuration, an "
                                    "enrollment key's secret, an API token), as is or as a QR code for a phone's WireGuard app."))
    req_cls = GetMessageClass(m.input)
    svc_method = m.python_name

    def callback(positional_name=None, from_file=None, output=None, **values):
        if output in ("secret", "qr") and m.output.full_name not in ONCE:
            # Refused before the call: a create must not run and lose its output.
            raise _usage(f"-o {output}: this call returns no secret ({SECRET_CALLS})")
        state = _state()
        printer = Printer(output)
        if m.client_streaming:
            if not from_file:
                raise _usage("--from-file is required: this call streams requests")
            docs = read_request_file(from_file)
            requests = [_parse(req_cls, d) for d in docs]
            client = state.client(m.service.full_name)
            for resp in _call(lambda: list(getattr(client, svc_method)(requests))):
                printer.stream(resp)
            return
        request: dict[str, Any] = {}
        if from_file:
            docs = read_request_file(from_file)
            if len(docs) != 1 or not isinstance(docs[0], dict):
                raise _usage("--from-file: expected one JSON or YAML object")
            request = docs[0]
        from_opts, given = options_to_dict(opts, values)
        _merge(request, from_opts)
        if positional_name is not None and pos is not None:  # NAME exists only with a path
            d = request
            for p in pos[:-1]:
                d = d.setdefault(p, {})
            if pos[-1] in d and d[pos[-1]] != positional_name:
                raise _usage(f"NAME {positional_name!r} and --{'.'.join(pos)} disagree")
            d[pos[-1]] = positional_name
        _update_mask(m, request, given)
        _masks_to_json(m.input, request)
        msg = _parse(req_cls, request)
        client = state.client(m.service.full_name)
        if m.server_streaming:
            def run():
                for item in getattr(client, svc_method)(msg):
                    printer.stream(item)
            try:
                _call(run)
            except KeyboardInterrupt:
                raise SystemExit(130) from None
            return
        if m.output.full_name != "google.protobuf.Empty" and list_items_of_desc(m) and "page_token" not in request:
            resp = _call(lambda: _all_pages(client, svc_method, msg))
        else:
            resp = _call(lambda: getattr(client, svc_method)(msg))
        printer.one(resp)

    help_text = m.help
    if m.name.startswith("List") and "page_token" in m.input.fields_by_name:
        help_text += "\n\nFollows page tokens to the end unless --page-token is given."
    return click.Command(m.verb, params=params, callback=callback, help=help_text,
                         short_help=_first_sentence(help_text))


def _first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    end = flat.find(". ")
    return flat if end < 0 else flat[: end + 1]


def list_items_of_desc(m: api.Method) -> bool:
    return "page_token" in m.input.fields_by_name and "next_page_token" in m.output.fields_by_name


def _all_pages(client, method: str, request: Any) -> Message:
    # `request`: a List request, any of them (each has a page_token)
    resp = getattr(client, method)(request)
    items = list_items(resp)
    while resp.next_page_token and items is not None:
        request.page_token = resp.next_page_token
        more = getattr(client, method)(request)
        getattr(resp, items[0]).extend(getattr(more, items[0]))
        resp.next_page_token = more.next_page_token
    return resp


def _parse(cls, data: Any) -> Message:
    if not isinstance(data, dict):
        raise _usage(f"expected a {cls.DESCRIPTOR.name} object")
    try:
        return json_format.ParseDict(_build.friendly(cls.DESCRIPTOR, data), cls())
    except (json_format.ParseError, _build.DurationError) as e:
        raise _usage(f"invalid {cls.DESCRIPTOR.name}: {e}") from None


# --- hand-written commands --------------------------------------------------


@click.group("context", help="Named connection settings, kept in the context file the SDK also reads.")
def context_group() -> None:
    pass


@context_group.command("add", help="Add or replace a context.")
@click.argument("name")
@click.option("--target", required=True, help="Control plane address, host:port.")
@click.option("--key-service-target", help="Key service address, for `meshgate key` commands.")
@click.option("--tls/--no-tls", default=None, help="Use TLS.")
@click.option("--ca-file", help="PEM CA certificates to trust.")
@click.option("--cert-file", help="PEM client certificate (mTLS).")
@click.option("--key-file", help="PEM key of --cert-file.")
@click.option("--token-file", help="File holding a bearer token (the token itself is never stored here).")
@click.option("--timeout", type=float, help="Default deadline in seconds.")
@click.option("--connect-timeout", type=float, help="Seconds to wait for a first connection (default 5).")
@click.option("--use", is_flag=True, help="Also make it the current context.")
def context_add(name, use, **settings) -> None:
    cf = _context_file()
    values = {k: v for k, v in settings.items() if v is not None}
    try:
        cf.set(name, values)
        if use or not cf.current:
            cf.use(name)
    except config_mod.ConfigError as e:
        raise _usage(str(e)) from None
    cf.write()
    click.echo(f"context {name} saved in {cf.path}" + (" (current)" if cf.current == name else ""))


@context_group.command("use", help="Make a context the current one.")
@click.argument("name")
def context_use(name) -> None:
    cf = _context_file()
    try:
        cf.use(name)
    except config_mod.ConfigError as e:
        raise _usage(str(e)) from None
    cf.write()
    click.echo(f"current context: {name}")


@context_group.command("list", help="List contexts; the current one is marked with *.")
def context_list() -> None:
    cf = _context_file()
    rows = [["CURRENT", "NAME", "TARGET"]]
    for name, settings in sorted(cf.contexts.items()):
        rows.append(["*" if name == cf.current else "", name, str((settings or {}).get("target", ""))])
    click.echo(_table(rows))


@context_group.command("show", help="Show the settings in effect and where each came from (the token masked).")
def context_show() -> None:
    cfg = _state().config()
    click.echo(_table([["SETTING", "VALUE (SOURCE)"]] + [[k, v] for k, v in cfg.describe().items()]))


def _context_file() -> config_mod.ContextFile:
    try:
        return config_mod.ContextFile()
    except config_mod.ConfigError as e:
        raise _usage(str(e)) from None


@click.command("watch", help="Stream resource changes (created, updated, deleted) as they happen.\n\n"
               "Resumes by itself after a control-plane restart, without losing or repeating events.")
@click.option("--parent", "-n", default="", help="Only this network, `networks/{network}`; all networks if omitted.")
@click.option("--start-revision", type=click.IntRange(min=0), default=0,
              help="Deliver the events after this revision (an event's revision or an etag); 0 means from now.")
@click.option("--type", "types", multiple=True, type=click.Choice(EVENT_TYPES), help="Only these resource types. Repeatable.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many events.")
@click.option("-o", "--output", type=click.Choice(STREAM_OUTPUTS), default=None, help="Output format (one line or document per event).")
def watch_command(parent, start_revision, types, count, output) -> None:
    from meshgate.sdk.client import AsyncClient

    printer = Printer(output)
    cfg = _state().config()
    _state().client()  # says at once when nothing answers, instead of a bare error after the deadline

    async def run() -> None:
        async with AsyncClient(config=cfg) as c:
            seen = 0
            async for ev in c.watch_events(parent, start_revision=start_revision, resource_types=types):
                printer.stream(ev)
                seen += 1
                if count and seen >= count:
                    return

    try:
        _call(lambda: asyncio.run(run()))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


@click.command("completion", help="Print the shell completion script: eval \"$(meshgate completion bash)\".")
@click.argument("shell", type=click.Choice(["bash", "zsh"]))
def completion_command(shell) -> None:
    from click.shell_completion import get_completion_class

    comp = get_completion_class(shell)(cli, {}, "meshgate", "_MESHGATE_COMPLETE")
    click.echo(comp.source())


# --- the root ---------------------------------------------------------------


def build() -> click.Group:
    @click.group("meshgate", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.option("--context", "context_name", envvar="MESHGATE_CONTEXT", help="Context to use (default: the current one).")
    @click.option("--target", help="Control plane address, host:port (overrides the context).")
    @click.option("--key-service-target", help="Key service address (overrides the context).")
    @click.option("--tls/--no-tls", default=None, help="Use TLS.")
    @click.option("--ca-file", help="PEM CA certificates to trust.")
    @click.option("--token-file", help="File holding a bearer token.")
    @click.option("--timeout", type=float, help="Deadline of each call in seconds.")
    @click.option("--connect-timeout", type=float,
                  help="Seconds to wait for a first connection before saying that nothing answers (default 5).")
    @click.pass_context
    def root(ctx, context_name, **overrides):
        """meshgate: manage private WireGuard networks and egress gateways.

        Every API call is `meshgate <resource> <verb>`; settings come from flags,
        MESHGATE_* variables and the current context (`meshgate context`).
        """
        state = State({k: v for k, v in overrides.items() if v is not None}, context_name)
        ctx.obj = state
        ctx.call_on_close(state.close)

    for s in api.services():
        group = click.Group(s.command, help=s.help, short_help=_first_sentence(s.help))
        for m in s.methods:
            group.add_command(make_command(m))
        root.add_command(group)
    root.add_command(context_group)
    root.add_command(watch_command)
    root.add_command(completion_command)
    return root


cli = build()


def main(argv: Iterable[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="meshgate", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        e.show()
        sys.exit(2)
    except click.UsageError as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except errors.MeshgateError as e:
        click.echo(f"error: {e.one_line()}", err=True)
        sys.exit(1)
    except SystemExit:
        raise
    sys.exit(0)


if __name__ == "__main__":
    main()
