"""The agent talks NATS only through fedplane.runtime.bus, and its decisions do no I/O at all.

Imports are read by the one scanner, tests/imports.py: every statement, relative imports
resolved, and importlib.import_module and __import__ calls with a literal name.
"""

from __future__ import annotations

from tests import imports

NATS = frozenset({"nats"})
# What decisions.py may not import: anything that waits, talks, reads a clock or reaches a cluster.
IO = frozenset(
    {
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
        "fedplane.agent.state",
        "fedplane.agent.simulated",
        "fedplane.agent.kubernetes_backend",
    }
)


def test_nothing_in_the_agent_imports_nats() -> None:
    scanned = {module for module, _ in imports.modules("fedplane.agent")}
    assert {"fedplane.agent.daemon", "fedplane.agent.decisions"} <= scanned
    found = imports.offenders("fedplane.agent", lambda name: not imports.matches(name, NATS))
    assert not found, f"the agent reaches NATS through fedplane.runtime.bus only: {found}"


def test_the_agents_decisions_do_no_io() -> None:
    found = imports.offenders(
        "fedplane.agent", lambda name: not imports.matches(name, IO), only={"fedplane.agent.decisions"}
    )
    assert not found, found


def test_the_scan_sees_every_form_of_import() -> None:
    source = (
        "import nats\nimport nats.js as js\nfrom nats.aio.client import Client\n"
        "import importlib\nimportlib.import_module('nats.js.api')\n__import__('nats')\n"
        "from . import sibling\nimport natsort\n"
    )
    found = [name for _, name in imports.imported(source, "fedplane.agent.module")]
    hits = [name for name in found if imports.matches(name, NATS)]
    assert sorted(hits) == ["nats", "nats", "nats.aio.client.Client", "nats.js", "nats.js.api"]
    assert "fedplane.agent.sibling" in found and "natsort" in found


def test_a_relative_import_of_an_io_module_is_caught() -> None:
    # `from . import daemon` in decisions.py names fedplane.agent.daemon, as the rule spells it.
    found = [name for _, name in imports.imported("from . import daemon\n", "fedplane.agent.decisions")]
    assert found == ["fedplane.agent.daemon"] and imports.matches(found[0], IO)
