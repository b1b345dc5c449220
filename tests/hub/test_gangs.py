"""Gang timeouts: a job whose gang is not running in time is taken off its cluster and requeued
with a backoff that doubles with every attempt (and is not placed before it is over), or failed
after its attempts; a job that starts is left alone.

The driver's own tests run on the in-memory store with a clock the test moves; the last test
runs a real federation (etcd, NATS, a hub and simulated clusters, one whose jobs never start)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from fedplane.agent.simulated import SimulatedBackend
from fedplane.core import dispatch as sm
from fedplane.hub import records
from fedplane.hub.gangs import GANG_TIMEOUT, GangTimeouts, backoff_seconds
from fedplane.hub.scheduler import Scheduler
from fedplane.hub.table import JobRecord, JobTable
from fedplane.runtime.config import ConfigError, HubConfig, check_hub, from_mapping
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, cpu_nodes, eventually, job_spec, sim_agent_config
from tests.hub.fakes import Parts, cancelled_status, ready_cluster, reported_status, settle, spec
from tests.hub.memory_store import MemoryStore

S = sm.S
TIMEOUT, BACKOFF, BACKOFF_MAX = 10.0, 5.0, 60.0


# -- the backoff --------------------------------------------------------------------------------


def test_the_backoff_doubles_per_attempt_up_to_its_cap_as_kueues() -> None:
    assert [backoff_seconds(n, 60, 3600) for n in range(1, 10)] == [
        60,
        120,
        240,
        480,
        960,
        1920,
        3600,
        3600,
        3600,
    ]
    assert backoff_seconds(0, 60, 3600) == 0  # never dispatched: nothing to back off from
    assert backoff_seconds(3, 0, 3600) == 0  # no backoff configured


@settings(max_examples=200, deadline=None)
@given(
    attempts=st.integers(1, 10_000),
    base=st.floats(0.001, 365 * 24 * 3600),
    cap=st.floats(0.001, 365 * 24 * 3600),
)
def test_the_backoff_is_base_doubled_per_earlier_attempt_never_past_the_cap(
    attempts: int, base: float, cap: float
) -> None:
    wait = backoff_seconds(attempts, base, cap)
    assert 0 < wait <= cap
    if attempts <= 60:
        assert wait == min(cap, base * 2 ** (attempts - 1))
    # One more attempt waits twice as long, until the cap holds both.
    assert backoff_seconds(attempts + 1, base, cap) == min(cap, 2 * wait) or wait == cap


def test_the_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="gang_timeout_seconds"):
        from_mapping(HubConfig, {"gang_timeout_seconds": -1})
    with pytest.raises(ConfigError, match="max_attempts"):
        from_mapping(HubConfig, {"max_attempts": 1.5})
    with pytest.raises(ConfigError, match="requeue_backoff_max_seconds"):
        check_hub(HubConfig(requeue_backoff_seconds=120, requeue_backoff_max_seconds=60))
    assert HubConfig().gang_timeout_seconds == 0  # off unless asked for


# -- the driver ---------------------------------------------------------------------------------


def config(**settings: object) -> HubConfig:
    base: dict[str, object] = {
        "gang_timeout_seconds": TIMEOUT,
        "requeue_backoff_seconds": BACKOFF,
        "requeue_backoff_max_seconds": BACKOFF_MAX,
        "max_attempts": 3,
        # Clusters stay READY for the minutes the tests move the clock by.
        "cluster_unknown_after_seconds": 600.0,
        "cluster_lost_after_seconds": 1200.0,
    }
    return HubConfig(**(base | settings))  # type: ignore[arg-type]


class Gangs:
    """A table, registry and clock with cluster `a`, the scheduler, and the driver running."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.table = parts.table
        self.clock = parts.clock
        self.driver = GangTimeouts(parts.table, parts.registry, parts.commands, parts.clock, parts.config)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.driver.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def place(self) -> None:
        """A placement round, after letting in the jobs whose backoff is over (as Scheduler.run does)."""
        parts = self.parts
        self.table.due(self.clock.time())
        await Scheduler(self.table, parts.registry, parts.commands, self.clock, parts.config).place_pending()
        await settle()

    async def dispatched(self, job_spec: pb.JobSpec) -> JobRecord:
        (record,) = await self.parts.submit(job_spec)
        await self.place()
        assert (record.state, record.cluster) == (S.DISPATCHED, "a")
        return record

    def deletes(self) -> list[tuple[str, str, int]]:
        """(cluster, job, generation) of each delete queued, as the sender addresses it."""
        return [
            (job.status.cluster, command.job_id, command.generation)
            for job, command in self.parts.commands.queued
            if command.HasField("delete")
        ]


