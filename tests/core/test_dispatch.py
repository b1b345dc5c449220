"""The dispatch state machine: forward-only, idempotent, generation-fenced status changes.

The transition table is the specification: every (state, input) pair it lists does what it
says through the function that takes the input, and every pair it does not list is refused
(the hub's decisions) or ignored (clusters' reports).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedplane.core import dispatch as sm
from fedplane.v1 import types_pb2 as pb

S = pb.JobState
On = sm.On
T0 = 1_700_000_000.0  # times are multiples of 1/4 s, exact in binary floating point
ALL_STATES = [S.Value(name) for name in S.keys()]
INPUTS = [value for name, value in vars(On).items() if name.isupper()]
HUB_INPUTS = [On.PLACE, On.CANCEL, On.REQUEUE]
# Forward order a job may move in; a job may only stay or move right.
ORDER: dict[int, int] = {
    S.DISPATCHED: 1,
    S.ADMITTED: 2,
    S.RUNNING: 3,
    S.CANCELLING: 4,
    S.SUCCEEDED: 5,
    S.FAILED: 5,
    S.CANCELLED: 5,
}


def nanos(t: float) -> int:
    return int(t * 1e9)


def assignment(node: str = "n1", count: int = 2) -> pb.NodeAssignment:
    return pb.NodeAssignment(pod_set="main", node=node, count=count)


def dispatched(cluster: str = "east", now: float = T0 + 1) -> pb.JobStatus:
    return sm.dispatch(sm.new_pending(T0), cluster, [assignment()], pb.ScoreBreakdown(total=0.5), now)


def update(status: pb.JobStatus, state: int, now: float, **kwargs: str) -> pb.JobStatus:
    """Apply an update from the job's own cluster at its generation, which must take effect."""
    outcome = sm.apply_update(status, status.cluster, status.generation, state, now, **kwargs)
    assert outcome.ignored is None and outcome.status is not None
    return outcome.status


def ignored(
    status: pb.JobStatus, state: int, *, cluster: str | None = None, generation: int | None = None
) -> str:
    """Apply an update that must change nothing; return why it was ignored."""
    outcome = sm.apply_update(
        status,
        status.cluster if cluster is None else cluster,
        status.generation if generation is None else generation,
        state,
        T0 + 100,
    )
    assert outcome.status is None and outcome.ignored
    return outcome.ignored


def history(status: pb.JobStatus) -> list[tuple[str, int, str, int, str]]:
    return [
        (sm.state_name(h.state), h.time.ToNanoseconds(), h.cluster, h.generation, h.reason)
        for h in status.history
    ]


# -- the happy path ----------------------------------------------------------------------------


def test_new_job_is_pending_with_one_history_entry() -> None:
    status = sm.new_pending(T0)
    assert status.state == S.PENDING
    assert (status.cluster, status.generation, status.reason) == ("", 0, "Submitted")
    assert status.update_time.ToNanoseconds() == nanos(T0)
    assert history(status) == [("PENDING", nanos(T0), "", 0, "Submitted")]
    assert not status.HasField("start_time") and not status.HasField("finish_time")


def test_full_forward_path_records_history_and_timestamps() -> None:
    score = pb.ScoreBreakdown(total=0.75, data_locality=1.0)
    status = sm.dispatch(sm.new_pending(T0), "east", [assignment("n1"), assignment("n2", 1)], score, T0 + 1)
    assert status.state == S.DISPATCHED
    assert (status.cluster, status.generation) == ("east", 1)
    assert status.message == "dispatched to east"
    assert [(a.node, a.count) for a in status.assignments] == [("n1", 2), ("n2", 1)]
    assert status.placement_score == score

    status = update(status, S.ADMITTED, T0 + 2, reason="Admitted")
    assert not status.HasField("start_time")
    status = update(status, S.RUNNING, T0 + 3.5, reason="Started", message="4/4 pods running")
    assert status.start_time.ToNanoseconds() == nanos(T0 + 3.5)
    assert not status.HasField("finish_time")
    status = update(status, S.SUCCEEDED, T0 + 10.25, reason="Completed", message="done")

    assert status.state == S.SUCCEEDED and sm.is_terminal(status.state)
    assert (status.reason, status.message) == ("Completed", "done")
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
    # What placement decided survives the cluster's reports.
    assert len(status.assignments) == 2 and status.placement_score == score


