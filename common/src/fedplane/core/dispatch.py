"""The dispatch state machine: how a job's status record may change, and what that asks for.

Every function takes the current status and returns a new one (never mutating the input),
so the hub can write it with a compare-and-swap and retry on conflict. Status updates from
agents are idempotent by (generation, state): a stale generation or a backwards move is
ignored, so redelivered or reordered messages never regress a job or resurrect it.

    PENDING --place--> DISPATCHED --agent--> ADMITTED --> RUNNING --> SUCCEEDED | FAILED
       |                   |                    |            |
       +--cancel--> CANCELLED   +------cancel---+------------+--> CANCELLING --agent--> CANCELLED
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedplane.v1 import types_pb2 as pb


class S:
    """The JobState values as plain class attributes: reading `pb.JobState.X` goes through a
    Python-level __getattr__ each time, and the hub reads states several times per job."""

    JOB_STATE_UNSPECIFIED = pb.JOB_STATE_UNSPECIFIED
    PENDING = pb.PENDING
    DISPATCHED = pb.DISPATCHED
    ADMITTED = pb.ADMITTED
    RUNNING = pb.RUNNING
    SUCCEEDED = pb.SUCCEEDED
    FAILED = pb.FAILED
    CANCELLING = pb.CANCELLING
    CANCELLED = pb.CANCELLED


TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
ON_CLUSTER = frozenset({S.DISPATCHED, S.ADMITTED, S.RUNNING})
# Forward order of the states a member cluster reports.
_PROGRESS: dict[int, int] = {
    S.DISPATCHED: 1,
    S.ADMITTED: 2,
    S.RUNNING: 3,
    S.SUCCEEDED: 4,
    S.FAILED: 4,
    S.CANCELLED: 4,
}
# Cap on kept transitions so a long-lived record stays small.
MAX_HISTORY = 64


class TransitionError(ValueError):
    """The requested change is not allowed from the job's current state."""


def state_name(state: int) -> str:
    # proto3 enums are open: a newer agent may report a value this hub does not know.
    try:
        return pb.JobState.Name(state)  # type: ignore[arg-type]
    except ValueError:
        return f"JobState({state})"


def _transition(
    status: pb.JobStatus, state: int, now: float, *, reason: str = "", message: str = ""
) -> pb.JobStatus:
    new = pb.JobStatus()
    new.CopyFrom(status)
    return _transitioned(new, state, now, reason, message)


def _transitioned(new: pb.JobStatus, state: int, now: float, reason: str, message: str) -> pb.JobStatus:
    """`new` (a copy the caller owns) moved to `state`, with the move in its history."""
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
    if len(new.history) > MAX_HISTORY:
        del new.history[1 : len(new.history) - MAX_HISTORY + 1]
    if state == S.RUNNING and not new.HasField("start_time"):
        new.start_time.CopyFrom(update_time)
    if state in TERMINAL:
        new.finish_time.CopyFrom(update_time)
    return new


def new_pending(now: float) -> pb.JobStatus:
    return _transition(pb.JobStatus(), S.PENDING, now, reason="Submitted")


def dispatch(
    status: pb.JobStatus,
    cluster: str,
    assignments: Sequence[pb.NodeAssignment],
    score: pb.ScoreBreakdown,
    now: float,
) -> pb.JobStatus:
    """PENDING -> DISPATCHED on `cluster` under the next generation."""
    if status.state != S.PENDING:
        raise TransitionError(f"cannot dispatch a job that is {state_name(status.state)}")
    new = pb.JobStatus()
    new.CopyFrom(status)
    new.cluster = cluster
    new.generation = status.generation + 1
    del new.assignments[:]
    new.assignments.extend(assignments)
    new.placement_score.CopyFrom(score)
    return _transitioned(new, S.DISPATCHED, now, "Placed", f"dispatched to {cluster}")


@dataclass(frozen=True)
class UpdateOutcome:
    status: pb.JobStatus | None
    # Why the update changed nothing (None when it applied).
    ignored: str | None = None


def apply_update(
    status: pb.JobStatus,
    cluster: str,
    generation: int,
    state: int,
    now: float,
    *,
    reason: str = "",
    message: str = "",
) -> UpdateOutcome:
    """Apply a member cluster's status report, if it is current and moves the job forward."""
    if generation != status.generation or cluster != status.cluster:
        return UpdateOutcome(None, f"stale: job is at {status.cluster}/{status.generation}")
    if status.state in TERMINAL:
        return UpdateOutcome(None, f"job already {state_name(status.state)}")
    if status.state not in _PROGRESS and status.state != S.CANCELLING:
        # PENDING (cluster "" at generation 0): nothing runs anywhere, so no report applies.
        return UpdateOutcome(None, f"job is {state_name(status.state)}, not on a cluster")
    if state not in _PROGRESS or state == S.DISPATCHED:
        return UpdateOutcome(None, f"clusters do not report {state_name(state)}")
    if status.state == S.CANCELLING:
        if state not in TERMINAL:
            return UpdateOutcome(None, "cancelling")
    elif _PROGRESS[state] <= _PROGRESS[status.state]:
        return UpdateOutcome(None, f"not forward from {state_name(status.state)}")
    return UpdateOutcome(_transition(status, state, now, reason=reason, message=message))


@dataclass(frozen=True)
class CancelOutcome:
    status: pb.JobStatus
    # True when the member cluster must be told to delete the workload.
    send_delete: bool


def request_cancel(status: pb.JobStatus, reason: str, now: float) -> CancelOutcome:
    if status.state in TERMINAL:
        raise TransitionError(f"job already {state_name(status.state)}")
    message = reason or "cancelled by user"
    if status.state == S.PENDING:
        return CancelOutcome(
            _transition(status, S.CANCELLED, now, reason="Cancelled", message=message), False
        )
    if status.state == S.CANCELLING:
        return CancelOutcome(status, True)
    return CancelOutcome(
        _transition(status, S.CANCELLING, now, reason="CancelRequested", message=message), True
    )


def is_terminal(state: int) -> bool:
    return state in TERMINAL


def is_orphan(status: pb.JobStatus | None, cluster: str, generation: int) -> bool:
    """Whether a workload found in `cluster` at `generation` is one the hub no longer wants there.

    Unknown jobs, jobs now held by another cluster or generation, and cancelled jobs are
    orphans; finished jobs are not, so their objects (and logs) stay until cleaned up by TTL.
    """
    if status is None:
        return True
    if status.cluster != cluster or status.generation != generation:
        return True
    return status.state in (S.CANCELLED, S.PENDING)
