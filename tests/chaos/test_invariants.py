"""The chaos checker on hand-made histories: a clean run passes, and each broken invariant is caught."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedplane.chaos import invariants
from fedplane.chaos.invariants import (
    ADMITTED,
    CANCELLED,
    CANCELLING,
    DISPATCHED,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    Change,
    Result,
    Run,
)

History = dict[str, list[Change]]


def history(job_id: str, *writes: tuple[int, str, int], start: int = 10) -> History:
    """A job's status writes as (state, cluster, generation), at revisions from `start` on."""
    return {
        job_id: [
            Change(start + i, job_id, state, cluster, generation)
            for i, (state, cluster, generation) in enumerate(writes)
        ]
    }


def ran(
    job_id: str, cluster: str, generation: int, start: float, end: float | None, outcome: str
) -> list[Run]:
    runs = [
        Run(start - 0.1, cluster, job_id, generation, "created"),
        Run(start, cluster, job_id, generation, "running"),
    ]
    if end is not None:
        event = "deleted" if outcome == "CANCELLED" else "ended"
        runs.append(Run(end, cluster, job_id, generation, event, outcome))
    return runs


CLEAN = history(
    "j1",
    (PENDING, "", 0),
    (DISPATCHED, "a", 1),
    (ADMITTED, "a", 1),
    (RUNNING, "a", 1),
    (SUCCEEDED, "a", 1),
)
# Requeued off a lost cluster and run to success elsewhere; the old copy deleted first.
REQUEUED = history(
    "j2",
    (PENDING, "", 0),
    (DISPATCHED, "edge", 1),
    (RUNNING, "edge", 1),
    (PENDING, "", 1),
    (DISPATCHED, "b", 2),
    (RUNNING, "b", 2),
    (SUCCEEDED, "b", 2),
    start=100,
)
CLEAN_LEDGER = [
    *ran("j1", "a", 1, 1.0, 2.0, "SUCCEEDED"),
    *ran("j2", "edge", 1, 1.0, 5.0, "CANCELLED"),
    *ran("j2", "b", 2, 6.0, 8.0, "SUCCEEDED"),
]


def by_name(results: Sequence[Result]) -> dict[str, Result]:
    return {r.name: r for r in results}


def test_a_clean_run_with_a_requeue_holds_every_invariant() -> None:
    results = invariants.check_all(
        ["j1", "j2"],
        CLEAN | REQUEUED,
        CLEAN_LEDGER,
        specs={"j1": "k1", "j2": "k2"},
        keys=["k1", "k2"],
    )
    assert [r.name for r in results if not r.holds] == []
    checks = by_name(results)
    assert checks["no accepted job lost"].counts["finished"] == 2
    assert checks["no state moving backwards"].counts["requeues"] == 1
    assert checks["no job running in two clusters at one time"].counts["run_again_later"] == 1
    assert checks["at most one terminal state per job"].counts["succeeded"] == 2


# -- no accepted job lost ---------------------------------------------------------------------------


def test_an_accepted_job_missing_from_etcd_is_lost() -> None:
    result = invariants.no_job_lost(["j1", "ghost"], CLEAN)
    assert not result.holds
    assert result.counts["lost"] == 1
    assert "ghost" in result.examples[0]


def test_an_accepted_job_not_terminal_is_stuck_unless_its_cluster_is_down() -> None:
    running = history("j3", (PENDING, "", 0), (DISPATCHED, "a", 1), (RUNNING, "a", 1))
    stuck = invariants.no_job_lost(["j3"], running)
    assert not stuck.holds and stuck.counts["stuck"] == 1
    waiting = invariants.no_job_lost(["j3"], running, waiting_on=frozenset({"a"}))
    assert waiting.holds and waiting.counts["waiting"] == 1


def test_a_pending_job_is_stuck_even_with_a_cluster_down() -> None:
    pending = history("j4", (PENDING, "", 0))
    assert not invariants.no_job_lost(["j4"], pending, waiting_on=frozenset({"a"})).holds


# -- no job running in two clusters at one time --------------------------------------------------------


def test_overlapping_runs_on_two_clusters_are_caught() -> None:
    ledger = [*ran("j", "a", 1, 1.0, 5.0, "CANCELLED"), *ran("j", "b", 2, 4.9, 8.0, "SUCCEEDED")]
    result = invariants.no_double_run(ledger)
    assert not result.holds
    assert result.counts["run_twice_at_once"] == 1
    assert "a" in result.examples[0] and "b" in result.examples[0]


