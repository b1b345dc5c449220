from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedplane.local import servers as embedded
from fedplane.runtime import logs
from fedplane.runtime.config import HubConfig
from tests.federation import Federation

logs.configure("warning", "console")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[embedded.ServerProcess, embedded.ServerProcess]]:
    """Real etcd and nats-server on free loopback ports, data under the test's tmp dir."""
    etcd = embedded.start_etcd(tmp_path / "etcd")
    try:
        nats = embedded.start_nats(tmp_path / "nats")
    except Exception:
        etcd.stop()
        raise
    try:
        yield etcd, nats
    finally:
        nats.stop()
        etcd.stop()


@pytest.fixture
async def federation(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess], tmp_path: Path
) -> AsyncIterator[Federation]:
    etcd, nats = servers
    config = HubConfig(
        listen="127.0.0.1:0",
        etcd_endpoint=etcd.address,
        nats_url=f"nats://{nats.address}",
        cluster_unknown_after_seconds=3.0,
        batch_window_seconds=0.01,
    )
    fed = Federation(etcd, nats, tmp_path, config)
    await fed.start_hub()
    try:
        yield fed
    finally:
        await fed.close()


@pytest.fixture(scope="session")
def span_exporter() -> Any:
    """Every span of the test process, for asserting that traces cross process boundaries."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from fedplane.runtime import telemetry

    exporter = InMemorySpanExporter()
    telemetry.configure("fedplane-tests", "none", extra_exporter=exporter)
    return exporter
