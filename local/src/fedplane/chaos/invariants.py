"""The invariants a chaos run must keep, checked on what happened: pure functions of the jobs
the load generator saw accepted, every job's full status history from etcd (each write, in
revision order) and the simulated clusters' ledgers (what really ran where, by wall time).

Deliberately written from the rules as users state them, not from the hub's state machine
(fedplane.core.dispatch): an oracle that shared the code under test would share its bugs.

- no accepted job lost: every accepted job exists in etcd and ends in a terminal state, or is
  still waiting for a cluster that is down;
- no job running in two clusters at one time: no two [running, ended) intervals of one job in
  the ledgers overlap, whichever clusters and generations they belong to;
- no state moving backwards: a status only moves forward, except back to PENDING by a
  requeue, which keeps the generation; the generation never decreases, a dispatch raises it,
  and a job never changes cluster within a generation;
- at most one terminal state per job: once terminal, a job's status never changes again (so
  no job succeeds twice, nor on two clusters);
- every reported success happened: a SUCCEEDED in etcd names a cluster and generation whose
  ledger shows the workload ending successfully;
- one job per idempotency key;
- no orphaned workload: nothing still runs, once the run has settled, for a job that has
  finished or moved to another cluster or generation (the old copies are deleted on return).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# The wire's JobState numbers (kept literal: see the module docstring).
PENDING, DISPATCHED, ADMITTED, RUNNING = 1, 2, 3, 4
SUCCEEDED, FAILED, CANCELLING, CANCELLED = 5, 6, 7, 8
NAMES = {
    0: "DELETED",
    PENDING: "PENDING",
    DISPATCHED: "DISPATCHED",
    ADMITTED: "ADMITTED",
    RUNNING: "RUNNING",
    SUCCEEDED: "SUCCEEDED",
    FAILED: "FAILED",
    CANCELLING: "CANCELLING",
    CANCELLED: "CANCELLED",
}
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# How far along a job is: a status never goes to a lower rank, except PENDING by a requeue.
RANK = {
    PENDING: 0,
    DISPATCHED: 1,
    ADMITTED: 2,
    RUNNING: 3,
    CANCELLING: 4,
    SUCCEEDED: 5,
    FAILED: 5,
    CANCELLED: 5,
}
# How many examples of a broken invariant a result keeps.
EXAMPLES = 10


class Change(NamedTuple):
    """One write of a job's status key, as etcd recorded it (state 0: the key was deleted)."""

    revision: int
    job_id: str
    state: int
    cluster: str
    generation: int
    # The status's reason (why it is in this state), for the report.
    reason: str = ""


class Run(NamedTuple):
    """One line of a ledger: a workload event in a simulated cluster, at wall time."""

    time: float
    cluster: str
    job_id: str
    generation: int
    # created | running | ended | deleted
    event: str
    # The ending state's name, for ended and deleted.
    state: str = ""


@dataclass
class Result:
    name: str
    counts: dict[str, int]
    # The counts that must be zero for the invariant to hold.
    must_be_zero: tuple[str, ...]
    examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return all(self.counts.get(name, 0) == 0 for name in self.must_be_zero)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "holds": self.holds,
            "counts": self.counts,
            "examples": self.examples,
            "notes": self.notes,
        }


def _example(result: Result, text: str) -> None:
    if len(result.examples) < EXAMPLES:
        result.examples.append(text)


def name(state: int) -> str:
    return NAMES.get(state, str(state))


def _last_puts(history: Mapping[str, Sequence[Change]]) -> dict[str, Change]:
    out = {}
    for job_id, changes in history.items():
        puts = [c for c in changes if c.state]
        if puts:
            out[job_id] = puts[-1]
    return out


# -- no accepted job lost ---------------------------------------------------------------------------


