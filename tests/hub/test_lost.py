"""A lost cluster's jobs follow their disconnect policy: requeued elsewhere after their delay
when another cluster can take them (the old copy told to go), left waiting, or failed; and
nothing an old generation reports changes a job."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import pytest

from fedplane.core import dispatch as sm
from fedplane.hub import records
from fedplane.hub.lost import LostClusterJobs
from fedplane.hub.table import JobRecord
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb
from tests.hub.fakes import cancelled_status, ready_cluster, settle, spec, status_msg
from tests.hub.lost_fakes import LostParts, config, defaults, policy

S = sm.S
REQUEUE, WAIT, FAIL = pb.DISCONNECT_REQUEUE, pb.DISCONNECT_WAIT, pb.DISCONNECT_FAIL


def job_spec(
    name: str = "job", action: int | None = None, after: float = 0.0, **kwargs: object
) -> pb.JobSpec:
    out = spec(name, **kwargs)  # type: ignore[arg-type]
    if action is not None:
        out.disconnect.CopyFrom(policy(action, after))
    return out


def history(record: JobRecord) -> list[tuple[str, str, int, str]]:
    return [(sm.state_name(h.state), h.cluster, h.generation, h.reason) for h in record.status.history]


@pytest.fixture
async def running() -> AsyncIterator[tuple[LostParts, LostClusterJobs, asyncio.Task[None]]]:
    """Parts with cluster `a` (and later others), and the driver running on them."""
    parts = LostParts()
    driver = parts.driver()
    task = asyncio.create_task(driver.run())
    yield parts, driver, task
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- requeue -----------------------------------------------------------------------------------


async def test_a_running_job_is_requeued_after_its_delay_and_runs_elsewhere_at_the_next_generation(
    running: tuple[LostParts, LostClusterJobs, asyncio.Task[None]],
) -> None:
    parts, _, _ = running
    ready_cluster(parts.registry, "a", parts.clock.time())
    (record,) = await parts.running_on("a", job_spec(action=REQUEUE, after=30))
    ready_cluster(parts.registry, "b", parts.clock.time())
    assert parts.registry.clusters["a"].reservations
    parts.commands.queued.clear()

    parts.lose("a")
    await settle()
    await parts.clock.advance(29)
    # Untouched before its delay: still running on a, nothing sent.
    assert (record.state, record.cluster, record.generation) == (S.RUNNING, "a", 1)
    assert parts.commands.queued == []

    parts.table.wake.clear()
    await parts.clock.advance(1)
    assert (record.state, record.cluster, record.generation) == (S.PENDING, "", 1)
    assert (record.status.reason, record.status.message) == (
        "ClusterLost",
        "cluster a lost for 30s; requeued",
    )
    assert not record.status.assignments and not record.status.HasField("placement_score")
    # Back in the pending queue, placement woken; its capacity on a given back.
    assert record.id in parts.table.queue and parts.table.wake.is_set()
    assert parts.registry.clusters["a"].reservations == {}
    # The old copy is told to go: a delete for generation 1, addressed to a.
    [delete] = parts.deletes()
    assert (delete.cluster, delete.job_id, delete.generation) == ("a", record.id, 1)
    assert delete.reason.startswith("ClusterLost")

    await parts.scheduler().place_pending()
    assert (record.state, record.cluster, record.generation) == (S.DISPATCHED, "b", 2)
    [create] = parts.creates()
    assert (create.cluster, create.job_id, create.generation) == ("b", record.id, 2)
    # The attempt count and the history survive the move.
    assert sm.attempts(record.dispatch_state) == 2
    assert history(record) == [
        ("PENDING", "", 0, "Submitted"),
        ("DISPATCHED", "a", 1, "Placed"),
        ("RUNNING", "a", 1, ""),
        ("PENDING", "", 1, "ClusterLost"),
        ("DISPATCHED", "b", 2, "Placed"),
    ]
    assert record.status.start_time.ToNanoseconds() > 0  # its first start is kept


async def test_a_requeue_no_other_cluster_can_take_keeps_the_job_until_one_can(
    running: tuple[LostParts, LostClusterJobs, asyncio.Task[None]],
) -> None:
    parts, _, _ = running
    ready_cluster(parts.registry, "a", parts.clock.time(), cpu_millis=8000)
    (record,) = await parts.running_on("a", job_spec(action=REQUEUE, cpu_millis=4000))
    ready_cluster(parts.registry, "small", parts.clock.time(), cpu_millis=2000)
    parts.commands.queued.clear()

    parts.lose("a")
    await parts.clock.advance(120)
    # Never evicted without a place to go: it stays where it was, nothing is deleted.
    assert (record.state, record.cluster, record.generation) == (S.RUNNING, "a", 1)
    assert parts.commands.queued == []

    ready_cluster(parts.registry, "big", parts.clock.time(), cpu_millis=8000)
    await parts.clock.advance(1)
    assert (record.state, record.generation) == (S.PENDING, 1)
    [delete] = parts.deletes()
    assert (delete.cluster, delete.generation) == ("a", 1)
    await parts.scheduler().place_pending()
    assert (record.state, record.cluster, record.generation) == (S.DISPATCHED, "big", 2)


async def test_jobs_are_requeued_only_as_far_as_the_other_clusters_have_room_for_them_together() -> None:
    parts = LostParts()
    ready_cluster(parts.registry, "a", parts.clock.time(), cpu_millis=16000)
    (first,) = await parts.running_on("a", job_spec("first", REQUEUE))
    (second,) = await parts.running_on("a", job_spec("second", REQUEUE))
    ready_cluster(parts.registry, "b", parts.clock.time(), cpu_millis=1500)  # room for one of them
    parts.lose("a")

    again = await parts.driver().decide()

    # The first submitted goes first; the second waits, to be decided again soon.
    assert first.state == S.PENDING and second.state == S.RUNNING
    assert [d.job_id for d in parts.deletes()] == [first.id]
    assert again == parts.clock.time() + 1.0


# -- wait, fail, cancelling --------------------------------------------------------------------


async def test_wait_is_never_touched() -> None:
    parts = LostParts()
    ready_cluster(parts.registry, "a", parts.clock.time())
    (record,) = await parts.running_on("a", job_spec(action=WAIT, after=0))
    ready_cluster(parts.registry, "b", parts.clock.time())
    parts.commands.queued.clear()
    parts.lose("a")
    driver = parts.driver()
    revision = record.revision

    for days in (0, 1, 30, 365):
        parts.clock.now += days * 86400.0
        parts.registry.clusters["b"].last_seen = parts.clock.now
        assert await driver.decide() == math.inf  # nothing to wake for but the cluster's return

    assert (record.state, record.cluster, record.revision) == (S.RUNNING, "a", revision)
    assert parts.commands.queued == []
    assert parts.registry.clusters["a"].reservations  # still holds its capacity there


async def test_fail_fails_the_job_where_it_was_with_reason_cluster_lost(
    running: tuple[LostParts, LostClusterJobs, asyncio.Task[None]],
) -> None:
    parts, _, _ = running
    ready_cluster(parts.registry, "a", parts.clock.time())
    (record,) = await parts.running_on("a", job_spec(action=FAIL, after=10))
    ready_cluster(parts.registry, "b", parts.clock.time())
    parts.commands.queued.clear()

    parts.lose("a")
    await parts.clock.advance(9)
    assert record.state == S.RUNNING
    await parts.clock.advance(1)

    assert (record.state, record.cluster, record.generation) == (S.FAILED, "a", 1)
    assert (record.status.reason, record.status.message) == ("ClusterLost", "cluster a lost for 10s")
    assert record.status.HasField("finish_time")
    assert record.id not in parts.table.queue
    assert parts.registry.clusters["a"].reservations == {}
    [delete] = parts.deletes()
    assert (delete.cluster, delete.job_id, delete.generation) == ("a", record.id, 1)
    assert parts.creates() == []  # not run anywhere else


async def test_a_job_being_cancelled_is_cancelled_as_soon_as_its_cluster_is_lost() -> None:
    parts = LostParts()
    ready_cluster(parts.registry, "a", parts.clock.time())
    (record,) = await parts.running_on("a", job_spec(action=WAIT))
    record = await parts.set_status(record, cancelled_status(record.status, "stop", parts.clock.time()))
    assert record.state == S.CANCELLING
    parts.commands.queued.clear()
    parts.lose("a")

    await parts.driver().decide()

    assert (record.state, record.cluster, record.generation) == (S.CANCELLED, "a", 1)
    assert record.status.reason == "ClusterLost"
    assert [(d.cluster, d.generation) for d in parts.deletes()] == [("a", 1)]


# -- which policy ------------------------------------------------------------------------------


async def test_the_queues_default_applies_unless_the_job_has_its_own() -> None:
    parts = LostParts(
        config=config(
            disconnect=defaults("requeue", 0),
            queue_disconnect={"edge": defaults("wait"), "strict": defaults("fail")},
        )
    )
    ready_cluster(parts.registry, "a", parts.clock.time(), cpu_millis=64000)
    plain, waits, own, fails, delay_only = await parts.running_on(
        "a",
        job_spec("plain"),  # the hub's default: requeue at once
        job_spec("waits", queue="edge"),  # the queue's default: wait
        job_spec("own", REQUEUE, queue="edge"),  # its own wins over the queue's
        job_spec("fails", queue="strict"),  # the queue's: fail
        job_spec("delay-only", pb.DISCONNECT_ACTION_UNSPECIFIED, 60, queue="strict"),  # fail, after 60 s
    )
    ready_cluster(parts.registry, "b", parts.clock.time(), cpu_millis=64000)
    parts.lose("a")

    await parts.driver().decide()

    assert [r.state for r in (plain, waits, own, fails, delay_only)] == [
        S.PENDING,
        S.RUNNING,
        S.PENDING,
        S.FAILED,
        S.RUNNING,
    ]
    parts.clock.now += 60
    await parts.driver().decide()
    assert delay_only.state == S.FAILED and waits.state == S.RUNNING


# -- races and takeover ------------------------------------------------------------------------


async def test_a_decision_that_loses_its_race_is_decided_again_on_what_won() -> None:
    parts = LostParts()
    ready_cluster(parts.registry, "a", parts.clock.time())
    (record,) = await parts.running_on("a", job_spec(action=REQUEUE))
    ready_cluster(parts.registry, "b", parts.clock.time())
    # Another writer (a cancel on another replica) moves the job on behind the table's back.
    parts.store.put_status(
        record.id, cancelled_status(record.status, "stop", parts.clock.time()).SerializeToString()
    )
    parts.commands.queued.clear()
    parts.lose("a")
    driver = parts.driver()

    again = await driver.decide()
    assert record.state == S.CANCELLING  # the winner's status, merged; nothing acted on
    assert parts.commands.queued == [] and again == parts.clock.time() + 1.0

    await driver.decide()
    assert record.state == S.CANCELLED and [d.generation for d in parts.deletes()] == [1]


async def test_a_new_leader_decides_from_the_table_and_registry_alone() -> None:
    parts = LostParts()
    ready_cluster(parts.registry, "a", parts.clock.time())
    (record,) = await parts.running_on("a", job_spec(action=REQUEUE, after=30))
    ready_cluster(parts.registry, "b", parts.clock.time())
    parts.lose("a")
    first = parts.driver()
    assert await first.decide() == parts.clock.time() + 30  # asks to look again when due

    parts.clock.now += 30
    # The first leader is gone; a driver that never saw the cluster go acts on time.
    await parts.driver().decide()
    assert record.state == S.PENDING


async def test_a_cluster_that_comes_back_before_the_delay_keeps_its_jobs(
    running: tuple[LostParts, LostClusterJobs, asyncio.Task[None]],
) -> None:
    parts, _, _ = running
    ready_cluster(parts.registry, "a", parts.clock.time())
    (record,) = await parts.running_on("a", job_spec(action=REQUEUE, after=30))
    ready_cluster(parts.registry, "b", parts.clock.time())
    parts.commands.queued.clear()
    parts.lose("a")
    await parts.clock.advance(20)
    parts.registry.clusters["a"].lost_since = None
    await parts.clock.advance(60)
    assert (record.state, record.cluster) == (S.RUNNING, "a") and parts.commands.queued == []


# -- fencing by generation ---------------------------------------------------------------------


def update(job_id: str, cluster: str, generation: int, state: int) -> agent_pb.StatusUpdate:
    return agent_pb.StatusUpdate(cluster=cluster, job_id=job_id, generation=generation, state=state)  # type: ignore[arg-type]


async def test_after_a_requeue_only_the_new_generation_changes_the_job_and_it_succeeds_once() -> None:
    parts = LostParts()
    ready_cluster(parts.registry, "a", parts.clock.time())
    (record,) = await parts.running_on("a", job_spec(action=REQUEUE))
    ready_cluster(parts.registry, "b", parts.clock.time())
    parts.lose("a")
    await parts.driver().decide()
    await parts.scheduler().place_pending()
    assert (record.state, record.cluster, record.generation) == (S.DISPATCHED, "b", 2)
    statuses = parts.statuses()

    # The lost cluster comes back and reports its old copy: running, then done.
    revision, before = record.revision, parts.store.revision
    old = status_msg(update(record.id, "a", 1, S.RUNNING), update(record.id, "a", 1, S.SUCCEEDED))
    await statuses.apply_batch([old])
    assert old.acked and (record.state, record.cluster, record.revision) == (S.DISPATCHED, "b", revision)
    assert parts.store.revision == before  # nothing written

    new = status_msg(update(record.id, "b", 2, S.RUNNING), update(record.id, "b", 2, S.SUCCEEDED))
    await statuses.apply_batch([new])
    assert new.acked and (record.state, record.cluster, record.generation) == (S.SUCCEEDED, "b", 2)

    # Succeeded once: a second success, from either copy, is ignored.
    revision, before = record.revision, parts.store.revision
    again = status_msg(update(record.id, "b", 2, S.SUCCEEDED), update(record.id, "a", 1, S.SUCCEEDED))
    await statuses.apply_batch([again])
    assert again.acked and record.revision == revision and parts.store.revision == before
    assert [sm.state_name(h.state) for h in record.status.history].count("SUCCEEDED") == 1


# -- a federation-wide disruption -------------------------------------------------------------


async def test_no_job_is_evicted_while_most_clusters_are_lost_at_once(
    running: tuple[LostParts, LostClusterJobs, asyncio.Task[None]],
) -> None:
    """Most clusters lost together (the hub's NATS or network, more likely than theirs): held."""
    parts, _, _ = running
    ready_cluster(parts.registry, "a", parts.clock.time())
    (record,) = await parts.running_on("a", job_spec(action=REQUEUE))
    ready_cluster(parts.registry, "b", parts.clock.time())
    ready_cluster(parts.registry, "c", parts.clock.time())
    parts.commands.queued.clear()

    parts.lose("a")
    parts.lose("b")  # 2 of 3: past the 0.55 threshold
    await settle()
    await parts.clock.advance(600)
    assert (record.state, record.cluster) == (S.RUNNING, "a")
    assert parts.commands.queued == []

    parts.registry.clusters["b"].lost_since = None  # b is back: 1 of 3 lost
    ready_cluster(parts.registry, "b", parts.clock.time())
    await settle()
    await parts.clock.advance(1)
    assert (record.state, record.cluster) == (S.PENDING, "")


# -- the create's fence ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "after", "edge", "fence"),
    [
        (REQUEUE, 30, False, 60 + 30 - 6),  # lost after 60 s, less 10% of it
        (FAIL, 0, False, 60 - 6),
        (WAIT, 30, False, 0),  # never: the job waits for its cluster
        (REQUEUE, 0, True, 900 - 90),  # an edge cluster's longer threshold
        (None, 0, False, 60 + 120 - 6),  # the hub's default: requeue 2 minutes after the loss
    ],
)
async def test_each_create_says_when_a_cut_off_agent_stops_the_job(
    action: int | None, after: float, edge: bool, fence: float
) -> None:
    parts = LostParts(config=config(cluster_unknown_after_seconds=15.0, cluster_lost_after_seconds=60.0))
    cluster = ready_cluster(parts.registry, "a", parts.clock.time())
    if edge:
        inventory = agent_pb.Inventory()
        inventory.CopyFrom(cluster.inventory or agent_pb.Inventory())
        inventory.labels["fedplane.io/edge"] = "true"
        cluster.apply_inventory(inventory)
    await parts.submit(job_spec(action=action, after=after))

    await parts.scheduler().place_pending()

    [create] = parts.creates()
    assert create.cluster == "a" and create.fence_after_seconds == pytest.approx(fence)


