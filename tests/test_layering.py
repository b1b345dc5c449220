"""The hub and the agent stand on fedplane-common alone.

Each is its own distribution, installed where the other is not (the agent in every member
cluster, the hub in one place), and the client and the local tools are built on top of them,
not under. An import across would work in this checkout, where everything is installed, and
fail where it is deployed. Every module counts, subpackages included, and every import in it,
wherever it is written (see tests/imports.py).
"""

from __future__ import annotations

import pytest

from tests import imports

NEVER = {
    "fedplane.hub": frozenset({"fedplane.agent", "fedplane.local", "fedplane.bench", "fedplane.client"}),
    "fedplane.agent": frozenset({"fedplane.hub", "fedplane.local", "fedplane.bench", "fedplane.client"}),
}


@pytest.mark.parametrize("package", sorted(NEVER))
def test_imports_stay_out_of_the_other_distributions(package: str) -> None:
    never = NEVER[package]
    assert len(list(imports.modules(package))) > 1
    assert not imports.offenders(package, lambda name: not imports.matches(name, never))


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("fedplane.agent", "def f():\n    from fedplane import hub\n"),
        ("fedplane.agent", "from ..bench.fleet import Fleet\n"),
        ("fedplane.agent", "import fedplane.client.sdk\n"),
        ("fedplane.hub", "class C:\n    def m(self):\n        from .. import agent\n"),
        ("fedplane.hub", "from fedplane.local import servers\n"),
    ],
)
def test_a_forbidden_import_is_caught_however_it_is_written(package: str, source: str) -> None:
    found = [name for _, name in imports.imported(source, f"{package}.module")]
    assert any(imports.matches(name, NEVER[package]) for name in found), found


def test_what_the_hub_and_agent_share_is_allowed() -> None:
    for package in NEVER:
        for name in ("fedplane.core.model", "fedplane.runtime.bus", "fedplane.v1.types_pb2", f"{package}.x"):
            assert not imports.matches(name, NEVER[package])