def no_job_lost(
    accepted: Iterable[str],
    history: Mapping[str, Sequence[Change]],
    *,
    waiting_on: frozenset[str] = frozenset(),
) -> Result:
    """Every accepted job is in etcd and terminal, or waits on a cluster in `waiting_on` (down)."""
    last = _last_puts(history)
    result = Result(
        "no accepted job lost",
        Counter({"accepted": 0, "finished": 0, "lost": 0, "stuck": 0, "waiting": 0}),
        ("lost", "stuck"),
    )
    for job_id in sorted(set(accepted)):
        result.counts["accepted"] += 1
        status = last.get(job_id)
        if status is None:
            result.counts["lost"] += 1
            _example(result, f"{job_id}: accepted, but etcd has no status for it")
        elif status.state in TERMINAL:
            result.counts["finished"] += 1
        elif status.cluster and status.cluster in waiting_on:
            result.counts["waiting"] += 1
            result.notes.append(f"{job_id}: {name(status.state)} on {status.cluster}, which is down")
        else:
            result.counts["stuck"] += 1
            where = f" on {status.cluster}" if status.cluster else ""
            _example(
                result,
                f"{job_id}: still {name(status.state)}{where} (generation {status.generation})",
            )
    result.counts = dict(result.counts)
    return result


# -- no job running in two clusters at one time --------------------------------------------------------


class Interval(NamedTuple):
    start: float
    end: float  # math.inf while the workload runs
    cluster: str
    generation: int
    outcome: str


def intervals(ledger: Iterable[Run]) -> dict[str, list[Interval]]:
    """Each job's [running, ended or deleted) intervals, one per (cluster, generation) that ran."""
    started: dict[tuple[str, str, int], float] = {}
    ends: dict[tuple[str, str, int], tuple[float, str]] = {}
    for run in ledger:
        workload = (run.job_id, run.cluster, run.generation)
        if run.event == "running":
            started[workload] = min(run.time, started.get(workload, math.inf))
        elif run.event in ("ended", "deleted"):
            ends.setdefault(workload, (run.time, run.state))
    out: dict[str, list[Interval]] = defaultdict(list)
    for (job_id, cluster, generation), start in started.items():
        end, outcome = ends.get((job_id, cluster, generation), (math.inf, "RUNNING"))
        out[job_id].append(Interval(start, end, cluster, generation, outcome))
    for runs in out.values():
        runs.sort()
    return dict(out)


def no_double_run(ledger: Sequence[Run]) -> Result:
    """No two intervals of one job overlap, on two clusters or at two generations."""
    result = Result(
        "no job running in two clusters at one time",
        {"runs": 0, "jobs_run": 0, "run_twice_at_once": 0, "run_again_later": 0, "completed_twice": 0},
        ("run_twice_at_once",),
    )
    for job_id, runs in sorted(intervals(ledger).items()):
        result.counts["runs"] += len(runs)
        result.counts["jobs_run"] += 1
        if len(runs) > 1:
            result.counts["run_again_later"] += 1
        overlapped = False
        latest = runs[0]
        for run in runs[1:]:
            if run.start < latest.end:
                overlapped = True
                _example(
                    result,
                    f"{job_id}: ran on {latest.cluster} (generation {latest.generation}) until "
                    f"{_end(latest)} and on {run.cluster} (generation {run.generation}) from "
                    f"{run.start:.3f}",
                )
            if run.end > latest.end:
                latest = run
        if overlapped:
            result.counts["run_twice_at_once"] += 1
            result.counts["run_again_later"] -= 1
        if sum(1 for r in runs if r.outcome == "SUCCEEDED") > 1:
            result.counts["completed_twice"] += 1
            result.notes.append(f"{job_id}: completed more than once: {_where(runs)}")
    return result


def _end(run: Interval) -> str:
    return "now (still running)" if run.end == math.inf else f"{run.end:.3f}"


def _where(runs: Sequence[Interval]) -> str:
    return ", ".join(f"{r.cluster}/g{r.generation} {r.outcome}" for r in runs)


# -- no state moving backwards -----------------------------------------------------------------------


def no_backwards(history: Mapping[str, Sequence[Change]]) -> Result:
    result = Result(
        "no state moving backwards",
        {"jobs": 0, "writes": 0, "requeues": 0, "backwards": 0},
        ("backwards",),
    )
    for job_id, changes in sorted(history.items()):
        result.counts["jobs"] += 1
        puts = [c for c in changes if c.state]
        result.counts["writes"] += len(puts)
        highest = 0
        for before, after in itertools.pairwise(puts):
            why = _backwards(before, after, highest)
            highest = max(highest, before.generation)
            if why is None:
                if after.state == PENDING and before.state != PENDING:
                    result.counts["requeues"] += 1
                continue
            result.counts["backwards"] += 1
            _example(
                result,
                f"{job_id}: {_show(before)} -> {_show(after)} at revision {after.revision}: {why}",
            )
    return result


