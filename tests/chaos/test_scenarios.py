"""Chaos scenarios: hubs and agents as separate processes on real etcd and nats-server, a fault
injected under a steady stream of submissions, and the invariants checked afterwards on etcd's
full status history and the simulated clusters' ledgers (see fedplane.chaos.invariants).

Select them with `pytest -m chaos`; they run in the default suite too.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest

from fedplane.chaos import invariants, scenarios
from fedplane.chaos.invariants import PENDING, SUCCEEDED, TERMINAL, Change
from fedplane.chaos.scenarios import Outcome

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]


async def run(name: str, tmp_path: Path) -> Outcome:
    outcome = await scenarios.run(scenarios.SCENARIOS[name], tmp_path / name, settle_within=25)
    assert outcome.ok, outcome.failures()
    assert outcome.load["accepted"] >= 20
    assert outcome.load["rejected"] == 0 and outcome.load["unconfirmed"] == 0
    return outcome


def final(changes: Sequence[Change]) -> Change:
    return [c for c in changes if c.state][-1]


def requeued(outcome: Outcome) -> dict[str, list[Change]]:
    return {
        job_id: changes
        for job_id, changes in outcome.history.items()
        if any(a.cluster and b.state == PENDING for a, b in itertools.pairwise(changes))
    }


def ran_on(outcome: Outcome, cluster: str) -> dict[str, list[invariants.Interval]]:
    out: dict[str, list[invariants.Interval]] = {}
    for job_id, runs in invariants.intervals(outcome.runs).items():
        mine = [r for r in runs if r.cluster == cluster]
        if mine:
            out[job_id] = mine
    return out


async def test_kill_the_leader_during_submissions_while_a_second_replica_runs(tmp_path: Path) -> None:
    outcome = await run("kill-leader", tmp_path)
    assert outcome.ha
    (takeover,) = outcome.observations["takeovers"]
    # Within the lease's life and a little: the lease is 2s.
    assert takeover["seconds"] < 6
    # Clients went on submitting through the replica that was left, without knowing who leads.
    assert outcome.load["by_replica"][takeover["to"]] > 0
    assert requeued(outcome) == {}


async def test_kill_the_only_hub_during_submissions_and_start_it_again(tmp_path: Path) -> None:
    outcome = await run("kill-hub", tmp_path)
    assert outcome.load["retried"] > 0  # submissions met the dead hub, and were retried
    assert all(final(c).generation == 1 for c in outcome.history.values())


async def test_kill_an_agent_mid_run_and_start_it_again(tmp_path: Path) -> None:
    outcome = await run("kill-agent", tmp_path)
    (kill,) = outcome.observations["agent_kills"]
    assert kill["workloads"] > 0, "the agent was killed with workloads in its cluster"
    # Its workloads ran on while it was down and were reported once it was back: no job moved.
    caught = [
        job_id
        for job_id, runs in ran_on(outcome, kill["agent"]).items()
        if any(r.start < kill["killed_at"] < r.end for r in runs)
    ]
    assert caught
    for job_id in caught:
        status = final(outcome.history[job_id])
        assert (status.state, status.cluster, status.generation) == (SUCCEEDED, kill["agent"], 1)
    assert requeued(outcome) == {}


async def test_cut_an_edge_site_off_for_less_than_its_lost_timeout(tmp_path: Path) -> None:
    outcome = await run("edge-short-cut", tmp_path)
    (cut,) = outcome.observations["cuts"]
    # No re-dispatch: every job ran once, at generation 1.
    assert requeued(outcome) == {}
    assert all(final(c).generation == 1 for c in outcome.history.values())
    # Jobs that ended at the edge site while it was cut off were reported after the link returned.
    ended_offline = [
        job_id
        for job_id, runs in ran_on(outcome, cut["agent"]).items()
        if any(cut["cut_at"] < r.end < cut["restored_at"] for r in runs)
    ]
    assert ended_offline, "some edge jobs ended during the cut"
    for job_id in ended_offline:
        terminal = next(c for c in outcome.history[job_id] if c.state in TERMINAL)
        assert terminal.cluster == cut["agent"]
        assert terminal.revision > cut["revision_before_restore"]


async def test_cut_an_edge_site_off_for_longer_than_its_lost_timeout(tmp_path: Path) -> None:
    outcome = await run("edge-long-cut", tmp_path)
    (cut,) = outcome.observations["cuts"]
    edge = cut["agent"]
    at_the_edge = {
        job_id: next(r for r in runs if r.start < cut["cut_at"] < r.end)
        for job_id, runs in ran_on(outcome, edge).items()
        if any(r.start < cut["cut_at"] < r.end for r in runs)
    }
    assert at_the_edge, "jobs were running at the edge site when it was cut off"
    # The old copies were deleted (fenced while cut off, or told on return), but for any that
    # ended by itself before its fence (then it ran twice, one run after the other).
    deleted = {job_id for job_id, old in at_the_edge.items() if old.outcome == "CANCELLED"}
    finished_offline = {job_id for job_id, old in at_the_edge.items() if old.outcome == "SUCCEEDED"}
    assert deleted and deleted | finished_offline == set(at_the_edge)
    # Re-dispatched per policy (requeue): one reported success each, from another cluster at a
    # new generation (a late success from the edge copy changed nothing).
    assert set(at_the_edge) <= set(requeued(outcome))
    for job_id in at_the_edge:
        status = final(outcome.history[job_id])
        assert status.state == SUCCEEDED and status.cluster != edge and status.generation >= 2
    double = next(r for r in outcome.results if r.name == "no job running in two clusters at one time")
    assert double.counts["completed_twice"] == len(finished_offline)


async def test_restart_nats_server_then_etcd(tmp_path: Path) -> None:
    # One federation for both restarts (each alone is a scenario of `fedplane chaos` too).
    outcome = await run("restart-nats-then-etcd", tmp_path)
    assert all(final(c).state == SUCCEEDED for c in outcome.history.values())


async def test_pause_the_leader_past_its_lease_and_resume_it(tmp_path: Path) -> None:
    outcome = await run("pause-leader", tmp_path)
    (pause,) = outcome.observations["pauses"]
    # Another replica took over while it was stopped, and once resumed it knew it no longer led.
    assert pause["taken_over_by"] and pause["taken_over_by"] != pause["replica"]
    assert pause["leader_after_resume"] != pause["replica"]
    assert pause["logged_stopped_leading"]
    assert pause["dispatched_while_deposed"] == 0
    # Whatever it tried to write afterwards changed nothing: the invariants held (run() checked).
    assert requeued(outcome) == {}
