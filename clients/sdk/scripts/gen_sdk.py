"""Generate the SDK's typed methods and the API's comments from protos/.

Writes two modules into clients/sdk/src/meshgate/sdk/:

- `_generated.py`: `SyncMethods` and `AsyncMethods`, one typed method per RPC
  of every service (keyword arguments per request field, the proto comment as
  docstring) and an `iter_*` page iterator per List method. `Client` and
  `AsyncClient` inherit them.
- `_comments.py`: the leading comment of every message, field, enum, enum
  value, service and method, by full name. The generated `_pb2` modules carry
  no comments, and the CLI's help text comes from these.

The output depends only on the .proto files and the pinned grpcio-tools (the
descriptor set is compiled with source info by protoc), so it is committed and
a test fails when regenerating would change it. Run after `make protos`:

    .venv/bin/python clients/sdk/scripts/gen_sdk.py
"""

from __future__ import annotations

import argparse
import pathlib
import pprint
import re
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2

ROOT = pathlib.Path(__file__).resolve().parents[3]
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = pathlib.Path("meshgate") / "api" / "v1"
DEFAULT_OUT = ROOT / "clients" / "sdk" / "src" / "meshgate" / "sdk"
PROTO_PACKAGE = "meshgate.api.v1"

F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    F.TYPE_STRING: "str", F.TYPE_BYTES: "bytes", F.TYPE_BOOL: "bool",
    F.TYPE_DOUBLE: "float", F.TYPE_FLOAT: "float",
}
# Well-known types the SDK's arguments accept in a friendlier form as well.
WKT = {
    ".google.protobuf.FieldMask": "field_mask_pb2.FieldMask | Sequence[str]",
    ".google.protobuf.Duration": "duration_pb2.Duration | float",
    ".google.protobuf.Timestamp": "timestamp_pb2.Timestamp",
}


def _googleapis_include() -> str:
    import google.api.field_behavior_pb2 as fb

    return str(pathlib.Path(fb.__file__).resolve().parent.parent.parent)


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "api.pb"
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{_googleapis_include()}",
             "--include_source_info", f"--descriptor_set_out={out}", *protos],
            cwd=PROTO_ROOT, check=True,
        )
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _clean(comment: str) -> str:
    lines = [ln[1:] if ln.startswith(" ") else ln for ln in comment.strip("\n").split("\n")]
    return "\n".join(lines).strip()