def test_overlapping_generations_on_one_cluster_are_caught() -> None:
    ledger = [*ran("j", "a", 1, 1.0, 5.0, "CANCELLED"), *ran("j", "a", 2, 3.0, 8.0, "SUCCEEDED")]
    assert invariants.no_double_run(ledger).counts["run_twice_at_once"] == 1


def test_a_copy_that_never_ended_overlaps_every_later_run() -> None:
    ledger = [*ran("j", "edge", 1, 1.0, None, ""), *ran("j", "b", 2, 60.0, 61.0, "SUCCEEDED")]
    result = invariants.no_double_run(ledger)
    assert not result.holds
    assert "still running" in result.examples[0]
    assert invariants.intervals(ledger)["j"][0].end == math.inf


def test_back_to_back_runs_hold_and_a_second_completion_is_noted() -> None:
    ledger = [*ran("j", "a", 1, 1.0, 2.0, "SUCCEEDED"), *ran("j", "b", 2, 2.0, 3.0, "SUCCEEDED")]
    result = invariants.no_double_run(ledger)
    assert result.holds
    assert result.counts["run_again_later"] == 1
    assert result.counts["completed_twice"] == 1
    assert "completed more than once" in result.notes[0]


# -- no state moving backwards -----------------------------------------------------------------------


def backwards(*writes: tuple[int, str, int]) -> Result:
    return invariants.no_backwards(history("j", *writes))


def test_a_state_moving_back_is_caught() -> None:
    result = backwards((PENDING, "", 0), (DISPATCHED, "a", 1), (RUNNING, "a", 1), (ADMITTED, "a", 1))
    assert not result.holds
    assert "moved back" in result.examples[0]


def test_a_decreasing_generation_is_caught() -> None:
    result = backwards((PENDING, "", 0), (DISPATCHED, "a", 2), (PENDING, "", 2), (DISPATCHED, "b", 1))
    assert not result.holds


def test_a_requeue_that_loses_the_generation_is_caught() -> None:
    result = backwards((PENDING, "", 0), (DISPATCHED, "a", 2), (RUNNING, "a", 2), (PENDING, "", 1))
    assert "generation decreased" in result.examples[0]


def test_a_dispatch_without_a_new_generation_is_caught() -> None:
    result = backwards((PENDING, "", 0), (DISPATCHED, "a", 1), (PENDING, "", 1), (DISPATCHED, "b", 1))
    assert "without a new generation" in result.examples[0]


def test_a_cluster_change_within_a_generation_is_caught() -> None:
    result = backwards((PENDING, "", 0), (DISPATCHED, "a", 1), (RUNNING, "b", 1))
    assert "changed cluster" in result.examples[0]


def test_a_new_generation_that_skips_pending_is_caught() -> None:
    result = backwards((PENDING, "", 0), (DISPATCHED, "a", 1), (RUNNING, "a", 1), (DISPATCHED, "b", 2))
    assert not result.holds


def test_a_cancelling_job_is_never_requeued() -> None:
    result = backwards((PENDING, "", 0), (DISPATCHED, "a", 1), (CANCELLING, "a", 1), (PENDING, "", 1))
    assert not result.holds


def test_cancel_paths_and_a_give_up_hold() -> None:
    assert backwards((PENDING, "", 0), (DISPATCHED, "a", 1), (CANCELLING, "a", 1), (CANCELLED, "a", 1)).holds
    assert backwards((PENDING, "", 0), (CANCELLED, "", 0)).holds
    assert backwards((PENDING, "", 0), (DISPATCHED, "a", 1), (RUNNING, "a", 1), (FAILED, "a", 1)).holds
    # A rewrite of the same state (history only) is no move.
    assert backwards((PENDING, "", 0), (DISPATCHED, "a", 1), (RUNNING, "a", 1), (RUNNING, "a", 1)).holds


# -- at most one terminal state per job -------------------------------------------------------------


def terminal(*writes: tuple[int, str, int]) -> Result:
    return invariants.one_terminal(history("j", *writes))


def test_two_terminal_states_are_caught() -> None:
    result = terminal((PENDING, "", 0), (DISPATCHED, "a", 1), (SUCCEEDED, "a", 1), (FAILED, "a", 1))
    assert not result.holds
    assert result.counts["double_terminal"] == 1


