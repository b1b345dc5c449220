"""The agent's decisions, from plain inputs: idempotency by generation, create outcomes, max run time,
self-fencing."""

from __future__ import annotations

import pytest

from fedplane.agent import decisions
from fedplane.agent.backend import BackendError, WorkloadEvent
from fedplane.agent.decisions import Command
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb


def create(
    generation: int, max_run_seconds: int = 0, job_id: str = "j-1", fence_after_seconds: float = 0.0
) -> agent_pb.DispatchCommand:
    command = agent_pb.DispatchCommand(job_id=job_id, generation=generation)
    command.create.spec.name = "train"
    command.create.spec.max_run_seconds = max_run_seconds
    command.create.fence_after_seconds = fence_after_seconds
    return command


def delete(generation: int, job_id: str = "j-1") -> agent_pb.DispatchCommand:
    return agent_pb.DispatchCommand(
        job_id=job_id, generation=generation, delete=agent_pb.DeleteWorkload(reason="cancelled")
    )


def event(state: pb.JobState.ValueType, generation: int = 2) -> WorkloadEvent:
    return WorkloadEvent("j-1", generation, state, "Why", "what happened")


# ---------------------------------------------------------------------- commands


@pytest.mark.parametrize(
    ("generation", "held", "expected"),
    [
        (1, 0, Command.CREATE),  # a job the agent has never seen
        (3, 2, Command.CREATE),  # a newer dispatch of a job it has seen
        (2, 2, Command.DUPLICATE),  # a redelivery, or the hub's re-send after a restart
        (1, 2, Command.DUPLICATE),  # an older dispatch arriving late
    ],
)
def test_a_create_is_applied_only_for_a_generation_newer_than_the_one_held(
    generation: int, held: int, expected: Command
) -> None:
    assert decisions.decide_command(create(generation), held) is expected


@pytest.mark.parametrize(
    ("generation", "held", "expected"),
    [
        (2, 2, Command.DELETE),  # cancels the dispatch the agent holds
        (3, 2, Command.DELETE_AHEAD),  # a dispatch newer than any create seen: still nothing may run
        (1, 0, Command.DELETE_AHEAD),  # a job the agent never saw: the backend reports it gone
        (1, 2, Command.STALE_DELETE),  # meant for a dispatch since replaced: the newer one stays
    ],
)
def test_a_delete_is_applied_unless_its_generation_is_older_than_the_one_held(
    generation: int, held: int, expected: Command
) -> None:
    assert decisions.decide_command(delete(generation), held) is expected


def test_a_command_without_a_known_action_is_acked_and_nothing_is_done() -> None:
    assert (
        decisions.decide_command(agent_pb.DispatchCommand(job_id="j-1", generation=5), 0) is Command.NOTHING
    )


# ---------------------------------------------------------------------- create outcomes


def test_an_accepted_create_is_acked_and_held_with_no_clock_when_the_job_has_no_limit() -> None:
    outcome = decisions.decide_created(create(2), None)
    assert outcome == decisions.Created(retry=False, report=None, max_run_seconds=0)


def test_an_accepted_create_carries_the_jobs_max_run_time() -> None:
    outcome = decisions.decide_created(create(2, max_run_seconds=90), None)
    assert not outcome.retry and outcome.report is None
    assert outcome.max_run_seconds == 90


def test_a_temporary_refusal_is_retried_and_holds_nothing() -> None:
    error = BackendError("apiserver busy", permanent=False, reason="Throttled")
    outcome = decisions.decide_created(create(2, max_run_seconds=90), error)
    assert outcome.retry
    assert outcome.report is None and outcome.max_run_seconds == 0


def test_a_permanent_refusal_fails_the_job_with_the_backends_reason() -> None:
    error = BackendError("node cpu-9 does not exist", permanent=True, reason="NodeNotFound")
    outcome = decisions.decide_created(create(3, max_run_seconds=90, job_id="j-7"), error)
    assert not outcome.retry
    assert outcome.report == WorkloadEvent("j-7", 3, pb.FAILED, "NodeNotFound", "node cpu-9 does not exist")
    assert outcome.max_run_seconds == 0  # nothing runs, so there is no clock to start


# ---------------------------------------------------------------------- workload events, max run time


def test_the_clock_starts_when_a_limited_workload_runs() -> None:
    outcome = decisions.decide_event(event(pb.RUNNING), 30, False)
    assert outcome.start_clock_seconds == 30
    assert outcome.report is None and not outcome.finished


@pytest.mark.parametrize(("state", "limit"), [(pb.RUNNING, 0), (pb.ADMITTED, 30), (pb.ADMITTED, 0)])
def test_no_clock_starts_before_running_or_without_a_limit(state: pb.JobState.ValueType, limit: int) -> None:
    assert decisions.decide_event(event(state), limit, False) is decisions.AS_IS