def test_failure_is_terminal_with_its_reason() -> None:
    status = update(update(dispatched(), S.RUNNING, T0 + 2), S.FAILED, T0 + 3, reason="BackoffLimitExceeded")
    assert status.state == S.FAILED and sm.is_terminal(S.FAILED)
    assert status.reason == "BackoffLimitExceeded"
    assert status.finish_time.ToNanoseconds() == nanos(T0 + 3)


def test_states_may_be_skipped_forward() -> None:
    # A missed ADMITTED report does not stop RUNNING, nor a missed RUNNING stop SUCCEEDED.
    status = update(dispatched(), S.RUNNING, T0 + 2)
    assert status.start_time.ToNanoseconds() == nanos(T0 + 2)
    status = update(dispatched(), S.SUCCEEDED, T0 + 2)
    assert status.state == S.SUCCEEDED and not status.HasField("start_time")


# -- updates that must be ignored --------------------------------------------------------------


def test_stale_generation_is_ignored() -> None:
    status = dispatched()
    assert ignored(status, S.RUNNING, generation=0) == "stale: job is at east/1"
    assert ignored(status, S.FAILED, generation=2) == "stale: job is at east/1"


def test_update_from_another_cluster_is_ignored() -> None:
    status = dispatched("east")
    assert ignored(status, S.RUNNING, cluster="west") == "stale: job is at east/1"
    assert ignored(status, S.SUCCEEDED, cluster="") == "stale: job is at east/1"


def test_backwards_moves_are_ignored() -> None:
    running = update(dispatched(), S.RUNNING, T0 + 2)
    assert ignored(running, S.ADMITTED) == "not forward from RUNNING"
    done = update(running, S.SUCCEEDED, T0 + 3)
    assert ignored(done, S.RUNNING) == "job already SUCCEEDED"
    assert ignored(done, S.ADMITTED) == "job already SUCCEEDED"


def test_a_terminal_state_is_never_replaced_by_another() -> None:
    done = update(dispatched(), S.SUCCEEDED, T0 + 2)
    assert ignored(done, S.FAILED) == "job already SUCCEEDED"
    failed = update(dispatched(), S.FAILED, T0 + 2)
    assert ignored(failed, S.SUCCEEDED) == "job already FAILED"
    assert ignored(failed, S.CANCELLED) == "job already FAILED"


def test_duplicate_updates_are_idempotent() -> None:
    running = update(dispatched(), S.RUNNING, T0 + 2)
    assert ignored(running, S.RUNNING) == "not forward from RUNNING"
    admitted = update(dispatched(), S.ADMITTED, T0 + 2)
    assert ignored(admitted, S.ADMITTED) == "not forward from ADMITTED"
    done = update(running, S.SUCCEEDED, T0 + 3)
    assert ignored(done, S.SUCCEEDED) == "job already SUCCEEDED"


@pytest.mark.parametrize("state", [S.JOB_STATE_UNSPECIFIED, S.PENDING, S.DISPATCHED, S.CANCELLING])
def test_states_clusters_do_not_report_are_ignored(state: int) -> None:
    assert ignored(dispatched(), state) == f"clusters do not report {sm.state_name(state)}"


def test_an_unknown_state_from_a_newer_agent_is_ignored_not_an_error() -> None:
    # proto3 enums are open: the wire can carry a state this hub has no name for.
    assert sm.state_name(99) == "JobState(99)"
    assert ignored(dispatched(), 99) == "clusters do not report JobState(99)"
    assert sm.state_name(S.RUNNING) == "RUNNING"


