"""Intake: group commit of submits, and idempotency keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fedplane.core import dispatch as sm
from fedplane.hub.errors import HubError
from fedplane.hub.intake import Intake
from fedplane.v1 import types_pb2 as pb
from tests.hub.fakes import Parts, settle, spec

S = sm.S


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    yield Parts()


@pytest.fixture
async def intake(parts: Parts) -> AsyncIterator[Intake]:
    intake = Intake(parts.table, parts.clock)
    runner = asyncio.create_task(intake.run())
    yield intake
    runner.cancel()


async def test_concurrent_submits_share_a_transaction(parts: Parts, intake: Intake) -> None:
    results = await asyncio.gather(*(intake.submit([(spec(f"j{i}"), "")], batch=False) for i in range(5)))
    jobs = [job for ((job, created),) in results if created]
    assert len(jobs) == 5
    assert parts.store.create_txns == [5]
    assert len({job.revision for job in jobs}) == 1  # one transaction, one revision
    assert all(job.status.state == S.PENDING for job in jobs)
    assert len(parts.table.queue) == 5 and parts.table.wake.is_set()


async def test_submits_arriving_during_a_transaction_go_together_into_the_next(
    parts: Parts, intake: Intake
) -> None:
    parts.store.gate = asyncio.Event()
    first = asyncio.create_task(intake.submit([(spec("first"), "")], batch=False))
    await settle()  # the first transaction is in flight, held by the gate
    later = [asyncio.create_task(intake.submit([(spec(f"later{i}"), "")], batch=False)) for i in range(3)]
    await settle()
    parts.store.gate.set()
    await asyncio.gather(first, *later)
    assert parts.store.create_txns == [1, 3]


async def test_an_idempotency_key_answers_with_the_earlier_job(parts: Parts, intake: Intake) -> None:
    [(job, created)] = await intake.submit([(spec("a"), "key-1")], batch=False)
    [(again, created_again)] = await intake.submit([(spec("b"), "key-1")], batch=False)
    assert created and not created_again
    assert again.id == job.id and again.spec.name == "a"
    assert len(parts.table) == 1 and len(parts.store.specs) == 1

    # A key repeated within one batch answers with its first occurrence, as a retry would.
    batch = await intake.submit([(spec("c"), "key-2"), (spec("d"), "key-2"), (spec("e"), "")], batch=True)
    assert [created for _, created in batch] == [True, False, True]
    assert batch[0][0].id == batch[1][0].id
    assert len(parts.table) == 3


async def test_concurrent_submits_with_one_key_create_one_job(parts: Parts, intake: Intake) -> None:
    results = await asyncio.gather(*(intake.submit([(spec(f"j{i}"), "same")], batch=False) for i in range(3)))
    assert sorted(created for ((_, created),) in results) == [False, False, True]
    assert len({job.id for ((job, _),) in results}) == 1
    assert len(parts.store.specs) == 1 and len(parts.table) == 1


async def test_an_invalid_spec_stores_nothing(parts: Parts, intake: Intake) -> None:
    bad = spec("bad")
    bad.pod_sets[0].count = 0
    with pytest.raises(HubError) as err:
        await intake.submit([(spec("ok"), ""), (bad, "x" * 300)], batch=True)
    assert err.value.code == "INVALID_ARGUMENT"
    assert "jobs[1].spec.pod_sets[0].count" in str(err.value)
    assert "jobs[1].idempotency_key" in str(err.value)
    assert parts.store.create_txns == [] and len(parts.table) == 0


async def test_jobs_are_stamped_with_the_clocks_time(parts: Parts, intake: Intake) -> None:
    [(job, _)] = await intake.submit([(spec(), "")], batch=False)
    assert job.create_time.ToNanoseconds() / 1e9 == pytest.approx(parts.clock.time())
    assert job.id.startswith(f"j{int(parts.clock.time() * 1000):011x}")
    assert job.spec.queue == "default"
    assert pb.JobStatus.FromString(parts.store.statuses[job.id][0]).state == S.PENDING


async def test_stopping_fails_the_submits_still_waiting(parts: Parts) -> None:
    intake = Intake(parts.table, parts.clock)  # its loop is not running: nothing is written
    waiting = asyncio.create_task(intake.submit([(spec(), "")], batch=False))
    await settle()
    intake.close(HubError("UNAVAILABLE", "stopping"))
    with pytest.raises(HubError):
        await waiting
