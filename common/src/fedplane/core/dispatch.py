"""The dispatch state machine: how a job's dispatch record may change, and what that asks for.

The machine decides on three plain fields of the record, `DispatchState` (state, cluster,
generation), and returns a decision: a `Transition` (the state to move to, why, and where the
job then is), or `Ignored` for a cluster's report that changes nothing. It never sees the
stored record: the hub records a transition into its wire status (hub/records.py), once, and
writes that with a compare-and-swap, retrying on conflict. Which changes are allowed is the
table `TRANSITIONS` (state -> {input -> next state}) and nothing else: the functions look their
move up in it, and refuse (the hub's own decisions) or ignore (a member cluster's reports) any
pair it does not list.

    PENDING --place--> DISPATCHED --agent--> ADMITTED --agent--> RUNNING --agent--> SUCCEEDED | FAILED
     | ^                   |                    |                   |
     | +------requeue------+--------------------+-------------------+
     |                     |                    |                   |
     |                     +--------fail--------+-------------------+--> FAILED (the hub gave up)
     |                     |                    |                   |
     |                     +-------cancel-------+-------------------+--> CANCELLING --agent--> CANCELLED
     +--cancel--> CANCELLED                                     (requeue or fail: CANCELLED)

Status updates from agents are idempotent by (generation, state): a stale generation or a
backwards move is ignored, so redelivered or reordered messages never regress a job or
resurrect it. The one way back is `requeue`, the hub's own decision: it clears the cluster
but keeps the generation, so the next dispatch bumps it and fences off whatever the old
cluster still reports. The hub's other decision about a job on a cluster is `give_up` (its
cluster was lost and its disconnect policy says fail): the job ends FAILED where it was. The
record has no attempt counter: the generation, which dispatch and nothing else bumps, counts
the dispatches (`attempts`).

The core speaks its own types only (see docs/architecture.md, "One language in the core"):
states are plain ints, the same numbers as the wire's JobState (tests/hub/test_states.py
checks that they never drift), and a dispatch carries placement's own Assignment and Score.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, NamedTuple

from fedplane.core.model import Assignment
from fedplane.core.placement import Score, Verdict


class S:
    """The job states, as plain ints: the wire's JobState numbers.

    Class attributes rather than an Enum: the hub reads states several times per job, and an
    Enum member costs a Python-level lookup and hash each time.
    """

    JOB_STATE_UNSPECIFIED = 0
    PENDING = 1
    DISPATCHED = 2
    ADMITTED = 3
    RUNNING = 4
    SUCCEEDED = 5
    FAILED = 6
    CANCELLING = 7
    CANCELLED = 8


# Each state's name, as the wire names it.
NAMES: Final[Mapping[int, str]] = {value: name for name, value in vars(S).items() if name.isupper()}


class On:
    """The inputs of the table: four decisions of the hub's, and the states clusters report.

    Plain strings rather than an Enum: an Enum member hashes in Python code, and the table is
    looked up for every status update.
    """

    PLACE = "place"  # placement chose a cluster: dispatch()
    CANCEL = "cancel"  # a user asked: request_cancel()
    REQUEUE = "requeue"  # the cluster was lost, or the job preempted: requeue()
    FAIL = "fail"  # the hub gave up on the job where it is (its cluster lost): give_up()
    # The agent stopped the workload itself, cut off from the hub past the job's fence: the
    # job must run again elsewhere. Reported as CANCELLED with reason FENCED.
    FENCED = "FENCED"
    # A member cluster reported its workload in this state: apply_update().
    ADMITTED = "ADMITTED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


# state: {input: next state}. In each row: what the cluster reports, then the hub's decisions.
# A pair not listed is refused (dispatch, request_cancel, requeue, give_up raise TransitionError) or,
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
        On.CANCEL: S.CANCELLING, On.REQUEUE: S.PENDING, On.FAIL: S.FAILED, On.FENCED: S.PENDING,
    },
    S.ADMITTED: {
        On.RUNNING: S.RUNNING,
        On.SUCCEEDED: S.SUCCEEDED, On.FAILED: S.FAILED, On.CANCELLED: S.CANCELLED,
        On.CANCEL: S.CANCELLING, On.REQUEUE: S.PENDING, On.FAIL: S.FAILED, On.FENCED: S.PENDING,
    },
    S.RUNNING: {
        On.SUCCEEDED: S.SUCCEEDED, On.FAILED: S.FAILED, On.CANCELLED: S.CANCELLED,
        On.CANCEL: S.CANCELLING, On.REQUEUE: S.PENDING, On.FAIL: S.FAILED, On.FENCED: S.PENDING,
    },
    # Only the workload's end still counts, whichever way it ended. Cancelling again re-sends
    # the delete and changes nothing. Requeued or given up (its cluster is gone), the job was
    # cancelled: it must not run again.
    S.CANCELLING: {
        On.SUCCEEDED: S.SUCCEEDED, On.FAILED: S.FAILED, On.CANCELLED: S.CANCELLED,
        On.CANCEL: S.CANCELLING, On.REQUEUE: S.CANCELLED, On.FAIL: S.CANCELLED, On.FENCED: S.CANCELLED,
    },
    S.SUCCEEDED: {},
    S.FAILED: {},
    S.CANCELLED: {},
}
# fmt: on

# The reason of an agent's CANCELLED report for a workload it stopped itself, cut off from the
# hub for longer than the job's fence (agent.decisions.FENCED_REASON is the same string).
FENCED = "Fenced"

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


class TransitionError(ValueError):
    """The requested change is not allowed from the job's current state."""


