"""Fixtures for tests against a real kube-apiserver (marked `kube`).

The binary is built (or found in the cache) once per session, before the first test runs, so
the first build's minutes do not count against any test's timeout.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import apiserver, helm

_KUBE_DIR = Path(__file__).parent
_binary: Path | None = None
_build_error: str | None = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _KUBE_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kube)


def pytest_collection_finish(session: pytest.Session) -> None:
    global _binary, _build_error
    if not any(item.get_closest_marker("kube") for item in session.items):
        return
    try:
        _binary = apiserver.build_binary()
    except Exception as exc:
        _build_error = str(exc)
    # helm too (tests/kube/test_helm.py), before any timeout runs; a failure shows in its tests.
    with contextlib.suppress(Exception):
        helm.binary()


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[apiserver.KubeAPIServer]:
    """etcd + kube-apiserver for the whole session; killed at teardown, even after failures."""
    if _build_error is not None:
        pytest.fail(f"kube-apiserver unavailable: {_build_error}")
    binary = _binary or apiserver.build_binary()
    server = apiserver.start(binary, tmp_path_factory.mktemp("kube"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def admin(kube: apiserver.KubeAPIServer) -> Iterator[apiserver.Admin]:
    client = apiserver.Admin(kube)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def namespace(admin: apiserver.Admin) -> Iterator[str]:
    """A fresh namespace per test, so tests sharing the apiserver do not see each other's objects."""
    name = f"t-{secrets.token_hex(4)}"
    admin.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
