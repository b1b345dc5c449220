"""CLI and client behaviour that needs no real hub.

Error handling runs against nothing at all; the happy paths run against `FakeHub`, a tiny
in-process stand-in for the hub's gRPC API (jobs go PENDING -> RUNNING -> SUCCEEDED/FAILED on
timers), so no etcd, NATS or agent is involved.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from typer.testing import CliRunner

from fedplane.client import display
from fedplane.client.cli import app
from fedplane.client.sdk import FedplaneClient, FedplaneError
from fedplane.v1 import hub_pb2, hub_pb2_grpc
from fedplane.v1 import types_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
COMMANDS = [
    "submit",
    "get",
    "list",
    "watch",
    "cancel",
    "explain",
    "clusters",
    "cluster",
    "cordon",
    "uncordon",
    "hub",
    "agent",
    "up",
]

runner = CliRunner()


def closed_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env)


def assert_one_line_error(result: Any, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# -- no hub at all ------------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert "--hub" in result.stdout and "FEDPLANE_HUB" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout


def test_python_dash_m_runs_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedplane.client", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "submit" in proc.stdout


def test_submit_of_a_bad_file_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: ok\n---\nname: broken\npodSets:\n  - requests: {cpu: abc}\n")
    result = invoke("--hub", f"127.0.0.1:{closed_port()}", "submit", str(bad))
    assert_one_line_error(result, f"{bad}[1] podSets[0].requests.cpu: 'abc' is not a quantity")


def test_submit_validates_every_file_before_contacting_the_hub(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmaxRunTime: soon\n")
    result = invoke(
        "--hub", f"127.0.0.1:{closed_port()}", "submit", str(EXAMPLES / "cpu-batch.yaml"), str(bad)
    )
    assert_one_line_error(result, "maxRunTime: 'soon' is not a duration")


def test_submit_of_a_missing_file(tmp_path: Path) -> None:
    result = invoke("submit", str(tmp_path / "nope.yaml"))
    assert_one_line_error(result, "nope.yaml: no such file")


def test_submit_needs_a_file() -> None:
    result = invoke("submit")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_unreachable_hub_is_one_clear_line() -> None:
    target = f"127.0.0.1:{closed_port()}"
    result = invoke("--hub", target, "list")
    assert_one_line_error(result, f"cannot reach the hub at {target}")


def test_unreachable_hub_from_environment() -> None:
    target = f"127.0.0.1:{closed_port()}"
    result = invoke("submit", str(EXAMPLES / "gpu-training.yaml"), env={"FEDPLANE_HUB": target})
    assert_one_line_error(result, f"cannot reach the hub at {target}")


def test_bad_filters_are_one_line_errors() -> None:
    assert_one_line_error(invoke("list", "--state", "sleeping"), "--state 'sleeping' is not a job state")
    assert_one_line_error(invoke("list", "--label", "novalue"), "--label 'novalue' must look like key=value")


def test_explain_of_a_missing_spec_file() -> None:
    assert_one_line_error(invoke("explain", "examples/does-not-exist.yaml"), "no such file")


def test_daemon_commands_call_the_lead_modules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, Any]] = []

    def fake(name: str, main: Any) -> None:
        module = types.ModuleType(name)
        module.main = main  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, name, module)

    fake("fedplane.hub.server", lambda config_path: calls.append(("hub", config_path)))
    fake("fedplane.agent.daemon", lambda config_path: calls.append(("agent", config_path)))

    def local_main(
        jobs_dir: Path | None, data_dir: Path | None, keep_running: bool, clusters: int = 3
    ) -> None:
        calls.append(("up", (jobs_dir, data_dir, keep_running, clusters)))

    fake("fedplane.local.federation", local_main)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    assert invoke("hub").exit_code == 0
    assert invoke("hub", "--config", str(config)).exit_code == 0
    assert invoke("agent", "--config", str(config)).exit_code == 0
    result = invoke(
        "up", "--clusters", "2", "--jobs", str(EXAMPLES), "--data-dir", str(tmp_path), "--keep-running"
    )
    assert result.exit_code == 0, result.output
    assert calls == [
        ("hub", None),
        ("hub", str(config)),
        ("agent", str(config)),
        ("up", (EXAMPLES, tmp_path, True, 2)),
    ]
    assert_one_line_error(invoke("agent", "--config", str(tmp_path / "none.yaml")), "none.yaml: no such file")


# -- rendering ----------------------------------------------------------------------------------


def ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def make_job(job_id: str, name: str, state: int, cluster: str = "", revision: int = 1) -> pb.Job:
    job = pb.Job(id=job_id, revision=revision, create_time=ts(1_700_000_000))
    job.spec.name, job.spec.queue = name, "research"
    job.status.state = state  # type: ignore[assignment]
    job.status.cluster = cluster
    return job


def render(renderable: Any) -> str:
    console = Console(record=True, width=240)
    console.print(renderable)
    return console.export_text()


def test_job_board_shows_pending_reasons_and_where_jobs_ran() -> None:
    pending = make_job("j1", "waiting", pb.PENDING)
    pending.pending_reason = "no cluster has 64 free GPUs"
    done = make_job("j2", "trained", pb.SUCCEEDED, "gpu-eu")
    done.status.start_time.CopyFrom(ts(1_700_000_000))
    done.status.finish_time.CopyFrom(ts(1_700_000_012))
    done.status.placement_score.CopyFrom(
        pb.ScoreBreakdown(total=0.81, data_locality=1.0, headroom=0.4, cost=0.5, preference=1.0)
    )
    failed = make_job("j3", "broken", pb.FAILED, "cpu-us")
    failed.status.reason, failed.status.message = "BackoffLimitExceeded", "pod exited 1"

    board = display.JobBoard([pending, done], title="Demo")
    board.update(hub_pb2.JobEvent(revision=5, job=failed))
    assert len(board) == 3 and not board.done
    text = render(board)
    assert "Demo" in text
    assert "no cluster has 64 free GPUs" in text
    assert "ran on gpu-eu for 12s" in text
    assert "score 0.81 (data 1.00, headroom 0.40, cost 0.50, pref 1.00)" in text
    assert "BackoffLimitExceeded: pod exited 1" in text
    assert "1 pending · 1 succeeded · 1 failed" in text

    # An older replayed event never overwrites a newer state.
    board.update(make_job("j2", "trained", pb.RUNNING, "gpu-eu", revision=0))
    board.update(make_job("j3", "broken", pb.RUNNING, "cpu-us", revision=0))
    stale = make_job("j1", "waiting", pb.RUNNING, "gpu-eu", revision=0)
    board.update(stale)
    newer = make_job("j1", "waiting", pb.SUCCEEDED, "gpu-eu", revision=9)
    board.update(newer)
    board.update(make_job("j1", "waiting", pb.RUNNING, "gpu-eu", revision=3))
    assert board.jobs[0].status.state == pb.SUCCEEDED


def test_tables_render_every_part() -> None:
    job = make_job("j1", "trained", pb.SUCCEEDED, "gpu-eu")
    job.status.history.add(state=pb.PENDING, time=ts(1_700_000_000), reason="Submitted")
    job.status.history.add(state=pb.RUNNING, time=ts(1_700_000_005), cluster="gpu-eu", generation=1)
    job.status.generation = 1
    detail = render(display.job_detail(job))
    assert "History" in detail and "Submitted" in detail and "Generation" in detail

    cluster = pb.Cluster(name="gpu-eu", health=pb.READY, active_jobs=2, cost=1.5)
    cluster.allocatable.quantities.update({"cpu": 96_000, "memory": 768 * 2**30, "nvidia.com/gpu": 8})
    cluster.free.quantities.update({"cpu": 64_000, "memory": 512 * 2**30, "nvidia.com/gpu": 0})
    node = cluster.nodes.add(name="gpu-eu-0", ready=True)
    node.allocatable.CopyFrom(cluster.allocatable)
    node.free.CopyFrom(cluster.free)
    node.labels["nvidia.com/gpu.product"] = "A100"
    cluster.datasets.add(id="imagenet", bytes=150 * 2**30)
    table = render(display.cluster_table([cluster]))
    assert "64/96" in table and "512Gi/768Gi" in table and "0/8" in table and "imagenet" in table
    details = render(display.cluster_detail(cluster))
    assert "gpu-eu-0" in details and "A100" in details and "150Gi" in details

    explanation = pb.Explanation(chosen_cluster="gpu-eu", summary="gpu-eu holds the data")
    explanation.verdicts.add(cluster="edge-lab", feasible=False, reasons=["taint edge=true:NoSchedule"])
    explanation.verdicts.add(
        cluster="gpu-eu", feasible=True, score=pb.ScoreBreakdown(total=0.9, data_locality=1)
    )
    text = render(display.explanation_table(explanation))
    assert text.index("gpu-eu *") < text.index("edge-lab")
    assert "taint edge=true:NoSchedule" in text and "chosen: gpu-eu" in text


# -- against a fake hub -------------------------------------------------------------------------


class FakeHub(hub_pb2_grpc.JobServiceServicer, hub_pb2_grpc.ClusterServiceServicer):
    """Just enough of the hub's API for client and CLI tests."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.revision = 100
        self.jobs: dict[str, pb.Job] = {}
        self.keys: dict[str, str] = {}
        self.events: list[tuple[int, pb.Job]] = []
        self.lose_submit_responses = 0  # process a submit, then answer UNAVAILABLE
        self.watch_drops = 0  # abort this many streams with UNAVAILABLE, each after its first event
        self.mute_watches = False  # streams that never deliver anything (a lossy hub)
        self.auto_progress = True  # PENDING -> RUNNING -> SUCCEEDED/FAILED on timers
        self.finish_on_get = False  # finish jobs between GetJob and the watch
        self.watch_calls = 0
        self.timers: list[threading.Timer] = []

    def change(self, job_id: str, state: int, cluster: str = "", reason: str = "") -> None:
        self.change_together([job_id], state, cluster, reason)

    def change_together(self, job_ids: list[str], state: int, cluster: str = "", reason: str = "") -> None:
        """Change several jobs in one revision, as one etcd transaction does."""
        with self.cond:
            self.revision += 1
            for job_id in job_ids:
                self._apply(job_id, state, cluster, reason)
            self.cond.notify_all()

    def _apply(self, job_id: str, state: int, cluster: str, reason: str) -> None:
        job = self.jobs[job_id]
        job.status.state = state  # type: ignore[assignment]
        job.status.reason = reason
        if cluster:
            job.status.cluster = cluster
            job.status.generation = 1
            job.status.placement_score.total = 0.75
        job.status.history.add(state=state, cluster=cluster, reason=reason)  # type: ignore[arg-type]
        job.revision = self.revision
        self.events.append((self.revision, pb.Job.FromString(job.SerializeToString())))

    def _create(self, request: hub_pb2.SubmitJobRequest) -> hub_pb2.SubmitJobResponse:
        with self.cond:
            if request.idempotency_key in self.keys:
                return hub_pb2.SubmitJobResponse(
                    job=self.jobs[self.keys[request.idempotency_key]], created=False
                )
            job_id = f"job-{len(self.jobs) + 1}"
            self.jobs[job_id] = pb.Job(id=job_id, spec=request.spec, idempotency_key=request.idempotency_key)
            self.keys[request.idempotency_key] = job_id
        self.change(job_id, pb.PENDING)
        outcome = pb.FAILED if "fail" in request.spec.name else pb.SUCCEEDED
        if self.auto_progress and not self.finish_on_get:
            self._later(0.05, self.change, job_id, pb.RUNNING, "gpu-eu")
            self._later(
                0.15, self.change, job_id, outcome, "", "Completed" if outcome == pb.SUCCEEDED else "Boom"
            )
        return hub_pb2.SubmitJobResponse(job=self.jobs[job_id], created=True)

    def _later(self, delay: float, fn: Any, *args: Any) -> None:
        timer = threading.Timer(delay, fn, args)
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def SubmitJob(self, request: Any, context: Any) -> Any:
        return self._create(request)

    def SubmitJobs(self, request: Any, context: Any) -> Any:
        results = [self._create(r) for r in request.jobs]
        if self.lose_submit_responses:
            self.lose_submit_responses -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return hub_pb2.SubmitJobsResponse(results=results)

    def GetJob(self, request: Any, context: Any) -> Any:
        with self.cond:
            if request.job_id not in self.jobs:
                context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id} not found")
            answer = pb.Job.FromString(self.jobs[request.job_id].SerializeToString())
        if self.finish_on_get:
            self.change(request.job_id, pb.SUCCEEDED, "cpu-us")
        return answer

    def ListJobs(self, request: Any, context: Any) -> Any:
        with self.cond:
            jobs = [
                j
                for j in self.jobs.values()
                if (not request.queue or j.spec.queue == request.queue)
                and (not request.states or j.status.state in request.states)
            ]
            start = int(request.page_token or 0)
            size = request.page_size or 100
            token = str(start + size) if start + size < len(jobs) else ""
            return hub_pb2.ListJobsResponse(
                jobs=jobs[start : start + size], next_page_token=token, revision=self.revision
            )

    def CancelJob(self, request: Any, context: Any) -> Any:
        self.change(request.job_id, pb.CANCELLED, "", request.reason)
        return self.jobs[request.job_id]

    def SetJobPriority(self, request: Any, context: Any) -> Any:
        """Records what it was asked: the class as given, a value as given (the hub resolves classes)."""
        job = self.jobs[request.job_id]
        job.status.priority = request.priority if request.WhichOneof("to") == "priority" else 1000
        job.status.priority_class = request.priority_class
        return job

    def WatchJobs(self, request: Any, context: Any) -> Iterator[hub_pb2.JobEvent]:
        self.watch_calls += 1
        after = request.from_revision or self.revision
        while context.is_active():
            with self.cond:
                ready = [
                    (r, j)
                    for r, j in self.events
                    if r > after and (not request.job_ids or j.id in request.job_ids)
                ]
                if not ready or self.mute_watches:
                    self.cond.wait(0.05)
                    continue
            for revision, job in ready:
                yield hub_pb2.JobEvent(revision=revision, job=job)
                after = revision
                if self.watch_drops:
                    self.watch_drops -= 1
                    context.abort(grpc.StatusCode.UNAVAILABLE, "hub restarting")

    def GetJobStats(self, request: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not faked")

    def ExplainJob(self, request: Any, context: Any) -> Any:
        explanation = pb.Explanation(
            job_id=request.job_id, chosen_cluster="gpu-eu", summary="best data locality"
        )
        explanation.verdicts.add(
            cluster="gpu-eu", feasible=True, score=pb.ScoreBreakdown(total=0.9, data_locality=1)
        )
        explanation.verdicts.add(cluster="edge-lab", feasible=False, reasons=["untolerated taint edge"])
        return explanation

    def _cluster(self, name: str, cordoned: bool = False, reason: str = "") -> pb.Cluster:
        cluster = pb.Cluster(
            name=name, health=pb.READY, cordoned=cordoned, cordon_reason=reason, active_jobs=1
        )
        cluster.allocatable.quantities.update({"cpu": 512_000, "memory": 2048 * 2**30})
        cluster.free.quantities.update({"cpu": 256_000, "memory": 1024 * 2**30})
        cluster.nodes.add(name=f"{name}-0", ready=True)
        cluster.datasets.add(id="logs-2026", bytes=40 * 2**30)
        return cluster

    def ListClusters(self, request: Any, context: Any) -> Any:
        return hub_pb2.ListClustersResponse(clusters=[self._cluster("cpu-us"), self._cluster("gpu-eu")])

    def GetCluster(self, request: Any, context: Any) -> Any:
        return self._cluster(request.name)

    def CordonCluster(self, request: Any, context: Any) -> Any:
        return self._cluster(request.name, True, request.reason)

    def UncordonCluster(self, request: Any, context: Any) -> Any:
        return self._cluster(request.name)

    def ApproveCluster(self, request: Any, context: Any) -> Any:
        cluster = self._cluster(request.name)
        cluster.admission = pb.ADMISSION_APPROVED
        cluster.public_key = request.public_key or "UREQUESTED"
        return cluster

    def RemoveCluster(self, request: Any, context: Any) -> Any:
        return hub_pb2.RemoveClusterResponse(cluster=self._cluster(request.name), jobs_affected=3)


@pytest.fixture
def fake_hub() -> Iterator[tuple[FakeHub, str]]:
    hub = FakeHub()
    # No SO_REUSEPORT (gRPC's default): a server of an earlier test still shutting down could
    # otherwise share the port and answer this test's calls with GOAWAY.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
    hub_pb2_grpc.add_JobServiceServicer_to_server(hub, server)
    hub_pb2_grpc.add_ClusterServiceServicer_to_server(hub, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield hub, f"127.0.0.1:{port}"
    for timer in hub.timers:
        timer.cancel()
    server.stop(grace=None).wait(10)


def test_submit_wait_shows_where_jobs_ran(fake_hub: tuple[FakeHub, str]) -> None:
    hub, target = fake_hub
    result = invoke("--hub", target, "submit", "--wait", str(EXAMPLES / "small-jobs.yaml"))
    assert result.exit_code == 0, result.output
    assert result.stdout.count("submitted job") == 4
    assert "SUCCEEDED etl-hourly job-1: ran on gpu-eu" in result.stdout
    assert "score 0.75" in result.stdout
    assert all(job.status.state == pb.SUCCEEDED for job in hub.jobs.values())


def test_submit_wait_exits_1_when_a_job_fails(fake_hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    _, target = fake_hub
    spec = tmp_path / "jobs.yaml"
    spec.write_text("name: fine\npodSets: [{requests: {cpu: 1}}]\n---\nname: will-fail\npodSets: [{}]\n")
    result = invoke("--hub", target, "submit", "--wait", str(spec))
    assert result.exit_code == 1, result.output
    assert "FAILED will-fail" in result.stdout and "Boom" in result.stdout


def test_lost_submit_responses_are_retried_without_duplicates(fake_hub: tuple[FakeHub, str]) -> None:
    hub, target = fake_hub
    hub.lose_submit_responses = 2
    result = invoke("--hub", target, "submit", str(EXAMPLES / "overflow-burst.yaml"))
    assert result.exit_code == 0, result.output
    assert len(hub.jobs) == 3
    # The third attempt found the jobs created by the first one.
    assert result.stdout.count("already exists: job") == 3


def test_explicit_key_makes_resubmission_idempotent(fake_hub: tuple[FakeHub, str]) -> None:
    hub, target = fake_hub
    first = invoke("--hub", target, "submit", "--key", "nightly", str(EXAMPLES / "cpu-batch.yaml"))
    again = invoke("--hub", target, "submit", "--key", "nightly", str(EXAMPLES / "cpu-batch.yaml"))
    assert "submitted job job-1" in first.stdout
    assert "already exists: job job-1" in again.stdout
    assert list(hub.keys) == ["nightly"]
    invoke("--hub", target, "submit", "--key", "burst", str(EXAMPLES / "overflow-burst.yaml"))
    assert list(hub.keys)[1:] == ["burst-0", "burst-1", "burst-2"]


def test_get_list_cancel_and_output_formats(fake_hub: tuple[FakeHub, str]) -> None:
    _, target = fake_hub
    invoke("--hub", target, "submit", str(EXAMPLES / "small-jobs.yaml"))
    as_json = json.loads(invoke("--hub", target, "get", "job-2", "-o", "json").stdout)
    assert as_json["id"] == "job-2" and as_json["spec"]["name"] == "daily-report"
    table = invoke("--hub", target, "get", "job-2").stdout
    assert "daily-report" in table and "History" in table
    listed = yaml.safe_load(invoke("--hub", target, "list", "-q", "etl", "-o", "yaml").stdout)
    assert [j["spec"]["name"] for j in listed] == ["etl-hourly", "daily-report"]
    assert "unit-tests" in invoke("--hub", target, "list", "--label", "team=platform").stdout
    lowered = invoke("--hub", target, "priority", "job-2", "--", "-5").stdout.strip()
    assert lowered.startswith("job job-2 (daily-report): priority -5, ")
    raised = invoke("--hub", target, "priority", "job-2", "guaranteed").stdout.strip()
    assert raised.startswith("job job-2 (daily-report): priority 1000")
    cancelled = invoke("--hub", target, "cancel", "job-3", "--reason", "not needed")
    assert cancelled.stdout.strip() == "job job-3 (unit-tests): CANCELLED"
    assert_one_line_error(invoke("--hub", target, "get", "job-99"), "NOT_FOUND: job job-99 not found")


def test_cluster_commands(fake_hub: tuple[FakeHub, str]) -> None:
    _, target = fake_hub
    table = invoke("--hub", target, "clusters").stdout
    assert "cpu-us" in table and "gpu-eu" in table and "256/512" in table
    assert json.loads(invoke("--hub", target, "clusters", "-o", "json").stdout)[0]["name"] == "cpu-us"
    assert "cpu-us-0" in invoke("--hub", target, "cluster", "cpu-us").stdout
    cordoned = invoke("--hub", target, "cordon", "gpu-eu", "--reason", "maintenance")
    assert cordoned.stdout.strip() == "cluster gpu-eu cordoned (maintenance)"
    assert invoke("--hub", target, "uncordon", "gpu-eu").stdout.strip() == "cluster gpu-eu uncordoned"
    approved = invoke("--hub", target, "clusters", "approve", "gpu-eu", "--key", "UKEY")
    assert approved.stdout.strip() == "cluster gpu-eu approved (key UKEY)"
    removed = invoke("--hub", target, "clusters", "remove", "gpu-eu", "--reason", "gone")
    assert removed.stdout.strip() == "cluster gpu-eu removed; 3 job(s) on it follow their disconnect policy"


def test_explain_job_and_file(fake_hub: tuple[FakeHub, str]) -> None:
    _, target = fake_hub
    by_id = invoke("--hub", target, "explain", "job-1")
    assert by_id.exit_code == 0 and "chosen: gpu-eu" in by_id.stdout and "untolerated taint" in by_id.stdout
    by_file = invoke("--hub", target, "explain", str(EXAMPLES / "overflow-burst.yaml"))
    assert by_file.stdout.count("chosen: gpu-eu") == 3 and "render-frames-2" in by_file.stdout
    as_json = json.loads(
        invoke("--hub", target, "explain", str(EXAMPLES / "cpu-batch.yaml"), "-o", "json").stdout
    )
    assert as_json[0]["chosenCluster"] == "gpu-eu"


async def test_watch_resumes_after_unavailable_without_gaps(fake_hub: tuple[FakeHub, str]) -> None:
    hub, target = fake_hub
    hub.watch_drops = 2
    async with FedplaneClient(target, reconnect_timeout=10) as client:
        revision = await client.current_revision()
        job, created = await client.submit(pb.JobSpec(name="a", queue="q"))
        assert created
        seen: list[tuple[int, int]] = []
        async for event in client.watch(from_revision=revision, job_ids=[job.id]):
            seen.append((event.revision, event.job.status.state))
            if event.job.status.state == pb.SUCCEEDED:
                break
    assert [state for _, state in seen] == [pb.PENDING, pb.RUNNING, pb.SUCCEEDED]
    assert [r for r, _ in seen] == sorted({r for r, _ in seen})
    assert hub.watch_calls >= 3


async def test_wait_sees_changes_between_get_and_watch(fake_hub: tuple[FakeHub, str]) -> None:
    hub, target = fake_hub
    hub.finish_on_get = True
    seen: list[int] = []
    async with FedplaneClient(target) as client:
        job, _ = await client.submit(pb.JobSpec(name="quick"), "k1")
        final = await client.wait([job.id], on_event=lambda j: seen.append(j.status.state))
    assert final[job.id].status.state == pb.SUCCEEDED
    assert seen == [pb.PENDING, pb.SUCCEEDED]


async def test_list_pages_and_errors(fake_hub: tuple[FakeHub, str]) -> None:
    _, target = fake_hub
    async with FedplaneClient(target, interceptors=()) as client:
        for i in range(5):
            await client.submit(pb.JobSpec(name=f"j{i}", queue="q" if i % 2 else "other"))
        assert len(await client.list(page_size=2)) == 5
        assert [j.spec.name async for j in client.iter_jobs(queue="q", page_size=1)] == ["j1", "j3"]
        with pytest.raises(FedplaneError) as info:
            await client.get("missing")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert str(info.value) == "NOT_FOUND: job missing not found"


async def test_watch_cut_inside_a_multi_job_revision_loses_nothing(fake_hub: tuple[FakeHub, str]) -> None:
    hub, target = fake_hub
    hub.auto_progress = False
    async with FedplaneClient(target, reconnect_timeout=10) as client:
        a, _ = await client.submit(pb.JobSpec(name="a"))
        b, _ = await client.submit(pb.JobSpec(name="b"))
        start = await client.current_revision()
        hub.watch_drops = 1  # the first stream breaks between a's and b's RUNNING
        hub.change_together([a.id, b.id], pb.RUNNING, "cpu-us")
        hub.change_together([a.id, b.id], pb.SUCCEEDED, "cpu-us")
        seen = []
        async for event in client.watch(from_revision=start):
            seen.append((event.revision, event.job.id, event.job.status.state))
            if len(seen) == 4:
                break
    assert seen == [
        (start + 1, a.id, pb.RUNNING),
        (start + 1, b.id, pb.RUNNING),
        (start + 2, a.id, pb.SUCCEEDED),
        (start + 2, b.id, pb.SUCCEEDED),
    ]
    assert hub.watch_calls == 2


async def test_wait_survives_a_watch_that_loses_events(fake_hub: tuple[FakeHub, str]) -> None:
    hub, target = fake_hub
    hub.mute_watches = True
    async with FedplaneClient(target) as client:
        job, _ = await client.submit(pb.JobSpec(name="quiet"))
        final = await client.wait([job.id], resync_interval=0.1)
    assert final[job.id].status.state == pb.SUCCEEDED