# The machine's inputs and decisions are immutable values, NamedTuples rather than frozen
# dataclasses: the hub makes a few per job on its hot paths (a placement round, a status
# batch, an orphan query), and a frozen dataclass costs about twice as much to build (each
# field goes through object.__setattr__).


class DispatchState(NamedTuple):
    """What the machine decides on: a job's state, and the cluster and generation holding it
    (no cluster, generation 0, before its first dispatch)."""

    state: int
    cluster: str = ""
    generation: int = 0


class Transition(NamedTuple):
    """A move of a job's record: to `state`, for `reason` and `message`, after which the job
    is at `cluster` and `generation` (the record's history notes both with the move).

    When `replaces_placement` is set, what placement decided is replaced too: dispatch sets
    the chosen cluster's node assignments and score, a requeue clears them (no assignments, no
    score). Other moves keep the record's.
    """

    state: int
    reason: str
    message: str
    cluster: str
    generation: int
    replaces_placement: bool = False
    assignments: tuple[Assignment, ...] = ()
    score: Score | None = None

    @property
    def after(self) -> DispatchState:
        """The job's dispatch state once the move is made: what the next decision starts from."""
        return DispatchState(self.state, self.cluster, self.generation)


class Ignored(NamedTuple):
    """A cluster's report that changes nothing, and why."""

    why: str


class CancelOutcome(NamedTuple):
    # The move, or None when the job is already cancelling (nothing changes).
    transition: Transition | None
    # True when the member cluster must be told to delete the workload.
    send_delete: bool


def state_name(state: int) -> str:
    # The wire's enums are open: a newer agent may report a value this hub does not know.
    name = NAMES.get(state)
    return name if name is not None else f"JobState({state})"


def next_state(state: int, on: str) -> int | None:
    """Where `on` moves a job that is in `state`, or None if the table does not allow it."""
    return TRANSITIONS.get(state, _NO_MOVES).get(on)


def _move(current: DispatchState, state: int, reason: str, message: str) -> Transition:
    """A move that leaves the job where it is (its cluster, generation and placement)."""
    return Transition(state, reason, message, current.cluster, current.generation)


_SUBMITTED = Transition(S.PENDING, "Submitted", "", "", 0)


def new_pending() -> Transition:
    """A new job's first move: into PENDING, on no cluster, at generation 0."""
    return _SUBMITTED


def attempts(current: DispatchState) -> int:
    """How many times the job was dispatched: its generation, which only dispatch bumps."""
    return current.generation


def dispatch(current: DispatchState, verdict: Verdict) -> Transition:
    """PENDING -> DISPATCHED on the verdict's cluster under the next generation.

    `verdict` is placement's choice as placement returned it (`Decision.chosen`): its node
    assignments and score go into the record with the move.
    """
    state = next_state(current.state, On.PLACE)
    if state is None:
        raise TransitionError(f"cannot dispatch a job that is {state_name(current.state)}")
    if not verdict.feasible:
        raise ValueError(f"cannot dispatch to {verdict.cluster}: the job does not fit there")
    cluster = verdict.cluster
    return Transition(
        state,
        "Placed",
        f"dispatched to {cluster}",
        cluster,
        current.generation + 1,
        True,
        tuple(verdict.assignments),
        verdict.score,
    )


