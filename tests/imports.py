"""What a package's modules import, read from their source: the one scanner behind every
import rule (tests/test_core_purity.py, tests/test_layering.py, tests/agent/test_imports.py,
tests/hub/test_imports.py).

Every import statement counts, wherever it is (module level, in a function, under
`if TYPE_CHECKING:`), relative imports are resolved, and so are the imports made by calling
`importlib.import_module` or `__import__` with a literal name, so that no way of writing an
import slips past a rule.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Container, Iterator
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
    `importlib.import_module` (or `import_module`) or `__import__` with a literal name gives
    that name. A call of `__import__` also gives "__import__", whatever it imports, and a call of
    `import_module` whose name is not a literal gives "importlib.import_module": what they
    import cannot always be read, so a rule that allows neither refuses them.
    """
    package = module if is_package else module.rpartition(".")[0]

    def resolved(level: int, name: str) -> str:
        if not level:
            return name
        parts = package.split(".")
        return ".".join([*parts[: len(parts) - level + 1], *([name] if name else [])])

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = resolved(node.level, node.module or "")
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call):
            func = node.func
            called = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            if called not in ("__import__", "import_module"):
                continue
            if called == "__import__":
                yield node.lineno, "__import__"
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                name = first.value
                dots = len(name) - len(name.lstrip("."))
                yield node.lineno, resolved(dots, name[dots:])
            elif called == "import_module":
                yield node.lineno, "importlib.import_module"


def matches(name: str, rules: frozenset[str] | set[str]) -> bool:
    """Whether `name` or one of its dotted prefixes is in `rules`."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in rules for i in range(1, len(parts) + 1))


def offenders(package: str, allowed: Callable[[str], bool], only: Container[str] | None = None) -> list[str]:
    """The imports of `package`'s modules (or of those named in `only`) that `allowed` refuses,
    as "module:line: name"."""
    found = []
    for module, path in modules(package):
        if only is not None and module not in only:
            continue
        for line, name in imported(path.read_text(), module, path.name == "__init__.py"):
            if not allowed(name):
                found.append(f"{module}:{line}: {name}")
    return found
