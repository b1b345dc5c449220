"""What a package's modules import, read from their source: the basis of the layering tests.

Every import statement counts, wherever it is (module level, in a function, under
`if TYPE_CHECKING:`), and relative imports are resolved, so that no way of writing an import
slips past a rule.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent
# Where each part of the `fedplane` namespace package lives.
PACKAGES = {
    "fedplane.core": SRC / "common" / "src" / "fedplane" / "core",
    "fedplane.hub": SRC / "hub" / "src" / "fedplane" / "hub",
    "fedplane.agent": SRC / "agent" / "src" / "fedplane" / "agent",
}


def modules(package: str) -> Iterator[tuple[str, Path]]:
    """Every module of `package` and its subpackages, as (dotted name, path)."""
    root = PACKAGES[package]
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join((package, *parts)), path


def imported(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """Every name the source of `module` imports, as (line, dotted name).

    `from a import b` gives `a.b`, since b may be a module (`from fedplane import hub`); a rule
    matches a name by its dotted prefixes, so `a.b` also counts as `a`. A call of
    `__import__` gives "__import__": what it imports cannot be read.
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            yield node.lineno, "__import__"


def matches(name: str, rules: frozenset[str] | set[str]) -> bool:
    """Whether `name` or one of its dotted prefixes is in `rules`."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in rules for i in range(1, len(parts) + 1))


def offenders(package: str, allowed: Callable[[str], bool]) -> list[str]:
    """The imports of `package`'s modules that `allowed` refuses, as "module:line: name"."""
    found = []
    for module, path in modules(package):
        for line, name in imported(path.read_text(), module, path.name == "__init__.py"):
            if not allowed(name):
                found.append(f"{module}:{line}: {name}")
    return found
