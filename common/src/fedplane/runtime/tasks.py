"""Bounded shutdown of a daemon's background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Iterable

from fedplane.runtime import logs

log = logs.get("fedplane.tasks")


async def finish_first(task: asyncio.Task[None] | None, grace: float) -> None:
    """Give one task up to `grace` seconds to end by itself (e.g. to finish the batch in hand)."""
    if task is not None:
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), grace)


async def cancel_all(tasks: Iterable[asyncio.Task[None]], grace: float = 5.0) -> None:
    """Cancel tasks and wait for them, but never longer than `grace` seconds: a stuck task is logged
    with its stack instead of keeping the process alive past its termination grace period."""
    pending = {t for t in tasks if not t.done()}
    deadline = asyncio.get_running_loop().time() + grace
    while pending:
        # Again and again: asyncio.wait_for before Python 3.12 can swallow a cancellation that
        # arrives as its inner call completes, and the task then runs on.
        for task in pending:
            task.cancel()
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(0.1, left))
    for task in pending:
        frames = [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack()]
        log.error("task did not stop", task=task.get_name(), frames=frames)


async def bounded(awaitable: Awaitable[object], grace: float, what: str) -> None:
    """Await a shutdown step, giving up (with a log line) after `grace` seconds."""
    try:
        await asyncio.wait_for(awaitable, grace)
    except TimeoutError:
        log.error("shutdown step timed out", step=what, seconds=grace)
    except Exception as exc:
        log.warning("shutdown step failed", step=what, error=str(exc))


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: how every daemon here learns to shut down."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_at_most(event: asyncio.Event, seconds: float) -> bool:
    """Wait for `event` at most `seconds`; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()
