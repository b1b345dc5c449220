"""The dispatch state machine: how a job's status record may change, and what that asks for.

Every function takes the current status and returns a new one (never mutating the input),
so the hub can write it with a compare-and-swap and retry on conflict. Which changes are
allowed is the table `TRANSITIONS` (state -> {input -> next state}) and nothing else: the
functions look their move up in it, and refuse (the hub's own decisions) or ignore (a
member cluster's reports) any pair it does not list.

    PENDING --place--> DISPATCHED --agent--> ADMITTED --agent--> RUNNING --agent--> SUCCEEDED | FAILED
     | ^                   |                    |                   |
     | +------requeue------+--------------------+-------------------+
     |                     |                    |                   |
     |                     +-------cancel-------+-------------------+--> CANCELLING --agent--> CANCELLED
     +--cancel--> CANCELLED                                               (requeue: CANCELLED)

Status updates from agents are idempotent by (generation, state): a stale generation or a
backwards move is ignored, so redelivered or reordered messages never regress a job or
resurrect it. The one way back is `requeue`, the hub's own decision: it clears the cluster
but keeps the generation, so the next dispatch bumps it and fences off whatever the old
cluster still reports. JobStatus has no attempt counter: the generation, which dispatch and
nothing else bumps, counts the dispatches (`attempts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

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


class On:
    """The inputs of the table: three decisions of the hub's, and the states clusters report.

    Plain strings rather than an Enum: an Enum member hashes in Python code, and the table is
    looked up for every status update.
    """

    PLACE = "place"  # placement chose a cluster: dispatch()
    CANCEL = "cancel"  # a user asked: request_cancel()
    REQUEUE = "requeue"  # the cluster was lost, or the job preempted: requeue()
    # A member cluster reported its workload in this state: apply_update().
    ADMITTED = "ADMITTED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


# state: {input: next state}. In each row: what the cluster reports, then the hub's decisions.
# A pair not listed is refused (dispatch, request_cancel, requeue raise TransitionError) or,
# for a report, ignored (apply_update says why).
# fmt: off
TRANSITIONS: Final[Mapping[int, Mapping[str, int]]] = {
    S.PENDING: {
        On.PLACE: S.DISPATCHED,
        On.CANCEL: S.CANCELLED,
    },
    S.DISPATCHED: {
        On.ADMITTED: S.ADMITTED, On.RUNNING: S.RUNNING,
        On.SUCCEEDED: S.SUCCEEDED, On.FAILED: S.FAILED, On.CANCELLED: S.CANCELLED,
        On.CANCEL: S.CANCELLING, On.REQUEUE: S.PENDING,
    },
    S.ADMITTED: {
        On.RUNNING: S.RUNNING,
        On.SUCCEEDED: S.SUCCEEDED, On.FAILED: S.FAILED, On.CANCELLED: S.CANCELLED,
        On.CANCEL: S.CANCELLING, On.REQUEUE: S.PENDING,
    },
    S.RUNNING: {
        On.SUCCEEDED: S.SUCCEEDED, On.FAILED: S.FAILED, On.CANCELLED: S.CANCELLED,
        On.CANCEL: S.CANCELLING, On.REQUEUE: S.PENDING,
    },
    # Only the workload's end still counts, whichever way it ended. Cancelling again re-sends
    # the delete and changes nothing. Requeued (its cluster is gone), the job was cancelled:
    # it must not run again.
    S.CANCELLING: {
        On.SUCCEEDED: S.SUCCEEDED, On.FAILED: S.FAILED, On.CANCELLED: S.CANCELLED,
        On.CANCEL: S.CANCELLING, On.REQUEUE: S.CANCELLED,
    },
    S.SUCCEEDED: {},
    S.FAILED: {},
    S.CANCELLED: {},
}
# fmt: on

TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
ON_CLUSTER = frozenset({S.DISPATCHED, S.ADMITTED, S.RUNNING})
# The states a cluster reports, as inputs of the table. Other states (PENDING, DISPATCHED,
# CANCELLING, values from newer agents) are no report and are ignored.
REPORTS: Final[Mapping[int, str]] = {
    S.ADMITTED: On.ADMITTED,
    S.RUNNING: On.RUNNING,
    S.SUCCEEDED: On.SUCCEEDED,
    S.FAILED: On.FAILED,
    S.CANCELLED: On.CANCELLED,
}
_NO_MOVES: Mapping[str, int] = {}
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


def next_state(state: int, on: str) -> int | None:
    """Where `on` moves a job that is in `state`, or None if the table does not allow it."""
    return TRANSITIONS.get(state, _NO_MOVES).get(on)


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


def attempts(status: pb.JobStatus) -> int:
    """How many times the job was dispatched: its generation, which only dispatch bumps."""
    return status.generation


def dispatch(
    status: pb.JobStatus,
    cluster: str,
    assignments: Sequence[pb.NodeAssignment],
    score: pb.ScoreBreakdown,
    now: float,
) -> pb.JobStatus:
    """PENDING -> DISPATCHED on `cluster` under the next generation."""
    state = next_state(status.state, On.PLACE)
    if state is None:
        raise TransitionError(f"cannot dispatch a job that is {state_name(status.state)}")
    new = pb.JobStatus()
    new.CopyFrom(status)
    new.cluster = cluster
    new.generation = status.generation + 1
    del new.assignments[:]
    new.assignments.extend(assignments)
    new.placement_score.CopyFrom(score)
    return _transitioned(new, state, now, "Placed", f"dispatched to {cluster}")


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
    """Apply a member cluster's status report, if it is current and the table takes it.

    Never raises: a report that cannot apply is answered with why, since an exception would
    have its message redelivered forever.
    """
    if generation != status.generation or cluster != status.cluster:
        return UpdateOutcome(None, f"stale: job is at {status.cluster}/{status.generation}")
    on = REPORTS.get(state)
    target = None if on is None else next_state(status.state, on)
    if target is None:
        return UpdateOutcome(None, _why_ignored(status.state, state))
    return UpdateOutcome(_transition(status, target, now, reason=reason, message=message))


def _why_ignored(current: int, reported: int) -> str:
    """Why the table has no move for a current report of `reported` to a job in `current`."""
    if current in TERMINAL:
        return f"job already {state_name(current)}"
    if current not in ON_CLUSTER and current != S.CANCELLING:
        # PENDING (cluster "" at generation 0): nothing runs anywhere, so no report applies.
        return f"job is {state_name(current)}, not on a cluster"
    if reported not in REPORTS:
        return f"clusters do not report {state_name(reported)}"
    if current == S.CANCELLING:
        return "cancelling"
    return f"not forward from {state_name(current)}"


@dataclass(frozen=True)
class CancelOutcome:
    status: pb.JobStatus
    # True when the member cluster must be told to delete the workload.
    send_delete: bool


def request_cancel(status: pb.JobStatus, reason: str, now: float) -> CancelOutcome:
    """Cancel at once if nothing runs yet, or ask the cluster to delete the workload.

    Cancelling a job that is already cancelling returns `status` itself (no new transition),
    with the delete to be sent again.
    """
    state = next_state(status.state, On.CANCEL)
    if state is None:
        if status.state in TERMINAL:
            raise TransitionError(f"job already {state_name(status.state)}")
        raise TransitionError(f"cannot cancel a job that is {state_name(status.state)}")
    if state == status.state:
        return CancelOutcome(status, True)
    message = reason or "cancelled by user"
    if state == S.CANCELLING:
        return CancelOutcome(_transition(status, state, now, reason="CancelRequested", message=message), True)
    return CancelOutcome(_transition(status, state, now, reason="Cancelled", message=message), False)


def requeue(status: pb.JobStatus, reason: str, now: float, *, message: str = "") -> pb.JobStatus:
    """Take the job off its cluster (lost, or the job preempted there): back to PENDING.

    Allowed from DISPATCHED, ADMITTED and RUNNING. The cluster, its assignments and the
    placement score are cleared; the generation and the history are kept, so the next
    dispatch bumps the generation (the old cluster's reports go stale, and `attempts` counts
    on); start_time keeps the first start. A CANCELLING job becomes CANCELLED instead: it is
    wanted nowhere, and it keeps its cluster and generation, so that a late report finds it
    finished and its workload an orphan. `reason` is machine-readable ("ClusterLost",
    "Preempted").
    """
    state = next_state(status.state, On.REQUEUE)
    if state is None:
        raise TransitionError(f"cannot requeue a job that is {state_name(status.state)}")
    if state != S.PENDING:
        return _transition(
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
    return _transitioned(new, state, now, reason, message or f"requeued from {status.cluster}")


def is_terminal(state: int) -> bool:
    return state in TERMINAL


def is_orphan(status: pb.JobStatus | None, cluster: str, generation: int) -> bool:
    """Whether a workload found in `cluster` at `generation` is one the hub no longer wants there.

    Unknown jobs, jobs now held by another cluster or generation (a requeued job is held by
    none), and cancelled jobs are orphans; finished jobs are not, so their objects (and logs)
    stay until cleaned up by TTL.
    """
    if status is None:
        return True
    if status.cluster != cluster or status.generation != generation:
        return True
    return status.state in (S.CANCELLED, S.PENDING)