@pytest.fixture
async def gangs() -> AsyncIterator[Gangs]:
    parts = Parts(config=config())
    ready_cluster(parts.registry, "a", parts.clock.time())
    out = Gangs(parts)
    out.start()
    await settle()
    yield out
    await out.stop()


def history(record: JobRecord) -> list[tuple[str, int, str]]:
    return [(sm.state_name(h.state), h.generation, h.reason) for h in record.status.history]


def seconds(timestamp: Timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


async def test_a_gang_not_running_in_time_is_requeued_with_backoff_and_its_copy_deleted(
    gangs: Gangs,
) -> None:
    record = await gangs.dispatched(spec("train", cpu_millis=4000))
    cluster = gangs.parts.registry.clusters["a"]
    assert cluster.reservations
    await gangs.parts.set_status(record, reported_status(record.status, S.ADMITTED, gangs.clock.time()))
    await gangs.clock.advance(TIMEOUT - 0.5)
    assert (record.state, record.cluster) == (S.ADMITTED, "a")  # not yet
    assert gangs.deletes() == []

    await gangs.clock.advance(0.5)
    timed_out_at = gangs.clock.time()
    assert (record.state, record.cluster, record.generation) == (S.PENDING, "", 1)
    status = record.status
    assert status.reason == GANG_TIMEOUT
    assert status.message == "gang not running on a 10s after dispatch 1; requeued, not placed for 5s"
    assert seconds(status.not_before) == pytest.approx(timed_out_at + BACKOFF)
    assert gangs.deletes() == [("a", record.id, 1)]
    assert cluster.reservations == {}
    # PENDING for every reader, but not placed before its backoff is over.
    assert record.id in gangs.table.delayed and record.id not in gangs.table.queue
    assert gangs.table.counts[(record.queue, S.PENDING)] == 1
    assert gangs.table.pending_reason(record.id).startswith("backing off until ")
    assert gangs.table.pending_reason(record.id).endswith("after a gang timeout (attempt 1)")
    await gangs.place()
    assert record.state == S.PENDING

    await gangs.clock.advance(BACKOFF)
    await gangs.place()
    assert (record.state, record.cluster, record.generation) == (S.DISPATCHED, "a", 2)
    assert not record.status.HasField("not_before")  # the backoff held one stay in PENDING


async def test_the_backoff_doubles_and_the_last_attempt_fails(gangs: Gangs) -> None:
    record = await gangs.dispatched(spec("train"))
    gaps = []
    for attempt in (1, 2):
        await gangs.clock.advance(TIMEOUT)
        assert (record.state, record.generation, record.status.reason) == (S.PENDING, attempt, GANG_TIMEOUT)
        gaps.append(seconds(record.status.not_before) - gangs.clock.time())
        await gangs.clock.advance(gaps[-1])
        await gangs.place()
        assert (record.state, record.generation) == (S.DISPATCHED, attempt + 1)
    assert gaps == [pytest.approx(BACKOFF), pytest.approx(2 * BACKOFF)]

    await gangs.clock.advance(TIMEOUT)
    # The third dispatch was its last: FAILED where it was, and its copy there deleted.
    assert (record.state, record.cluster, record.generation) == (S.FAILED, "a", 3)
    assert (record.status.reason, record.status.message) == (
        GANG_TIMEOUT,
        f"gang not running on a {TIMEOUT:g}s after dispatch 3; failed after 3 attempts",
    )
    assert gangs.deletes() == [("a", record.id, 1), ("a", record.id, 2), ("a", record.id, 3)]
    assert [h for h in history(record) if h[2] == GANG_TIMEOUT] == [
        ("PENDING", 1, GANG_TIMEOUT),
        ("PENDING", 2, GANG_TIMEOUT),
        ("FAILED", 3, GANG_TIMEOUT),
    ]
    assert gangs.parts.registry.clusters["a"].reservations == {}


async def test_a_job_whose_gang_runs_in_time_is_left_alone(gangs: Gangs) -> None:
    record = await gangs.dispatched(spec("train"))
    await gangs.clock.advance(TIMEOUT - 1)
    await gangs.parts.set_status(record, reported_status(record.status, S.RUNNING, gangs.clock.time()))
    await gangs.clock.advance(10 * TIMEOUT)
    assert (record.state, record.generation) == (S.RUNNING, 1)
    assert gangs.deletes() == [] and gangs.driver._deadlines == []


async def test_a_job_on_a_cluster_the_hub_does_not_hear_is_left_to_its_disconnect_policy(
    gangs: Gangs,
) -> None:
    record = await gangs.dispatched(spec("train"))
    gangs.parts.registry.clusters["a"].last_seen = gangs.clock.time() - 700  # UNKNOWN
    await gangs.clock.advance(TIMEOUT + 3)
    assert (record.state, record.cluster) == (S.DISPATCHED, "a")
    gangs.parts.registry.clusters["a"].last_seen = gangs.clock.time()  # heard again
    await gangs.clock.advance(1)
    assert (record.state, record.status.reason) == (S.PENDING, GANG_TIMEOUT)


async def test_a_backing_off_job_can_be_cancelled_and_is_never_placed(gangs: Gangs) -> None:
    record = await gangs.dispatched(spec("train"))
    await gangs.clock.advance(TIMEOUT)
    assert record.id in gangs.table.delayed
    await gangs.parts.set_status(
        record, cancelled_status(record.status, "no longer wanted", gangs.clock.time())
    )
    assert record.state == S.CANCELLED and record.id not in gangs.table.delayed
    await gangs.clock.advance(BACKOFF)
    assert gangs.table.due(gangs.clock.time()) is None
    await gangs.place()
    assert record.state == S.CANCELLED and record.id not in gangs.table.queue


async def test_a_new_leader_judges_the_jobs_dispatched_before_it_led() -> None:
    parts = Parts(config=config())
    ready_cluster(parts.registry, "a", parts.clock.time())
    gangs = Gangs(parts)
    record = await gangs.dispatched(spec("train"))
    await parts.clock.advance(TIMEOUT - 2)
    gangs.start()  # leads from here: the job was dispatched 8 s ago
    try:
        await settle()
        await parts.clock.advance(1.5)
        assert record.state == S.DISPATCHED
        await parts.clock.advance(0.5)
        assert (record.state, record.status.reason) == (S.PENDING, GANG_TIMEOUT)
    finally:
        await gangs.stop()
    assert parts.table.on_dispatch is None  # a follower keeps no deadlines


async def test_a_replica_that_loads_a_backing_off_job_keeps_it_out_of_the_queue() -> None:
    parts = Parts(config=config())
    ready_cluster(parts.registry, "a", parts.clock.time())
    gangs = Gangs(parts)
    gangs.start()
    record = await gangs.dispatched(spec("train"))
    await parts.clock.advance(TIMEOUT)
    await gangs.stop()
    not_before = seconds(record.status.not_before)

    # Another replica starting on the same store (the records as etcd holds them).
    other = JobTable(parts.store)
    stored, _ = await parts.store.load_jobs()
    for item in stored:
        other.add(JobRecord.stored(item))
    assert record.id in other.delayed and record.id not in other.queue
    assert other.due(not_before - 0.1) == pytest.approx(not_before)
    assert record.id not in other.queue
    other.wake.clear()
    assert other.due(not_before) is None
    assert record.id in other.queue and other.wake.is_set()


def test_a_submitted_job_costs_no_backoff_check() -> None:
    """Jobs never dispatched (every submit) join the queue without their status being parsed."""
    table = JobTable(MemoryStore())
    job = pb.Job(id="j1", spec=spec("train"))
    job.status.CopyFrom(records.submitted(1.0))
    record = JobRecord.of(job, 1, 1, job.SerializeToString(), b"not a status")
    table.add(record)
    assert "j1" in table.queue and not table.delayed


# -- a real federation --------------------------------------------------------------------------


async def test_a_federation_requeues_a_gang_that_never_starts_with_doubling_backoff_then_fails_it(
    federation: Federation,
) -> None:
    await federation.stop_hub()
    federation.hub_config.gang_timeout_seconds = 1.0
    federation.hub_config.requeue_backoff_seconds = 1.0
    federation.hub_config.max_attempts = 3
    await federation.start_hub()
    stuck = sim_agent_config("stuck", federation.nats_url, nodes=[cpu_nodes(1)], labels={"site": "stuck"})
    stuck.backend["start_delay_seconds"] = 1e6  # admitted, never running
    stuck_agent = await federation.start_agent(stuck)
    await federation.start_agent(
        sim_agent_config("good", federation.nats_url, nodes=[cpu_nodes(1)], labels={"site": "good"})
    )
    await federation.wait_clusters_ready(["stuck", "good"])

    never = await federation.submit(job_spec("never", selector={"site": "stuck"}))
    runs = await federation.submit(job_spec("runs", selector={"site": "good"}, duration="2.5s"))

    # While it backs off, readers see why it waits.
    backing_off = await federation.wait_state(never.id, {pb.PENDING, pb.FAILED}, timeout=5)
    for _ in range(100):
        if backing_off.status.reason == GANG_TIMEOUT:
            break
        await asyncio.sleep(0.02)
        backing_off = await federation.get(never.id)
    assert backing_off.status.state == pb.PENDING and backing_off.status.HasField("not_before")
    assert backing_off.pending_reason.startswith("backing off until ")

    failed = await federation.wait_state(never.id, {pb.FAILED}, timeout=15)
    assert (failed.status.reason, failed.status.cluster, failed.status.generation) == (
        GANG_TIMEOUT,
        "stuck",
        3,
    )
    moves = [(h.state, h.generation, h.reason, seconds(h.time)) for h in failed.status.history]
    dispatched = {g: t for state, g, _, t in moves if state == pb.DISPATCHED}
    timed_out = {g: t for state, g, reason, t in moves if reason == GANG_TIMEOUT}
    assert sorted(dispatched) == sorted(timed_out) == [1, 2, 3]
    for generation in (1, 2, 3):
        assert timed_out[generation] - dispatched[generation] >= 1.0  # its timeout, at least
    for generation, backoff in ((1, 1.0), (2, 2.0)):
        # Not placed again before its backoff was over, and soon after.
        waited = dispatched[generation + 1] - timed_out[generation]
        assert backoff <= waited < backoff + 3, (generation, waited)
    # Each copy the stuck cluster was given is deleted there.
    backend = stuck_agent.backend
    assert isinstance(backend, SimulatedBackend) and backend.started[never.id] == 3

    async def deleted() -> bool:
        return backend.workloads[never.id].done

    await eventually(deleted, 5, "the last copy deleted")

    done = await federation.wait_state(runs.id, {pb.SUCCEEDED, pb.FAILED}, timeout=10)
    assert (done.status.state, done.status.generation) == (pb.SUCCEEDED, 1)
    assert all(h.reason != GANG_TIMEOUT for h in done.status.history)
