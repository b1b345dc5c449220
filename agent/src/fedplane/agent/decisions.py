"""What the agent decides, kept apart from doing it: plain inputs in, decisions out.

The daemon owns NATS, the backend, timers and files; this module owns the rules, so they can
be read in one place and tested without any of those:

- Dispatch commands are idempotent by generation: a redelivered or re-sent create never
  makes a second workload, and a delete meant for an older dispatch never touches a newer one.
  A delete for a newer generation than the one held is held from then on, so that its create
  arriving after it (a create nak'd and redelivered) never runs.
- A backend's refusal is either temporary (the command comes back) or permanent (the job
  fails, and the command is done with).
- The max-run-time policy: the clock starts when the workload first runs (a RUNNING reported
  again, as by a watch that resyncs, does not restart it: a workload could then run on past
  its limit); a workload the agent stopped for overrunning is reported FAILED
  (MaxRunTimeExceeded), not CANCELLED, because nobody cancelled it. All of it is per workload,
  i.e. per (job, generation): another dispatch of the job is another workload.
- Self-fencing: a workload whose create carried `fence_after_seconds` is stopped once the
  agent has been cut off from the hub (no heartbeat acknowledged by JetStream) for longer,
  because from then on the hub may run the job elsewhere; its end is reported as CANCELLED
  with reason FENCED_REASON, which the hub, if it still holds the job at that generation,
  takes as a requeue. A workload stopped both for overrunning and by its fence ends as the
  overrun (FAILED): that is the job's own doing, and true wherever it would run.

It imports the wire types and the backend's plain data types only: no asyncio, NATS, clock
or backend I/O (tests/agent/test_imports.py checks). The daemon's command and status paths
call it for every command and event, so the common outcomes are shared constants.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import TypeAlias

from fedplane.agent.backend import BackendError, WorkloadEvent
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb

TERMINAL = frozenset((pb.SUCCEEDED, pb.FAILED, pb.CANCELLED))
_RUNNING, _CANCELLED, _FAILED = pb.RUNNING, pb.CANCELLED, pb.FAILED
MAX_RUN_REASON = "MaxRunTimeExceeded"
MAX_RUN_MESSAGE = "ran longer than max_run_seconds"
# The reason of a CANCELLED the agent reports for a workload it stopped by its fence: the hub
# takes (CANCELLED, FENCED_REASON) at the generation it holds as a requeue, not a cancel.
FENCED_REASON = "Fenced"
# A workload: one dispatch of a job, (job id, generation).
Workload: TypeAlias = tuple[str, int]


class Command(enum.Enum):
    """What to do with one dispatch command, given the generation the agent holds for its job."""

    CREATE = "create"
    DELETE = "delete"
    # A delete for a generation newer than the held one (or a job never seen): carried out, and
    # its generation held from now on, so that a create of it arriving later is a duplicate.
    DELETE_AHEAD = "delete-ahead"
    # A create at or below the held generation: a redelivery or a hub's re-send. Ack it only.
    DUPLICATE = "duplicate"
    # A delete for a generation older than the held one: that dispatch was replaced. Ack it only.
    STALE_DELETE = "stale-delete"
    # No action this agent knows (e.g. from a newer hub). Ack it, or it would come back forever.
    NOTHING = "nothing"


# The members as module constants: on Python 3.11 an enum member costs ~0.2 µs to look up on
# its class, more than deciding a command does, and every command is decided.
CREATE = Command.CREATE
DELETE = Command.DELETE
DELETE_AHEAD = Command.DELETE_AHEAD
DUPLICATE = Command.DUPLICATE
STALE_DELETE = Command.STALE_DELETE
NOTHING = Command.NOTHING


def decide_command(command: agent_pb.DispatchCommand, held_generation: int) -> Command:
    """Decide a command against the highest generation the agent holds for its job (0: none).

    A delete of the held generation itself is carried out: it cancels that very dispatch.
    """
    if command.HasField("create"):  # cheaper than WhichOneof, and creates are the common case
        return CREATE if command.generation > held_generation else DUPLICATE
    if command.HasField("delete"):
        if command.generation == held_generation:
            return DELETE
        return DELETE_AHEAD if command.generation > held_generation else STALE_DELETE
    return NOTHING


@dataclass(frozen=True, slots=True)
class Created:
    """What follows a create command's call to the backend.

    Unless `retry`, the command is acked and its generation held, so its copies are duplicates.
    """

    # The backend refused for now: nak the command and hold nothing, so the redelivery is applied.
    retry: bool = False
    # Reported at once: the job's end when the backend refused it for good.
    report: WorkloadEvent | None = None
    # Once the workload runs, stop it after this many seconds (0: no limit).
    max_run_seconds: int = 0
    # Stop it once the agent has been cut off from the hub for longer than this (0: never).
    fence_after_seconds: float = 0.0


CREATED = Created()
RETRY = Created(retry=True)


def decide_created(command: agent_pb.DispatchCommand, error: BackendError | None) -> Created:
    """Decide what a create's outcome means: `error` is the backend's refusal, None if it took it."""
    if error is None:
        limit, fence = command.create.spec.max_run_seconds, command.create.fence_after_seconds
        if limit > 0 or fence > 0:
            return Created(max_run_seconds=max(limit, 0), fence_after_seconds=max(fence, 0.0))
        return CREATED
    if not error.permanent:
        return RETRY
    return Created(
        report=WorkloadEvent(command.job_id, command.generation, pb.FAILED, error.reason, str(error))
    )


@dataclass(frozen=True, slots=True)
class Observed:
    """What follows a workload's state change, besides reporting it."""

    # Report this instead of the backend's event (None: the event as it is).
    report: WorkloadEvent | None = None
    # The workload started running under a limit: stop it after this many seconds (0: no clock).
    start_clock_seconds: int = 0
    # The workload ended: stop its clock, forget its limit and whether the agent stopped it (any
    # ending settles that: one that came by itself as the stop fired leaves no stop to report).
    finished: bool = False


