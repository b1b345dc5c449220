"""Regenerate the Python stubs in common/src/fedplane/v1 from proto/ (the only way they are made).

Usage: python tools/genproto.py [OUTPUT_ROOT]   (default: common/src, the shared library)
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
# The mypy-protobuf plugins are installed beside this interpreter.
BIN = Path(sys.executable).parent


def generate(out_root: Path) -> list[Path]:
    """Generate messages, gRPC stubs and mypy stubs under out_root/fedplane/v1."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    (out_root / "fedplane" / "v1").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = out_root / "fedplane" / "v1" / "__init__.py"
    init.write_text('"""Generated protobuf and gRPC stubs (tools/genproto.py); do not edit."""\n')
    return sorted((out_root / "fedplane" / "v1").iterdir())


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "common" / "src")
