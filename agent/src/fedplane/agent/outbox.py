"""Status updates on their way to the hub, kept until JetStream has acknowledged them.

An edge agent may lose its link for hours: its workloads keep running and their state
changes queue here, in order, and are replayed when the link returns. With a state
directory the queue is also on disk, so an agent restart while offline loses nothing.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from fedplane.v1 import agent_pb2 as agent_pb

Item = tuple[agent_pb.StatusUpdate, dict[str, str]]
# Publishes a batch in order; per item, None when stored, else the error.
PublishBatch = Callable[[list[Item]], Awaitable[list[BaseException | None]]]


class Outbox:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._queue: deque[Item] = deque()
        self._ready = asyncio.Event()
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
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

    @staticmethod
    def _line(update: agent_pb.StatusUpdate, trace: dict[str, str]) -> str:
        headers = ",".join(f"{k}={v}" for k, v in trace.items())
        return f"{base64.b64encode(update.SerializeToString()).decode()} {headers}\n"

    def _rewrite(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(self._line(u, t) for u, t in self._queue))
        os.replace(tmp, self.path)

    async def run(self, publish: PublishBatch, batch: int = 64, retry_delay: float = 0.5) -> None:
        """Publish in order until cancelled; on failure wait and retry the same updates."""
        delay = retry_delay
        while True:
            await self._ready.wait()
            items = list(itertools.islice(self._queue, batch))  # not a copy of the whole backlog
            if not items:
                self._ready.clear()
                continue
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
                self._rewrite()
                delay = retry_delay
            if not self._queue:
                self._ready.clear()
            if sent < len(items):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
