"""Placement rounds: dispatch by compare-and-swap, then reserve and queue the command."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from fedplane.core import dispatch as sm
from fedplane.hub import records
from fedplane.hub.scheduler import Scheduler
from fedplane.hub.store import Fence, FenceLost, StatusToWrite
from fedplane.v1 import types_pb2 as pb
from tests.hub.fakes import Parts, cancelled_status, free_cpu, ready_cluster, spec
from tests.hub.memory_store import MemoryStore

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


async def test_a_round_whose_write_is_refused_leaves_its_jobs_queued() -> None:
    """The fence gone under a round (the lease ran out): its jobs wait in the queue for the
    next leader, this replica included, without the quota the cycle admitted them with."""
    parts = Parts()
    ready_cluster(parts.registry, "c1", parts.clock.time(), cpu_millis=8000)
    records_ = await parts.submit(spec(), spec())
    parts.table.fence = Fence(b"/fedplane/leader", 7)
    parts.store.leader = Fence(b"/fedplane/leader", 9)  # another replica took over

    with pytest.raises(FenceLost):
        await scheduler(parts).place_pending()

    for record in records_:
        assert record.state == S.PENDING and record.id in parts.table.queue
        assert not parts.table.queue.charged(record.id)
    assert parts.commands.queued == [] and free_cpu(parts.registry, "c1", parts.clock.time()) == 8000
    # Leading again, under the fence etcd holds: the next round places them.
    parts.table.fence = parts.store.leader
    await scheduler(parts).place_pending()
    assert [r.state for r in records_] == [S.DISPATCHED, S.DISPATCHED] and len(parts.commands.queued) == 2


@dataclass
class HeldWrites(MemoryStore):
    """Status writes wait until `landing` is set: a round's write in flight (`sent`)."""

    sent: asyncio.Event = field(default_factory=asyncio.Event)
    landing: asyncio.Event = field(default_factory=asyncio.Event)

    async def write_statuses(self, writes: Sequence[StatusToWrite], fence: Fence) -> list[int | None]:
        self.sent.set()
        await self.landing.wait()
        return await super().write_statuses(writes, fence)


async def test_a_round_cancelled_while_its_write_is_in_flight_leaves_its_jobs_queued() -> None:
    """Stepping down (the lease not renewed in time) cancels placement wherever it is."""
    store = HeldWrites()
    parts = Parts(store=store)
    ready_cluster(parts.registry, "c1", parts.clock.time(), cpu_millis=8000)
    records_ = await parts.submit(spec(), spec())
    placing = asyncio.create_task(scheduler(parts).place_pending())
    await store.sent.wait()
    assert not any(r.id in parts.table.queue for r in records_)  # the cycle took them
    placing.cancel()

    with pytest.raises(asyncio.CancelledError):
        await placing

    for record in records_:
        assert record.state == S.PENDING and record.id in parts.table.queue
        assert not parts.table.queue.charged(record.id)
    store.landing.set()
    await scheduler(parts).place_pending()
    assert [r.state for r in records_] == [S.DISPATCHED, S.DISPATCHED] and len(parts.commands.queued) == 2


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
