"""The CLI and SDK cover every RPC, and their generated files are current."""

from __future__ import annotations

import importlib.util
import pathlib

import click
from google.protobuf import descriptor_pool

from meshgate.sdk import AsyncClient, Client, api
from meshgate.sdk.cli import cli

ROOT = pathlib.Path(__file__).resolve().parents[3]
SDK = ROOT / "clients" / "sdk"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SDK / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _all_rpcs() -> set[str]:
    """Every RPC of every service in every meshgate.api.v1 file, from the descriptor pool."""
    pool = descriptor_pool.Default()
    out = set()
    for proto in (ROOT / "protos/meshgate/api/v1").glob("*.proto"):
        importlib.import_module(f"meshgate.api.v1.{proto.stem}_pb2")
        fd = pool.FindFileByName(f"meshgate/api/v1/{proto.name}")
        for svc in fd.services_by_name.values():
            out |= {f"{svc.full_name}.{m.name}" for m in svc.methods}
    return out


def test_every_rpc_has_a_cli_command_with_help():
    rpcs = _all_rpcs()
    assert rpcs, "no RPCs found"
    ctx = click.Context(cli)
    covered = set()
    for s in api.services():
        group = cli.get_command(ctx, s.command)
        assert isinstance(group, click.Group) and group.help, s.full_name
        for m in s.methods:
            cmd = group.get_command(ctx, m.verb)
            assert cmd is not None, f"{m.full_name} has no command"
            assert cmd.help and cmd.help.strip(), f"{m.full_name} has no help"
            covered.add(m.full_name)
    assert rpcs == covered, f"RPCs without a command: {sorted(rpcs - covered)}"


def test_every_rpc_has_sdk_methods():
    for full in _all_rpcs():
        m = api.method(full)
        for cls in (Client, AsyncClient):
            fn = getattr(cls, m.python_name, None)
            assert fn is not None and fn.__doc__, f"{cls.__name__} lacks {m.python_name}"


def test_proto_comments_are_the_help_text():
    ctx = click.Context(cli)
    create = cli.get_command(ctx, "network").get_command(ctx, "create")
    assert create.help.startswith("Creates a network.")
    opt = next(p for p in create.params if p.name == "f__network__ipv4_cidr")
    assert "CIDR notation" in opt.help and opt.opts == ["--network.ipv4-cidr"]


def test_a_field_required_on_create_is_not_marked_required_on_update():
    ctx = click.Context(cli)
    group = cli.get_command(ctx, "egress-gateway")
    def node_help(cmd: str) -> str:
        return next(p for p in group.get_command(ctx, cmd).params if p.name == "f__egress_gateway__node").help
    assert node_help("create").endswith("(required)")
    assert "(required)" not in node_help("update")


def test_generated_sdk_code_is_current(tmp_path):
    written = _script("gen_sdk").generate(tmp_path)
    for f in written:
        committed = SDK / "src" / "meshgate" / "sdk" / f.name
        assert f.read_text() == committed.read_text(), f"{f.name} is stale: run clients/sdk/scripts/gen_sdk.py"


def test_cli_docs_are_current():
    text = _script("gen_cli_docs").render(cli)
    assert (ROOT / "docs" / "cli.md").read_text() == text, "docs/cli.md is stale: run `make docs`"
