"""The dispatch state machine: forward-only, idempotent, generation-fenced moves of a job.

The transition table is the specification: every (state, input) pair it lists does what it
says through the function that takes the input, and every pair it does not list is refused
(the hub's decisions) or ignored (clusters' reports).

The machine speaks plain types: it decides on a DispatchState and returns a Transition (or
Ignored). `Job` below stands in for the record the hub keeps, moved by each transition as the
hub moves the wire status (that recording, timestamps and history cap included, is checked in
tests/hub/test_records.py).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedplane.core import dispatch as sm
from fedplane.core.model import Assignment, ClusterView, JobRequest, NodeView, PodSetRequest
from fedplane.core.placement import Score, Verdict, place_batch

S = sm.S
On = sm.On
ALL_STATES = sorted(sm.NAMES)
INPUTS = [value for name, value in vars(On).items() if name.isupper()]
HUB_INPUTS = [On.PLACE, On.CANCEL, On.REQUEUE, On.FAIL]
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


class Entry(NamedTuple):
    state: str
    cluster: str
    generation: int
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Job:
    """A job's record as the transitions leave it: where it is, what placement decided, and
    every move so far."""

    state: int = S.JOB_STATE_UNSPECIFIED
    cluster: str = ""
    generation: int = 0
    reason: str = ""
    message: str = ""
    assignments: tuple[Assignment, ...] = ()
    score: Score | None = None
    history: tuple[Entry, ...] = ()

    @property
    def current(self) -> sm.DispatchState:
        return sm.DispatchState(self.state, self.cluster, self.generation)

    def moved(self, t: sm.Transition) -> Job:
        assignments, score = (
            (t.assignments, t.score) if t.replaces_placement else (self.assignments, self.score)
        )
        entry = Entry(sm.state_name(t.state), t.cluster, t.generation, t.reason, t.message)
        return Job(
            t.state, t.cluster, t.generation, t.reason, t.message, assignments, score, (*self.history, entry)
        )


def assignment(node: str = "n1", count: int = 2) -> Assignment:
    return Assignment("main", node, count)


def verdict(cluster: str = "east", *assignments: Assignment, total: float = 0.5) -> Verdict:
    """A feasible verdict, as placement gives it."""
    return Verdict(cluster, True, score=Score(total=total), assignments=list(assignments))


def new() -> Job:
    return Job().moved(sm.new_pending())


def dispatched(cluster: str = "east") -> Job:
    job = new()
    return job.moved(sm.dispatch(job.current, verdict(cluster, assignment())))


def update(job: Job, state: int, **kwargs: str) -> Job:
    """Apply an update from the job's own cluster at its generation, which must take effect."""
    outcome = sm.apply_update(job.current, job.cluster, job.generation, state, **kwargs)
    assert isinstance(outcome, sm.Transition), outcome
    return job.moved(outcome)


def ignored(job: Job, state: int, *, cluster: str | None = None, generation: int | None = None) -> str:
    """Apply an update that must change nothing; return why it was ignored."""
    outcome = sm.apply_update(
        job.current,
        job.cluster if cluster is None else cluster,
        job.generation if generation is None else generation,
        state,
    )
    assert isinstance(outcome, sm.Ignored) and outcome.why
    return outcome.why


def cancel(job: Job, reason: str = "") -> Job:
    """Cancel a job that moves (not one already cancelling)."""
    transition = sm.request_cancel(job.current, reason).transition
    assert transition is not None
    return job.moved(transition)


def history(job: Job) -> list[tuple[str, str, int, str]]:
    return [(h.state, h.cluster, h.generation, h.reason) for h in job.history]


# -- the happy path ----------------------------------------------------------------------------


def test_new_job_is_pending_with_one_history_entry() -> None:
    first = sm.new_pending()
    assert (first.state, first.cluster, first.generation) == (S.PENDING, "", 0)
    assert (first.reason, first.message) == ("Submitted", "")
    assert not first.replaces_placement
    job = new()
    assert job.state == S.PENDING
    assert history(job) == [("PENDING", "", 0, "Submitted")]
    assert job.assignments == () and job.score is None


