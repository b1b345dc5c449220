"""The hub's event log: every job change in etcd revision order, fanned out to watchers.

Recent events stay in a ring so a reconnecting client resumes from memory; an older
resume point is replayed from etcd by the caller's `replay`. A watcher that cannot keep up
is cut off (WatchFellBehind) instead of growing the hub's memory without bound; it resumes
from the last revision it processed, like any reconnecting client.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Change:
    """One status write, as the log keeps it: the API event is built only when a watcher wants it."""

    revision: int
    job_id: str
    queue: str
    status_blob: bytes


Wanted = Callable[[Change], bool]
Replay = Callable[[int, int], AsyncIterator[Change]]


class WatchFellBehind(Exception):
    pass


@dataclass(eq=False)
class _Watcher:
    limit: int
    queue: asyncio.Queue[Change | None] = field(default_factory=asyncio.Queue)
    behind: bool = False

    def offer(self, event: Change | None) -> None:
        if event is not None and self.queue.qsize() >= self.limit:
            self.behind = True
            event = None
        self.queue.put_nowait(event)


class EventLog:
    def __init__(self, capacity: int = 20_000, watcher_backlog: int = 50_000) -> None:
        self.events: deque[Change] = deque(maxlen=capacity)
        # Every change up to this revision has been published.
        self.revision = 0
        self._watchers: set[_Watcher] = set()
        self._backlog = watcher_backlog
        # Watchers cut off for falling behind, ever (a metric).
        self.fell_behind = 0

    def publish(self, event: Change) -> None:
        self.revision = max(self.revision, event.revision)
        self.events.append(event)
        for watcher in self._watchers:
            if not watcher.behind:
                watcher.offer(event)

    def backlogs(self) -> list[int]:
        """Each open watcher's queued events: how far behind it is (a metric)."""
        return [watcher.queue.qsize() for watcher in self._watchers]

    def close(self) -> None:
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)

    async def stream(self, from_revision: int, wanted: Wanted, replay: Replay) -> AsyncIterator[Change]:
        """Events strictly after `from_revision` (0: from now), each (revision, job) once."""
        watcher = _Watcher(self._backlog)
        self._watchers.add(watcher)
        # One etcd transaction changes many jobs at one revision: dedup by (revision, job id).
        floor = from_revision or self.revision
        last = floor
        sent_at_last: set[str] = set()

        def fresh(event: Change) -> bool:
            nonlocal last
            if event.revision <= floor or event.revision < last:
                return False
            if event.revision == last and event.job_id in sent_at_last:
                return False
            if event.revision > last:
                last = event.revision
                sent_at_last.clear()
            sent_at_last.add(event.job_id)
            return True

        try:
            oldest = self.events[0].revision if self.events else self.revision + 1
            if from_revision and from_revision + 1 < oldest:
                async for event in replay(from_revision, self.revision):
                    if fresh(event) and wanted(event):
                        yield event
            for event in list(self.events):
                if fresh(event) and wanted(event):
                    yield event
            while True:
                item = await watcher.queue.get()
                if item is None:
                    if watcher.behind:
                        self.fell_behind += 1
                        raise WatchFellBehind(f"the watch fell behind at revision {last}; resume from it")
                    return
                if fresh(item) and wanted(item):
                    yield item
        finally:
            self._watchers.discard(watcher)
