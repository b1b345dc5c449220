"""Prometheus metrics, with the real parts: a real Prometheus scrapes a hub and an agent through a
run of jobs and answers rate and quantile queries; promtool checks and tests the alerting rules;
the rules and the Grafana dashboard name only metrics the daemons really export."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from fedplane.hub.metrics import HubMetrics
from fedplane.local import servers as embedded
from fedplane.runtime import metrics
from fedplane.runtime.config import MetricsConfig, StartupError
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, cpu_nodes, hub_config, job_spec, sim_agent_config

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "fedplane.json"
ALERTS = {
    "FedplaneClusterLost",
    "FedplaneClusterUnknown",
    "FedplaneDispatchStalled",
    "FedplaneNoLeader",
    "FedplaneLeaderChangesTooOften",
    "FedplaneAgentOutboxGrowing",
    "FedplaneEtcdErrors",
    "FedplaneCommandPublishFailing",
}
# A window every rate below covers the whole run with: the run takes a few seconds.
WINDOW = "30s"
JOBS = 30


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


class Prometheus:
    """A real Prometheus on loopback, scraping `targets` (job name -> host:port) every second
    and evaluating the alerting rules in deploy/."""

    def __init__(self, tmp: Path, targets: dict[str, str]) -> None:
        self.port = embedded.free_port()
        scrapes = "".join(
            f"  - job_name: {job}\n    static_configs: [{{targets: ['{target}']}}]\n"
            for job, target in targets.items()
        )
        config = tmp / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{RULES}']\n"
            f"scrape_configs:\n{scrapes}"
        )
        self.log = (tmp / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited: {self.log.name}"
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_get, f"{self.url}/-/ready")
                return
            await asyncio.sleep(0.1)
        raise AssertionError("prometheus did not become ready")

    async def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        body = json.loads(await asyncio.to_thread(_get, f"{self.url}/api/v1/{path}?{query}"))
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[float]:
        """The values of an instant query's vector (empty when nothing matched)."""
        data = await self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return [float(sample["value"][1]) for sample in data["result"]]

    async def value(self, expr: str, timeout: float = 10) -> float:
        """The single value of `expr` once it has one."""
        deadline = time.monotonic() + timeout
        while True:
            values = await self.query(expr)
            if len(values) == 1:
                return values[0]
            assert time.monotonic() < deadline, f"{expr}: {values}"
            await asyncio.sleep(0.25)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _exprs() -> list[str]:
    """Every PromQL expression of the alerting rules and of the dashboard's panels."""
    import yaml

    exprs = [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    return exprs


def _as_grafana_runs_it(expr: str) -> str:
    """A dashboard expression with its template variables as Grafana fills them in."""
    return expr.replace("$__rate_interval", WINDOW).replace("$cluster", ".*")


@pytest.mark.skipif(not PROMETHEUS.exists(), reason="needs /usr/bin/prometheus (Debian's prometheus package)")
async def test_prometheus_scrapes_hub_and_agent(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess], tmp_path: Path
) -> None:
    etcd, nats = servers
    config = hub_config(etcd, nats, metrics=MetricsConfig(listen="127.0.0.1:0"))
    fed = Federation(etcd, nats, tmp_path, config)
    prometheus: Prometheus | None = None
    try:
        hub = await fed.start_hub()
        agent_config = sim_agent_config("metrics-a", fed.nats_url, nodes=[cpu_nodes(4)])
        agent_config.metrics.listen = "127.0.0.1:0"
        agent = await fed.start_agent(agent_config)
        assert hub.metrics is not None and agent.metrics_server is not None
        targets = {
            "fedplane-hub": f"127.0.0.1:{hub.metrics.port}",
            "fedplane-agent": f"127.0.0.1:{agent.metrics_server.port}",
        }
        prometheus = Prometheus(tmp_path, targets)
        await fed.wait_clusters_ready(["metrics-a"])
        await prometheus.ready()
        # Scraped before the jobs, so that the counters' rise from 0 is in the record.
        assert await prometheus.value("count(fedplane_jobs_dispatched_total)") == 1
        assert await prometheus.value("count(fedplane_agent_creates_total)") == 4

        async with fed.client() as client:
            # Running for 2 s, longer than a scrape interval.
            submitted = await client.submit_many(
                [(job_spec(f"m{i}", duration="2s"), "") for i in range(JOBS)]
            )
            job_ids = [job.id for job, _ in submitted]
            # Waiting watches the jobs (WatchJobs): a watch stream open while they run.
            await client.wait(job_ids)

        # Every job scraped as finished, from both sides.
        finished = 'sum(fedplane_jobs_finished_total{state="SUCCEEDED"})'
        deadline = time.monotonic() + 10
        while await prometheus.value(finished) < JOBS:
            assert time.monotonic() < deadline, "the finished jobs were never scraped"
            await asyncio.sleep(0.25)
        assert await prometheus.value('sum(fedplane_agent_creates_total{result="created"})') == JOBS
        assert sorted(await prometheus.query("up")) == [1.0, 1.0]

        # A rate: every job dispatched within the window, none twice.
        dispatch_rate = await prometheus.value(f"sum(rate(fedplane_jobs_dispatched_total[{WINDOW}]))")
        assert 0 < dispatch_rate * 30 <= 1.5 * JOBS, dispatch_rate
        # Quantiles: each job waited for placement less than the run took, and ran within
        # seconds of its dispatch (the simulated cluster starts a workload in 0.1 s).
        waited = await prometheus.value(
            "histogram_quantile(0.9, sum by (le)"
            f" (rate(fedplane_job_submit_to_dispatch_seconds_bucket[{WINDOW}])))"
        )
        assert 0 < waited < 5, waited
        started = await prometheus.value(
            "histogram_quantile(0.5, sum by (le)"
            f" (rate(fedplane_job_dispatch_to_running_seconds_bucket[{WINDOW}])))"
        )
        assert 0.05 < started < 5, started
        create = await prometheus.value(
            "histogram_quantile(0.99, sum by (le)"
            f' (rate(fedplane_agent_backend_call_seconds_bucket{{call="create"}}[{WINDOW}])))'
        )
        assert 0 < create < 1, create
        # What is read at scrape time: the cluster, its capacity, the watch stream the wait held.
        assert await prometheus.value('fedplane_cluster_health{cluster="metrics-a",health="READY"}') == 1
        assert await prometheus.value('fedplane_cluster_capacity{cluster="metrics-a",resource="cpu"}') == 32
        assert await prometheus.value("fedplane_leader") == 1
        assert await prometheus.value(f"max_over_time(fedplane_watch_streams[{WINDOW}])") >= 1
        assert await prometheus.value("fedplane_agent_outbox_updates") == 0

        # No job id is ever a label value.
        for target in targets.values():
            text = (await asyncio.to_thread(_get, f"http://{target}/metrics")).decode()
            assert "fedplane_jobs_dispatched_total" in text or "fedplane_agent_creates_total" in text
            leaked = [job_id for job_id in job_ids if job_id in text]
            assert not leaked, leaked

        # The rules load and evaluate on real series, and every expression of the rules and the
        # dashboard names only metrics the daemons export, and runs.
        groups = (await prometheus.api("rules"))["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        assert set(rules) == ALERTS
        exported = set(await prometheus.api("label/__name__/values"))
        for expr in _exprs():
            named = set(re.findall(r"\bfedplane_[a-z0-9_]+", expr))
            assert named and named <= exported, (expr, named - exported)
            await prometheus.query(_as_grafana_runs_it(expr))
        deadline = time.monotonic() + 5
        while any(rule["health"] != "ok" for rule in rules.values()):
            assert time.monotonic() < deadline, {
                n: (r["health"], r.get("lastError")) for n, r in rules.items()
            }
            await asyncio.sleep(0.25)
            groups = (await prometheus.api("rules"))["groups"]
            rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    finally:
        if prometheus is not None:
            prometheus.stop()
        await fed.close()


@pytest.mark.skipif(not PROMTOOL.exists(), reason="needs /usr/bin/promtool (Debian's prometheus package)")
def test_alerting_rules_pass_promtool() -> None:
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        result = subprocess.run([str(PROMTOOL), *command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_runbook_section() -> None:
    """Each alert's runbook_url names an anchor of docs/operations.md, which has that section."""
    import yaml

    operations = (DEPLOY.parent / "docs" / "operations.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in operations.splitlines()
        if line.startswith("#")
    }
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
            assert path == "docs/operations.md" and anchor in headings, rule["alert"]


def test_batch_histogram_exports_what_the_client_library_would() -> None:
    values = [0.0, 0.0004, 0.001, 0.003, 0.2, 0.25, 7.0, 11.0, 1e6]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = metrics.BatchHistogram("x_seconds", "x", metrics.CALL_BUCKETS, ours, ["kind"], [("a",)])
    histogram.observe_many(values[:4], "a")
    for value in values[4:]:
        histogram.observe(value, "a")
    reference = Histogram("x_seconds", "x", ["kind"], buckets=metrics.CALL_BUCKETS, registry=theirs)
    for value in values:
        reference.labels("a").observe(value)

    def samples(registry: CollectorRegistry) -> list[str]:
        return [
            line
            for line in generate_latest(registry).decode().splitlines()
            if not line.startswith("#") and "_created" not in line
        ]

    assert samples(ours) == samples(theirs)


def test_a_bad_metrics_address_is_refused() -> None:
    for listen in ("9464", "localhost", "host:port", "127.0.0.1:99999"):
        with pytest.raises(StartupError, match=r"metrics\.listen: .* is not host:port"):
            metrics.parse_listen(listen)
    assert metrics.parse_listen(":9464") == ("0.0.0.0", 9464)
    assert metrics.parse_listen("[::1]:9464") == ("::1", 9464)


@contextlib.contextmanager
def _taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


async def test_a_taken_metrics_port_is_a_startup_error() -> None:
    with _taken_port() as port:
        with pytest.raises(StartupError, match=rf"metrics\.listen: cannot listen on 127\.0\.0\.1:{port}: "):
            await metrics.serve(CollectorRegistry(), f"127.0.0.1:{port}")


def test_an_agent_on_a_taken_metrics_port_says_so_in_one_line(tmp_path: Path) -> None:
    """The daemon refuses at once, before connecting to anything: one line, exit status 2."""
    with _taken_port() as port:
        (tmp_path / "agent.yaml").write_text(
            "cluster: edge\ninsecure: true\nnats_url: nats://127.0.0.1:1\n"
            f"metrics: {{listen: '127.0.0.1:{port}'}}\n"
        )
        result = subprocess.run(
            [sys.executable, "-m", "fedplane.agent", "--config", "agent.yaml"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "metrics.listen" in line]
    assert lines == [
        f"fedplane-agent: metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert "Traceback" not in result.stderr


def _status(*entries: tuple[int, float]) -> pb.JobStatus:
    """A status whose history is these (state, time) entries, in the last one's state."""
    status = pb.JobStatus(generation=1)
    for state, at in entries:
        entry = status.history.add(state=state, generation=1)  # type: ignore[arg-type]
        entry.time.seconds, entry.time.nanos = divmod(int(at * 1e9), 1_000_000_000)
    status.state = entries[-1][0]  # type: ignore[assignment]
    return status


def test_start_latency_counts_each_job_once_even_when_it_ends_in_the_same_batch() -> None:
    hub = HubMetrics()
    now = time.time()
    dispatched = now - 3
    running = _status((pb.PENDING, now - 5), (pb.DISPATCHED, dispatched), (pb.RUNNING, now))
    quick = _status(
        (pb.PENDING, now - 5), (pb.DISPATCHED, dispatched), (pb.RUNNING, now), (pb.SUCCEEDED, now)
    )
    ended = _status((pb.DISPATCHED, dispatched), (pb.RUNNING, now - 1), (pb.FAILED, now))
    hub.statuses([running, quick, ended], now)
    value = hub.registry.get_sample_value
    # running and quick, 3 s each; ended started in an earlier batch, and was counted then.
    assert value("fedplane_job_dispatch_to_running_seconds_count") == 2
    assert value("fedplane_job_dispatch_to_running_seconds_sum") == pytest.approx(6.0, abs=1e-3)
    finished = {
        state: value("fedplane_jobs_finished_total", {"state": state})
        for state in ("SUCCEEDED", "FAILED", "CANCELLED")
    }
    assert finished == {"SUCCEEDED": 1, "FAILED": 1, "CANCELLED": 0}