def test_full_forward_path_records_history() -> None:
    score = Score(total=0.75, data_locality=1.0)
    chosen = Verdict("east", True, score=score, assignments=[assignment("n1"), assignment("n2", 1)])
    job = new().moved(sm.dispatch(new().current, chosen))
    assert job.state == S.DISPATCHED
    assert (job.cluster, job.generation) == ("east", 1)
    assert (job.reason, job.message) == ("Placed", "dispatched to east")
    assert [(a.node, a.count) for a in job.assignments] == [("n1", 2), ("n2", 1)]
    assert job.score == score

    job = update(job, S.ADMITTED, reason="Admitted")
    job = update(job, S.RUNNING, reason="Started", message="4/4 pods running")
    job = update(job, S.SUCCEEDED, reason="Completed", message="done")

    assert job.state == S.SUCCEEDED and sm.is_terminal(job.state)
    assert (job.reason, job.message) == ("Completed", "done")
    assert history(job) == [
        ("PENDING", "", 0, "Submitted"),
        ("DISPATCHED", "east", 1, "Placed"),
        ("ADMITTED", "east", 1, "Admitted"),
        ("RUNNING", "east", 1, "Started"),
        ("SUCCEEDED", "east", 1, "Completed"),
    ]
    assert job.history[3].message == "4/4 pods running"
    # What placement decided survives the cluster's reports.
    assert len(job.assignments) == 2 and job.score == score


def test_failure_is_terminal_with_its_reason() -> None:
    job = update(update(dispatched(), S.RUNNING), S.FAILED, reason="BackoffLimitExceeded")
    assert job.state == S.FAILED and sm.is_terminal(S.FAILED)
    assert job.reason == "BackoffLimitExceeded"


def test_states_may_be_skipped_forward() -> None:
    # A missed ADMITTED report does not stop RUNNING, nor a missed RUNNING stop SUCCEEDED.
    assert update(dispatched(), S.RUNNING).state == S.RUNNING
    job = update(dispatched(), S.SUCCEEDED)
    assert job.state == S.SUCCEEDED
    assert [h.state for h in job.history] == ["PENDING", "DISPATCHED", "SUCCEEDED"]


def test_a_report_moves_the_job_where_it_is() -> None:
    move = sm.apply_update(sm.DispatchState(S.DISPATCHED, "east", 3), "east", 3, S.RUNNING, reason="Started")
    assert move == sm.Transition(S.RUNNING, "Started", "", "east", 3)
    assert isinstance(move, sm.Transition) and move.after == sm.DispatchState(S.RUNNING, "east", 3)


# -- updates that must be ignored --------------------------------------------------------------


def test_stale_generation_is_ignored() -> None:
    job = dispatched()
    assert ignored(job, S.RUNNING, generation=0) == "stale: job is at east/1"
    assert ignored(job, S.FAILED, generation=2) == "stale: job is at east/1"


def test_update_from_another_cluster_is_ignored() -> None:
    job = dispatched("east")
    assert ignored(job, S.RUNNING, cluster="west") == "stale: job is at east/1"
    assert ignored(job, S.SUCCEEDED, cluster="") == "stale: job is at east/1"


def test_backwards_moves_are_ignored() -> None:
    running = update(dispatched(), S.RUNNING)
    assert ignored(running, S.ADMITTED) == "not forward from RUNNING"
    done = update(running, S.SUCCEEDED)
    assert ignored(done, S.RUNNING) == "job already SUCCEEDED"
    assert ignored(done, S.ADMITTED) == "job already SUCCEEDED"


def test_a_terminal_state_is_never_replaced_by_another() -> None:
    done = update(dispatched(), S.SUCCEEDED)
    assert ignored(done, S.FAILED) == "job already SUCCEEDED"
    failed = update(dispatched(), S.FAILED)
    assert ignored(failed, S.SUCCEEDED) == "job already FAILED"
    assert ignored(failed, S.CANCELLED) == "job already FAILED"