def test_a_pending_job_ignores_status_updates() -> None:
    # Before dispatch the job is on no cluster, at generation 0; a report naming no cluster must
    # not move it (nor fail: an exception here would make the bad message redeliver forever).
    pending = sm.new_pending(T0)
    for state in (S.ADMITTED, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED):
        assert ignored(pending, state, cluster="", generation=0) == "job is PENDING, not on a cluster"


# -- cancellation ------------------------------------------------------------------------------


def test_cancel_pending_job_is_immediate_without_a_delete() -> None:
    outcome = sm.request_cancel(sm.new_pending(T0), "no longer needed", T0 + 1)
    assert outcome.send_delete is False
    status = outcome.status
    assert status.state == S.CANCELLED
    assert (status.reason, status.message) == ("Cancelled", "no longer needed")
    assert status.finish_time.ToNanoseconds() == nanos(T0 + 1)
    assert history(status)[-1] == ("CANCELLED", nanos(T0 + 1), "", 0, "Cancelled")


def test_cancel_without_a_reason_says_by_user() -> None:
    assert sm.request_cancel(sm.new_pending(T0), "", T0 + 1).status.message == "cancelled by user"


@pytest.mark.parametrize("state", [S.DISPATCHED, S.ADMITTED, S.RUNNING])
def test_cancel_on_a_cluster_asks_for_a_delete_and_waits(state: int) -> None:
    status = dispatched()
    if state != S.DISPATCHED:
        status = update(status, state, T0 + 2)
    outcome = sm.request_cancel(status, "stop", T0 + 5)
    assert outcome.send_delete is True
    cancelling = outcome.status
    assert cancelling.state == S.CANCELLING and not sm.is_terminal(cancelling.state)
    assert (cancelling.reason, cancelling.message) == ("CancelRequested", "stop")
    assert (cancelling.cluster, cancelling.generation) == ("east", 1)
    assert not cancelling.HasField("finish_time")
    # Progress reports no longer apply while the workload is being deleted...
    for progress in (S.ADMITTED, S.RUNNING):
        assert ignored(cancelling, progress) == "cancelling"
    # ...but its end does, whichever way it ended.
    for terminal in (S.CANCELLED, S.SUCCEEDED, S.FAILED):
        final = update(cancelling, terminal, T0 + 6)
        assert final.state == terminal
        assert final.finish_time.ToNanoseconds() == nanos(T0 + 6)
        assert history(final)[-2][0] == "CANCELLING"


def test_cancel_while_cancelling_resends_the_delete_without_a_new_transition() -> None:
    cancelling = sm.request_cancel(dispatched(), "stop", T0 + 5).status
    again = sm.request_cancel(cancelling, "stop again", T0 + 6)
    assert again.send_delete is True
    assert again.status == cancelling
    assert len(again.status.history) == len(cancelling.history)


def test_cancelling_still_fences_stale_updates() -> None:
    cancelling = sm.request_cancel(dispatched(), "stop", T0 + 5).status
    assert ignored(cancelling, S.CANCELLED, generation=0) == "stale: job is at east/1"
    assert ignored(cancelling, S.CANCELLED, cluster="west") == "stale: job is at east/1"


