"""The hub's event log: ordering, per-revision dedup, resume, and slow watchers cut off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fedplane.hub.events import Change, EventLog, WatchFellBehind


def event(revision: int, job_id: str) -> Change:
    return Change(revision, job_id, "default", b"")


async def no_replay(after: int, until: int) -> AsyncIterator[Change]:
    raise AssertionError("memory should have served this")
    yield  # pragma: no cover


async def take(stream: AsyncIterator[Change], n: int) -> list[tuple[int, str]]:
    out = []
    async for e in stream:
        out.append((e.revision, e.job_id))
        if len(out) == n:
            break
    return out


async def test_resume_delivers_every_job_of_a_shared_revision_once() -> None:
    log = EventLog()
    for e in (event(5, "a"), event(6, "b"), event(6, "c"), event(7, "d")):
        log.publish(e)
    got = await take(log.stream(5, lambda e: True, no_replay), 3)
    assert got == [(6, "b"), (6, "c"), (7, "d")]


async def test_live_events_follow_the_backlog_without_repeats() -> None:
    log = EventLog()
    log.publish(event(1, "a"))
    stream = log.stream(0, lambda e: True, no_replay)  # from now: revision 1 is history
    consumer = asyncio.create_task(take(stream, 2))
    await asyncio.sleep(0)
    log.publish(event(2, "b"))
    log.publish(event(2, "b"))  # duplicate delivery of the same change
    log.publish(event(3, "c"))
    assert await consumer == [(2, "b"), (3, "c")]


async def test_older_than_memory_is_replayed_then_memory_takes_over() -> None:
    log = EventLog(capacity=2)
    for r in (1, 2, 3, 4):
        log.publish(event(r, f"j{r}"))

    async def replay(after: int, until: int) -> AsyncIterator[Change]:
        assert (after, until) == (1, 4)
        for r in (2, 3, 4):
            yield event(r, f"j{r}")

    assert await take(log.stream(1, lambda e: True, replay), 3) == [(2, "j2"), (3, "j3"), (4, "j4")]


async def test_a_watcher_that_cannot_keep_up_is_cut_off_not_buffered_forever() -> None:
    log = EventLog(watcher_backlog=3)
    stream = log.stream(0, lambda e: True, no_replay)
    first = asyncio.create_task(take(stream, 1))
    await asyncio.sleep(0)
    for r in range(1, 10):
        log.publish(event(r, "j"))
    assert await first == [(1, "j")]
    with pytest.raises(WatchFellBehind):
        await take(stream, 100)
