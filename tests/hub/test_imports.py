"""The hub talks NATS only through fedplane.runtime.bus, as the agent does (tests/agent/test_imports.py),
so that the protocol's choices (consumers, acks, deliver policies, headers) are made in one place.
Imports are read by the one scanner, tests/imports.py."""

from __future__ import annotations

from tests import imports

NATS = frozenset({"nats"})


def test_nothing_in_the_hub_imports_nats() -> None:
    scanned = {module for module, _ in imports.modules("fedplane.hub")}
    assert {
        "fedplane.hub.hub",
        "fedplane.hub.reports",
        "fedplane.hub.statuses",
        "fedplane.hub.commands",
    } <= scanned
    found = imports.offenders("fedplane.hub", lambda name: not imports.matches(name, NATS))
    assert not found, f"the hub reaches NATS through fedplane.runtime.bus only: {found}"
