"""The hub talks NATS only through fedplane.runtime.bus, as the agent does (tests/agent/test_imports.py),
so that the protocol's choices (consumers, acks, deliver policies, headers) are made in one place."""

from __future__ import annotations

from pathlib import Path

from tests.agent.test_imports import imported

HUB = Path(__file__).resolve().parents[2] / "hub" / "src" / "fedplane" / "hub"


def test_nothing_in_the_hub_imports_nats() -> None:
    sources = sorted(HUB.rglob("*.py"))
    assert {HUB / "hub.py", HUB / "reports.py", HUB / "statuses.py", HUB / "commands.py"} <= set(sources)
    found = [
        f"{path.relative_to(HUB)}: {name}"
        for path in sources
        for name in imported(path.read_text())
        if name == "nats" or name.startswith("nats.")
    ]
    assert not found, f"the hub reaches NATS through fedplane.runtime.bus only: {found}"
