"""Retention: finished jobs are deleted once the clock passes their retention."""

from __future__ import annotations

import asyncio

from fedplane.core import dispatch as sm
from fedplane.hub.retention import Retention
from tests.hub.fakes import Parts, cancelled_status, reported_status, spec

S = sm.S
RETENTION = 100.0  # the loop looks every 25 s


async def test_a_finished_job_is_deleted_once_the_clock_passes_its_retention() -> None:
    parts = Parts()
    done, running, key_holder = await parts.submit(spec("done"), spec("running"), spec("keyed"))
    done = await parts.dispatched(done, "c1")
    running = await parts.dispatched(running, "c1")
    finished = reported_status(done.status, S.SUCCEEDED, parts.clock.time())
    assert finished is not None
    done = await parts.set_status(done, finished)
    retention = Retention(parts.table, parts.clock, RETENTION)
    loop = asyncio.create_task(retention.run())
    try:
        await parts.clock.advance(RETENTION - 1)
        assert done.id in parts.table.jobs and done.id in parts.store.specs

        await parts.clock.advance(30)
        assert done.id not in parts.table.jobs
        assert done.id not in parts.store.specs and done.id not in parts.store.statuses
        assert running.id in parts.table.jobs and key_holder.id in parts.table.jobs
        assert parts.table.counts[("default", S.SUCCEEDED)] == 0
    finally:
        loop.cancel()


async def test_a_job_changed_since_it_was_judged_is_not_deleted() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    cancelled = cancelled_status(record.status, "no", parts.clock.time())
    record = await parts.set_status(record, cancelled)
    # Written again behind the table's back: the table's revision is stale.
    parts.store.put_status(record.id, cancelled.SerializeToString())
    await parts.clock.advance(RETENTION + 1)

    deleted = await Retention(parts.table, parts.clock, RETENTION).forget_finished(
        parts.clock.time() - RETENTION
    )

    assert deleted == 0 and record.id in parts.table.jobs and record.id in parts.store.specs


async def test_zero_retention_keeps_finished_jobs() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    await parts.set_status(record, cancelled_status(record.status, "no", parts.clock.time()))
    loop = asyncio.create_task(Retention(parts.table, parts.clock, 0).run())
    await parts.clock.advance(10 * 365 * 86400)
    assert loop.done() and record.id in parts.table.jobs
