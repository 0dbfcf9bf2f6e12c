"""Generate the Python code of the meshgate API from protos/.

Used by `make protos` (writes into clients/api/src) and by the drift test
(writes into a temporary directory and compares). The output depends only on
the .proto files and the pinned grpcio-tools and mypy-protobuf versions.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "clients" / "api" / "src"
PACKAGE = pathlib.Path("meshgate") / "api" / "v1"


def _googleapis_include() -> str:
    # googleapis-common-protos ships google/api/*.proto next to its modules.
    import google.api.field_behavior_pb2 as fb

    return str(pathlib.Path(fb.__file__).resolve().parent.parent.parent)


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    """Generate into `out` (a source root) and return the files written."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        plugin_dir = pathlib.Path(sys.executable).parent
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{PROTO_ROOT}", f"-I{_googleapis_include()}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out={tmp}", f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        subprocess.run(cmd, cwd=PROTO_ROOT, check=True)
        target = out / PACKAGE
        if target.exists():
            for old in target.glob("*_pb2*"):
                old.unlink()
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((pathlib.Path(tmp) / PACKAGE).iterdir()):
            shutil.copy2(f, target / f.name)
            written.append(target / f.name)
        return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="source root to write into")
    args = parser.parse_args()
    for f in generate(args.out):
        print(f.relative_to(args.out))


if __name__ == "__main__":
    main()
