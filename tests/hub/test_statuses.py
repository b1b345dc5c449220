"""Status intake: agents' updates applied by compare-and-swap, then acked or nak'd."""

from __future__ import annotations

from fedplane.core import dispatch as sm
from fedplane.core.model import Assignment, JobRequest, PodSetRequest
from fedplane.hub.statuses import StatusIntake
from fedplane.v1 import agent_pb2 as agent_pb
from tests.hub.fakes import (
    FakeMsg,
    Parts,
    cancelled_status,
    free_cpu,
    ready_cluster,
    reported_status,
    spec,
    status_msg,
)

S = sm.S


def intake(parts: Parts) -> StatusIntake:
    return StatusIntake(parts.table, parts.registry, parts.clock)


def update(job_id: str, state: int, generation: int = 1, cluster: str = "c1") -> agent_pb.StatusUpdate:
    return agent_pb.StatusUpdate(cluster=cluster, job_id=job_id, generation=generation, state=state)  # type: ignore[arg-type]


async def test_updates_are_written_and_the_message_acked() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    record = await parts.dispatched(record, "c1")
    msg = status_msg(update(record.id, S.ADMITTED), update(record.id, S.RUNNING))
    before = parts.store.revision

    await intake(parts).apply_batch([msg])

    assert msg.acked and not msg.naked
    assert record.state == S.RUNNING
    assert parts.store.revision == before + 1  # both updates, one write
    assert parts.table.counts[("default", S.RUNNING)] == 1


async def test_a_stale_generation_is_ignored_and_acked() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    record = await parts.dispatched(record, "c1")
    before = parts.store.revision
    stale = status_msg(update(record.id, S.RUNNING, generation=0))
    elsewhere = status_msg(update(record.id, S.FAILED, cluster="c2"))
    unknown = status_msg(update("no-such-job", S.RUNNING))

    await intake(parts).apply_batch([stale, elsewhere, unknown])

    assert all(m.acked and not m.naked for m in (stale, elsewhere, unknown))
    assert record.state == S.DISPATCHED
    assert parts.store.revision == before  # nothing written


async def test_a_lost_compare_and_swap_naks_only_its_messages() -> None:
    parts = Parts()
    first, second = await parts.submit(spec("a"), spec("b"))
    first = await parts.dispatched(first, "c1")
    second = await parts.dispatched(second, "c1")
    # Another writer moves the first job on behind the table's back (as a cancel would).
    cancelling = cancelled_status(first.status, "stop", parts.clock.time())
    won_at = parts.store.put_status(first.id, cancelling.SerializeToString())
    lost = status_msg(update(first.id, S.RUNNING))
    landed = status_msg(update(second.id, S.RUNNING))

    await intake(parts).apply_batch([lost, landed])

    assert lost.naked and not lost.acked
    assert landed.acked and not landed.naked
    assert first.state == S.CANCELLING and first.revision == won_at  # the winner's status, merged
    assert second.state == S.RUNNING
    # Redelivered, the update applies to the winner's status.
    redelivered = status_msg(update(first.id, S.CANCELLED))
    await intake(parts).apply_batch([redelivered])
    assert redelivered.acked and first.state == S.CANCELLED


async def test_a_terminal_state_releases_the_capacity() -> None:
    parts = Parts()
    cluster = ready_cluster(parts.registry, "c1", parts.clock.time(), cpu_millis=8000)
    (record,) = await parts.submit(spec())
    record = await parts.dispatched(record, "c1")
    request = JobRequest(record.id, (PodSetRequest("main", 1, 0, {"cpu": 1000}),))
    cluster.reserve(request, 1, [Assignment("main", "c1-n0", 1)])
    assert free_cpu(parts.registry, "c1", parts.clock.time()) == 7000
    parts.table.wake.clear()

    msg = status_msg(update(record.id, S.SUCCEEDED))
    await intake(parts).apply_batch([msg])

    assert msg.acked and record.state == S.SUCCEEDED
    assert free_cpu(parts.registry, "c1", parts.clock.time()) == 8000
    assert parts.table.active["c1"] == 0
    assert parts.table.wake.is_set()  # placement looks again at the freed capacity