def test_duplicate_updates_are_idempotent() -> None:
    running = update(dispatched(), S.RUNNING)
    assert ignored(running, S.RUNNING) == "not forward from RUNNING"
    admitted = update(dispatched(), S.ADMITTED)
    assert ignored(admitted, S.ADMITTED) == "not forward from ADMITTED"
    done = update(running, S.SUCCEEDED)
    assert ignored(done, S.SUCCEEDED) == "job already SUCCEEDED"


@pytest.mark.parametrize("state", [S.JOB_STATE_UNSPECIFIED, S.PENDING, S.DISPATCHED, S.CANCELLING])
def test_states_clusters_do_not_report_are_ignored(state: int) -> None:
    assert ignored(dispatched(), state) == f"clusters do not report {sm.state_name(state)}"


def test_an_unknown_state_from_a_newer_agent_is_ignored_not_an_error() -> None:
    # The wire's enums are open: it can carry a state this hub has no name for.
    assert sm.state_name(99) == "JobState(99)"
    assert ignored(dispatched(), 99) == "clusters do not report JobState(99)"
    assert sm.state_name(S.RUNNING) == "RUNNING"


def test_a_pending_job_ignores_status_updates() -> None:
    # Before dispatch the job is on no cluster, at generation 0; a report naming no cluster must
    # not move it (nor fail: an exception here would make the bad message redeliver forever).
    pending = new()
    for state in (S.ADMITTED, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED):
        assert ignored(pending, state, cluster="", generation=0) == "job is PENDING, not on a cluster"


# -- cancellation ------------------------------------------------------------------------------


def test_cancel_pending_job_is_immediate_without_a_delete() -> None:
    outcome = sm.request_cancel(new().current, "no longer needed")
    assert outcome.send_delete is False
    assert outcome.transition is not None
    job = new().moved(outcome.transition)
    assert job.state == S.CANCELLED and sm.is_terminal(job.state)
    assert (job.reason, job.message) == ("Cancelled", "no longer needed")
    assert history(job)[-1] == ("CANCELLED", "", 0, "Cancelled")


def test_cancel_without_a_reason_says_by_user() -> None:
    assert cancel(new()).message == "cancelled by user"


@pytest.mark.parametrize("state", [S.DISPATCHED, S.ADMITTED, S.RUNNING])
def test_cancel_on_a_cluster_asks_for_a_delete_and_waits(state: int) -> None:
    job = dispatched()
    if state != S.DISPATCHED:
        job = update(job, state)
    outcome = sm.request_cancel(job.current, "stop")
    assert outcome.send_delete is True
    assert outcome.transition is not None and not outcome.transition.replaces_placement
    cancelling = job.moved(outcome.transition)
    assert cancelling.state == S.CANCELLING and not sm.is_terminal(cancelling.state)
    assert (cancelling.reason, cancelling.message) == ("CancelRequested", "stop")
    assert (cancelling.cluster, cancelling.generation) == ("east", 1)
    # Progress reports no longer apply while the workload is being deleted...
    for progress in (S.ADMITTED, S.RUNNING):
        assert ignored(cancelling, progress) == "cancelling"
    # ...but its end does, whichever way it ended.
    for terminal in (S.CANCELLED, S.SUCCEEDED, S.FAILED):
        final = update(cancelling, terminal)
        assert final.state == terminal and sm.is_terminal(final.state)
        assert history(final)[-2][0] == "CANCELLING"


def test_cancel_while_cancelling_resends_the_delete_without_a_new_transition() -> None:
    cancelling = cancel(dispatched(), "stop")
    again = sm.request_cancel(cancelling.current, "stop again")
    assert again.send_delete is True
    assert again.transition is None


def test_cancelling_still_fences_stale_updates() -> None:
    cancelling = cancel(dispatched(), "stop")
    assert ignored(cancelling, S.CANCELLED, generation=0) == "stale: job is at east/1"
    assert ignored(cancelling, S.CANCELLED, cluster="west") == "stale: job is at east/1"


