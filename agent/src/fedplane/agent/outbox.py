"""Status updates on their way to the hub, kept until JetStream has acknowledged them.

An edge agent may lose its link for hours: its workloads keep running and their state
changes queue here, in order, and are replayed when the link returns. With a state
directory the queue is also on disk, so an agent restart while offline loses nothing.

On disk the queue is an append-only log (one fsync'd line per update) and a count of its
leading lines already acknowledged (`<log>.sent`), so that replaying a long backlog costs a
small write per batch rather than a rewrite of the whole log; the log is compacted once the
acknowledged lines are the larger part. The count is always written before the log is
rewritten: a crash between the two makes the outbox send some updates again (the hub
applies them idempotently), never skip one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from fedplane.v1 import agent_pb2 as agent_pb

Item = tuple[agent_pb.StatusUpdate, dict[str, str]]
# Publishes a batch in order; per item, None when stored, else the error.
PublishBatch = Callable[[list[Item]], Awaitable[list[BaseException | None]]]
# Acknowledged lines the log may keep before it is compacted (and at least as many as are queued).
_COMPACT_AFTER = 4096


class Outbox:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._sent_path = path.with_name(path.name + ".sent") if path is not None else None
        self._queue: deque[Item] = deque()
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        # Leading lines of the log on disk that JetStream has acknowledged.
        self._sent = 0
        # Updates JetStream has stored since start (a metric).
        self.published = 0
        if path is not None and path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            self._sent = min(self._read_sent(), len(lines))
            for line in lines[self._sent :]:
                data, _, trace = line.partition(" ")
                headers = dict(h.split("=", 1) for h in trace.split(",") if "=" in h)
                self._queue.append((agent_pb.StatusUpdate.FromString(base64.b64decode(data)), headers))
        if self._queue:
            self._ready.set()

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, update: agent_pb.StatusUpdate, trace: dict[str, str]) -> None:
        self._queue.append((update, trace))
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(self._line(update, trace))
                f.flush()
                os.fsync(f.fileno())
        self._ready.set()

    def wake(self) -> None:
        """Retry now rather than after the backoff: the link to the hub is back."""
        self._wake.set()

    @staticmethod
    def _line(update: agent_pb.StatusUpdate, trace: dict[str, str]) -> str:
        headers = ",".join(f"{k}={v}" for k, v in trace.items())
        return f"{base64.b64encode(update.SerializeToString()).decode()} {headers}\n"

    def _read_sent(self) -> int:
        assert self._sent_path is not None
        with contextlib.suppress(OSError, ValueError):
            return max(0, int(self._sent_path.read_text().strip() or 0))
        return 0

    def _write_sent(self) -> None:
        assert self._sent_path is not None
        tmp = self._sent_path.with_name(self._sent_path.name + ".tmp")
        tmp.write_text(str(self._sent))
        os.replace(tmp, self._sent_path)

    def _acknowledged(self, count: int) -> None:
        """Record on disk that the first `count` queued updates were stored by JetStream."""
        if self.path is None:
            return
        self._sent += count
        if self._queue and self._sent <= max(_COMPACT_AFTER, len(self._queue)):
            self._write_sent()
            return
        # Compact: the count first (a crash before the rewrite then sends some updates again).
        self._sent = 0
        self._write_sent()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(self._line(u, t) for u, t in self._queue))
        os.replace(tmp, self.path)

    async def run(self, publish: PublishBatch, batch: int = 64, retry_delay: float = 0.5) -> None:
        """Publish in order until cancelled; on failure wait and retry the same updates (at once
        when woken)."""
        delay = retry_delay
        while True:
            await self._ready.wait()
            items = list(itertools.islice(self._queue, batch))  # not a copy of the whole backlog
            if not items:
                self._ready.clear()
                continue
            self._wake.clear()  # a wake from now on cuts the wait after this attempt short
            try:
                results = await publish(items)
            except Exception as exc:
                results = [exc] * len(items)
            # Only an unbroken prefix may leave the queue, so order is preserved on retry.
            sent = 0
            for result in results:
                if isinstance(result, BaseException):
                    break
                sent += 1
            for _ in range(sent):
                self._queue.popleft()
            if sent:
                self._acknowledged(sent)
                self.published += sent
                delay = retry_delay
            if not self._queue:
                self._ready.clear()
            if sent < len(items):
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                    delay = retry_delay
                except TimeoutError:
                    delay = min(delay * 2, 10.0)
