"""gatewayd's settings are documented: every field of Settings has its own
docstring right below it (the house style: a docstring per field), and the
path settings' environment variables are named in docs/gatewayd.md."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

from meshgate.gatewayd import config

ROOT = pathlib.Path(__file__).resolve().parents[3]


def test_every_setting_has_its_own_docstring():
    tree = ast.parse(pathlib.Path(config.__file__).read_text())
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings"]
    undocumented = []
    for stmt, after in zip(cls.body, [*cls.body[1:], None], strict=True):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            documented = (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                          and isinstance(after.value.value, str))
            if not documented:
                undocumented.append(stmt.target.id)
    assert undocumented == []


def test_path_settings_environment_variables_are_in_the_docs():
    doc = (ROOT / "docs/gatewayd.md").read_text()
    names = {f.name for f in dataclasses.fields(config.Settings)}
    for name in ("path_check_interval", "path_rtt_interval"):
        assert name in names
        assert config.ENV_PREFIX + name.upper() in doc, name
