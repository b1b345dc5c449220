"""`python -m fedplane.bench.failover`: the smallest real run (one leader kill with a 2 s lease,
one cluster lost with 2 s / 5 s thresholds), the arithmetic that turns the jobs' records into
its checks, and its refusals.

The bounds are the design's (docs/architecture.md): a dead leader's lease cannot expire before
two thirds of its TTL after the kill, nor a silent cluster's before its lost threshold after its
last heartbeat, so figures under those bounds are not measurements of a takeover at all.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console

from fedplane.bench import failover
from fedplane.bench.failover import FailoverParams
from fedplane.v1 import types_pb2 as pb

LEASE = 2.0
UNKNOWN = 2.0
LOST = 5.0


@pytest.mark.e2e
def test_smallest_run_measures_a_takeover_and_a_lost_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "failover.json"
    failover.main(["--rounds", "1", "--leases", f"{LEASE:g}", "--json", str(out)])  # exits only on failure
    result = json.loads(out.read_text())
    assert result["ok"] is True

    (leader,) = result["failover"]
    (kill,) = leader["rounds"]
    assert leader["lease_s"] == LEASE and kill["round"] == 1
    assert {kill["killed"], kill["new_leader"]} == {"hub-a", "hub-b"}
    assert kill["fencing_revision"]["after"] > kill["fencing_revision"]["before"] > 0
    for figure in ("status_names_new_leader_s", "leader_since_s", "first_dispatch_s"):
        assert LEASE * 2 / 3 - 0.2 <= kill[figure] < LEASE + 3, (figure, kill[figure])
        assert leader[figure] == {"min": kill[figure], "median": kill[figure], "max": kill[figure]}
    # The new leader dispatches once it leads, not before.
    assert kill["first_dispatch_s"] >= kill["leader_since_s"] - 0.05
    checks = leader["integrity"]
    assert checks["accepted"] == checks["found"] == leader["submissions"]["accepted"] > 20
    assert checks["lost"] == checks["dispatched_twice"] == checks["ran_twice"] == 0
    assert leader["submissions"]["given_up"] == 0

    (lost,) = result["cluster_lost"]
    assert (lost["unknown_after_s"], lost["lost_after_s"], lost["requeue_after_s"]) == (UNKNOWN, LOST, 0.0)
    assert UNKNOWN - 0.1 <= lost["unknown_s"] < LOST
    for figure in ("lost_s", "lost_recorded_s"):
        assert LOST - 0.1 <= lost[figure] < LOST + 5, (figure, lost[figure])
    assert lost["requeue_reasons"] == ["ClusterLost"]
    # Requeued once lost (never before), and running on the other cluster soon after.
    assert lost["requeued_s"]["first"] >= lost["lost_recorded_s"] - 0.05
    assert lost["requeued_s"]["first"] <= lost["running_elsewhere_s"]["first"]
    assert lost["running_elsewhere_s"]["last"] < LOST + 5
    assert lost["other_cluster"] != lost["lost_cluster"]
    checks = lost["integrity"]
    assert checks["accepted"] == checks["found"] == lost["jobs"] == FailoverParams().lost_jobs
    assert checks["lost"] == checks["dispatched_twice"] == checks["ran_twice"] == 0

    assert result["expected_defaults"]["lost_after_s"]["min"] == 60.0
    printed = capsys.readouterr().out
    assert "Leader failover" in printed and "Cluster lost" in printed and "No job lost" in printed
    assert f"{kill['first_dispatch_s']:.2f}" in printed


# -- the checks' arithmetic -----------------------------------------------------------------------


def stamp(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def job(job_id: str, generation: int, *steps: tuple[pb.JobState.ValueType, float, str]) -> pb.Job:
    """A job whose history is (state, time, cluster) steps."""
    history = [
        pb.Transition(
            state=state, time=stamp(at), cluster=cluster, reason="ClusterLost" if state == pb.PENDING else ""
        )
        for state, at, cluster in steps
    ]
    return pb.Job(id=job_id, status=pb.JobStatus(state=steps[-1][0], generation=generation, history=history))


def test_a_second_dispatch_without_a_requeue_is_counted_and_one_after_a_requeue_is_not() -> None:
    once = job("once", 1, (pb.PENDING, 1, ""), (pb.DISPATCHED, 2, "a"), (pb.RUNNING, 3, "a"))
    requeued = job(
        "requeued", 2, (pb.PENDING, 1, ""), (pb.DISPATCHED, 2, "a"), (pb.PENDING, 8, ""), (pb.RUNNING, 9, "b")
    )
    twice = job("twice", 2, (pb.PENDING, 1, ""), (pb.DISPATCHED, 2, "a"), (pb.RUNNING, 3, "a"))
    assert [failover.dispatched_twice(j) for j in (once, requeued, twice)] == [False, False, True]
    assert failover.requeue_of(requeued) == (8.0, "ClusterLost") and failover.requeue_of(once) is None
    assert failover.transition_time(requeued, pb.RUNNING, cluster="b") == 9.0


def test_first_dispatch_after_the_kill_ignores_the_dead_leaders_dispatches() -> None:
    jobs = [
        job("before", 1, (pb.PENDING, 1, ""), (pb.DISPATCHED, 4.9, "a")),
        job("later", 1, (pb.PENDING, 5.5, ""), (pb.DISPATCHED, 7.5, "a")),
        job("first", 1, (pb.PENDING, 4.0, ""), (pb.DISPATCHED, 7.2, "b")),
        job("pending", 1, (pb.PENDING, 6.0, "")),
    ]
    first = failover.first_dispatch_after(jobs, 5.0)
    assert first is not None and first[0] == pytest.approx(7.2) and first[1] == "first"
    assert failover.first_dispatch_after(jobs[:1], 5.0) is None


def test_integrity_counts_missing_jobs_and_jobs_started_more_than_dispatched(tmp_path: Path) -> None:
    ledger = tmp_path / "a.jsonl"
    lines = [
        {"event": "running", "job_id": "x", "cluster": "a", "generation": 1},
        {"event": "running", "job_id": "x", "cluster": "b", "generation": 1},  # a second copy
        {"event": "running", "job_id": "y", "cluster": "a", "generation": 1},
        {"event": "running", "job_id": "y", "cluster": "a", "generation": 1},  # a replayed line
        {"event": "created", "job_id": "z", "cluster": "a", "generation": 1},
    ]
    ledger.write_text("".join(json.dumps(line) + "\n" for line in lines))
    started = failover.starts([ledger])
    assert started == {"x": {("a", 1), ("b", 1)}, "y": {("a", 1)}}
    jobs = {name: job(name, 1, (pb.PENDING, 1, ""), (pb.RUNNING, 2, "a")) for name in ("x", "y", "z")}
    checks = failover.integrity(["x", "y", "z", "gone"], jobs, started)
    assert (checks["lost"], checks["dispatched_twice"], checks["ran_twice"]) == (1, 0, 1)
    assert checks["examples"]["lost"] == ["gone"] and checks["examples"]["ran_twice"] == ["x"]


def test_spread_and_the_defaults_by_formula() -> None:
    assert failover.spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert failover.spread([]) == {"min": None, "median": None, "max": None}
    d = failover.expected_defaults()
    # 5 s lease; 15 s unknown (renewal round 3.75 s); 60 s lost; 120 s requeue after.
    assert d["takeover_s"] == {"min": pytest.approx(10 / 3, abs=0.001), "max": 6.0}
    assert d["lost_after_s"] == {"min": 60.0, "max": 64.25}
    assert d["running_elsewhere_s"]["min"] == 180.0


def test_render_flags_a_failed_check() -> None:
    checks = {"accepted": 10, "found": 9, "lost": 1, "dispatched_twice": 0, "ran_twice": 0}
    spread = {"min": 1.5, "median": 1.6, "max": 1.7}
    result = {
        "failover": [
            {
                "lease_s": 2.0,
                "rounds": [{}],
                "status_names_new_leader_s": spread,
                "first_dispatch_s": spread,
                "expected": {"min": 1.33, "max": 2.75},
                "integrity": checks,
            }
        ],
        "cluster_lost": [],
        "expected_defaults": failover.expected_defaults(),
        "ok": False,
    }
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(failover.render(result))
    text = console.export_text()
    assert "1.50/1.60/1.70" in text and "A CHECK FAILED" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--leases", "1"], "below etcd's shortest lease"),
        (["--rounds", "0"], "--rounds"),
        (["--clusters", "1"], "--clusters"),
        (["--unknown-after", "6"], "need 0 < unknown < lost"),
        (["--leases", "two"], "comma-separated"),
    ],
)
def test_nonsense_is_refused_before_anything_starts(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        failover.parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