def _backwards(before: Change, after: Change, highest: int) -> str | None:
    """Why the move from `before` to `after` is not allowed, or None."""
    if before.state in TERMINAL:
        return None  # a move after a terminal state is the terminal invariant's to count
    if after.generation < before.generation:
        return "the generation decreased"
    if after.state == PENDING:
        if before.state == CANCELLING:
            return "a cancelling job went back to PENDING"
        return None  # a requeue: the generation is kept (or raised), checked above
    if after.state == DISPATCHED and before.state == PENDING:
        if after.generation <= max(highest, before.generation):
            return "dispatched without a new generation"
        return None
    if RANK.get(after.state, -1) < RANK.get(before.state, -1):
        return "moved back"
    if after.generation == before.generation and before.cluster and after.cluster != before.cluster:
        return "changed cluster within a generation"
    if after.generation > before.generation and before.state != PENDING:
        return "a new generation without going through PENDING"
    return None


def _show(change: Change) -> str:
    where = f"@{change.cluster}" if change.cluster else ""
    return f"{name(change.state)}{where}/g{change.generation}"


# -- at most one terminal state per job -------------------------------------------------------------


def one_terminal(history: Mapping[str, Sequence[Change]]) -> Result:
    """Once a job is terminal its status never changes again: no second terminal state (so no
    second success, nor one from another cluster or generation), and no way back from it."""
    result = Result(
        "at most one terminal state per job",
        {
            "terminal_jobs": 0,
            "succeeded": 0,
            "failed": 0,
            "cancelled": 0,
            "double_terminal": 0,
            "left_terminal": 0,
        },
        ("double_terminal", "left_terminal"),
    )
    for job_id, changes in sorted(history.items()):
        puts = [c for c in changes if c.state]
        terminal = next((c for c in puts if c.state in TERMINAL), None)
        if terminal is None:
            continue
        result.counts["terminal_jobs"] += 1
        later = [c for c in puts if c.revision > terminal.revision]
        first = (terminal.state, terminal.cluster, terminal.generation)
        changed = next((c for c in later if (c.state, c.cluster, c.generation) != first), None)
        if changed is None:
            result.counts[name(terminal.state).lower()] += 1
            if terminal.state != SUCCEEDED:
                result.notes.append(f"{job_id}: {_show(terminal)}: {terminal.reason or 'no reason given'}")
            continue
        again = any(c.state in TERMINAL for c in later if c is changed or c.revision > changed.revision)
        result.counts["double_terminal" if again else "left_terminal"] += 1
        _example(
            result,
            f"{job_id}: {_show(terminal)} at revision {terminal.revision}, then {_show(changed)} "
            f"at revision {changed.revision}",
        )
    return result


# -- nothing cancelled unless a user asked -------------------------------------------------------

# The reasons the hub writes when a user cancels: a job on a cluster (then CANCELLING), or a
# job that waits (then CANCELLED at once).
_USER_CANCEL = frozenset({"CancelRequested", "Cancelled"})


def cancelled_only_when_asked(history: Mapping[str, Sequence[Change]]) -> Result:
    """A job ends CANCELLED only after a user's cancel: one the system cancelled by itself (a
    workload deleted as an orphan while it ran, say) is a job lost to its user."""
    result = Result("nothing cancelled unless a user asked", {"cancelled": 0, "unasked": 0}, ("unasked",))
    for job_id, status in sorted(_last_puts(history).items()):
        if status.state != CANCELLED:
            continue
        result.counts["cancelled"] += 1
        if not any(c.reason in _USER_CANCEL for c in history[job_id] if c.state):
            result.counts["unasked"] += 1
            _example(result, f"{job_id}: {_show(status)}: {status.reason or 'no reason given'}, never asked")
    return result


# -- every reported success happened ---------------------------------------------------------------


def successes_happened(history: Mapping[str, Sequence[Change]], ledger: Sequence[Run]) -> Result:
    """A SUCCEEDED in etcd at (cluster, generation) has that workload's successful end in the ledgers."""
    ended = {
        (r.job_id, r.cluster, r.generation) for r in ledger if r.event == "ended" and r.state == "SUCCEEDED"
    }
    result = Result("every reported success happened", {"checked": 0, "unbacked": 0}, ("unbacked",))
    for job_id, status in sorted(_last_puts(history).items()):
        if status.state != SUCCEEDED:
            continue
        result.counts["checked"] += 1
        if (job_id, status.cluster, status.generation) not in ended:
            result.counts["unbacked"] += 1
            _example(
                result, f"{job_id}: SUCCEEDED on {status.cluster}/g{status.generation}, not in its ledger"
            )
    return result