def comments(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, str]:
    """Leading comments by full name (messages, fields, enums, values, services, methods)."""
    out: dict[str, str] = {}
    for f in fds.file:
        by_path = {tuple(loc.path): loc.leading_comments for loc in f.source_code_info.location if loc.leading_comments}
        pkg = f.package

        def put(path, name, by_path=by_path):
            c = by_path.get(tuple(path))
            if c:
                out[name] = _clean(c)

        def enum(e, path, scope):
            name = f"{scope}.{e.name}"
            put(path, name)
            for i, v in enumerate(e.value):
                # Enum values are scoped like C++: siblings of the enum.
                put([*path, 2, i], f"{name}.{v.name}")

        def message(m, path, scope):
            name = f"{scope}.{m.name}"
            put(path, name)
            for i, fld in enumerate(m.field):
                put([*path, 2, i], f"{name}.{fld.name}")
            for i, nested in enumerate(m.nested_type):
                message(nested, [*path, 3, i], name)
            for i, e in enumerate(m.enum_type):
                enum(e, [*path, 4, i], name)

        for i, m in enumerate(f.message_type):
            message(m, [4, i], pkg)
        for i, e in enumerate(f.enum_type):
            enum(e, [5, i], pkg)
        for i, s in enumerate(f.service):
            put([6, i], f"{pkg}.{s.name}")
            for j, meth in enumerate(s.method):
                put([6, i, 2, j], f"{pkg}.{s.name}.{meth.name}")
    return dict(sorted(out.items()))


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class Gen:
    def __init__(self, fds: descriptor_pb2.FileDescriptorSet, notes: dict[str, str]) -> None:
        self.notes = notes
        self.files = [f for f in fds.file if f.package == PROTO_PACKAGE]
        # full type name (with leading dot) -> (python module alias, dotted class path)
        self.types: dict[str, tuple[str, str]] = {}
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        for f in self.files:
            mod = pathlib.Path(f.name).stem + "_pb2"

            def walk(m, scope, mod=mod):
                full = f"{scope}.{m.name}"
                self.types[full] = (mod, full[len("." + PROTO_PACKAGE) + 1 :])
                self.messages[full] = m
                for n in m.nested_type:
                    walk(n, full)
                for e in m.enum_type:
                    self.types[f"{full}.{e.name}"] = (mod, f"{full}.{e.name}"[len("." + PROTO_PACKAGE) + 1 :])

            for m in f.message_type:
                walk(m, "." + PROTO_PACKAGE)
            for e in f.enum_type:
                self.types[f".{PROTO_PACKAGE}.{e.name}"] = (mod, e.name)

    def pyclass(self, full: str) -> str:
        if full in self.types:
            mod, path = self.types[full]
            return f"{mod}.{path}"
        known = {
            ".google.protobuf.Empty": "empty_pb2.Empty",
            ".google.protobuf.FieldMask": "field_mask_pb2.FieldMask",
            ".google.protobuf.Duration": "duration_pb2.Duration",
            ".google.protobuf.Timestamp": "timestamp_pb2.Timestamp",
            ".google.rpc.Status": "status_pb2.Status",
        }
        return known[full]

    def field_type(self, fld: descriptor_pb2.FieldDescriptorProto) -> str:
        if fld.type == F.TYPE_MESSAGE:
            entry = self.messages.get(fld.type_name)
            if entry is not None and entry.options.map_entry:
                return "Mapping[str, str]"
            base = WKT.get(fld.type_name) or f"{self.pyclass(fld.type_name)} | Mapping[str, Any]"
        elif fld.type == F.TYPE_ENUM:
            base = "int | str"
        else:
            base = SCALARS.get(fld.type, "int")
        if fld.label == F.LABEL_REPEATED:
            return f"Sequence[{base}]"
        return base

    def method(self, svc, m, is_async: bool) -> list[str]:
        req = self.messages[m.input_type]
        req_cls, resp_cls = self.pyclass(m.input_type), self.pyclass(m.output_type)
        svc_full = f"{PROTO_PACKAGE}.{svc.name}"
        doc = self.notes.get(f"{svc_full}.{m.name}", f"Calls {svc.name}.{m.name}.")
        name = snake(m.name)
        a = "async " if is_async else ""
        lines: list[str] = []
        if m.client_streaming:
            ret = f"AsyncIterator[{resp_cls}]" if is_async else f"Iterator[{resp_cls}]"
            req_t = f"AsyncIterable[{req_cls}] | Iterable[{req_cls}]" if is_async else f"Iterable[{req_cls}]"
            lines += [
                f"    def {name}(self, requests: {req_t}, *, timeout: float | None = None, metadata: Metadata | None = None) -> {ret}:",
                f'        """{_docstring(doc)}"""',
                f"        return self._stream_stream({svc_full!r}, {m.name!r}, requests, timeout, metadata)",
                "",
            ]
            return lines
        params, kwargs = [], []
        for fld in req.field:
            arg = fld.name + ("_" if fld.name in ("request", "timeout", "metadata", "self") else "")
            params.append(f"        {arg}: {self.field_type(fld)} | None = None,")
            kwargs.append(f"{fld.name}={arg}")
        field_doc = []
        for fld in req.field:
            c = self.notes.get(f"{m.input_type[1:]}.{fld.name}")
            if c:
                field_doc.append(f"{fld.name}: {' '.join(c.split())}")
        full_doc = doc + ("\n\nArguments (or fields of `request`):\n" + "\n".join("- " + d for d in field_doc) if field_doc else "")
        build = f"_build({req_cls}, request, {', '.join(kwargs)})" if kwargs else f"_build({req_cls}, request)"
        if m.server_streaming:
            ret = f"AsyncIterator[{resp_cls}]" if is_async else f"Iterator[{resp_cls}]"
            call = f"return self._unary_stream({svc_full!r}, {m.name!r}, {build}, timeout, metadata)"
            a = ""
        else:
            ret = resp_cls
            call = f"return {'await ' if is_async else ''}self._unary({svc_full!r}, {m.name!r}, {build}, timeout, metadata)"
        lines += [
            f"    {a}def {name}(",
            "        self,",
            f"        request: {req_cls} | Mapping[str, Any] | None = None,",
            "        /,",
            "        *,",
            *params,
            "        timeout: float | None = None,",
            "        metadata: Metadata | None = None,",
            f"    ) -> {ret}:",
            f'        """{_docstring(full_doc)}"""',
            f"        {call}",
            "",
        ]
        page = self.pager(m)
        if page:
            items_field, item_type = page
            it = "iter_" + snake(m.name[len("List"):])
            ret = f"AsyncIterator[{self.pyclass(item_type)}]" if is_async else f"Iterator[{self.pyclass(item_type)}]"
            lines += [
                f"    def {it}(",
                "        self,",
                f"        request: {req_cls} | Mapping[str, Any] | None = None,",
                "        /,",
                "        *,",
                *params,
                "        timeout: float | None = None,",
                "        metadata: Metadata | None = None,",
                f"    ) -> {ret}:",
                f'        """Every item of `{name}`, following page tokens (each page is one call with `timeout`)."""',
                f"        return self._pages(self.{name}, {build}, {items_field!r}, timeout, metadata)",
                "",
            ]
        return lines

    def pager(self, m) -> tuple[str, str] | None:
        req, resp = self.messages.get(m.input_type), self.messages.get(m.output_type)
        if req is None or resp is None or not m.name.startswith("List") or "page_token" not in {f.name for f in req.field}:
            return None
        repeated = [f for f in resp.field if f.label == F.LABEL_REPEATED and f.type == F.TYPE_MESSAGE]
        if "next_page_token" not in {f.name for f in resp.field} or len(repeated) != 1:
            return None
        return repeated[0].name, repeated[0].type_name

    def module(self) -> str:
        mods = sorted({pathlib.Path(f.name).stem + "_pb2" for f in self.files})
        out = [
            '"""Typed methods per RPC, generated by clients/sdk/scripts/gen_sdk.py: do not edit."""',
            "",
            "# ruff: noqa",
            "from __future__ import annotations",
            "",
            "from typing import TYPE_CHECKING, Any, AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence",
            "",
            "from google.protobuf import duration_pb2, empty_pb2, field_mask_pb2, timestamp_pb2",
            "from google.rpc import status_pb2",
            "",
            f"from meshgate.api.v1 import {', '.join(mods)}",
            "from meshgate.sdk._build import Metadata, build as _build",
            "",
        ]
        names: set[str] = set()
        for cls, is_async in (("SyncMethods", False), ("AsyncMethods", True)):
            out += ["", f"class {cls}:", f'    """Every RPC of the API as a {"coroutine" if is_async else "method"}; see `Client`."""', ""]
            out += _TRANSPORT_ASYNC if is_async else _TRANSPORT_SYNC
            for f in self.files:
                for svc in f.service:
                    out.append(f"    # {svc.name} " + "-" * (70 - len(svc.name)))
                    out.append("")
                    for m in svc.method:
                        if not is_async:
                            assert snake(m.name) not in names, f"two RPCs named {m.name}"
                            names.add(snake(m.name))
                        out += self.method(svc, m, is_async)
        return "\n".join(out).rstrip() + "\n"


