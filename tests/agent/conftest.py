"""A real nats-server alone, the hub's side of the bus and an agent, for the agent's tests: no etcd,
no hub, so they run in a few seconds and do not depend on the hub's code."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fedplane.agent.daemon import Agent
from fedplane.agent.simulated import SimulatedBackend
from fedplane.local import servers as embedded
from fedplane.runtime import bus
from tests.agent.support import HubSide, agent_config


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    server = embedded.start_nats(tmp_path / "nats")
    try:
        yield f"nats://{server.address}"
    finally:
        server.stop()


@pytest.fixture
async def hub_js(nats_url: str) -> AsyncIterator[bus.JetStream]:
    """The streams as a hub creates them, and a JetStream context to play the hub's part."""
    nc = await bus.connect(nats_url, "test-hub")
    js = bus.jetstream(nc)
    await bus.ensure_streams(js, 3600)
    try:
        yield js
    finally:
        await bus.close(nc)


@pytest.fixture
async def hub_side(hub_js: bus.JetStream) -> AsyncIterator[HubSide]:
    side = HubSide(hub_js)
    side.start()
    try:
        yield side
    finally:
        await side.stop()


@pytest.fixture
async def agent(nats_url: str, hub_side: HubSide) -> AsyncIterator[Agent]:
    """An agent for cluster `edge` (see support.agent_config), started after the hub's side."""
    config = agent_config(nats_url)
    started = Agent(config, SimulatedBackend(config.simulated()))
    await started.start()
    try:
        yield started
    finally:
        await started.stop()
