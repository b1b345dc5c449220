"""The dispatch record on the wire: a job's JobStatus, moved by the core's transitions.

The state machine (fedplane.core.dispatch) decides on three plain fields of the record and
returns a Transition; this is where that decision is written into the stored JobStatus, once,
and where placement's assignments and score become wire messages, once. Nothing else builds
a status.
"""

from __future__ import annotations

from fedplane.core.dispatch import TERMINAL, DispatchState, S, Transition, new_pending
from fedplane.hub import convert
from fedplane.v1 import types_pb2 as pb

# Cap on kept transitions so a long-lived record stays small.
MAX_HISTORY = 64
_EMPTY = pb.JobStatus()


def state_of(status: pb.JobStatus) -> DispatchState:
    """What the state machine decides on, read from a wire status."""
    return DispatchState(status.state, status.cluster, status.generation)


def record(status: pb.JobStatus, transition: Transition, now: float) -> pb.JobStatus:
    """`status` with `transition` made at `now`, as a new message (`status` is left as it was).

    `transition` must have been decided on `status`'s own state, cluster and generation.
    """
    new = pb.JobStatus()
    new.CopyFrom(status)
    return record_into(new, transition, now)


def record_into(new: pb.JobStatus, transition: Transition, now: float) -> pb.JobStatus:
    """Make `transition` at `now` in `new` (a message the caller owns), and return it."""
    state = transition.state
    reason = transition.reason
    message = transition.message
    new.cluster = transition.cluster
    new.generation = transition.generation
    if transition.replaces_placement:
        # A dispatch's flavor is set by the scheduler after this; a requeue holds no quota.
        new.flavor = ""
        # A backoff holds one stay in PENDING: gangs.py sets it after recording its requeue.
        new.ClearField("not_before")
        del new.assignments[:]
        if transition.assignments:
            new.assignments.extend(convert.assignments_pb(transition.assignments))
        if transition.score is None:
            new.ClearField("placement_score")
        else:
            new.placement_score.CopyFrom(convert.score_pb(transition.score))
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


def submitted(now: float) -> pb.JobStatus:
    """A new job's status: PENDING since `now`."""
    return record(_EMPTY, new_pending(), now)
