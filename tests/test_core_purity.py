"""The core stays pure: no I/O, no clocks, no network clients, no imports from the shells."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "common" / "src" / "fedplane" / "core"
FORBIDDEN = (
    "grpc",
    "nats",
    "aetcd",
    "kubernetes",
    "asyncio",
    "socket",
    "time",
    "random",
    "fedplane.hub",
    "fedplane.agent",
)


def test_core_imports_nothing_that_does_io() -> None:
    offenders = []
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                    offenders.append(f"{path.name}: {name}")
    assert not offenders, offenders