# What the methods call, implemented by Client and AsyncClient; declared here
# for type checkers only.
_TRANSPORT_SYNC = [
    "    if TYPE_CHECKING:  # the transport: Client's",
    "        def _unary(self, service: str, method: str, request: Any, timeout: float | None,",
    "                   metadata: Metadata | None) -> Any: ...",
    "        def _unary_stream(self, service: str, method: str, request: Any, timeout: float | None,",
    "                          metadata: Metadata | None) -> Iterator[Any]: ...",
    "        def _stream_stream(self, service: str, method: str, requests: Iterable[Any], timeout: float | None,",
    "                           metadata: Metadata | None) -> Iterator[Any]: ...",
    "        @staticmethod",
    "        def _pages(list_method: Any, request: Any, items_field: str, timeout: float | None,",
    "                   metadata: Metadata | None) -> Iterator[Any]: ...",
    "",
]
_TRANSPORT_ASYNC = [
    "    if TYPE_CHECKING:  # the transport: AsyncClient's",
    "        async def _unary(self, service: str, method: str, request: Any, timeout: float | None,",
    "                         metadata: Metadata | None) -> Any: ...",
    "        def _unary_stream(self, service: str, method: str, request: Any, timeout: float | None,",
    "                          metadata: Metadata | None) -> AsyncIterator[Any]: ...",
    "        def _stream_stream(self, service: str, method: str, requests: AsyncIterable[Any] | Iterable[Any],",
    "                           timeout: float | None, metadata: Metadata | None) -> AsyncIterator[Any]: ...",
    "        @staticmethod",
    "        def _pages(list_method: Any, request: Any, items_field: str, timeout: float | None,",
    "                   metadata: Metadata | None) -> AsyncIterator[Any]: ...",
    "",
]


def _docstring(text: str) -> str:
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    if "\n" in text:
        return text.replace("\n", "\n        ").replace("\n        \n", "\n\n") + "\n        "
    return text


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    fds = descriptor_set()
    notes = comments(fds)
    out.mkdir(parents=True, exist_ok=True)
    comments_py = out / "_comments.py"
    comments_py.write_text(
        '"""Proto comments by full name, generated by clients/sdk/scripts/gen_sdk.py: do not edit."""\n\n'
        "# ruff: noqa\n"
        f"COMMENTS: dict[str, str] = {pprint.pformat(notes, width=120, sort_dicts=True)}\n"
    )
    generated_py = out / "_generated.py"
    generated_py.write_text(Gen(fds, notes).module())
    return [comments_py, generated_py]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for f in generate(args.out):
        print(f)


if __name__ == "__main__":
    main()