async def test_a_single_update_message_from_an_earlier_agent_is_applied() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    record = await parts.dispatched(record, "c1")
    msg = FakeMsg(update(record.id, S.RUNNING).SerializeToString(), subject="fedplane.v1.status.c1")

    await intake(parts).apply_batch([msg])

    assert msg.acked and record.state == S.RUNNING


async def test_updates_for_one_job_in_a_batch_chain_and_the_ignored_ones_change_nothing() -> None:
    parts = Parts()
    (record,) = await parts.submit(spec())
    record = await parts.dispatched(record, "c1")
    expected = reported_status(
        reported_status(record.status, S.RUNNING, parts.clock.time()), S.SUCCEEDED, parts.clock.time()
    )
    before = parts.store.revision
    # RUNNING, then a late ADMITTED (backwards, after RUNNING in this very batch), a stale
    # generation, a duplicate RUNNING, then SUCCEEDED: each decided on what the batch made so far.
    first = status_msg(update(record.id, S.RUNNING), update(record.id, S.ADMITTED))
    second = status_msg(update(record.id, S.RUNNING, generation=0), update(record.id, S.RUNNING))
    third = status_msg(update(record.id, S.SUCCEEDED))

    await intake(parts).apply_batch([first, second, third])

    assert all(m.acked and not m.naked for m in (first, second, third))
    assert parts.store.revision == before + 1  # one write for the job
    stored = parts.store.statuses[record.id][0]
    assert stored == expected.SerializeToString()  # exactly the two moves that applied
    assert record.state == S.SUCCEEDED and record.status_blob == stored


async def test_a_message_that_does_not_parse_is_dropped_without_holding_up_the_batch() -> None:
    # Redelivered, it would fail again and take every good message of its batch with it.
    parts = Parts()
    (record,) = await parts.submit(spec())
    record = await parts.dispatched(record, "c1")
    garbage = FakeMsg(b"\xff\xff\xff\xff")
    good = status_msg(update(record.id, S.RUNNING))

    await intake(parts).apply_batch([garbage, good])

    assert garbage.acked and not garbage.naked
    assert good.acked and not good.naked
    assert record.state == S.RUNNING


async def test_a_workload_fenced_off_by_its_agent_is_requeued_with_its_capacity_released() -> None:
    parts = Parts()
    ready_cluster(parts.registry, "c1", parts.clock.time())
    (record,) = await parts.submit(spec())
    record = await parts.dispatched(record, "c1")
    parts.registry.clusters["c1"].reserve(
        JobRequest(record.id, (PodSetRequest("main", 1, 1, {"cpu": 1000}),)),
        1,
        [Assignment("main", "n1", 1)],
    )
    fenced = update(record.id, S.CANCELLED)
    fenced.reason = sm.FENCED
    msg = status_msg(fenced)

    await intake(parts).apply_batch([msg])

    assert msg.acked
    assert (record.state, record.cluster, record.generation) == (S.PENDING, "", 1)
    assert parts.registry.clusters["c1"].reservations == {}
    assert record.id in parts.table.queue  # placed again by the next round


async def test_an_update_naming_another_cluster_than_its_subject_changes_nothing() -> None:
    """c2 publishing on its own subject cannot speak for c1's job, even at c1's generation."""
    parts = Parts()
    (record,) = await parts.submit(spec())
    record = await parts.dispatched(record, "c1")
    before = parts.store.revision
    forged = status_msg(update(record.id, S.SUCCEEDED, cluster="c1"))
    forged.subject = "fedplane.v1.status.c2"

    await intake(parts).apply_batch([forged])

    assert forged.acked and not forged.naked  # dropped for good, not redelivered
    assert record.state == S.DISPATCHED
    assert parts.store.revision == before
