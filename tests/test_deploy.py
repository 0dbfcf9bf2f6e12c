"""The deploy files say only what the code accepts: every ExecStart runs an
entry point of ours with options its parser takes, and the example config
files load without error."""

import configparser
import pathlib
import shlex
import sys

import pytest

from meshgate.common import config

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "deploy/systemd").glob("*.service"))
BIN = pathlib.Path(sys.executable).parent


def exec_start(unit: pathlib.Path) -> list[str]:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.read(unit)
    return shlex.split(cp["Service"]["ExecStart"])


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_runs_an_entry_point_with_accepted_options(unit, tmp_path):
    argv = exec_start(unit)
    exe = pathlib.Path(argv[0])
    assert exe.parent == pathlib.Path("/opt/meshgate/.venv/bin")
    local = BIN / exe.name
    assert local.exists(), f"{exe.name} is not an entry point of the installed distributions"
    args = argv[1:]
    if exe.name in ("meshgate-controlplane", "meshgate-keyservice"):
        example = ROOT / "deploy/systemd" / (exe.name.split("-", 1)[1] + ".toml.example")
        args = [example.as_posix() if a.startswith("/etc/meshgate/") else a for a in args]
        from meshgate.controlplane.main import ControlPlaneConfig
        from meshgate.keyservice.main import KeyServiceConfig

        cls = ControlPlaneConfig if exe.name == "meshgate-controlplane" else KeyServiceConfig
        loaded = config.load(cls, args, prog=exe.name, environ={})
        assert loaded.sources["listen"].startswith("file ")
    else:
        from meshgate.gatewayd.main import build_parser

        ns = build_parser().parse_args(args)  # exits 2 on an option it does not take
        assert str(ns.state_dir) == "/var/lib/meshgate/gatewayd" and ns.log_format == "json"


def test_gatewayd_unit_leaves_wireguard_go_running_on_stop():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.read(ROOT / "deploy/systemd/meshgate-gatewayd.service")
    assert cp["Service"]["KillMode"] == "process"