@pytest.mark.parametrize("terminal", [S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_cancel_of_a_terminal_job_raises(terminal: int) -> None:
    status = update(dispatched(), terminal, T0 + 2)
    with pytest.raises(sm.TransitionError, match=f"job already {sm.state_name(terminal)}"):
        sm.request_cancel(status, "", T0 + 3)


def test_cancel_of_a_cancelled_pending_job_raises() -> None:
    cancelled = sm.request_cancel(sm.new_pending(T0), "", T0 + 1).status
    with pytest.raises(sm.TransitionError):
        sm.request_cancel(cancelled, "", T0 + 2)


# -- dispatch ----------------------------------------------------------------------------------


def test_dispatch_increments_the_generation_and_replaces_assignments() -> None:
    # A pending job that was on a cluster before (requeued) keeps counting generations.
    pending = sm.new_pending(T0)
    pending.generation = 3
    pending.cluster = "west"
    pending.assignments.append(pb.NodeAssignment(pod_set="main", node="old", count=9))
    status = sm.dispatch(pending, "east", [assignment("n7", 1)], pb.ScoreBreakdown(total=0.1), T0 + 1)
    assert (status.cluster, status.generation) == ("east", 4)
    assert [(a.node, a.count) for a in status.assignments] == [("n7", 1)]
    assert history(status)[-1] == ("DISPATCHED", nanos(T0 + 1), "east", 4, "Placed")
    # Reports about the earlier generation no longer apply.
    assert ignored(status, S.RUNNING, cluster="west", generation=3) == "stale: job is at east/4"


@pytest.mark.parametrize("state", [S.DISPATCHED, S.ADMITTED, S.RUNNING, S.CANCELLING, S.SUCCEEDED])
def test_dispatch_only_from_pending(state: int) -> None:
    status = dispatched()
    if state == S.CANCELLING:
        status = sm.request_cancel(status, "", T0 + 2).status
    elif state != S.DISPATCHED:
        status = update(status, state, T0 + 2)
    with pytest.raises(sm.TransitionError, match=f"cannot dispatch a job that is {sm.state_name(state)}"):
        sm.dispatch(status, "west", [], pb.ScoreBreakdown(), T0 + 3)


def test_dispatch_of_a_cancelled_job_raises() -> None:
    cancelled = sm.request_cancel(sm.new_pending(T0), "", T0 + 1).status
    with pytest.raises(sm.TransitionError):
        sm.dispatch(cancelled, "east", [], pb.ScoreBreakdown(), T0 + 2)


# -- purity and size ---------------------------------------------------------------------------


def test_inputs_are_never_mutated() -> None:
    pending = sm.new_pending(T0)
    before = pending.SerializeToString()
    status = sm.dispatch(pending, "east", [assignment()], pb.ScoreBreakdown(total=1), T0 + 1)
    assert pending.SerializeToString() == before and status is not pending

    before = status.SerializeToString()
    running = update(status, S.RUNNING, T0 + 2)
    assert status.SerializeToString() == before and running is not status
    ignored(status, S.DISPATCHED)
    ignored(status, S.RUNNING, generation=7)
    assert status.SerializeToString() == before

    before = running.SerializeToString()
    cancelling = sm.request_cancel(running, "stop", T0 + 3).status
    assert running.SerializeToString() == before and cancelling is not running

    before = pending.SerializeToString()
    sm.request_cancel(pending, "stop", T0 + 3)
    assert pending.SerializeToString() == before


def test_history_is_capped_keeping_the_first_and_the_latest_entries() -> None:
    status = dispatched()
    for i in range(sm.MAX_HISTORY + 10):
        status.history.add(state=S.DISPATCHED, cluster="east", generation=1, reason=f"filler-{i}")
    status = update(status, S.ADMITTED, T0 + 2)
    assert len(status.history) == sm.MAX_HISTORY
    assert status.history[0].reason == "Submitted"  # how the job began is always kept
    assert status.history[-1].state == S.ADMITTED
    # 76 entries plus ADMITTED: the first, then the latest 63 (filler-12 .. filler-73, ADMITTED).
    assert [h.reason for h in status.history[1:-1]] == [f"filler-{i}" for i in range(12, sm.MAX_HISTORY + 10)]
    # The cap holds as transitions continue.
    status = update(update(status, S.RUNNING, T0 + 3), S.SUCCEEDED, T0 + 4)
    assert len(status.history) == sm.MAX_HISTORY
    assert status.history[0].reason == "Submitted"
    assert [sm.state_name(h.state) for h in status.history[-3:]] == ["ADMITTED", "RUNNING", "SUCCEEDED"]


def test_history_up_to_the_cap_is_kept_whole_and_one_more_drops_the_oldest_but_first() -> None:
    status = dispatched()  # Submitted, Placed
    for _ in range(sm.MAX_HISTORY - 3):
        status.history.add(state=S.DISPATCHED)
    status = update(status, S.ADMITTED, T0 + 2)
    assert len(status.history) == sm.MAX_HISTORY
    assert [h.reason for h in status.history[:2]] == ["Submitted", "Placed"]
    status = update(status, S.RUNNING, T0 + 3)
    assert len(status.history) == sm.MAX_HISTORY
    assert status.history[0].reason == "Submitted"
    assert status.history[1].reason != "Placed"
    assert status.history[-1].state == S.RUNNING


# -- any sequence of updates -------------------------------------------------------------------

UPDATES = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["east", "east", "west", ""]),
            st.sampled_from([1, 1, 0, 2]),
            st.sampled_from([*ALL_STATES, 99]),  # 99: a state from a newer agent
        ),
        st.just("cancel"),
    ),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(UPDATES)
