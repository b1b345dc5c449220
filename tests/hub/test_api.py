"""The API's one status write, cancel: decided on the record's parsed fields, recorded into its
status once, written by compare-and-swap; and a cancel that changes nothing writes nothing."""

from __future__ import annotations

import pytest

from fedplane.core import dispatch as sm
from fedplane.core.placement import Weights
from fedplane.hub.api import HubApi
from fedplane.hub.errors import HubError
from fedplane.hub.events import EventLog
from fedplane.v1 import types_pb2 as pb
from tests.hub.fakes import Parts, reported_status, spec

S = sm.S


def api(parts: Parts) -> HubApi:
    return HubApi(parts.table, parts.registry, parts.commands, EventLog(), parts.clock, Weights())


async def test_a_pending_job_is_cancelled_at_once() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    parts.table.wake.clear()

    job = await api(parts).cancel(record.id, "no longer needed")

    assert job.status.state == S.CANCELLED and record.state == S.CANCELLED
    assert (job.status.reason, job.status.message) == ("Cancelled", "no longer needed")
    assert job.status.finish_time.ToNanoseconds() == int(parts.clock.time() * 1e9)
    stored = pb.JobStatus.FromString(parts.store.statuses[record.id][0])
    assert stored == record.status and [h.state for h in stored.history] == [S.PENDING, S.CANCELLED]
    assert record.id not in parts.table.queue and parts.commands.queued == []
    assert parts.table.wake.is_set()


async def test_a_job_on_a_cluster_is_asked_to_stop_and_asking_again_writes_nothing() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    record = await parts.dispatched(record, "c1")

    job = await api(parts).cancel(record.id, "stop")

    assert job.status.state == S.CANCELLING and (job.status.cluster, job.status.generation) == ("c1", 1)
    [(_, command)] = parts.commands.queued
    assert command.WhichOneof("action") == "delete" and command.generation == 1
    written = parts.store.revision

    again = await api(parts).cancel(record.id, "stop now")

    assert again.status == job.status
    assert parts.store.revision == written  # already cancelling: no new transition, no write
    assert [c.WhichOneof("action") for _, c in parts.commands.queued] == ["delete", "delete"]


async def test_a_finished_job_cannot_be_cancelled() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    record = await parts.dispatched(record, "c1")
    await parts.set_status(record, reported_status(record.status, S.SUCCEEDED, parts.clock.time()))

    with pytest.raises(HubError, match="job already SUCCEEDED") as raised:
        await api(parts).cancel(record.id, "")
    assert raised.value.code == "FAILED_PRECONDITION"
