"""A steady rate of submissions: one task a tick on a fixed timetable, with a cap on those in flight.

The timetable is fixed (each tick 1/rate after the last one was due, not after it started), so
slow ticks are caught up and the offered rate holds; only the cap can hold a tick back. The
failover bench's stream and the chaos runs' load generator both submit this way, each with its
own submission (and its own retries) as the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

__all__ = ["Pacer"]


class Pacer:
    """Runs `submit(n)` for n = 0, 1, ... at `rate` a second from `run` until `stop`, each in a task
    named `{name}-{n}`, at most `max_in_flight` at once; `drain` waits for the tasks in flight."""

    def __init__(
        self, submit: Callable[[int], Awaitable[None]], rate: float, max_in_flight: int, name: str
    ) -> None:
        self._submit = submit
        self.rate = rate
        self.name = name
        self._stopped = asyncio.Event()
        self._limit = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Start a submission every 1/rate seconds until `stop`."""
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        n = 0
        while not self._stopped.is_set():
            await self._limit.acquire()
            if self._stopped.is_set():  # stopped while the cap held this tick back
                self._limit.release()
                break
            task = asyncio.create_task(self._one(n), name=f"{self.name}-{n}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            n += 1
            next_at += interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), max(0.0, next_at - time.monotonic()))

    async def _one(self, n: int) -> None:
        try:
            await self._submit(n)
        finally:
            self._limit.release()

    def stop(self) -> None:
        self._stopped.set()

    async def drain(self) -> None:
        """Wait for the submissions in flight; each must end on its own (they are not cancelled)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