def test_updates_never_move_a_job_backwards_or_out_of_a_terminal_state(
    updates: list[tuple[str, int, int] | str],
) -> None:
    status = dispatched("east")
    now = T0 + 1
    for item in updates:
        now += 1
        before = status.SerializeToString()
        rank = ORDER[status.state]
        if isinstance(item, str):
            if sm.is_terminal(status.state):
                with pytest.raises(sm.TransitionError):
                    sm.request_cancel(status, "", now)
                continue
            new = sm.request_cancel(status, "", now).status
            assert new.state in (S.CANCELLING, S.CANCELLED)
        else:
            cluster, generation, state = item
            outcome = sm.apply_update(status, cluster, generation, state, now)
            assert (outcome.status is None) != (outcome.ignored is None)
            if outcome.status is None:
                assert status.SerializeToString() == before
                continue
            new = outcome.status
            # Only the job's own cluster, at its generation, may change it, and only to what it said.
            assert (cluster, generation) == ("east", 1)
            assert new.state == state
            assert not sm.is_terminal(status.state)
            assert len(new.history) == len(status.history) + 1
            assert new.history[-1].state == state
        assert status.SerializeToString() == before
        assert ORDER[new.state] >= rank
        if ORDER[new.state] == rank:
            # Equal rank is only allowed when cancelling again (no change at all).
            assert new == status
        assert (new.cluster, new.generation) == ("east", 1)
        assert new.HasField("finish_time") == sm.is_terminal(new.state)
        status = new


# -- the table ---------------------------------------------------------------------------------


def in_state(state: int) -> pb.JobStatus:
    """A job in `state`: on cluster east at generation 1, or, when pending, requeued from it."""
    status = dispatched("east")
    status.state = S.ValueType(state)
    if state == S.PENDING:
        status.cluster = ""
        del status.assignments[:]
    return status


def fire(status: pb.JobStatus, on: str) -> pb.JobStatus | None:
    """Give the job input `on` through the function that takes it: the new status, or None when
    that function refused it (TransitionError) or ignored it (a report)."""
    now = T0 + 50
    try:
        if on == On.PLACE:
            return sm.dispatch(status, "west", [assignment("w1")], pb.ScoreBreakdown(total=0.5), now)
        if on == On.CANCEL:
            return sm.request_cancel(status, "stop", now).status
        if on == On.REQUEUE:
            return sm.requeue(status, "ClusterLost", now)
    except sm.TransitionError:
        return None
    reported = next(state for state, report in sm.REPORTS.items() if report == on)
    outcome = sm.apply_update(status, status.cluster, status.generation, reported, now)
    assert (outcome.status is None) != (outcome.ignored is None)
    return outcome.status


