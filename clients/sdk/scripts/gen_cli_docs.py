"""Write docs/cli.md from the `meshgate` CLI itself (every command, option and help text).

    .venv/bin/python clients/sdk/scripts/gen_cli_docs.py [--out docs/cli.md]

A test fails when docs/cli.md differs from what this prints, so the page never
falls behind the API.
"""

from __future__ import annotations

import argparse
import inspect
import pathlib

import click

ROOT = pathlib.Path(__file__).resolve().parents[3]
DEFAULT_OUT = ROOT / "docs" / "cli.md"


def _options(cmd: click.Command, ctx: click.Context) -> list[str]:
    rows = []
    for p in cmd.get_params(ctx):
        rec = p.get_help_record(ctx)
        if rec is None:
            if isinstance(p, click.Argument):
                rows.append(f"| `{p.make_metavar(ctx)}` | positional: the resource name (instead of the `name` option) |")
            continue
        decl, help_text = rec
        cell = " ".join(help_text.split()).replace("|", "\\|")
        rows.append(f"| `{decl.replace('|', chr(92) + '|')}` | {cell} |")
    if not rows:
        return []
    return ["| option | meaning |", "| --- | --- |", *rows, ""]


def render(cli: click.Group) -> str:
    out = [
        "# The `meshgate` CLI",
        "",
        "Generated from the CLI itself by `clients/sdk/scripts/gen_cli_docs.py` (`make docs`); do not edit.",
        "Every RPC of the API is `meshgate <resource> <verb>`; request fields are options (nested fields",
        "with dotted names), `--from-file` takes the request as JSON or YAML, `-o table|json|yaml` picks",
        "the output. Exit codes: 0 success, 1 the server refused or nothing answers at the target, 2 usage error.",
        "",
    ]

    def walk(cmd: click.Command, parent: click.Context | None, path: list[str]) -> None:
        # With the command's own context settings, as when it runs: the help
        # option is -h/--help (the group's help_option_names), and click keeps
        # the first help option it built, so the docs must not depend on whether
        # the CLI has run in this process before.
        ctx = click.Context(cmd, info_name=path[-1], parent=parent, **cmd.context_settings)
        level = "#" * min(len(path) + 1, 4)
        out.append(f"{level} `{' '.join(path)}`")
        out.append("")
        out.append("```")
        out.append(" ".join(path) + " " + " ".join(cmd.collect_usage_pieces(ctx)))
        out.append("```")
        out.append("")
        if cmd.help:
            out.append(inspect.cleandoc(click.unstyle(cmd.help)))
            out.append("")
        out.extend(_options(cmd, ctx))
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), ctx, [*path, name])

    walk(cli, None, ["meshgate"])
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    from meshgate.sdk.cli import cli

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = p.parse_args()
    args.out.write_text(render(cli))
    print(args.out)


if __name__ == "__main__":
    main()
