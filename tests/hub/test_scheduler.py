"""Placement rounds: dispatch by compare-and-swap, then reserve and queue the command."""

from __future__ import annotations

from fedplane.core import dispatch as sm
from fedplane.hub import records
from fedplane.hub.scheduler import Scheduler
from fedplane.v1 import types_pb2 as pb
from tests.hub.fakes import Parts, cancelled_status, free_cpu, ready_cluster, spec

S = sm.S


def scheduler(parts: Parts) -> Scheduler:
    return Scheduler(parts.table, parts.registry, parts.commands, parts.clock, parts.config)


async def test_a_pending_job_is_dispatched_and_its_command_queued() -> None:
    parts = Parts()
    ready_cluster(parts.registry, "c1", parts.clock.time(), cpu_millis=8000)
    (record,) = await parts.submit(spec(cpu_millis=3000))
    created_at = record.revision
    parts.table.wake.clear()

    await scheduler(parts).place_pending()

    assert record.state == S.DISPATCHED and record.cluster == "c1" and record.generation == 1
    assert record.revision > created_at
    stored = pb.JobStatus.FromString(parts.store.statuses[record.id][0])
    assert stored.state == S.DISPATCHED and stored.cluster == "c1"
    assert stored.update_time.ToNanoseconds() / 1e9 == parts.clock.time()
    assert record.id not in parts.table.queue
    assert parts.table.counts[("default", S.DISPATCHED)] == 1 and parts.table.active["c1"] == 1
    [(job, command)] = parts.commands.queued
    assert job.status.cluster == "c1"
    assert command.job_id == record.id and command.generation == 1
    assert command.WhichOneof("action") == "create"
    assert command.create.spec.pod_sets[0].requests.quantities["cpu"] == 3000
    assert (
        free_cpu(parts.registry, "c1", parts.clock.time()) == 5000
    )  # reserved until its inventory counts it
    assert not parts.table.wake.is_set()


async def test_a_lost_compare_and_swap_requeues_the_job() -> None:
    parts = Parts()
    ready_cluster(parts.registry, "c1", parts.clock.time(), cpu_millis=8000)
    (record,) = await parts.submit(spec())
    # Another writer rewrites the status, still PENDING, behind the table's back.
    again = records.submitted(parts.clock.time())
    parts.store.put_status(record.id, again.SerializeToString())
    parts.table.wake.clear()

    await scheduler(parts).place_pending()

    assert record.state == S.PENDING and record.revision == parts.store.status_revision(record.id)
    assert record.id in parts.table.queue and parts.table.wake.is_set()
    assert parts.commands.queued == [] and free_cpu(parts.registry, "c1", parts.clock.time()) == 8000
    # The next round places it.
    await scheduler(parts).place_pending()
    assert record.state == S.DISPATCHED and len(parts.commands.queued) == 1


async def test_a_job_cancelled_during_the_round_is_not_requeued() -> None:
    parts = Parts()
    ready_cluster(parts.registry, "c1", parts.clock.time())
    (record,) = await parts.submit(spec())
    cancelled = cancelled_status(record.status, "changed my mind", parts.clock.time())
    parts.store.put_status(record.id, cancelled.SerializeToString())

    await scheduler(parts).place_pending()

    assert record.state == S.CANCELLED
    assert record.id not in parts.table.queue and parts.commands.queued == []


async def test_a_job_that_fits_nowhere_stays_pending_with_its_reason() -> None:
    parts = Parts()
    ready_cluster(parts.registry, "c1", parts.clock.time(), cpu_millis=1000)
    (record,) = await parts.submit(spec(cpu_millis=2000))

    await scheduler(parts).place_pending()

    assert record.state == S.PENDING and parts.commands.queued == []
    assert parts.store.status_revision(record.id) == record.revision  # nothing written
    assert "c1" in parts.table.pending_reason(record.id)
