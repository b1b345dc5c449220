"""The agent daemon carries out its decisions, end to end over a real nats-server.

The hub's half is played through bus's hub-side functions (tests/agent/support.py), so each
test sees exactly the status updates a hub would, in order, and no etcd is needed.
"""

from __future__ import annotations

import asyncio
import gc

import pytest

from fedplane.agent.backend import BackendError, CreateRequest, EmitStatus, NotifyChange, WorkloadEvent
from fedplane.agent.daemon import Agent
from fedplane.agent.simulated import SimulatedBackend
from fedplane.runtime.config import SimulatedBackendConfig
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


# ---------------------------------------------------------------------- max run time, edge cases


class StopsSlowly(SimulatedBackend):
    """A cluster whose API does not answer a delete: the agent's overrun stop stays under way."""

    def __init__(self, config: SimulatedBackendConfig) -> None:
        super().__init__(config)
        self.deleting = asyncio.Event()

    async def delete(self, job_id: str, generation: int, reason: str) -> None:
        self.deleting.set()
        await asyncio.Event().wait()


@pytest.mark.timeout(30)
async def test_an_overrun_stop_under_way_is_held_by_the_agent_and_cancelled_at_stop(
    nats_url: str, hub_side: HubSide
) -> None:
    config = agent_config(nats_url)
    backend = StopsSlowly(config.simulated())
    agent = Agent(config, backend)
    await agent.start()
    try:
        await hub_side.send("edge", create_command("j-slow", duration="60s", max_run_seconds=1))
        await asyncio.wait_for(backend.deleting.wait(), 10)
        (stopping,) = agent._stops
        gc.collect()  # the loop holds tasks weakly: only the agent's reference keeps it alive
        assert not stopping.done()
    finally:
        await agent.stop()
    assert stopping.cancelled()
    assert not agent._stops


class RunsTwice(SimulatedBackend):
    """A cluster that reports RUNNING again `again_after` seconds later, as a watch does when it
    resyncs; it records when each RUNNING came and each delete was asked for (loop time)."""

    def __init__(self, config: SimulatedBackendConfig, again_after: float) -> None:
        super().__init__(config)
        self.again_after = again_after
        self.running_at: list[float] = []
        self.deletes_at: list[float] = []

    async def start(self, emit: EmitStatus, changed: NotifyChange) -> None:
        loop = asyncio.get_running_loop()

        def emit_twice(event: WorkloadEvent) -> None:
            emit(event)
            if event.state == pb.RUNNING:
                self.running_at.append(loop.time())
                if len(self.running_at) == 1:
                    loop.call_later(self.again_after, emit_twice, event)

        await super().start(emit_twice, changed)

    async def delete(self, job_id: str, generation: int, reason: str) -> None:
        self.deletes_at.append(asyncio.get_running_loop().time())
        await super().delete(job_id, generation, reason)


@pytest.mark.timeout(30)
async def test_a_repeated_running_keeps_the_deadline_of_the_first(nats_url: str, hub_side: HubSide) -> None:
    config = agent_config(nats_url)
    backend = RunsTwice(config.simulated(), again_after=0.6)
    agent = Agent(config, backend)
    await agent.start()
    try:
        await hub_side.send("edge", create_command("j-twice", duration="60s", max_run_seconds=1))
        failed = await hub_side.until("j-twice", pb.FAILED, timeout=10)
        await asyncio.sleep(1.0)  # past where a clock restarted by the second RUNNING would run out
    finally:
        await agent.stop()
    assert failed.reason == "MaxRunTimeExceeded"
    assert len(backend.running_at) == 2
    (deleted_at,) = backend.deletes_at  # one stop: the first clock was neither lost nor doubled
    assert 1.0 <= deleted_at - backend.running_at[0] < 1.5  # counted from the first RUNNING


@pytest.mark.timeout(30)
async def test_a_workload_ending_within_its_limit_after_a_repeated_running_is_never_stopped(
    nats_url: str, hub_side: HubSide
) -> None:
    config = agent_config(nats_url)
    backend = RunsTwice(config.simulated(), again_after=0.2)
    agent = Agent(config, backend)
    await agent.start()
    try:
        await hub_side.send("edge", create_command("j-short", duration="0.5s", max_run_seconds=1))
        await hub_side.until("j-short", pb.SUCCEEDED)
        await asyncio.sleep(1.0)  # past the limit, counted from either RUNNING
    finally:
        await agent.stop()
    assert len(backend.running_at) == 2
    assert backend.deletes_at == []  # the ending stopped every clock the workload had
    assert hub_side.states("j-short") == [pb.ADMITTED, pb.RUNNING, pb.RUNNING, pb.SUCCEEDED]
    assert not agent._deadlines and not agent._overrun


class EndsAsStopped(SimulatedBackend):
    """A cluster where the first dispatch's workload completes by itself just as the agent's
    overrun stop reaches it, so the stop finds nothing to delete."""

    async def delete(self, job_id: str, generation: int, reason: str) -> None:
        workload = self.workloads.get(job_id)
        if workload is not None and workload.generation == 1 and not workload.done:
            if workload.task is not None:
                workload.task.cancel()
            self._finish(workload, pb.SUCCEEDED, "Completed", "ended by itself")
        await super().delete(job_id, generation, reason)


@pytest.mark.timeout(30)
async def test_an_overrun_stop_that_found_the_workload_ended_is_not_taken_for_a_later_cancel(
    nats_url: str, hub_side: HubSide
) -> None:
    config = agent_config(nats_url)
    agent = Agent(config, EndsAsStopped(config.simulated()))
    await agent.start()
    try:
        await hub_side.send("edge", create_command("j-race", duration="60s", max_run_seconds=1))
        ended = await hub_side.until("j-race", pb.SUCCEEDED, timeout=10)
        assert (ended.generation, ended.reason) == (1, "Completed")
        # The job comes back to this cluster at a new generation, and the user cancels it.
        await hub_side.send(
            "edge",
            create_command("j-race", generation=2, duration="60s"),
            delete_command("j-race", generation=2, reason="cancelled by user"),
        )
        cancelled = await hub_side.until("j-race", pb.CANCELLED)
    finally:
        await agent.stop()
    assert (cancelled.generation, cancelled.reason, cancelled.message) == (2, "Deleted", "cancelled by user")
    assert pb.FAILED not in hub_side.states("j-race")
    assert not agent._overrun  # the ending cleared the mark of the stop


async def test_a_delete_ahead_of_its_create_keeps_that_create_from_ever_running(
    agent: Agent, hub_side: HubSide
) -> None:
    # The hub cancelled dispatch 2 before its create was applied here (say the create was nak'd
    # and comes back later): the delete arrives first, the create after it.
    await hub_side.send("edge", delete_command("j-ahead", generation=2, reason="cancelled by user"))
    cancelled = await hub_side.until("j-ahead", pb.CANCELLED)
    assert cancelled.generation == 2
    assert agent.generations == {"j-ahead": 2}

    await hub_side.send("edge", create_command("j-ahead", generation=2, duration="0.2s"))
    await hub_side.send("edge", create_command("j-marker", duration="0.2s"))
    await hub_side.until("j-marker", pb.SUCCEEDED)
    assert "j-ahead" not in backend_of(agent).started
    assert hub_side.states("j-ahead") == [pb.CANCELLED]