# -- the table takes requeued jobs back into the pending queue ---------------------------------


async def test_a_requeue_written_by_another_replica_puts_the_job_back_in_the_queue() -> None:
    parts = LostParts()
    ready_cluster(parts.registry, "a", parts.clock.time())
    (record,) = await parts.running_on("a", job_spec())
    assert record.id not in parts.table.queue
    parts.table.wake.clear()
    requeued = sm.requeue(record.dispatch_state, "ClusterLost")
    status = records.record(record.status, requeued, parts.clock.time())
    revision = parts.store.put_status(record.id, status.SerializeToString())

    parts.table.merge(record.id, status, revision)  # as the watch brings it

    assert record.state == S.PENDING and record.id in parts.table.queue and parts.table.wake.is_set()
    assert parts.table.counts[("default", S.PENDING)] == 1 and parts.table.active["a"] == 0
    # Merged again (the write's own answer and the watch both bring it), it is queued once.
    parts.table.merge(record.id, status, revision)
    assert len(parts.table.queue) == 1


async def test_a_cluster_declared_lost_wakes_the_driver_at_once() -> None:
    parts = LostParts()
    ready_cluster(parts.registry, "a", parts.clock.time())
    (record,) = await parts.running_on("a", job_spec(action=REQUEUE, after=0))
    ready_cluster(parts.registry, "b", parts.clock.time())
    task = asyncio.create_task(parts.driver(recheck_seconds=3600).run())
    try:
        await settle()
        assert record.state == S.RUNNING
        parts.lose("a")  # no time passes: only the registry's word can start the pass
        await settle()
        assert record.state == S.PENDING
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