def test_the_table_has_a_row_for_every_state_and_only_terminal_states_have_no_way_out() -> None:
    assert set(sm.TRANSITIONS) == set(ALL_STATES) - {S.JOB_STATE_UNSPECIFIED}
    assert {state for state, row in sm.TRANSITIONS.items() if not row} == sm.TERMINAL
    for row in sm.TRANSITIONS.values():
        assert set(row) <= set(INPUTS)
        assert set(row.values()) <= set(sm.TRANSITIONS)
    # Every state a cluster reports is an input, and only those.
    assert set(sm.REPORTS) == {S.ADMITTED, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED}
    assert set(sm.REPORTS.values()) == set(INPUTS) - set(HUB_INPUTS)


def test_reports_only_move_a_job_forward_and_to_the_state_reported() -> None:
    for state, row in sm.TRANSITIONS.items():
        for reported, on in sm.REPORTS.items():
            if on in row:
                assert row[on] == reported
                assert ORDER[reported] > ORDER[state], (sm.state_name(state), on)


@pytest.mark.parametrize("on", INPUTS)
@pytest.mark.parametrize("state", [*ALL_STATES, 99], ids=sm.state_name)
def test_every_state_and_input_does_what_the_table_says(state: int, on: str) -> None:
    status = in_state(state)
    before = status.SerializeToString()
    expected = sm.TRANSITIONS.get(state, {}).get(on)
    assert sm.next_state(state, on) == expected
    new = fire(status, on)
    assert status.SerializeToString() == before
    if expected is None:
        assert new is None, f"{sm.state_name(state)} took {on}"
        return
    assert new is not None, f"{sm.state_name(state)} refused {on}"
    assert new.state == expected
    if new is not status:  # cancelling again changes nothing at all
        assert new.history[-1].state == expected
        assert len(new.history) == len(status.history) + 1
    assert new.HasField("finish_time") == sm.is_terminal(expected)
    # Only dispatch changes the generation, by one.
    assert new.generation == status.generation + (on == On.PLACE)


# -- requeue -----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [S.DISPATCHED, S.ADMITTED, S.RUNNING])
def test_requeue_puts_the_job_back_in_the_queue_keeping_its_generation_and_history(state: int) -> None:
    status = dispatched("east")
    if state != S.DISPATCHED:
        status = update(status, state, T0 + 2)
    requeued = sm.requeue(status, "ClusterLost", T0 + 5)
    assert requeued.state == S.PENDING and not sm.is_terminal(requeued.state)
    assert (requeued.cluster, requeued.generation) == ("", 1)
    assert (requeued.reason, requeued.message) == ("ClusterLost", "requeued from east")
    assert list(requeued.assignments) == [] and not requeued.HasField("placement_score")
    assert not requeued.HasField("finish_time")
    assert requeued.update_time.ToNanoseconds() == nanos(T0 + 5)
    assert history(requeued) == [*history(status), ("PENDING", nanos(T0 + 5), "", 1, "ClusterLost")]
    assert sm.attempts(requeued) == 1


def test_a_requeued_job_is_dispatched_under_the_next_generation_and_the_old_copy_is_fenced_off() -> None:
    running = update(dispatched("east"), S.RUNNING, T0 + 2)
    requeued = sm.requeue(running, "Preempted", T0 + 3, message="preempted by a higher priority job")
    assert requeued.message == "preempted by a higher priority job"
    # It keeps its first start: it did run.
    assert requeued.start_time.ToNanoseconds() == nanos(T0 + 2)
    # While pending, the old cluster's reports do not apply, and its workload is an orphan.
    assert ignored(requeued, S.SUCCEEDED, cluster="east", generation=1) == "stale: job is at /1"
    assert sm.is_orphan(requeued, "east", 1)
    again = sm.dispatch(requeued, "west", [assignment("w1")], pb.ScoreBreakdown(total=0.25), T0 + 4)
    assert (again.cluster, again.generation, sm.attempts(again)) == ("west", 2, 2)
    assert ignored(again, S.SUCCEEDED, cluster="east", generation=1) == "stale: job is at west/2"
    assert sm.is_orphan(again, "east", 1) and not sm.is_orphan(again, "west", 2)
    assert [(h[0], h[2], h[3]) for h in history(again)] == [
        ("PENDING", "", 0),
        ("DISPATCHED", "east", 1),
        ("RUNNING", "east", 1),
        ("PENDING", "", 1),
        ("DISPATCHED", "west", 2),
    ]
    assert update(again, S.SUCCEEDED, T0 + 5).state == S.SUCCEEDED


