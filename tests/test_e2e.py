"""End to end with separate processes: `fedplane hub`, `fedplane agent` and the CLI, as users run them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedplane.local import servers as embedded

pytestmark = pytest.mark.e2e

JOB = """
name: e2e-train
queue: research
podSets:
  - name: workers
    count: 2
    gpuType: A100
    requests: {cpu: "8", memory: 32Gi, gpu: 4}
workload:
  apiVersion: batch/v1
  kind: Job
  metadata: {name: e2e-train, annotations: {fedplane.io/simulated-duration: "1s"}}
"""


def fedplane(
    *args: str, hub: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "fedplane.client", "--hub", hub, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "250"},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fedplane {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


class Daemons:
    """The hub and agents as separate processes, each logging to <name>.out."""

    def __init__(self, workdir: Path, hub: str) -> None:
        self.workdir = workdir
        self.hub = hub
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> None:
        out = (self.workdir / f"{name}.out").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "fedplane.client", *args],
            cwd=self.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FEDPLANE_LOG_LEVEL": "info"},
        )

    def kill(self, name: str) -> None:
        """SIGKILL: a crash, with no chance to finish anything."""
        self.procs[name].kill()
        self.procs[name].wait(10)


@pytest.fixture
def daemons(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess], tmp_path: Path
) -> Iterator[Daemons]:
    etcd, nats = servers
    assert nats.identities is not None
    identities = nats.identities
    port = embedded.free_port()
    (tmp_path / "hub.yaml").write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "etcd_endpoint": etcd.address,
                "nats_url": f"nats://{nats.address}",
                "cluster_unknown_after_seconds": 5,
                # NATS is authenticated here (the agents are admitted by key); gRPC and etcd are not.
                "insecure": True,
                "implicit_queues": True,
                "nats_auth": identities.hub_settings(),
            }
        )
    )
    agents = {
        "gpu-a": {
            "nodes": [
                {
                    "name": "g",
                    "count": 1,
                    "gpu_type": "A100",
                    "resources": {"cpu": 32, "memory": "128Gi", "gpu": 8},
                }
            ]
        },
        "cpu-a": {"nodes": [{"name": "c", "count": 2, "resources": {"cpu": 16, "memory": "64Gi"}}]},
    }
    for name, backend in agents.items():
        (tmp_path / f"{name}.yaml").write_text(
            yaml.safe_dump(
                {
                    "cluster": name,
                    "nats_url": f"nats://{nats.address}",
                    "heartbeat_interval_seconds": 0.5,
                    "state_dir": str(tmp_path / "state" / name),
                    **identities.agent_settings(),
                    "backend": {"type": "simulated", "start_delay_seconds": 0.05, **backend},
                }
            )
        )
    fed = Daemons(tmp_path, f"127.0.0.1:{port}")
    fed.start("hub", ["hub", "--config", "hub.yaml"])
    for name in agents:
        fed.start(name, ["agent", "--config", f"{name}.yaml"])
    procs = fed.procs
    hub = fed.hub
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            result = fedplane("clusters", "-o", "json", hub=hub, check=False)
            if result.returncode == 0:
                clusters = json.loads(result.stdout)
                if sum(1 for c in clusters if c.get("health") == "READY") == 2:
                    break
            time.sleep(0.3)
        else:
            raise AssertionError(
                "clusters never became ready:\n" + (tmp_path / "hub.out").read_text()[-3000:]
            )
        yield fed
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | str] = {}
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
                proc.wait(10)
                codes[name] = "hung:\n" + (tmp_path / f"{name}.out").read_text()[-4000:]
        assert codes == {name: 0 for name in procs}, f"daemons did not stop cleanly: {codes}"


def test_cli_drives_a_federation_of_separate_processes(daemons: Daemons, tmp_path: Path) -> None:
    hub = daemons.hub
    spec = tmp_path / "job.yaml"
    spec.write_text(JOB)

    explained = fedplane("explain", str(spec), hub=hub)
    assert "gpu-a" in explained.stdout and "no node has GPU type A100" in explained.stdout

    watcher = subprocess.Popen(
        [sys.executable, "-m", "fedplane.client", "--hub", hub, "watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "250", "PYTHONFAULTHANDLER": "1"},
        # As at a terminal: a suite started in the background inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(2)  # the watch is open before the job exists
    submitted = fedplane("submit", str(spec), "--wait", hub=hub)
    assert "gpu-a" in submitted.stdout
    time.sleep(1)
    watcher.send_signal(signal.SIGINT)
    try:
        watched, _ = watcher.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        watcher.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        _, stack = watcher.communicate(timeout=10)
        raise AssertionError(f"watch did not stop on Ctrl-C:\n{stack[-6000:]}") from None
    states = [line.split()[4] for line in watched.splitlines() if "e2e-train" in line]
    # One event per write: updates that arrive together (ADMITTED with RUNNING) share one.
    assert states[0] == "PENDING" and states[-1] == "SUCCEEDED", watched
    order = ["PENDING", "DISPATCHED", "ADMITTED", "RUNNING", "SUCCEEDED"]
    assert [order.index(s) for s in states] == sorted(order.index(s) for s in states), watched

    jobs = json.loads(fedplane("list", "-o", "json", hub=hub).stdout)
    assert len(jobs) == 1
    job_id = jobs[0]["id"]
    job = json.loads(fedplane("get", job_id, "-o", "json", hub=hub).stdout)
    assert job["status"]["state"] == "SUCCEEDED" and job["status"]["cluster"] == "gpu-a"
    assert [t["state"] for t in job["status"]["history"]] == [
        "PENDING",
        "DISPATCHED",
        "ADMITTED",
        "RUNNING",
        "SUCCEEDED",
    ]

    fedplane("cordon", "gpu-a", "--reason", "maintenance", hub=hub)
    clusters = {c["name"]: c for c in json.loads(fedplane("clusters", "-o", "json", hub=hub).stdout)}
    assert clusters["gpu-a"].get("cordoned") is True
    fedplane("uncordon", "gpu-a", hub=hub)

    bad = tmp_path / "bad.yaml"
    bad.write_text(JOB.replace("count: 2", "count: 0"))
    rejected = fedplane("submit", str(bad), hub=hub, check=False)
    assert rejected.returncode == 2
    assert "pod_sets[0].count" in rejected.stderr and "Traceback" not in rejected.stderr
    assert len(rejected.stderr.strip().splitlines()) == 1

    missing = fedplane("get", "no-such-job", hub=hub, check=False)
    assert missing.returncode == 2 and "not found" in missing.stderr


def log_events(path: Path, event: str) -> list[dict[str, object]]:
    found = []
    for line in path.read_text().splitlines():
        if not line.startswith("{"):
            continue  # gRPC's native log lines share the output
        entry = json.loads(line)
        if entry.get("event") == event:
            found.append(entry)
    return found


def test_a_crashed_hub_loses_no_job_and_dispatches_none_twice(daemons: Daemons, tmp_path: Path) -> None:
    many = tmp_path / "many.yaml"
    many.write_text(
        "\n---\n".join(
            JOB.replace("e2e-train", f"crash-{i}").replace("count: 2", "count: 1").replace('"1s"', '"2s"')
            for i in range(12)
        )
    )
    submitted = fedplane("submit", str(many), hub=daemons.hub)
    assert submitted.stdout.count("crash-") == 12, submitted.stdout
    time.sleep(0.3)  # some dispatched, some maybe not: the hub dies mid-flight
    daemons.kill("hub")
    daemons.start("hub", ["hub", "--config", "hub.yaml"])

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = fedplane("list", "-o", "json", hub=daemons.hub, check=False)
        if result.returncode == 0:
            jobs = json.loads(result.stdout)
            if len(jobs) == 12 and all(j["status"]["state"] == "SUCCEEDED" for j in jobs):
                break
        time.sleep(0.5)
    else:
        raise AssertionError("not every job finished after the hub crash")
    for job in jobs:
        assert job["status"]["generation"] == "1"
        assert [t["state"] for t in job["status"]["history"]].count("DISPATCHED") == 1
    created = [e["job_id"] for e in log_events(tmp_path / "gpu-a.out", "workload created")]
    assert sorted(map(str, created)) == sorted(str(j["id"]) for j in jobs), "each job created exactly once"
