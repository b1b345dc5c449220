"""The agent talks NATS only through fedplane.runtime.bus, and its decisions do no I/O at all."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent" / "src" / "fedplane" / "agent"
# What decisions.py may not import: anything that waits, talks, reads a clock or reaches a cluster.
IO = (
    "nats",
    "asyncio",
    "socket",
    "time",
    "kubernetes",
    "urllib3",
    "opentelemetry",
    "fedplane.runtime",
    "fedplane.hub",
    "fedplane.agent.daemon",
    "fedplane.agent.outbox",
    "fedplane.agent.simulated",
    "fedplane.agent.kubernetes_backend",
)


def imported(source: str) -> list[str]:
    """Every module a source imports, by statement or by a literal importlib/__import__ call."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            names.append(node.args[0].value)
    return names


def offenders(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(AGENT)}: {name}"
        for name in imported(path.read_text())
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_nothing_in_the_agent_imports_nats() -> None:
    sources = sorted(AGENT.rglob("*.py"))
    assert AGENT / "daemon.py" in sources
    found = [o for path in sources for o in offenders(path, ("nats",))]
    assert not found, f"the agent reaches NATS through fedplane.runtime.bus only: {found}"


def test_the_agents_decisions_do_no_io() -> None:
    found = offenders(AGENT / "decisions.py", IO)
    assert not found, found


def test_the_scan_sees_every_form_of_import() -> None:
    source = (
        "import nats\nimport nats.js as js\nfrom nats.aio.client import Client\n"
        "import importlib\nimportlib.import_module('nats.js.api')\n__import__('nats')\n"
        "from . import sibling\nimport natsort\n"
    )
    hits = [n for n in imported(source) if n == "nats" or n.startswith("nats.")]
    assert sorted(hits) == ["nats", "nats", "nats.aio.client", "nats.js", "nats.js.api"]