@pytest.mark.parametrize("terminal", [S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_cancel_of_a_terminal_job_raises(terminal: int) -> None:
    job = update(dispatched(), terminal)
    with pytest.raises(sm.TransitionError, match=f"job already {sm.state_name(terminal)}"):
        sm.request_cancel(job.current, "")


def test_cancel_of_a_cancelled_pending_job_raises() -> None:
    cancelled = cancel(new())
    with pytest.raises(sm.TransitionError):
        sm.request_cancel(cancelled.current, "")


# -- dispatch ----------------------------------------------------------------------------------


def test_dispatch_increments_the_generation_and_replaces_assignments() -> None:
    # A pending job that was on a cluster before (requeued) keeps counting generations.
    pending = dataclasses.replace(new(), generation=3, cluster="west", assignments=(assignment("old", 9),))
    job = pending.moved(sm.dispatch(pending.current, verdict("east", assignment("n7", 1), total=0.1)))
    assert (job.cluster, job.generation) == ("east", 4)
    assert [(a.node, a.count) for a in job.assignments] == [("n7", 1)]
    assert job.score == Score(total=0.1)
    assert history(job)[-1] == ("DISPATCHED", "east", 4, "Placed")
    # Reports about the earlier generation no longer apply.
    assert ignored(job, S.RUNNING, cluster="west", generation=3) == "stale: job is at east/4"


def test_dispatch_takes_placements_own_choice_as_it_is() -> None:
    # No conversion between placement and the state machine: the chosen verdict goes in as is.
    job = JobRequest("j1", (PodSetRequest("main", 2, 0, {"cpu": 1000}),))
    clusters = [
        ClusterView("east", [NodeView("e1", {"cpu": 1000}), NodeView("e2", {"cpu": 1000})]),
        ClusterView("west", [NodeView("w1", {"cpu": 4000})]),
    ]
    (decision,) = place_batch([job], clusters)
    chosen = decision.chosen
    assert chosen is not None and decision.cluster is not None
    move = sm.dispatch(sm.DispatchState(S.PENDING), chosen)
    assert (move.state, move.cluster, move.generation) == (S.DISPATCHED, decision.cluster, 1)
    assert move.replaces_placement
    assert move.score is chosen.score
    assert move.assignments == tuple(chosen.assignments) and move.assignments
    assert all(type(a) is Assignment for a in move.assignments)


def test_dispatch_to_a_cluster_the_job_does_not_fit_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        sm.dispatch(new().current, Verdict("east", False, ["too small"]))


@pytest.mark.parametrize("state", [S.DISPATCHED, S.ADMITTED, S.RUNNING, S.CANCELLING, S.SUCCEEDED])
def test_dispatch_only_from_pending(state: int) -> None:
    job = dispatched()
    if state == S.CANCELLING:
        job = cancel(job)
    elif state != S.DISPATCHED:
        job = update(job, state)
    with pytest.raises(sm.TransitionError, match=f"cannot dispatch a job that is {sm.state_name(state)}"):
        sm.dispatch(job.current, verdict("west"))


def test_dispatch_of_a_cancelled_job_raises() -> None:
    cancelled = cancel(new())
    with pytest.raises(sm.TransitionError):
        sm.dispatch(cancelled.current, verdict("east"))


# -- purity ------------------------------------------------------------------------------------


def test_inputs_are_never_mutated_and_decisions_are_values() -> None:
    current = sm.DispatchState(S.PENDING)
    chosen = verdict("east", assignment())
    move = sm.dispatch(current, chosen)
    assert current == sm.DispatchState(S.PENDING, "", 0)
    assert chosen == verdict("east", assignment())
    # The move keeps its own assignments: placement's list changing later does not change it.
    chosen.assignments.append(assignment("n9"))
    assert move.assignments == (assignment(),)
    with pytest.raises(AttributeError):
        current.state = S.RUNNING  # type: ignore[misc]
    with pytest.raises(AttributeError):
        move.cluster = "west"  # type: ignore[misc]
    # Deterministic: the same inputs, the same decision.
    running = sm.DispatchState(S.RUNNING, "east", 1)
    assert sm.apply_update(running, "east", 1, S.SUCCEEDED) == sm.apply_update(
        running, "east", 1, S.SUCCEEDED
    )
    assert sm.request_cancel(running, "stop") == sm.request_cancel(running, "stop")
    assert sm.requeue(running, "ClusterLost") == sm.requeue(running, "ClusterLost")


def test_the_state_names_are_the_cores_own() -> None:
    assert [sm.state_name(state) for state in ALL_STATES] == [
        "JOB_STATE_UNSPECIFIED",
        "PENDING",
        "DISPATCHED",
        "ADMITTED",
        "RUNNING",
        "SUCCEEDED",
        "FAILED",
        "CANCELLING",
        "CANCELLED",
    ]
    assert ALL_STATES == list(range(9))
    assert all(type(state) is int for state in ALL_STATES)


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
    job = dispatched("east")
    for item in updates:
        rank = ORDER[job.state]
        if isinstance(item, str):
            if sm.is_terminal(job.state):
                with pytest.raises(sm.TransitionError):
                    sm.request_cancel(job.current, "")
                continue
            outcome = sm.request_cancel(job.current, "")
            new_job = job if outcome.transition is None else job.moved(outcome.transition)
            assert new_job.state in (S.CANCELLING, S.CANCELLED)
        else:
            cluster, generation, state = item
            move = sm.apply_update(job.current, cluster, generation, state)
            if isinstance(move, sm.Ignored):
                assert move.why
                continue
            new_job = job.moved(move)
            # Only the job's own cluster, at its generation, may change it, and only to what it said.
            assert (cluster, generation) == ("east", 1)
            assert new_job.state == state
            assert not sm.is_terminal(job.state)
            assert len(new_job.history) == len(job.history) + 1
            assert new_job.history[-1].state == sm.state_name(state)
        assert ORDER[new_job.state] >= rank
        if ORDER[new_job.state] == rank:
            # Equal rank is only allowed when cancelling again (no change at all).
            assert new_job == job
        assert (new_job.cluster, new_job.generation) == ("east", 1)
        assert new_job.assignments == (assignment(),)  # reports and cancels keep what placement chose
        job = new_job


# -- the table ---------------------------------------------------------------------------------


def in_state(state: int) -> sm.DispatchState:
    """A job in `state`: on cluster east at generation 1, or, when pending, requeued from it."""
    return sm.DispatchState(state, "" if state == S.PENDING else "east", 1)


def fire(current: sm.DispatchState, on: str) -> tuple[int, sm.Transition | None] | None:
    """Give the job input `on` through the function that takes it: the state it is in after,
    with the move (None when it stays as it is, as when cancelled again), or None when that
    function refused the input (TransitionError) or ignored it (a report)."""
    try:
        if on == On.PLACE:
            move = sm.dispatch(current, verdict("west", assignment("w1")))
            return move.state, move
        if on == On.CANCEL:
            transition = sm.request_cancel(current, "stop").transition
            return (current.state, None) if transition is None else (transition.state, transition)
        if on == On.REQUEUE:
            move = sm.requeue(current, "ClusterLost")
            return move.state, move
        if on == On.FAIL:
            move = sm.give_up(current, "ClusterLost")
            return move.state, move
    except sm.TransitionError:
        return None
    if on == On.FENCED:  # the agent's own stop: CANCELLED, for the reason FENCED
        outcome = sm.apply_update(current, current.cluster, current.generation, S.CANCELLED, reason=sm.FENCED)
        return None if isinstance(outcome, sm.Ignored) else (outcome.state, outcome)
    reported = next(state for state, report in sm.REPORTS.items() if report == on)
    outcome = sm.apply_update(current, current.cluster, current.generation, reported)
    return None if isinstance(outcome, sm.Ignored) else (outcome.state, outcome)


def test_the_table_has_a_row_for_every_state_and_only_terminal_states_have_no_way_out() -> None:
    assert set(sm.TRANSITIONS) == set(ALL_STATES) - {S.JOB_STATE_UNSPECIFIED}
    assert {state for state, row in sm.TRANSITIONS.items() if not row} == sm.TERMINAL
    for row in sm.TRANSITIONS.values():
        assert set(row) <= set(INPUTS)
        assert set(row.values()) <= set(sm.TRANSITIONS)
    # Every state a cluster reports is an input, and only those.
    assert set(sm.REPORTS) == {S.ADMITTED, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED}
    assert set(sm.REPORTS.values()) == set(INPUTS) - set(HUB_INPUTS) - {On.FENCED}


def test_an_agents_fenced_stop_requeues_the_job_and_the_agent_uses_the_same_reason() -> None:
    from fedplane.agent import decisions

    assert decisions.FENCED_REASON == sm.FENCED
    running = update(dispatched("east"), S.RUNNING)
    outcome = sm.apply_update(running.current, "east", 1, S.CANCELLED, reason=sm.FENCED, message="cut off")
    assert isinstance(outcome, sm.Transition)
    assert (outcome.state, outcome.cluster, outcome.generation) == (S.PENDING, "", 1)
    assert outcome.replaces_placement
    # A plain CANCELLED still ends the job; a fenced stop of an older generation changes nothing.
    assert sm.apply_update(running.current, "east", 1, S.CANCELLED).state == S.CANCELLED  # type: ignore[union-attr]
    assert isinstance(sm.apply_update(running.current, "east", 0, S.CANCELLED, reason=sm.FENCED), sm.Ignored)


def test_reports_only_move_a_job_forward_and_to_the_state_reported() -> None:
    for state, row in sm.TRANSITIONS.items():
        for reported, on in sm.REPORTS.items():
            if on in row:
                assert row[on] == reported
                assert ORDER[reported] > ORDER[state], (sm.state_name(state), on)


@pytest.mark.parametrize("on", INPUTS)
@pytest.mark.parametrize("state", [*ALL_STATES, 99], ids=sm.state_name)
def test_every_state_and_input_does_what_the_table_says(state: int, on: str) -> None:
    current = in_state(state)
    expected = sm.TRANSITIONS.get(state, {}).get(on)
    assert sm.next_state(state, on) == expected
    fired = fire(current, on)
    if expected is None:
        assert fired is None, f"{sm.state_name(state)} took {on}"
        return
    assert fired is not None, f"{sm.state_name(state)} refused {on}"
    after, move = fired
    assert after == expected
    if move is None:  # cancelling again changes nothing at all
        assert (state, on) == (S.CANCELLING, On.CANCEL)
        return
    assert move.state == expected
    # Only dispatch changes the generation, by one; only dispatch and a requeue to PENDING
    # change the cluster and what placement decided (giving up keeps both).
    assert move.generation == current.generation + (on == On.PLACE)
    replaces = on == On.PLACE or (on in (On.REQUEUE, On.FENCED) and expected == S.PENDING)
    assert move.replaces_placement == replaces
    assert move.cluster == ("west" if on == On.PLACE else "" if replaces else current.cluster)


# -- requeue -----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [S.DISPATCHED, S.ADMITTED, S.RUNNING])
def test_requeue_puts_the_job_back_in_the_queue_keeping_its_generation_and_history(state: int) -> None:
    job = dispatched("east")
    if state != S.DISPATCHED:
        job = update(job, state)
    move = sm.requeue(job.current, "ClusterLost")
    assert move.replaces_placement and move.assignments == () and move.score is None
    requeued = job.moved(move)
    assert requeued.state == S.PENDING and not sm.is_terminal(requeued.state)
    assert (requeued.cluster, requeued.generation) == ("", 1)
    assert (requeued.reason, requeued.message) == ("ClusterLost", "requeued from east")
    assert requeued.assignments == () and requeued.score is None
    assert history(requeued) == [*history(job), ("PENDING", "", 1, "ClusterLost")]
    assert sm.attempts(requeued.current) == 1


def test_a_requeued_job_is_dispatched_under_the_next_generation_and_the_old_copy_is_fenced_off() -> None:
    running = update(dispatched("east"), S.RUNNING)
    requeued = running.moved(
        sm.requeue(running.current, "Preempted", message="preempted by a higher priority job")
    )
    assert requeued.message == "preempted by a higher priority job"
    # While pending, the old cluster's reports do not apply, and its workload is an orphan.
    assert ignored(requeued, S.SUCCEEDED, cluster="east", generation=1) == "stale: job is at /1"
    assert sm.is_orphan(requeued.current, "east", 1)
    again = requeued.moved(sm.dispatch(requeued.current, verdict("west", assignment("w1"), total=0.25)))
    assert (again.cluster, again.generation, sm.attempts(again.current)) == ("west", 2, 2)
    assert ignored(again, S.SUCCEEDED, cluster="east", generation=1) == "stale: job is at west/2"
    assert sm.is_orphan(again.current, "east", 1) and not sm.is_orphan(again.current, "west", 2)
    assert [(h[0], h[1], h[2]) for h in history(again)] == [
        ("PENDING", "", 0),
        ("DISPATCHED", "east", 1),
        ("RUNNING", "east", 1),
        ("PENDING", "", 1),
        ("DISPATCHED", "west", 2),
    ]
    assert update(again, S.SUCCEEDED).state == S.SUCCEEDED


def test_a_requeued_job_can_be_cancelled_at_once() -> None:
    job = dispatched("east")
    requeued = job.moved(sm.requeue(job.current, "ClusterLost"))
    outcome = sm.request_cancel(requeued.current, "")
    assert outcome.transition is not None
    assert outcome.transition.state == S.CANCELLED and not outcome.send_delete


def test_requeue_of_a_cancelling_job_cancels_it_instead() -> None:
    cancelling = cancel(dispatched("east"), "stop")
    move = sm.requeue(cancelling.current, "ClusterLost")
    assert not move.replaces_placement
    cancelled = cancelling.moved(move)
    assert cancelled.state == S.CANCELLED and sm.is_terminal(cancelled.state)
    assert (cancelled.reason, cancelled.message) == ("ClusterLost", "cancel finished without word from east")
    # It stays on record at its cluster and generation: should the cluster come back, its
    # workload is an orphan to delete and its reports change nothing.
    assert (cancelled.cluster, cancelled.generation) == ("east", 1)
    assert sm.is_orphan(cancelled.current, "east", 1)
    assert ignored(cancelled, S.SUCCEEDED) == "job already CANCELLED"


@pytest.mark.parametrize("state", [S.PENDING, S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_requeue_is_refused_for_a_job_on_no_cluster_or_finished(state: int) -> None:
    with pytest.raises(sm.TransitionError, match=f"cannot requeue a job that is {sm.state_name(state)}"):
        sm.requeue(in_state(state), "ClusterLost")


def test_orphans() -> None:
    assert sm.is_orphan(None, "east", 1)  # the hub does not know the job
    running = sm.DispatchState(S.RUNNING, "east", 1)
    assert not sm.is_orphan(running, "east", 1)
    assert sm.is_orphan(running, "west", 1)
    assert sm.is_orphan(sm.DispatchState(S.RUNNING, "east", 2), "east", 1)  # an older dispatch's copy
    # A workload newer than the record: the record is behind (a lagging replica), never the workload.
    assert not sm.is_orphan(running, "east", 2) and not sm.is_orphan(running, "west", 2)
    # Finished jobs keep their objects (and logs) until cleaned up by TTL; cancelled ones do not.
    assert not sm.is_orphan(sm.DispatchState(S.SUCCEEDED, "east", 1), "east", 1)
    assert sm.is_orphan(sm.DispatchState(S.CANCELLED, "east", 1), "east", 1)


# -- giving up ---------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [S.DISPATCHED, S.ADMITTED, S.RUNNING])
def test_giving_up_fails_the_job_where_it_is(state: int) -> None:
    job = dispatched("east")
    if state != S.DISPATCHED:
        job = update(job, state)
    move = sm.give_up(job.current, "ClusterLost")
    assert not move.replaces_placement
    failed = job.moved(move)
    assert failed.state == S.FAILED and sm.is_terminal(failed.state)
    assert (failed.reason, failed.message) == ("ClusterLost", "given up on east")
    # It stays on record where it last was, with what placement chose there.
    assert (failed.cluster, failed.generation) == ("east", 1)
    assert failed.assignments == (assignment(),)
    assert history(failed) == [*history(job), ("FAILED", "east", 1, "ClusterLost")]
    # Whatever the lost cluster says later changes nothing.
    for late in (S.RUNNING, S.SUCCEEDED, S.CANCELLED):
        assert ignored(failed, late) == "job already FAILED"
    assert sm.give_up(job.current, "ClusterLost", "lost for 60s").message == "lost for 60s"


def test_giving_up_on_a_cancelling_job_cancels_it() -> None:
    cancelling = cancel(dispatched("east"), "stop")
    cancelled = cancelling.moved(sm.give_up(cancelling.current, "ClusterLost"))
    assert cancelled.state == S.CANCELLED
    assert (cancelled.reason, cancelled.message) == ("ClusterLost", "cancel finished without word from east")
    assert (cancelled.cluster, cancelled.generation) == ("east", 1)


@pytest.mark.parametrize("state", [S.PENDING, S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_giving_up_is_refused_for_a_job_on_no_cluster_or_finished(state: int) -> None:
    with pytest.raises(sm.TransitionError, match=f"cannot fail a job that is {sm.state_name(state)}"):
        sm.give_up(in_state(state), "ClusterLost")


# -- any sequence of inputs --------------------------------------------------------------------

INPUT_SEQUENCES = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["east", "west", ""]),
            st.sampled_from([0, 1, 2, 3]),
            st.sampled_from([*ALL_STATES, 99]),
        ),
        st.sampled_from([On.CANCEL, On.REQUEUE, On.FAIL, "place east", "place west"]),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(INPUT_SEQUENCES)
def test_any_sequence_of_inputs_follows_the_table_and_fences_generations(
    inputs: list[tuple[str, int, int] | str],
) -> None:
    job = new()
    for item in inputs:
        move: sm.Transition | None
        try:
            if isinstance(item, tuple):
                cluster, generation, state = item
                on = sm.REPORTS.get(state, "")
                outcome = sm.apply_update(job.current, cluster, generation, state)
                move = None if isinstance(outcome, sm.Ignored) else outcome
                if (cluster, generation) != (job.cluster, job.generation):
                    assert move is None, "a report from another cluster or generation applied"
            elif item.startswith("place"):
                on = On.PLACE
                move = sm.dispatch(job.current, verdict(item.split()[1]))
            elif item == On.CANCEL:
                on = item
                cancelled = sm.request_cancel(job.current, "")
                if cancelled.transition is None:
                    assert job.state == S.CANCELLING and cancelled.send_delete
                    continue
                move = cancelled.transition
            elif item == On.FAIL:
                on = item
                move = sm.give_up(job.current, "ClusterLost")
            else:
                on = item
                move = sm.requeue(job.current, "ClusterLost")
        except sm.TransitionError:
            move = None
        allowed = sm.next_state(job.state, on)
        if move is None:
            stale = isinstance(item, tuple) and item[:2] != (job.cluster, job.generation)
            assert allowed is None or stale
            continue
        new_job = job.moved(move)
        assert new_job.state == allowed
        assert new_job.generation == job.generation + (on == On.PLACE)
        if new_job.state == S.PENDING:
            assert new_job.cluster == "" and new_job.assignments == () and new_job.score is None
        elif new_job.state in sm.ON_CLUSTER or new_job.state == S.CANCELLING:
            assert new_job.cluster
        job = new_job
    assert sm.attempts(job.current) == sum(h.state == "DISPATCHED" for h in job.history)
