"""What the agent decides, kept apart from doing it: plain inputs in, decisions out.

The daemon owns NATS, the backend, timers and files; this module owns the rules, so they can
be read in one place and tested without any of those:

- Dispatch commands are idempotent by generation: a redelivered or re-sent create never
  makes a second workload, and a delete meant for an older dispatch never touches a newer one.
- A backend's refusal is either temporary (the command comes back) or permanent (the job
  fails, and the command is done with).
- The max-run-time policy: the clock starts when the workload first runs (a RUNNING reported
  again, as by a watch that resyncs, does not restart it: a workload could then run on past
  its limit); a workload the agent stopped for overrunning is reported FAILED
  (MaxRunTimeExceeded), not CANCELLED, because nobody cancelled it. All of it is per workload,
  i.e. per (job, generation): another dispatch of the job is another workload.

It imports the wire types and the backend's plain data types only: no asyncio, NATS, clock
or backend I/O (tests/agent/test_imports.py checks). The daemon's command and status paths
call it for every command and event, so the common outcomes are shared constants.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fedplane.agent.backend import BackendError, WorkloadEvent
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb

TERMINAL = frozenset((pb.SUCCEEDED, pb.FAILED, pb.CANCELLED))
_RUNNING, _CANCELLED, _FAILED = pb.RUNNING, pb.CANCELLED, pb.FAILED
MAX_RUN_REASON = "MaxRunTimeExceeded"
MAX_RUN_MESSAGE = "ran longer than max_run_seconds"


class Command(enum.Enum):
    """What to do with one dispatch command, given the generation the agent holds for its job."""

    CREATE = "create"
    DELETE = "delete"
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
        return DELETE if command.generation >= held_generation else STALE_DELETE
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


CREATED = Created()
RETRY = Created(retry=True)


def decide_created(command: agent_pb.DispatchCommand, error: BackendError | None) -> Created:
    """Decide what a create's outcome means: `error` is the backend's refusal, None if it took it."""
    if error is None:
        limit = command.create.spec.max_run_seconds
        return Created(max_run_seconds=limit) if limit > 0 else CREATED
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
    event: WorkloadEvent, max_run_seconds: int, stopped_for_overrun: bool, clock_running: bool = False
) -> Observed:
    """Decide about a backend's workload event, given the workload's limit (0: none), whether the
    agent itself deleted the workload for running past it, and whether its clock already runs.

    The backend reports the end of a deleted workload as CANCELLED whoever deleted it; only
    the agent knows that it was its own max-run stop, which the hub must see as a failure.
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
    return FINISHED


def overrun_delete_reason(limit_seconds: int) -> str:
    """Why the agent deletes a workload whose clock ran out: the backend records it on the delete."""
    return f"exceeded max run time of {limit_seconds}s"
