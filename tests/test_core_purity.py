"""The core stays pure: it imports standard-library modules that do no I/O, and itself; nothing else.

An allowlist, not a list of what is forbidden, so that a new import has to be argued for here.
Every module under fedplane/core counts, subpackages included, and every import in it,
wherever it is written (see tests/imports.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests import imports

# Standard-library modules that do no I/O, read no clock, draw no randomness and start no
# threads. `sys` only for the two names the core uses: the rest of it is the process's I/O.
STDLIB = frozenset(
    {
        "__future__",
        "abc",
        "bisect",
        "collections",
        "dataclasses",
        "decimal",
        "enum",
        "fractions",
        "functools",
        "heapq",
        "itertools",
        "json",  # parsing and rendering text only
        "math",
        "operator",
        "re",
        "sys.intern",
        "sys.maxunicode",
        "typing",
    }
)
OWN = frozenset({"fedplane.core"})
# Nothing else: not even the wire messages (fedplane.v1). The core speaks its own types, and
# the shells convert at their edges (docs/architecture.md, "One language in the core").
ALLOWED = STDLIB | OWN
# Builtins that do I/O, or run code the import rule cannot see, without any import.
IO_BUILTINS = frozenset({"open", "print", "input", "breakpoint", "exec", "eval", "compile", "__import__"})


def allowed(name: str) -> bool:
    return imports.matches(name, ALLOWED)


def test_the_core_imports_only_what_the_allowlist_names() -> None:
    assert not imports.offenders("fedplane.core", allowed)


def test_the_core_calls_no_builtin_that_does_io() -> None:
    found = []
    for _, path in imports.modules("fedplane.core"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in IO_BUILTINS:
                found.append(f"{path.name}:{node.lineno}: {node.func.id}()")
    assert not found


def test_every_core_module_is_scanned() -> None:
    scanned = {module for module, _ in imports.modules("fedplane.core")}
    assert {
        "fedplane.core",
        "fedplane.core.dispatch",
        "fedplane.core.placement",
        "fedplane.core.capacity",
    } <= scanned


def test_the_core_does_not_speak_the_wire() -> None:
    found = imports.offenders(
        "fedplane.core", lambda name: not imports.matches(name, {"fedplane.v1", "google"})
    )
    assert not found, f"the core uses its own types; the shells convert: {found}"


@pytest.mark.parametrize(
    "name",
    [
        "os",
        "os.path",
        "sys",
        "sys.stdout",
        "threading",
        "time",
        "socket",
        "asyncio",
        "random",
        "logging",
        "grpc",
        "nats",
        "aetcd",
        "kubernetes",
        "fedplane",
        "fedplane.hub",
        "fedplane.hub.clusters",
        "fedplane.agent",
        "fedplane.runtime",
        "fedplane.runtime.bus",
        "fedplane.client",
        "fedplane.corefake",
        "fedplane.v1",
        "fedplane.v1.types_pb2",
        "google.protobuf",
        "importlib",
    ],
)
def test_io_clocks_threads_and_the_shells_are_refused(name: str) -> None:
    parent, _, last = name.rpartition(".")
    source = f"import {name}\n" + (f"from {parent} import {last}\n" if parent else "")
    found = [found for _, found in imports.imported(source, "fedplane.core.x")]
    assert found == [name] * (1 + bool(parent))
    assert not allowed(name)


SNEAKY = """\
from fedplane.core import model


class Planner:
    def plan(self) -> None:
        if model:
            from fedplane import hub
            import os.path as p


def later():
    from .. import agent
    from ..runtime.bus import consume
    from . import placement
    return __import__("socket")


def dynamic(name):
    import importlib
    importlib.import_module("fedplane.v1.types_pb2")
    importlib.import_module(".dispatch", "fedplane.core")
    return importlib.import_module(name)
"""


def test_the_scanner_finds_imports_wherever_they_are_written() -> None:
    found = list(imports.imported(SNEAKY, "fedplane.core.sneaky"))
    assert sorted(found) == [
        (1, "fedplane.core.model"),
        (7, "fedplane.hub"),
        (8, "os.path"),
        (12, "fedplane.agent"),
        (13, "fedplane.runtime.bus.consume"),
        (14, "fedplane.core.placement"),
        (15, "__import__"),
        (15, "socket"),
        (19, "importlib"),
        (20, "fedplane.v1.types_pb2"),
        (21, "fedplane.core.dispatch"),
        (22, "importlib.import_module"),
    ]
    assert [name for _, name in sorted(found) if not allowed(name)] == [
        "fedplane.hub",
        "os.path",
        "fedplane.agent",
        "fedplane.runtime.bus.consume",
        "__import__",
        "socket",
        "importlib",
        "fedplane.v1.types_pb2",
        "importlib.import_module",
    ]


def test_the_scan_reaches_every_module_of_every_subpackage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "deep" / "deeper").mkdir(parents=True)
    (tmp_path / "__init__.py").write_text("from . import deep\n")
    (tmp_path / "deep" / "__init__.py").write_text("from .. import model\nimport time\n")
    (tmp_path / "deep" / "deeper" / "step.py").write_text("def f():\n    from .... import hub\n")
    monkeypatch.setitem(imports.PACKAGES, "fedplane.core", tmp_path)
    assert imports.offenders("fedplane.core", allowed) == [
        "fedplane.core.deep:2: time",
        "fedplane.core.deep.deeper.step:2: fedplane.hub",
    ]
