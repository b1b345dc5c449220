"""The outbox keeps every update until JetStream stored it, in order, across restarts and failures."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from fedplane.agent import outbox as outbox_module
from fedplane.agent.outbox import Item, Outbox
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb


def update(job_id: str, state: pb.JobState.ValueType = pb.RUNNING) -> agent_pb.StatusUpdate:
    return agent_pb.StatusUpdate(cluster="edge", job_id=job_id, generation=1, state=state)


class Hub:
    """Stores what it is sent while `up`, up to `room` updates (the rest of a batch is refused,
    as when the link drops mid-batch); refuses everything while down."""

    def __init__(self, room: int = 1_000_000) -> None:
        self.up = False
        self.room = room
        self.stored: list[str] = []
        self.attempted = asyncio.Event()
        self.full = asyncio.Event()

    async def publish(self, items: list[Item]) -> list[BaseException | None]:
        self.attempted.set()
        if not self.up:
            raise ConnectionError("link down")
        taken = items[: self.room - len(self.stored)]
        self.stored += [u.job_id for u, _ in taken]
        if len(self.stored) >= self.room:
            self.full.set()
        return [None] * len(taken) + [ConnectionError("link down")] * (len(items) - len(taken))


async def run_until_full(outbox: Outbox, hub: Hub, timeout: float = 5.0) -> None:
    """Run the outbox until the hub has taken `hub.room` updates, then stop it (as in a crash)."""
    task = asyncio.create_task(outbox.run(hub.publish, batch=3, retry_delay=0.05))
    try:
        await asyncio.wait_for(hub.full.wait(), timeout)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_updates_queued_while_down_are_published_in_order_once_up(tmp_path: Path) -> None:
    outbox, hub = Outbox(tmp_path / "outbox.log"), Hub()
    for i in range(7):
        outbox.put(update(f"j-{i}"), {"traceparent": f"00-{i}"})
    task = asyncio.create_task(outbox.run(hub.publish, batch=3, retry_delay=0.05))
    await asyncio.sleep(0.3)
    assert hub.stored == [] and len(outbox) == 7
    hub.up = True
    await asyncio.sleep(0.5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert hub.stored == [f"j-{i}" for i in range(7)]
    assert len(outbox) == 0
    assert len(Outbox(tmp_path / "outbox.log")) == 0  # nothing left on disk


async def test_a_restart_keeps_what_was_not_stored_and_drops_what_was(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    outbox, hub = Outbox(path), Hub(room=3)
    for i in range(5):
        outbox.put(update(f"j-{i}"), {"traceparent": f"00-{i}"})
    hub.up = True
    await run_until_full(outbox, hub)  # three stored, then the agent stops
    for i in range(5, 7):
        outbox.put(update(f"j-{i}"), {})

    again = Outbox(path)
    assert [u.job_id for u, _ in again._queue] == ["j-3", "j-4", "j-5", "j-6"]
    assert again._queue[0][1] == {"traceparent": "00-3"}
    hub2 = Hub(room=4)
    hub2.up = True
    await run_until_full(again, hub2)
    assert hub2.stored == ["j-3", "j-4", "j-5", "j-6"]
    assert len(Outbox(path)) == 0


async def test_a_long_backlog_is_replayed_without_rewriting_the_log_per_batch(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    outbox, hub = Outbox(path), Hub(room=10)  # the last batch is stored in part: 3 + 3 + 3 + 1
    for i in range(30):
        outbox.put(update(f"j-{i}"), {})
    size = path.stat().st_size
    hub.up = True
    await run_until_full(outbox, hub)
    assert path.stat().st_size == size  # only the count of stored lines moved
    assert (tmp_path / "outbox.log.sent").read_text() == "10"
    assert [u.job_id for u, _ in Outbox(path)._queue] == [f"j-{i}" for i in range(10, 30)]


async def test_the_log_is_compacted_once_stored_lines_are_the_larger_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "_COMPACT_AFTER", 4)
    path = tmp_path / "outbox.log"
    outbox, hub = Outbox(path), Hub(room=9)
    for i in range(12):
        outbox.put(update(f"j-{i}"), {})
    hub.up = True
    await run_until_full(outbox, hub)
    assert len(path.read_text().splitlines()) == 3  # the three left, and nothing stored
    assert (tmp_path / "outbox.log.sent").read_text() == "0"
    assert [u.job_id for u, _ in Outbox(path)._queue] == ["j-9", "j-10", "j-11"]


async def test_a_count_written_before_a_crash_in_the_compaction_only_sends_again(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    outbox = Outbox(path)
    for i in range(4):
        outbox.put(update(f"j-{i}"), {})
    # The compaction wrote the count (0) and died before rewriting the log: all four come back,
    # none is lost (the hub applies the repeated ones idempotently).
    (tmp_path / "outbox.log.sent").write_text("0")
    assert [u.job_id for u, _ in Outbox(path)._queue] == ["j-0", "j-1", "j-2", "j-3"]


async def test_a_wake_retries_at_once_instead_of_after_the_backoff() -> None:
    outbox, hub = Outbox(), Hub()
    outbox.put(update("j-1"), {})
    task = asyncio.create_task(outbox.run(hub.publish, retry_delay=30.0))
    try:
        await asyncio.wait_for(hub.attempted.wait(), 2)
        hub.attempted.clear()
        hub.up = True
        outbox.wake()
        await asyncio.wait_for(hub.attempted.wait(), 2)  # not 30 s later
        await asyncio.sleep(0.05)
        assert hub.stored == ["j-1"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