AS_IS = Observed()
FINISHED = Observed(finished=True)


def decide_event(
    event: WorkloadEvent,
    max_run_seconds: int,
    stopped_for_overrun: bool,
    clock_running: bool = False,
    fenced: str = "",
) -> Observed:
    """Decide about a backend's workload event, given the workload's limit (0: none), whether the
    agent itself deleted the workload for running past it, whether its clock already runs, and
    the message of the agent's fence stop if it fenced the workload ("" if not).

    The backend reports the end of a deleted workload as CANCELLED whoever deleted it; only
    the agent knows that it was its own max-run stop, which the hub must see as a failure, or
    its fence, which the hub must see as a requeue.
    """
    state = event.state
    if state == _RUNNING:
        if max_run_seconds > 0 and not clock_running:
            return Observed(start_clock_seconds=max_run_seconds)
        return AS_IS
    if state not in TERMINAL:
        return AS_IS
    if stopped_for_overrun and state == _CANCELLED:
        return Observed(
            report=WorkloadEvent(event.job_id, event.generation, _FAILED, MAX_RUN_REASON, MAX_RUN_MESSAGE),
            finished=True,
        )
    if fenced and state == _CANCELLED:
        return Observed(
            report=WorkloadEvent(event.job_id, event.generation, _CANCELLED, FENCED_REASON, fenced),
            finished=True,
        )
    return FINISHED


def overrun_delete_reason(limit_seconds: int) -> str:
    """Why the agent deletes a workload whose clock ran out: the backend records it on the delete."""
    return f"exceeded max run time of {limit_seconds}s"


def clock_left(max_run_seconds: int, ran_seconds: float) -> float:
    """How long a workload may still run under its limit, having run `ran_seconds` already (its
    clock started before the agent restarted); 0: stop it now."""
    return max(0.0, max_run_seconds - max(0.0, ran_seconds))


def decide_fences(
    cut_off_seconds: float,
    fence_after: Iterable[tuple[Workload, float]],
    fencing: Container[Workload],
) -> list[Workload]:
    """The workloads to stop now: those whose fence (seconds, 0: none) the time the agent has
    been cut off from the hub exceeds, except those it is stopping already."""
    return [w for w, limit in fence_after if 0 < limit < cut_off_seconds and w not in fencing]


def fence_message(cut_off_seconds: float) -> str:
    """Why the agent stops a fenced workload: the backend records it on the delete, and the hub
    sees it as the message of the CANCELLED (FENCED_REASON)."""
    return f"fenced: cut off from the hub for {int(cut_off_seconds)} s; the hub may run it elsewhere"
