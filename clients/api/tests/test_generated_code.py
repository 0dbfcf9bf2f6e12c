"""The committed generated code is exactly what `make protos` produces now."""

import filecmp
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "clients" / "api" / "src" / "meshgate" / "api" / "v1"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_regenerating_changes_nothing(tmp_path):
    written = _generator().generate(tmp_path)
    fresh = {p.name for p in written}
    committed = {p.name for p in COMMITTED.iterdir() if p.is_file() and "_pb2" in p.name}
    assert fresh == committed, "generated files differ from committed ones: run `make protos`"
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "meshgate/api/v1", COMMITTED, sorted(fresh), shallow=False)
    assert not mismatch and not errors, f"stale generated code, run `make protos`: {mismatch + errors}"


def test_every_proto_has_generated_code():
    protos = {p.stem for p in (ROOT / "protos/meshgate/api/v1").glob("*.proto")}
    modules = {p.name[: -len("_pb2.py")] for p in COMMITTED.glob("*_pb2.py")}
    assert protos == modules


def test_resources_follow_aip_naming():
    """Every resource message declares its pattern, and has name, etag and times."""
    from google.api import resource_pb2

    from meshgate.api.v1 import egress_pb2, enrollment_pb2, external_client_pb2, network_pb2, node_pb2, policy_pb2

    for mod in (network_pb2, node_pb2, egress_pb2, enrollment_pb2, external_client_pb2, policy_pb2):
        for msg in mod.DESCRIPTOR.message_types_by_name.values():
            opts = msg.GetOptions()
            if not opts.HasExtension(resource_pb2.resource):
                continue
            res = opts.Extensions[resource_pb2.resource]
            assert res.pattern and res.pattern[0].startswith("networks/{network}"), msg.full_name
            for f in ("name", "etag", "create_time", "update_time", "uid"):
                assert f in msg.fields_by_name, f"{msg.full_name} lacks {f}"
