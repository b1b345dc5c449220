"""Vendor etcd's v3 API protos into proto/fedplane/hub/etcdpb (then run tools/genproto.py).

Usage: python tools/vendor_etcd_api.py [ETCD_API_DIR]
  (default: the go.etcd.io/etcd/api/v3 module of ETCD_VERSION in the Go module cache, which
  tools/build_etcd.sh fills)

The hub speaks etcd's gRPC API itself, on a channel of its own (TLS with a client certificate
when configured; see hub/etcd.py and docs/security.md). Its stubs are generated from etcd's own
rpc.proto, kv.proto and auth.proto with only what Python needs no part of taken out: the
gogoproto, versionpb and HTTP-gateway annotations, and their imports. Packages, messages,
field numbers and services are etcd's unchanged, so the wire API is etcd's exactly; the files
move under fedplane/hub/etcdpb so that the generated modules live in the hub's package.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ETCD_VERSION = "v3.6.16"  # keep in step with tools/build_etcd.sh and fedplane.local.servers
TARGET = ROOT / "proto" / "fedplane" / "hub" / "etcdpb"
SOURCES = {
    "rpc.proto": "etcdserverpb/rpc.proto",
    "kv.proto": "mvccpb/kv.proto",
    "auth.proto": "authpb/auth.proto",
}
IMPORTS = {f"etcd/api/{source}": f"fedplane/hub/etcdpb/{name}" for name, source in SOURCES.items()}


def strip(text: str, origin: str) -> str:
    """etcd's proto text without the annotations that need Go-only or gateway protos."""
    out: list[str] = []
    depth = 0  # inside a multi-line `option (...) = { ... };`
    for line in text.splitlines():
        stripped = line.strip()
        if depth:
            depth += line.count("{") - line.count("}")
            continue
        if stripped.startswith("import "):
            path = stripped.split('"')[1]
            if path not in IMPORTS:
                continue
            line = line.replace(path, IMPORTS[path])
        if stripped == "// for grpc-gateway":
            continue
        if stripped.startswith("option ("):
            depth = line.count("{") - line.count("}")
            continue
        out.append(re.sub(r"\s*\[\((?:versionpb|gogoproto)\.[^\]]*\]", "", line))
    body = "\n".join(out) + "\n"
    # An rpc whose options were all taken out: its empty body on one line.
    body = re.sub(r"(rpc [^{;]*\))\s*\{\s*\}", r"\1 {}", body)
    header = (
        f"// Vendored from etcd's {origin} ({ETCD_VERSION}) by tools/vendor_etcd_api.py:\n"
        "// annotations (gogoproto, versionpb, HTTP gateway) removed, imports moved; nothing else changed.\n"
    )
    return header + re.sub(r"\n{3,}", "\n\n", body)


def vendor(api_dir: Path) -> list[Path]:
    TARGET.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in SOURCES.items():
        path = TARGET / name
        path.write_text(strip((api_dir / source).read_text(), f"api/{source}"))
        written.append(path)
    return written


def default_api_dir() -> Path:
    cache = os.environ.get("GOMODCACHE") or str(Path.home() / "go" / "pkg" / "mod")
    return Path(cache) / "go.etcd.io" / "etcd" / "api" / f"v3@{ETCD_VERSION}"


if __name__ == "__main__":
    for written in vendor(Path(sys.argv[1]) if len(sys.argv) > 1 else default_api_dir()):
        print(written.relative_to(ROOT))
