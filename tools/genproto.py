"""Generate the Python stubs for proto/registry/v1 into clients/python.

protoc names generated modules after the proto package (``registry.v1``), but the
stubs ship inside the ``registry_client`` distribution, so imports are rewritten to
``registry_client.v1``. ``--check`` regenerates into a temporary folder and fails
when the committed stubs differ, which is how CI catches stale code.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTOS = sorted(PROTO_ROOT.glob("registry/v1/*.proto"))
BIN = Path(sys.executable).parent
TARGET = ROOT / "clients" / "python" / "registry_client" / "v1"
INIT = '"""Generated protobuf and gRPC stubs for registry.v1 (see ``make proto``)."""\n'


def generate(out: Path) -> None:
    raw = out / "raw"
    raw.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={raw}",
        f"--grpc_python_out={raw}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={raw}",
        f"--mypy_grpc_out={raw}",
        *(str(p) for p in PROTOS),
    ]
    subprocess.run(cmd, check=True)
    dest = out / "v1"
    dest.mkdir()
    for path in sorted((raw / "registry" / "v1").iterdir()):
        text = path.read_text()
        text = re.sub(r"\bfrom registry\.v1 import\b", "from registry_client.v1 import", text)
        text = re.sub(r"\bimport registry\.v1\.", "import registry_client.v1.", text)
        text = re.sub(r"\bregistry\.v1\.registry_pb2\b", "registry_client.v1.registry_pb2", text)
        (dest / path.name).write_text(text)
    (dest / "__init__.py").write_text(INIT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "v1"
        if args.check:
            names = sorted(p.name for p in fresh.iterdir())
            have = (
                sorted(p.name for p in TARGET.iterdir() if p.is_file()) if TARGET.exists() else []
            )
            _match, mismatch, errors = filecmp.cmpfiles(fresh, TARGET, names, shallow=False)
            stale = sorted(set(mismatch) | set(errors) | (set(have) - set(names)))
            if stale:
                print(f"stale generated stubs in {TARGET.relative_to(ROOT)}: {', '.join(stale)}")
                print("run `make proto` and commit the result")
                return 1
            print("generated stubs are up to date")
            return 0
        if TARGET.exists():
            shutil.rmtree(TARGET)
        shutil.copytree(fresh, TARGET)
        print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
