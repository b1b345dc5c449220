"""The dispatch record on the wire: the core's transitions recorded into JobStatus (hub/records.py).

What the core decides is checked in tests/core/test_dispatch.py; here, what the stored record
looks like. It must be byte for byte what the hub stored before the core spoke its own types
(when core/dispatch.py built the JobStatus itself): etcd holds records written both ways, and
every API-visible field comes from them. `Legacy` below is that earlier code, kept as the
reference, and the explicit records further down are written out field by field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from fedplane.core import dispatch as sm
from fedplane.core.model import Assignment
from fedplane.core.placement import Score, Verdict
from fedplane.hub import convert, records
from fedplane.v1 import types_pb2 as pb

S = sm.S
T0 = 1_700_000_000.0  # times are multiples of 1/4 s, exact in binary floating point
SCORE = Score(total=0.75, data_locality=1.0, headroom=0.5, cost=0.25, preference=1.0)


def nanos(t: float) -> int:
    return int(t * 1e9)


def at(t: float) -> Timestamp:
    seconds, rest = divmod(nanos(t), 1_000_000_000)
    return Timestamp(seconds=seconds, nanos=rest)


def verdict(cluster: str = "east", *assignments: Assignment, score: Score = SCORE) -> Verdict:
    return Verdict(cluster, True, score=score, assignments=list(assignments))


def move(status: pb.JobStatus, transition: sm.Transition | sm.Ignored, now: float) -> pb.JobStatus:
    assert isinstance(transition, sm.Transition), transition
    return records.record(status, transition, now)


def dispatched(cluster: str = "east", now: float = T0 + 1) -> pb.JobStatus:
    pending = records.submitted(T0)
    return move(
        pending, sm.dispatch(records.state_of(pending), verdict(cluster, Assignment("main", "n1", 2))), now
    )


def update(status: pb.JobStatus, state: int, now: float, **kwargs: str) -> pb.JobStatus:
    outcome = sm.apply_update(records.state_of(status), status.cluster, status.generation, state, **kwargs)
    return move(status, outcome, now)


def cancel(status: pb.JobStatus, reason: str, now: float) -> pb.JobStatus:
    transition = sm.request_cancel(records.state_of(status), reason).transition
    assert transition is not None
    return records.record(status, transition, now)


def history(status: pb.JobStatus) -> list[tuple[str, int, str, int, str]]:
    return [
        (sm.state_name(h.state), h.time.ToNanoseconds(), h.cluster, h.generation, h.reason)
        for h in status.history
    ]


# -- the records, written out ------------------------------------------------------------------

SUBMITTED = pb.Transition(state=pb.PENDING, time=at(T0), reason="Submitted")
PLACED = pb.Transition(
    state=pb.DISPATCHED,
    time=at(T0 + 1),
    cluster="east",
    generation=1,
    reason="Placed",
    message="dispatched to east",
)
ASSIGNMENTS = [
    pb.NodeAssignment(pod_set="main", node="n1", count=2),
    pb.NodeAssignment(pod_set="main", node="n2", count=1),
]
SCORE_PB = pb.ScoreBreakdown(total=0.75, data_locality=1.0, headroom=0.5, cost=0.25, preference=1.0)


def same(got: pb.JobStatus, expected: pb.JobStatus) -> None:
    assert got == expected
    assert got.SerializeToString() == expected.SerializeToString()


def test_a_submitted_job_is_recorded_pending() -> None:
    same(
        records.submitted(T0),
        pb.JobStatus(state=pb.PENDING, reason="Submitted", update_time=at(T0), history=[SUBMITTED]),
    )


def test_a_dispatch_records_the_cluster_generation_assignments_and_score() -> None:
    pending = records.submitted(T0)
    chosen = verdict("east", Assignment("main", "n1", 2), Assignment("main", "n2", 1))
    got = records.record(pending, sm.dispatch(records.state_of(pending), chosen), T0 + 1)
    same(
        got,
        pb.JobStatus(
            state=pb.DISPATCHED,
            cluster="east",
            generation=1,
            reason="Placed",
            message="dispatched to east",
            update_time=at(T0 + 1),
            history=[SUBMITTED, PLACED],
            assignments=ASSIGNMENTS,
            placement_score=SCORE_PB,
        ),
    )


def test_a_dispatch_with_a_zero_score_still_records_a_score() -> None:
    # As before: the score message is present (and serialized), even when every part is 0.
    pending = records.submitted(T0)
    got = records.record(
        pending, sm.dispatch(records.state_of(pending), verdict("east", score=Score())), T0 + 1
    )
    assert got.HasField("placement_score") and list(got.assignments) == []
    expected = pb.JobStatus(
        state=pb.DISPATCHED,
        cluster="east",
        generation=1,
        reason="Placed",
        message="dispatched to east",
        update_time=at(T0 + 1),
        history=[SUBMITTED, PLACED],
    )
    expected.placement_score.SetInParent()
    same(got, expected)


def test_reports_record_start_and_finish_and_keep_the_placement() -> None:
    status = dispatched()
    running = update(status, S.RUNNING, T0 + 2.5, reason="Started", message="1/1 pods running")
    done = update(running, S.SUCCEEDED, T0 + 4, reason="Completed")
    started = pb.Transition(
        state=pb.RUNNING,
        time=at(T0 + 2.5),
        cluster="east",
        generation=1,
        reason="Started",
        message="1/1 pods running",
    )
    completed = pb.Transition(
        state=pb.SUCCEEDED, time=at(T0 + 4), cluster="east", generation=1, reason="Completed"
    )
    same(
        done,
        pb.JobStatus(
            state=pb.SUCCEEDED,
            cluster="east",
            generation=1,
            reason="Completed",
            update_time=at(T0 + 4),
            history=[SUBMITTED, PLACED, started, completed],
            start_time=at(T0 + 2.5),
            finish_time=at(T0 + 4),
            assignments=ASSIGNMENTS[:1],
            placement_score=SCORE_PB,
        ),
    )


def test_a_cancel_of_a_pending_job_is_recorded_finished() -> None:
    got = cancel(records.submitted(T0), "", T0 + 1)
    cancelled = pb.Transition(
        state=pb.CANCELLED, time=at(T0 + 1), reason="Cancelled", message="cancelled by user"
    )
    same(
        got,
        pb.JobStatus(
            state=pb.CANCELLED,
            reason="Cancelled",
            message="cancelled by user",
            update_time=at(T0 + 1),
            history=[SUBMITTED, cancelled],
            finish_time=at(T0 + 1),
        ),
    )


def test_a_requeue_clears_the_cluster_and_placement_and_keeps_the_generation() -> None:
    running = update(dispatched(), S.RUNNING, T0 + 2)
    got = move(running, sm.requeue(records.state_of(running), "ClusterLost"), T0 + 3)
    started = pb.Transition(state=pb.RUNNING, time=at(T0 + 2), cluster="east", generation=1)
    requeued = pb.Transition(
        state=pb.PENDING, time=at(T0 + 3), generation=1, reason="ClusterLost", message="requeued from east"
    )
    same(
        got,
        pb.JobStatus(
            state=pb.PENDING,
            generation=1,
            reason="ClusterLost",
            message="requeued from east",
            update_time=at(T0 + 3),
            history=[SUBMITTED, PLACED, started, requeued],
            start_time=at(T0 + 2),
        ),
    )
    assert not got.HasField("placement_score")


def test_a_requeue_of_a_cancelling_job_records_it_cancelled_where_it_was() -> None:
    cancelling = cancel(dispatched(), "stop", T0 + 2)
    got = move(cancelling, sm.requeue(records.state_of(cancelling), "ClusterLost"), T0 + 3)
    asked = pb.Transition(
        state=pb.CANCELLING,
        time=at(T0 + 2),
        cluster="east",
        generation=1,
        reason="CancelRequested",
        message="stop",
    )
    lost = pb.Transition(
        state=pb.CANCELLED,
        time=at(T0 + 3),
        cluster="east",
        generation=1,
        reason="ClusterLost",
        message="cancel finished without word from east",
    )
    same(
        got,
        pb.JobStatus(
            state=pb.CANCELLED,
            cluster="east",
            generation=1,
            reason="ClusterLost",
            message="cancel finished without word from east",
            update_time=at(T0 + 3),
            history=[SUBMITTED, PLACED, asked, lost],
            finish_time=at(T0 + 3),
            assignments=ASSIGNMENTS[:1],
            placement_score=SCORE_PB,
        ),
    )


# -- timestamps and history ----------------------------------------------------------------------


def test_the_full_forward_path_records_history_and_timestamps() -> None:
    status = dispatched()
    assert status.update_time.ToNanoseconds() == nanos(T0 + 1)
    status = update(status, S.ADMITTED, T0 + 2, reason="Admitted")
    assert not status.HasField("start_time")
    status = update(status, S.RUNNING, T0 + 3.5, reason="Started", message="4/4 pods running")
    assert status.start_time.ToNanoseconds() == nanos(T0 + 3.5)
    assert not status.HasField("finish_time")
    status = update(status, S.SUCCEEDED, T0 + 10.25, reason="Completed", message="done")
    assert status.update_time.ToNanoseconds() == nanos(T0 + 10.25)
    assert status.start_time.ToNanoseconds() == nanos(T0 + 3.5)
    assert status.finish_time.ToNanoseconds() == nanos(T0 + 10.25)
    assert history(status) == [
        ("PENDING", nanos(T0), "", 0, "Submitted"),
        ("DISPATCHED", nanos(T0 + 1), "east", 1, "Placed"),
        ("ADMITTED", nanos(T0 + 2), "east", 1, "Admitted"),
        ("RUNNING", nanos(T0 + 3.5), "east", 1, "Started"),
        ("SUCCEEDED", nanos(T0 + 10.25), "east", 1, "Completed"),
    ]
    assert status.history[3].message == "4/4 pods running"


def test_a_skipped_running_leaves_no_start_and_a_failure_its_finish() -> None:
    status = update(dispatched(), S.RUNNING, T0 + 2)
    assert status.start_time.ToNanoseconds() == nanos(T0 + 2)
    status = update(dispatched(), S.SUCCEEDED, T0 + 2)
    assert status.state == S.SUCCEEDED and not status.HasField("start_time")
    failed = update(update(dispatched(), S.RUNNING, T0 + 2), S.FAILED, T0 + 3, reason="BackoffLimitExceeded")
    assert failed.finish_time.ToNanoseconds() == nanos(T0 + 3)


def test_a_cancelled_workloads_end_is_recorded() -> None:
    cancelling = cancel(dispatched(), "stop", T0 + 5)
    assert not cancelling.HasField("finish_time")
    for terminal in (S.CANCELLED, S.SUCCEEDED, S.FAILED):
        final = update(cancelling, terminal, T0 + 6)
        assert final.finish_time.ToNanoseconds() == nanos(T0 + 6)
        assert history(final)[-2][0] == "CANCELLING"


def test_a_requeued_job_keeps_its_first_start() -> None:
    running = update(dispatched(), S.RUNNING, T0 + 2)
    requeued = move(running, sm.requeue(records.state_of(running), "Preempted"), T0 + 3)
    assert requeued.start_time.ToNanoseconds() == nanos(T0 + 2) and not requeued.HasField("finish_time")
    again = move(requeued, sm.dispatch(records.state_of(requeued), verdict("west")), T0 + 4)
    running_again = update(again, S.RUNNING, T0 + 5)
    assert running_again.start_time.ToNanoseconds() == nanos(T0 + 2)


def test_history_is_capped_keeping_the_first_and_the_latest_entries() -> None:
    status = dispatched()
    for i in range(records.MAX_HISTORY + 10):
        status.history.add(state=S.DISPATCHED, cluster="east", generation=1, reason=f"filler-{i}")  # type: ignore[arg-type]
    status = update(status, S.ADMITTED, T0 + 2)
    assert len(status.history) == records.MAX_HISTORY
    assert status.history[0].reason == "Submitted"  # how the job began is always kept
    assert status.history[-1].state == S.ADMITTED
    # 76 entries plus ADMITTED: the first, then the latest 63 (filler-12 .. filler-73, ADMITTED).
    assert [h.reason for h in status.history[1:-1]] == [
        f"filler-{i}" for i in range(12, records.MAX_HISTORY + 10)
    ]
    # The cap holds as transitions continue.
    status = update(update(status, S.RUNNING, T0 + 3), S.SUCCEEDED, T0 + 4)
    assert len(status.history) == records.MAX_HISTORY
    assert status.history[0].reason == "Submitted"
    assert [sm.state_name(h.state) for h in status.history[-3:]] == ["ADMITTED", "RUNNING", "SUCCEEDED"]


def test_history_up_to_the_cap_is_kept_whole_and_one_more_drops_the_oldest_but_first() -> None:
    status = dispatched()  # Submitted, Placed
    for _ in range(records.MAX_HISTORY - 3):
        status.history.add(state=S.DISPATCHED)  # type: ignore[arg-type]
    status = update(status, S.ADMITTED, T0 + 2)
    assert len(status.history) == records.MAX_HISTORY
    assert [h.reason for h in status.history[:2]] == ["Submitted", "Placed"]
    status = update(status, S.RUNNING, T0 + 3)
    assert len(status.history) == records.MAX_HISTORY
    assert status.history[0].reason == "Submitted"
    assert status.history[1].reason != "Placed"
    assert status.history[-1].state == S.RUNNING


def test_record_leaves_its_input_and_record_into_moves_its_own() -> None:
    pending = records.submitted(T0)
    before = pending.SerializeToString()
    transition = sm.dispatch(records.state_of(pending), verdict("east", Assignment("main", "n1", 2)))
    status = records.record(pending, transition, T0 + 1)
    assert pending.SerializeToString() == before and status is not pending
    mine = pb.JobStatus.FromString(before)
    assert records.record_into(mine, transition, T0 + 1) is mine
    same(mine, status)
    # A submit shares one pending status between its jobs: making one leaves the next alone.
    assert records.submitted(T0) == records.submitted(T0) and records.submitted(T0) is not records.submitted(
        T0
    )


def test_the_state_read_from_a_record_is_what_the_table_keeps_parsed() -> None:
    status = dispatched("west")
    assert records.state_of(status) == sm.DispatchState(S.DISPATCHED, "west", 1)
    assert records.state_of(pb.JobStatus()) == sm.DispatchState(S.JOB_STATE_UNSPECIFIED, "", 0)


# -- the same bytes as before, for any sequence of inputs --------------------------------------


class Legacy:
    """The records as core/dispatch.py built them while it took and returned JobStatus (before
    "One language in the core"), kept verbatim as the reference."""

    @staticmethod
    def _transition(
        status: pb.JobStatus, state: int, now: float, *, reason: str = "", message: str = ""
    ) -> pb.JobStatus:
        new = pb.JobStatus()
        new.CopyFrom(status)
        return Legacy._transitioned(new, state, now, reason, message)

    @staticmethod
    def _transitioned(new: pb.JobStatus, state: int, now: float, reason: str, message: str) -> pb.JobStatus:
        new.state = state  # type: ignore[assignment]
        new.reason = reason
        new.message = message
        nanos = int(now * 1e9)
        seconds, nanos = divmod(nanos, 1_000_000_000)
        update_time = new.update_time
        update_time.seconds = seconds
        update_time.nanos = nanos
        new.history.add(
            state=state,  # type: ignore[arg-type]
            time=update_time,
            cluster=new.cluster,
            generation=new.generation,
            reason=reason,
            message=message,
        )
        if len(new.history) > 64:
            del new.history[1 : len(new.history) - 64 + 1]
        if state == S.RUNNING and not new.HasField("start_time"):
            new.start_time.CopyFrom(update_time)
        if state in sm.TERMINAL:
            new.finish_time.CopyFrom(update_time)
        return new

    @staticmethod
    def new_pending(now: float) -> pb.JobStatus:
        return Legacy._transition(pb.JobStatus(), S.PENDING, now, reason="Submitted")

    @staticmethod
    def dispatch(
        status: pb.JobStatus,
        cluster: str,
        assignments: Sequence[pb.NodeAssignment],
        score: pb.ScoreBreakdown,
        now: float,
    ) -> pb.JobStatus | None:
        state = sm.next_state(status.state, sm.On.PLACE)
        if state is None:
            return None
        new = pb.JobStatus()
        new.CopyFrom(status)
        new.cluster = cluster
        new.generation = status.generation + 1
        del new.assignments[:]
        new.assignments.extend(assignments)
        new.placement_score.CopyFrom(score)
        return Legacy._transitioned(new, state, now, "Placed", f"dispatched to {cluster}")

    @staticmethod
    def apply_update(
        status: pb.JobStatus, cluster: str, generation: int, state: int, now: float, reason: str, message: str
    ) -> pb.JobStatus | None:
        if generation != status.generation or cluster != status.cluster:
            return None
        on = sm.REPORTS.get(state)
        target = None if on is None else sm.next_state(status.state, on)
        if target is None:
            return None
        return Legacy._transition(status, target, now, reason=reason, message=message)

    @staticmethod
    def request_cancel(status: pb.JobStatus, reason: str, now: float) -> tuple[pb.JobStatus, bool] | None:
        state = sm.next_state(status.state, sm.On.CANCEL)
        if state is None:
            return None
        if state == status.state:
            return status, True
        message = reason or "cancelled by user"
        if state == S.CANCELLING:
            return Legacy._transition(status, state, now, reason="CancelRequested", message=message), True
        return Legacy._transition(status, state, now, reason="Cancelled", message=message), False

    @staticmethod
    def requeue(status: pb.JobStatus, reason: str, now: float, message: str) -> pb.JobStatus | None:
        state = sm.next_state(status.state, sm.On.REQUEUE)
        if state is None:
            return None
        if state != S.PENDING:
            return Legacy._transition(
                status,
                state,
                now,
                reason=reason,
                message=message or f"cancel finished without word from {status.cluster}",
            )
        new = pb.JobStatus()
        new.CopyFrom(status)
        new.cluster = ""
        del new.assignments[:]
        new.ClearField("placement_score")
        return Legacy._transitioned(new, state, now, reason, message or f"requeued from {status.cluster}")


TEXT = st.sampled_from(["", "Started", "OOMKilled", "ünïcode"])
SCORES = st.builds(
    Score,
    st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    st.sampled_from([0.0, 1.0]),
    st.sampled_from([0.0, 0.3]),
    st.sampled_from([0.0, 0.25]),
    st.sampled_from([0.0, 1.0]),
)


class Report(NamedTuple):
    cluster: str
    generation: int
    state: int
    reason: str
    message: str


class Place(NamedTuple):
    cluster: str
    assignments: list[Assignment]
    score: Score


class Cancel(NamedTuple):
    reason: str


class Requeue(NamedTuple):
    reason: str
    message: str


INPUTS = st.lists(
    st.one_of(
        st.builds(
            Report,
            st.sampled_from(["east", "west", ""]),
            st.sampled_from([0, 1, 2]),
            st.sampled_from([*sm.NAMES, 99]),
            TEXT,
            TEXT,
        ),
        st.builds(
            Place,
            st.sampled_from(["east", "west"]),
            st.lists(
                st.builds(
                    Assignment,
                    st.sampled_from(["main", "aux"]),
                    st.sampled_from(["n1", "n2"]),
                    st.integers(1, 8),
                ),
                max_size=3,
            ),
            SCORES,
        ),
        st.builds(Cancel, TEXT),
        st.builds(Requeue, st.sampled_from(["ClusterLost", "Preempted"]), TEXT),
    ),
    max_size=25,
)


@settings(max_examples=400, deadline=None)
@given(INPUTS, st.sampled_from([0, 3, 61, 70]), st.sampled_from([0.0, 0.1, 0.25, 1.5, 1e-9]))
def test_records_are_byte_for_byte_what_the_core_built_before(
    inputs: list[Report | Place | Cancel | Requeue], fillers: int, step: float
) -> None:
    now = T0 + 0.3
    old = Legacy.new_pending(now)
    new = records.submitted(now)
    assert new.SerializeToString() == old.SerializeToString()
    for i in range(fillers):
        for status in (old, new):
            status.history.add(state=S.PENDING, reason=f"filler-{i}")  # type: ignore[arg-type]
    for item in inputs:
        now += 1 + step
        current = records.state_of(new)
        was: pb.JobStatus | None
        got: pb.JobStatus | None
        if isinstance(item, Report):
            was = Legacy.apply_update(old, *item[:3], now, item.reason, item.message)
            outcome = sm.apply_update(current, *item[:3], reason=item.reason, message=item.message)
            got = None if isinstance(outcome, sm.Ignored) else records.record(new, outcome, now)
        elif isinstance(item, Place):
            # What the scheduler did before: convert placement's choice, then dispatch it.
            assignments_pb = convert.assignments_pb(item.assignments)
            was = Legacy.dispatch(old, item.cluster, assignments_pb, convert.score_pb(item.score), now)
            chosen = verdict(item.cluster, *item.assignments, score=item.score)
            try:
                got = records.record(new, sm.dispatch(current, chosen), now)
            except sm.TransitionError:
                got = None
        elif isinstance(item, Cancel):
            legacy = Legacy.request_cancel(old, item.reason, now)
            try:
                cancelled = sm.request_cancel(current, item.reason)
            except sm.TransitionError:
                assert legacy is None
                continue
            assert legacy is not None and legacy[1] == cancelled.send_delete
            was = legacy[0]
            got = new if cancelled.transition is None else records.record(new, cancelled.transition, now)
            assert (was is old) == (cancelled.transition is None)
        else:
            was = Legacy.requeue(old, item.reason, now, item.message)
            try:
                got = records.record(new, sm.requeue(current, item.reason, message=item.message), now)
            except sm.TransitionError:
                got = None
        assert (was is None) == (got is None), item
        if was is None or got is None:
            continue
        assert got.SerializeToString() == was.SerializeToString(), item
        assert got == was
        assert got.HasField("finish_time") == sm.is_terminal(got.state)
        old, new = was, got


@pytest.mark.parametrize("now", [T0, T0 + 0.1, T0 + 0.999999999, 1.5, 0.0])
def test_times_are_recorded_as_before(now: float) -> None:
    assert records.submitted(now).SerializeToString() == Legacy.new_pending(now).SerializeToString()
