"""Config loading: flag > env > TOML file > default, with sources; bad input exits 2."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshgate.common import config
from meshgate.common.config import ServerConfig, load

P = "MESHGATE_TEST_"


@dataclass
class Cfg(config.ServerConfig):
    kek: str = config.option("", "key-encryption key", secret=True)
    workers: int = config.option(4, "worker count")
    tags: list = config.option([], "tags")


def ld(argv=(), env=None, cls=Cfg):
    return load(cls, list(argv), prog="t", environ=env or {}, env_prefix=P)


def write(tmp_path, text: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_defaults():
    got = ld()
    assert got.config == Cfg()
    assert set(got.sources.values()) == {"default"}
    assert got.config.listen == "127.0.0.1:0"
    assert got.config.insecure is False


def test_precedence_flag_env_file_default(tmp_path):
    path = write(tmp_path, 'listen = "127.0.0.1:1"\netcd_prefix = "/file"\nshutdown_grace = 3\nlog_level = "warning"\n')
    env = {P + "CONFIG": path, P + "LISTEN": "127.0.0.1:2", P + "ETCD_PREFIX": "/env"}
    got = ld(["--listen", "127.0.0.1:3"], env)
    c, s = got.config, got.sources
    assert (c.listen, s["listen"]) == ("127.0.0.1:3", "flag")
    assert (c.etcd_prefix, s["etcd_prefix"]) == ("/env", f"env {P}ETCD_PREFIX")
    assert (c.shutdown_grace, s["shutdown_grace"]) == (3.0, f"file {path}")
    assert isinstance(c.shutdown_grace, float)
    assert (c.log_level, s["log_level"]) == ("warning", f"file {path}")
    assert (c.etcd_endpoints, s["etcd_endpoints"]) == ("127.0.0.1:2379", "default")


def test_config_flag_beats_config_env(tmp_path):
    a = tmp_path / "a.toml"
    a.write_text('etcd_prefix = "/a"\n')
    b = tmp_path / "b.toml"
    b.write_text('etcd_prefix = "/b"\n')
    got = ld(["--config", str(a)], {P + "CONFIG": str(b)})
    assert got.config.etcd_prefix == "/a"
    assert got.sources["etcd_prefix"] == f"file {a}"


def test_file_keys_may_use_dashes(tmp_path):
    path = write(tmp_path, 'etcd-prefix = "/dash"\nlog-json = true\n')
    got = ld(["--config", path])
    assert got.config.etcd_prefix == "/dash"
    assert got.config.log_json is True


@pytest.mark.parametrize(
    "text, want",
    [("true", True), ("1", True), ("yes", True), ("ON", True), ("false", False), ("0", False), ("off", False)],
)
def test_bool_from_env(text, want):
    got = ld(env={P + "INSECURE": text})
    assert got.config.insecure is want
    assert got.sources["insecure"] == f"env {P}INSECURE"


def test_bool_flags():
    assert ld(["--insecure"]).config.insecure is True
    got = ld(["--no-insecure"], {P + "INSECURE": "true"})
    assert got.config.insecure is False
    assert got.sources["insecure"] == "flag"


def test_int_and_float_parsing():
    got = ld(["--workers", "7", "--shutdown-grace", "0.5"])
    assert got.config.workers == 7 and isinstance(got.config.workers, int)
    assert got.config.shutdown_grace == 0.5


def test_list_default_is_not_shared():
    a, b = Cfg(), Cfg()
    a.tags.append("x")
    assert b.tags == []


def exit_code(capsys, fn) -> tuple[int, str]:
    with pytest.raises(SystemExit) as ei:
        fn()
    return ei.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--shutdown-grace", "soon"], {}),
        (["--workers", "4.5"], {}),
        ([], {P + "WORKERS": "many"}),
        ([], {P + "INSECURE": "maybe"}),
        ([], {P + "LOG_LEVEL": "verbose"}),
        (["--log-level", "verbose"], {}),
        (["--no-such-flag"], {}),
    ],
)
def test_bad_values_exit_2(capsys, argv, env):
    code, err = exit_code(capsys, lambda: ld(argv, env))
    assert code == 2
    assert "usage: t" in err


def test_bad_value_names_the_option(capsys):
    code, err = exit_code(capsys, lambda: ld([], {P + "SHUTDOWN_GRACE": "soon"}))
    assert code == 2
    assert "shutdown-grace" in err and "soon" in err


def test_unknown_file_key_exits_2(tmp_path, capsys):
    path = write(tmp_path, 'listen = "127.0.0.1:1"\nlisten_adress = "typo"\n')
    code, err = exit_code(capsys, lambda: ld(["--config", path]))
    assert code == 2
    assert "unknown keys" in err and "listen_adress" in err


@pytest.mark.parametrize(
    "text",
    [
        "shutdown_grace = 'soon'\n",
        "log_level = 'verbose'\n",
        "not toml [\n",
        "workers = true\n",  # a bool is not an int, even though Python says so
        "listen = ['127.0.0.1:1']\n",  # a list is not a string
        "insecure = 1\n",
    ],
)
def test_bad_file_values_exit_2(tmp_path, capsys, text):
    path = write(tmp_path, text)
    code, _ = exit_code(capsys, lambda: ld(["--config", path]))
    assert code == 2


def test_missing_file_exits_2(tmp_path, capsys):
    code, err = exit_code(capsys, lambda: ld(["--config", str(tmp_path / "nope.toml")]))
    assert code == 2
    assert "cannot read config file" in err


def test_describe_hides_secrets_and_names_sources():
    got = ld(["--kek", "hunter2-kek-material"], {P + "ETCD_PREFIX": "/x"})
    shown = got.describe()
    assert shown["kek"] == "<secret> (flag)"
    assert "hunter2" not in repr(shown)
    assert shown["etcd_prefix"] == f"'/x' (env {P}ETCD_PREFIX)"
    assert shown["listen"] == "'127.0.0.1:0' (default)"
    assert set(shown) == set(got.sources)


def test_describe_shows_empty_secret_as_empty():
    assert ld().describe()["kek"] == "'' (default)"


def test_help_names_env_variables(capsys):
    with pytest.raises(SystemExit) as ei:
        ld(["--help"])
    assert ei.value.code == 0
    text = capsys.readouterr().out
    for f in ("LISTEN", "ETCD_ENDPOINTS", "INSECURE", "CONFIG", "KEK"):
        assert P + f in text
    assert "--no-insecure" in text


def test_server_config_default_prefix():
    got = load(ServerConfig, [], prog="t", environ={"MESHGATE_LISTEN": "127.0.0.1:9"})
    assert got.config.listen == "127.0.0.1:9"
    assert got.sources["listen"] == "env MESHGATE_LISTEN"


def test_toml_int_is_accepted_for_float(tmp_path):
    path = write(tmp_path, "shutdown_grace = 3\nworkers = 2\n")
    cfg = ld(["--config", path]).config
    assert (cfg.shutdown_grace, cfg.workers) == (3.0, 2)
