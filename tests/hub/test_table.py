"""The job table: merging by revision, counters, and the one status write path."""

from __future__ import annotations

from fedplane.core import dispatch as sm
from fedplane.hub.store import NO_FENCE, Fence
from fedplane.hub.table import StatusWrite
from tests.hub.fakes import Parts, cancelled_status, dispatched_status, reported_status, spec

S = sm.S


async def test_an_older_revision_never_overwrites_a_newer_one() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    table = parts.table
    created_at = record.revision
    dispatched = dispatched_status(record.status, "c1", parts.clock.time())
    running = reported_status(dispatched, S.RUNNING, parts.clock.time())

    table.merge(record.id, running, created_at + 2)
    # The dispatch, at an older revision, arrives after (the watch lagging behind a write).
    table.merge(record.id, dispatched, created_at + 1)
    table.merge(record.id, dispatched, created_at + 2)
    assert record.state == S.RUNNING and record.revision == created_at + 2
    assert table.counts[("default", S.RUNNING)] == 1
    assert table.counts[("default", S.DISPATCHED)] == 0
    assert table.counts[("default", S.PENDING)] == 0
    assert table.active["c1"] == 1
    assert record.id not in table.queue


async def test_a_newer_revision_moves_counters_and_the_pending_queue() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec(queue="q"))
    table = parts.table
    assert record.id in table.queue and table.counts[("q", S.PENDING)] == 1

    cancelled = cancelled_status(record.status, "no", parts.clock.time())
    table.merge(record.id, cancelled, record.revision + 1)
    assert record.state == S.CANCELLED
    assert record.id not in table.queue
    assert table.counts[("q", S.PENDING)] == 0 and table.counts[("q", S.CANCELLED)] == 1
    assert table.merge("unknown", cancelled, 10**9) is None


async def test_a_lost_write_leaves_the_winners_status_in_the_table() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    stale = record.revision
    # Another writer cancels behind the table's back.
    cancelled = cancelled_status(record.status, "elsewhere", parts.clock.time())
    won_at = parts.store.put_status(record.id, cancelled.SerializeToString())
    dispatched = dispatched_status(record.status, "c1", parts.clock.time())

    (written,) = await parts.table.write([StatusWrite.of(record.id, dispatched, stale)])
    assert written is None
    assert record.state == S.CANCELLED and record.revision == won_at
    assert parts.store.statuses[record.id][1] == won_at


async def test_every_status_write_and_delete_carries_the_tables_fence() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    assert parts.table.fence is NO_FENCE
    record = await parts.dispatched(record, "c1")
    parts.table.fence = Fence(b"/fedplane/leader", 7)
    await parts.table.write([StatusWrite.of(record.id, record.status, record.revision)])
    await parts.table.delete([record])
    assert parts.store.fences == [NO_FENCE, Fence(b"/fedplane/leader", 7), Fence(b"/fedplane/leader", 7)]