def apply_update(
    current: DispatchState,
    cluster: str,
    generation: int,
    state: int,
    *,
    reason: str = "",
    message: str = "",
) -> Transition | Ignored:
    """Take a member cluster's status report, if it is current and the table takes it.

    Never raises: a report that cannot apply is answered with why, since an exception would
    have its message redelivered forever.
    """
    if generation != current.generation or cluster != current.cluster:
        return Ignored(f"stale: job is at {current.cluster}/{current.generation}")
    on = REPORTS.get(state)
    if on == On.CANCELLED and reason == FENCED:
        on = On.FENCED
    target = None if on is None else next_state(current.state, on)
    if target is None:
        return Ignored(_why_ignored(current.state, state))
    if target == S.PENDING:
        # Fenced by its agent: run it again elsewhere, as a requeue does.
        return Transition(target, reason, message, "", current.generation, replaces_placement=True)
    return _move(current, target, reason, message)


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


def request_cancel(current: DispatchState, reason: str) -> CancelOutcome:
    """Cancel at once if nothing runs yet, or ask the cluster to delete the workload.

    Cancelling a job that is already cancelling makes no move (the transition is None), with
    the delete to be sent again.
    """
    state = next_state(current.state, On.CANCEL)
    if state is None:
        if current.state in TERMINAL:
            raise TransitionError(f"job already {state_name(current.state)}")
        raise TransitionError(f"cannot cancel a job that is {state_name(current.state)}")
    if state == current.state:
        return CancelOutcome(None, True)
    message = reason or "cancelled by user"
    if state == S.CANCELLING:
        return CancelOutcome(_move(current, state, "CancelRequested", message), True)
    return CancelOutcome(_move(current, state, "Cancelled", message), False)


def requeue(current: DispatchState, reason: str, *, message: str = "") -> Transition:
    """Take the job off its cluster (lost, or the job preempted there): back to PENDING.

    Allowed from DISPATCHED, ADMITTED and RUNNING. The cluster, its assignments and the
    placement score are cleared; the generation (and the record's history) are kept, so the
    next dispatch bumps the generation (the old cluster's reports go stale, and `attempts`
    counts on); the record keeps its first start. A CANCELLING job becomes CANCELLED instead:
    it is wanted nowhere, and it keeps its cluster and generation, so that a late report finds
    it finished and its workload an orphan. `reason` is machine-readable ("ClusterLost",
    "Preempted").
    """
    state = next_state(current.state, On.REQUEUE)
    if state is None:
        raise TransitionError(f"cannot requeue a job that is {state_name(current.state)}")
    if state != S.PENDING:
        return _move(
            current, state, reason, message or f"cancel finished without word from {current.cluster}"
        )
    return Transition(
        state,
        reason,
        message or f"requeued from {current.cluster}",
        "",
        current.generation,
        replaces_placement=True,
    )


def give_up(current: DispatchState, reason: str, message: str = "") -> Transition:
    """End a job on a cluster as FAILED where it is, without word from the cluster (its cluster
    was lost and its disconnect policy says fail).

    Allowed from DISPATCHED, ADMITTED and RUNNING; a CANCELLING job becomes CANCELLED instead
    (what was asked of it). The job keeps its cluster, generation and placement, so the record
    says where it last ran, a late report from there finds it finished, and a delete can be
    addressed to that very dispatch. `reason` is machine-readable ("ClusterLost").
    """
    state = next_state(current.state, On.FAIL)
    if state is None:
        raise TransitionError(f"cannot fail a job that is {state_name(current.state)}")
    if not message:
        message = (
            f"cancel finished without word from {current.cluster}"
            if state == S.CANCELLED
            else f"given up on {current.cluster}"
        )
    return _move(current, state, reason, message)


def is_terminal(state: int) -> bool:
    return state in TERMINAL


def is_orphan(current: DispatchState | None, cluster: str, generation: int) -> bool:
    """Whether a workload found in `cluster` at `generation` is one the hub no longer wants there.

    Unknown jobs (None: the caller must know the job is gone, not merely not yet seen), jobs
    now held by another cluster or an older generation's workload (a requeued job is held by
    none), and cancelled jobs are orphans; a workload of a newer generation than the record is
    not judged; finished jobs are not, so their objects (and
    logs) stay until cleaned up by TTL.
    """
    if current is None:
        return True
    if generation > current.generation:
        # Only a dispatch makes a generation: the record asked about is behind (a replica whose
        # table lags etcd), and must not judge a workload newer than itself.
        return False
    if current.cluster != cluster or current.generation != generation:
        return True
    return current.state in (S.CANCELLED, S.PENDING)
