"""Generate the Python modules for every .proto under protos/.

Usage: python scripts/gen_protos.py [OUTPUT_ROOT]

The generated *_pb2.py, *_pb2.pyi and *_pb2_grpc.py files are committed next to
their .proto (so an editable install needs no build step); tests/test_protos.py
regenerates them into a temporary folder and fails when they drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent / "protos"


def proto_files() -> list[Path]:
    return sorted(ROOT.rglob("*.proto"))


def generate(out: Path) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    for proto in proto_files():
        rel = proto.relative_to(ROOT)
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(rel),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {rel}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
