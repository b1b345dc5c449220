"""The status feed: changes written by anyone reach the table and the event log."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fedplane.core import dispatch as sm
from fedplane.hub.events import EventLog
from fedplane.hub.feed import StatusFeed
from fedplane.hub.intake import Intake
from fedplane.hub.store import JobToCreate, StoredJob
from tests.hub.fakes import Parts, cancelled_status, settle, spec
from tests.hub.memory_store import MemoryStore

S = sm.S


async def test_the_feed_merges_foreign_writes_and_publishes_every_change() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    events = EventLog()
    feed = asyncio.create_task(StatusFeed(parts.table, events).run(lambda: False))
    try:
        await settle()
        assert [(c.revision, c.job_id) for c in events.events] == [(record.seq, record.id)]

        cancelled = cancelled_status(record.status, "elsewhere", parts.clock.time())
        revision = parts.store.put_status(record.id, cancelled.SerializeToString())
        await settle()
        assert record.state == S.CANCELLED and record.revision == revision
        assert events.revision == revision
    finally:
        feed.cancel()


class PausingStore(MemoryStore):
    """Answers a create of several jobs only once `resume` is set, after storing the first:
    the watch sees that one before the submit's transaction answers."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = asyncio.Event()

    async def create_jobs(self, jobs: Sequence[JobToCreate]) -> list[int | StoredJob]:
        first = await super().create_jobs(jobs[:1])
        await self.resume.wait()
        return first + await super().create_jobs(jobs[1:])


async def test_a_submit_seen_by_the_feed_first_is_held_once_and_not_rewound() -> None:
    store = PausingStore()
    parts = Parts(store=store)
    events = EventLog()
    events.revision = store.revision
    feed = asyncio.create_task(StatusFeed(parts.table, events).run(lambda: False))
    intake = Intake(parts.table, parts.clock)
    runner = asyncio.create_task(intake.run())
    try:
        submitted = asyncio.create_task(intake.submit([(spec("a"), ""), (spec("b"), "")], batch=True))
        await settle()
        (first,) = parts.table.jobs.values()  # taken from the feed, the submit still waiting
        assert not submitted.done() and first.id in parts.table.creating
        # Placement dispatches it before the submit's answer comes.
        first = await parts.dispatched(first, "c1")
        dispatched_at = first.revision

        store.resume.set()
        (a, a_created), (b, b_created) = await submitted
        await settle()

        assert a_created and b_created and a.id == first.id
        assert parts.table.jobs[a.id] is first
        assert first.state == S.DISPATCHED and first.revision == dispatched_at and first.seq < dispatched_at
        assert a.status.state == S.DISPATCHED
        assert parts.table.counts[("default", S.PENDING)] == 1
        assert parts.table.counts[("default", S.DISPATCHED)] == 1
        assert list(parts.table.queue) == [b.id]
        assert [c.job_id for c in events.events] == [a.id, a.id, b.id]
        assert parts.table.creating == {}
    finally:
        feed.cancel()
        runner.cancel()