def test_two_successes_from_different_clusters_are_caught() -> None:
    result = terminal(
        (PENDING, "", 0),
        (DISPATCHED, "a", 1),
        (SUCCEEDED, "a", 1),
        (PENDING, "", 1),
        (DISPATCHED, "b", 2),
        (SUCCEEDED, "b", 2),
    )
    assert result.counts["double_terminal"] == 1


def test_a_terminal_job_moving_on_is_caught() -> None:
    result = terminal((PENDING, "", 0), (DISPATCHED, "a", 1), (CANCELLED, "a", 1), (RUNNING, "a", 1))
    assert not result.holds
    assert result.counts["left_terminal"] == 1


def test_rewriting_the_same_terminal_state_is_one_terminal_state() -> None:
    assert terminal((PENDING, "", 0), (DISPATCHED, "a", 1), (SUCCEEDED, "a", 1), (SUCCEEDED, "a", 1)).holds


# -- every reported success happened, one job per key, orphans ---------------------------------------


def test_a_success_the_ledgers_do_not_show_is_caught() -> None:
    assert invariants.successes_happened(CLEAN, CLEAN_LEDGER).holds
    # Its cluster's workload was deleted, yet the hub says it succeeded.
    ledger = ran("j1", "a", 1, 1.0, 2.0, "CANCELLED")
    result = invariants.successes_happened(CLEAN, ledger)
    assert not result.holds and result.counts["unbacked"] == 1
    # A success from another generation does not count for this one.
    assert not invariants.successes_happened(CLEAN, ran("j1", "a", 2, 1.0, 2.0, "SUCCEEDED")).holds


def test_two_jobs_for_one_idempotency_key_are_caught() -> None:
    result = invariants.one_job_per_key({"j1": "k1", "j2": "k1", "other": "not-ours"}, ["k1"])
    assert not result.holds
    assert result.counts["duplicated"] == 1


def test_a_workload_left_running_for_a_finished_or_moved_job_is_an_orphan() -> None:
    assert invariants.no_orphans(CLEAN | REQUEUED, CLEAN_LEDGER).holds
    left = [*CLEAN_LEDGER, *ran("j1", "a", 2, 3.0, None, ""), *ran("j2", "edge", 0, 1.0, None, "")]
    result = invariants.no_orphans(CLEAN | REQUEUED, left)
    assert not result.holds
    assert result.counts["orphans"] == 2
    # The job's own live workload is no orphan.
    live = history("j5", (PENDING, "", 0), (DISPATCHED, "a", 1), (RUNNING, "a", 1))
    assert invariants.no_orphans(live, ran("j5", "a", 1, 1.0, None, "")).holds


def test_a_resumed_leader_that_dispatched_or_never_stepped_down_is_caught() -> None:
    quiet = {"replica": "hub-0", "taken_over_by": "hub-1", "logged_stopped_leading": True}
    assert invariants.deposed_leader_quiet([quiet]).holds
    wrote = quiet | {"dispatched_while_deposed": 2}
    assert invariants.deposed_leader_quiet([wrote]).counts["dispatched_while_deposed"] == 2
    silent = quiet | {"logged_stopped_leading": False}
    assert not invariants.deposed_leader_quiet([silent]).holds
    # Paused with no other replica to take over, it was never deposed: nothing to hold it to.
    alone = {"replica": "hub-0", "taken_over_by": ""}
    assert invariants.deposed_leader_quiet([alone]).counts["pauses"] == 0


def test_a_job_cancelled_without_a_users_cancel_is_caught() -> None:
    deleted = {
        "j3": [
            Change(10, "j3", PENDING, "", 0, "Submitted"),
            Change(11, "j3", DISPATCHED, "a", 1, "Placed"),
            Change(12, "j3", RUNNING, "a", 1, "Started"),
            Change(13, "j3", CANCELLED, "a", 1, "Deleted"),
        ]
    }
    result = invariants.cancelled_only_when_asked(deleted)
    assert not result.holds and result.counts["unasked"] == 1

    asked = {
        "j4": [
            Change(10, "j4", PENDING, "", 0, "Submitted"),
            Change(11, "j4", DISPATCHED, "a", 1, "Placed"),
            Change(12, "j4", CANCELLING, "a", 1, "CancelRequested"),
            Change(13, "j4", CANCELLED, "a", 1, "Deleted"),
        ],
        "j5": [
            Change(10, "j5", PENDING, "", 0, "Submitted"),
            Change(11, "j5", CANCELLED, "", 0, "Cancelled"),
        ],
    }
    result = invariants.cancelled_only_when_asked(asked)
    assert result.holds and result.counts == {"cancelled": 2, "unasked": 0}
