"""The agent daemon carries out its decisions, end to end over a real nats-server.

The hub's half is played through bus's hub-side functions (tests/agent/support.py), so each
test sees exactly the status updates a hub would, in order, and no etcd is needed.
"""

from __future__ import annotations

import pytest

from fedplane.agent.backend import BackendError, CreateRequest
from fedplane.agent.daemon import Agent
from fedplane.agent.simulated import SimulatedBackend
from fedplane.v1 import types_pb2 as pb
from tests.agent.support import HubSide, agent_config, create_command, delete_command


def backend_of(agent: Agent) -> SimulatedBackend:
    assert isinstance(agent.backend, SimulatedBackend)
    return agent.backend


async def test_a_workload_past_its_max_run_time_is_stopped_and_reported_failed(
    agent: Agent, hub_side: HubSide
) -> None:
    await hub_side.send("edge", create_command("j-long", duration="60s", max_run_seconds=1))

    running = await hub_side.until("j-long", pb.RUNNING)
    failed = await hub_side.until("j-long", pb.FAILED, timeout=10)
    assert (failed.reason, failed.message) == ("MaxRunTimeExceeded", "ran longer than max_run_seconds")
    assert failed.generation == 1 and failed.cluster == "edge"
    ran = (failed.time.ToNanoseconds() - running.time.ToNanoseconds()) / 1e9
    assert 1.0 <= ran < 5.0
    assert hub_side.states("j-long") == [pb.ADMITTED, pb.RUNNING, pb.FAILED]  # never CANCELLED
    assert await agent.backend.list_workloads() == []
    free = {n.name: n.free.quantities["cpu"] for n in (await agent.backend.inventory()).nodes}
    assert free == {"cpu-0": 8000, "cpu-1": 8000}


async def test_a_cancel_within_the_max_run_time_ends_as_cancelled(agent: Agent, hub_side: HubSide) -> None:
    await hub_side.send("edge", create_command("j-cancel", duration="60s", max_run_seconds=30))
    await hub_side.until("j-cancel", pb.RUNNING)

    await hub_side.send("edge", delete_command("j-cancel", reason="cancelled by user"))
    cancelled = await hub_side.until("j-cancel", pb.CANCELLED)
    assert (cancelled.reason, cancelled.message) == ("Deleted", "cancelled by user")
    assert hub_side.states("j-cancel") == [pb.ADMITTED, pb.RUNNING, pb.CANCELLED]


async def test_redelivered_and_stale_commands_change_nothing(agent: Agent, hub_side: HubSide) -> None:
    await hub_side.send("edge", create_command("j-once", generation=2, duration="0.5s"))
    await hub_side.until("j-once", pb.RUNNING)
    # A re-sent create (as after a hub restart), an older dispatch's create and delete.
    await hub_side.send(
        "edge",
        create_command("j-once", generation=2),
        create_command("j-once", generation=1),
        delete_command("j-once", generation=1),
    )
    await hub_side.until("j-once", pb.SUCCEEDED)
    assert backend_of(agent).started == {"j-once": 1}
    assert hub_side.states("j-once") == [pb.ADMITTED, pb.RUNNING, pb.SUCCEEDED]
    assert agent.generations == {"j-once": 2}


async def test_a_permanent_refusal_fails_the_job_once(agent: Agent, hub_side: HubSide) -> None:
    refused = create_command("j-nowhere", node="cpu-9")
    await hub_side.send("edge", refused)
    failed = await hub_side.until("j-nowhere", pb.FAILED)
    assert failed.reason == "NodeNotFound"

    await hub_side.send("edge", refused)  # a redelivery is a duplicate: not refused and reported again
    await hub_side.send("edge", create_command("j-marker"))
    await hub_side.until("j-marker", pb.SUCCEEDED)
    assert hub_side.states("j-nowhere") == [pb.FAILED]


class RefusesOnce(SimulatedBackend):
    """A cluster whose API refuses the first create for now, as a busy apiserver does."""

    refused = 0

    async def create(self, request: CreateRequest) -> None:
        if not self.refused:
            self.refused += 1
            raise BackendError("the apiserver is busy", permanent=False, reason="Throttled")
        await super().create(request)


@pytest.mark.timeout(30)
async def test_a_temporary_refusal_is_retried_when_the_command_comes_back(
    nats_url: str, hub_side: HubSide
) -> None:
    config = agent_config(nats_url)
    agent = Agent(config, RefusesOnce(config.simulated()))
    await agent.start()
    try:
        await hub_side.send("edge", create_command("j-retry"))
        await hub_side.until("j-retry", pb.SUCCEEDED, timeout=15)  # after the 2 s nak delay
        backend = agent.backend
        assert isinstance(backend, RefusesOnce)
        assert backend.refused == 1 and backend.started == {"j-retry": 1}
        assert hub_side.states("j-retry") == [pb.ADMITTED, pb.RUNNING, pb.SUCCEEDED]
    finally:
        await agent.stop()
