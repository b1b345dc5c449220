"""Regenerate the Python stubs from proto/ (the only way they are made).

Each proto package goes to the distribution that owns it: fedplane/v1 (the wire API) to
common/src, fedplane/hub/etcdpb (etcd's API, vendored by tools/vendor_etcd_api.py) to hub/src.

Usage: python tools/genproto.py [ROOT]   (default: this checkout; another ROOT gets the same tree)
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


# proto package directory -> the source root of the distribution that ships it.
PACKAGES = {"fedplane/v1": "common/src", "fedplane/hub/etcdpb": "hub/src"}


def generate(root: Path = ROOT) -> list[Path]:
    """Generate messages, gRPC stubs and mypy stubs of every package under root/<its source root>."""
    written: list[Path] = []
    for package, src in PACKAGES.items():
        written.extend(_generate_package(package, root / src))
    return written


def _generate_package(package: str, out_root: Path) -> list[Path]:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / package).glob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    out_dir = out_root / package
    out_dir.mkdir(parents=True, exist_ok=True)
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
    (out_dir / "__init__.py").write_text(
        '"""Generated protobuf and gRPC stubs (tools/genproto.py); do not edit."""\n'
    )
    return sorted(out_dir.iterdir())


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
