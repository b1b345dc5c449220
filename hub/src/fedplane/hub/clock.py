"""The hub's sense of time, injected so that tests can drive it.

Wall time stamps records (submit, dispatch, finish) and judges heartbeats; `sleep` paces the
periodic timers (health checks, retention). Waits that only pace the event loop (a placement
batch window, a retry backoff) are not time the hub reasons about and stay on asyncio.sleep.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait for `seconds` of this clock's time."""
        ...


class SystemClock:
    # The builtin itself, not a method wrapping it: read several times per placement round.
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM = SystemClock()