def test_a_requeued_job_can_be_cancelled_at_once() -> None:
    requeued = sm.requeue(dispatched("east"), "ClusterLost", T0 + 3)
    outcome = sm.request_cancel(requeued, "", T0 + 4)
    assert outcome.status.state == S.CANCELLED and not outcome.send_delete


def test_requeue_of_a_cancelling_job_cancels_it_instead() -> None:
    cancelling = sm.request_cancel(dispatched("east"), "stop", T0 + 2).status
    cancelled = sm.requeue(cancelling, "ClusterLost", T0 + 3)
    assert cancelled.state == S.CANCELLED and sm.is_terminal(cancelled.state)
    assert (cancelled.reason, cancelled.message) == ("ClusterLost", "cancel finished without word from east")
    assert cancelled.finish_time.ToNanoseconds() == nanos(T0 + 3)
    # It stays on record at its cluster and generation: should the cluster come back, its
    # workload is an orphan to delete and its reports change nothing.
    assert (cancelled.cluster, cancelled.generation) == ("east", 1)
    assert sm.is_orphan(cancelled, "east", 1)
    assert ignored(cancelled, S.SUCCEEDED) == "job already CANCELLED"


@pytest.mark.parametrize("state", [S.PENDING, S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_requeue_is_refused_for_a_job_on_no_cluster_or_finished(state: int) -> None:
    status = in_state(state)
    with pytest.raises(sm.TransitionError, match=f"cannot requeue a job that is {sm.state_name(state)}"):
        sm.requeue(status, "ClusterLost", T0 + 3)


# -- any sequence of inputs --------------------------------------------------------------------

INPUT_SEQUENCES = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["east", "west", ""]),
            st.sampled_from([0, 1, 2, 3]),
            st.sampled_from([*ALL_STATES, 99]),
        ),
        st.sampled_from([On.CANCEL, On.REQUEUE, "place east", "place west"]),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(INPUT_SEQUENCES)
def test_any_sequence_of_inputs_follows_the_table_and_fences_generations(
    inputs: list[tuple[str, int, int] | str],
) -> None:
    status = sm.new_pending(T0)
    now = T0
    for item in inputs:
        now += 1
        before = status.SerializeToString()
        try:
            if isinstance(item, tuple):
                cluster, generation, state = item
                on = sm.REPORTS.get(state, "")
                new = sm.apply_update(status, cluster, generation, state, now).status
                if (cluster, generation) != (status.cluster, status.generation):
                    assert new is None, "a report from another cluster or generation applied"
            elif item.startswith("place"):
                on = On.PLACE
                new = sm.dispatch(status, item.split()[1], [], pb.ScoreBreakdown(), now)
            elif item == On.CANCEL:
                on = item
                new = sm.request_cancel(status, "", now).status
            else:
                on = item
                new = sm.requeue(status, "ClusterLost", now)
        except sm.TransitionError:
            new = None
        assert status.SerializeToString() == before
        allowed = sm.next_state(status.state, on)
        if new is None:
            stale = isinstance(item, tuple) and item[:2] != (status.cluster, status.generation)
            assert allowed is None or stale
            continue
        assert new.state == allowed
        assert new.generation == status.generation + (on == On.PLACE)
        assert new.HasField("finish_time") == sm.is_terminal(new.state)
        if new.state == S.PENDING:
            assert new.cluster == ""
        elif new.state in sm.ON_CLUSTER or new.state == S.CANCELLING:
            assert new.cluster
        status = new
    assert sm.attempts(status) == sum(h.state == S.DISPATCHED for h in status.history)