# -- one job per idempotency key ------------------------------------------------------------------


def one_job_per_key(specs: Mapping[str, str], keys: Iterable[str]) -> Result:
    """`specs`: job id -> idempotency key as stored; `keys`: the keys the load generator used."""
    ours = set(keys)
    per_key = Counter(key for key in specs.values() if key in ours)
    result = Result(
        "one job per idempotency key",
        {"keys": len(ours), "stored": len(per_key), "duplicated": sum(1 for n in per_key.values() if n > 1)},
        ("duplicated",),
    )
    for key, n in sorted(per_key.items()):
        if n > 1:
            _example(result, f"key {key}: {n} jobs")
    return result


# -- no orphaned workload ---------------------------------------------------------------------------


def orphans(history: Mapping[str, Sequence[Change]], ledger: Sequence[Run]) -> list[str]:
    """Workloads still running in a cluster for a job that ended or lives elsewhere now."""
    last = _last_puts(history)
    out = []
    for job_id, runs in sorted(open_workloads(ledger).items()):
        status = last.get(job_id)
        for cluster, generation in sorted(runs):
            if (
                status is None
                or status.state in TERMINAL
                or (status.cluster, status.generation) != (cluster, generation)
            ):
                now = f"{_show(status)}" if status is not None else "gone"
                out.append(f"{job_id}: still running on {cluster}/g{generation}; the job is {now}")
    return out


def open_workloads(ledger: Iterable[Run]) -> dict[str, set[tuple[str, int]]]:
    """(cluster, generation) of each job's workloads created and not yet ended, by job."""
    live: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for run in sorted(ledger, key=lambda r: r.time):
        if run.event == "created":
            live[run.job_id].add((run.cluster, run.generation))
        elif run.event in ("ended", "deleted"):
            live[run.job_id].discard((run.cluster, run.generation))
    return {job_id: runs for job_id, runs in live.items() if runs}


def no_orphans(history: Mapping[str, Sequence[Change]], ledger: Sequence[Run]) -> Result:
    found = orphans(history, ledger)
    result = Result("no orphaned workload", {"orphans": len(found)}, ("orphans",))
    for text in found:
        _example(result, text)
    return result


# -- a deposed leader writes nothing --------------------------------------------------------------


def deposed_leader_quiet(pauses: Sequence[Mapping[str, Any]]) -> Result:
    """From the paused leaders' own logs once resumed (a status write names no writer in etcd):
    each logged that it stopped leading and dispatched nothing before leading again."""
    result = Result(
        "a paused leader writes nothing once deposed",
        {"pauses": 0, "dispatched_while_deposed": 0, "never_said_it_stopped": 0},
        ("dispatched_while_deposed", "never_said_it_stopped"),
    )
    for pause in pauses:
        if not pause.get("taken_over_by"):
            continue  # no other replica: it never was deposed
        result.counts["pauses"] += 1
        dispatched = int(pause.get("dispatched_while_deposed", 0))
        result.counts["dispatched_while_deposed"] += dispatched
        if dispatched:
            _example(result, f"{pause['replica']}: logged {dispatched} dispatches after it was resumed")
        if not pause.get("logged_stopped_leading"):
            result.counts["never_said_it_stopped"] += 1
            _example(result, f"{pause['replica']}: resumed, and never logged that it stopped leading")
    return result


# -- all of them -------------------------------------------------------------------------------------


def check_all(
    accepted: Iterable[str],
    history: Mapping[str, Sequence[Change]],
    ledger: Sequence[Run],
    *,
    specs: Mapping[str, str] | None = None,
    keys: Iterable[str] = (),
    waiting_on: frozenset[str] = frozenset(),
) -> list[Result]:
    results = [
        no_job_lost(accepted, history, waiting_on=waiting_on),
        no_double_run(ledger),
        no_backwards(history),
        one_terminal(history),
        cancelled_only_when_asked(history),
        successes_happened(history, ledger),
        no_orphans(history, ledger),
    ]
    if specs is not None:
        results.append(one_job_per_key(specs, keys))
    return results