@pytest.mark.parametrize("state", [pb.SUCCEEDED, pb.FAILED, pb.CANCELLED])
def test_an_ending_stops_the_clock_and_is_reported_as_the_backend_says(state: pb.JobState.ValueType) -> None:
    outcome = decisions.decide_event(event(state), 30, False)
    assert outcome.finished
    assert outcome.report is None and outcome.start_clock_seconds == 0


def test_a_workload_stopped_for_overrunning_is_reported_failed_not_cancelled() -> None:
    outcome = decisions.decide_event(event(pb.CANCELLED, generation=4), 30, True)
    assert outcome.report == WorkloadEvent(
        "j-1", 4, pb.FAILED, "MaxRunTimeExceeded", "ran longer than max_run_seconds"
    )
    assert outcome.finished  # which also forgets the stop


@pytest.mark.parametrize("state", [pb.SUCCEEDED, pb.FAILED])
def test_a_workload_that_ended_by_itself_before_its_overrun_stop_took_is_reported_as_it_ended(
    state: pb.JobState.ValueType,
) -> None:
    outcome = decisions.decide_event(event(state), 30, True)
    assert outcome.report is None and outcome.finished  # the stop is forgotten: nothing left to report


def test_a_repeated_running_keeps_the_clock_of_the_first() -> None:
    assert decisions.decide_event(event(pb.RUNNING), 30, False, clock_running=True) is decisions.AS_IS


def test_the_overrun_stop_names_the_limit() -> None:
    assert decisions.overrun_delete_reason(5) == "exceeded max run time of 5s"


def test_a_restarted_clock_runs_for_the_time_left() -> None:
    assert decisions.clock_left(60, 45.5) == 14.5
    assert decisions.clock_left(60, 0) == 60  # never ran before the restart
    assert decisions.clock_left(60, 75) == 0  # ran out while the agent was down: stop it now
    assert decisions.clock_left(60, -3) == 60  # a wall clock set back never lengthens the limit


# ---------------------------------------------------------------------- self-fencing


def test_an_accepted_create_carries_its_fence() -> None:
    outcome = decisions.decide_created(create(2, fence_after_seconds=840.0), None)
    assert not outcome.retry and outcome.report is None
    assert (outcome.fence_after_seconds, outcome.max_run_seconds) == (840.0, 0)
    assert decisions.decide_created(create(2), None).fence_after_seconds == 0  # wait for the hub forever


def test_a_refused_create_has_no_fence() -> None:
    error = BackendError("no such node", permanent=True, reason="NodeNotFound")
    assert decisions.decide_created(create(2, fence_after_seconds=60), error).fence_after_seconds == 0


def test_only_workloads_whose_fence_the_cut_off_time_exceeds_are_stopped() -> None:
    limits = [(("a", 1), 30.0), (("b", 2), 60.0), (("c", 1), 0.0), (("d", 3), 29.0)]
    assert decisions.decide_fences(10, limits, set()) == []  # within every fence
    assert decisions.decide_fences(30, limits, set()) == [("d", 3)]  # "a" is at its limit, not past it
    assert decisions.decide_fences(30.5, limits, set()) == [("a", 1), ("d", 3)]
    assert decisions.decide_fences(10_000, limits, set()) == [("a", 1), ("b", 2), ("d", 3)]  # never "c"


def test_a_workload_being_fenced_is_not_stopped_again() -> None:
    limits = [(("a", 1), 30.0), (("b", 2), 30.0)]
    assert decisions.decide_fences(45, limits, {("a", 1)}) == [("b", 2)]


def test_a_fenced_workloads_cancel_is_reported_with_the_fenced_reason() -> None:
    message = decisions.fence_message(912.7)
    assert message == "fenced: cut off from the hub for 912 s; the hub may run it elsewhere"
    outcome = decisions.decide_event(event(pb.CANCELLED, generation=3), 0, False, fenced=message)
    assert outcome.report == WorkloadEvent("j-1", 3, pb.CANCELLED, "Fenced", message)
    assert decisions.FENCED_REASON == "Fenced"
    assert outcome.finished  # which also forgets the fence


@pytest.mark.parametrize("state", [pb.SUCCEEDED, pb.FAILED])
def test_a_fenced_workload_that_ended_by_itself_first_is_reported_as_it_ended(
    state: pb.JobState.ValueType,
) -> None:
    outcome = decisions.decide_event(event(state), 0, False, fenced=decisions.fence_message(100))
    assert outcome.report is None and outcome.finished


def test_a_workload_stopped_both_for_overrunning_and_by_its_fence_ends_as_the_overrun() -> None:
    outcome = decisions.decide_event(event(pb.CANCELLED), 30, True, fenced=decisions.fence_message(100))
    assert outcome.report is not None
    assert (outcome.report.state, outcome.report.reason) == (pb.FAILED, "MaxRunTimeExceeded")
