"""The simulated backend's ledger: what really ran where, and the simulated cluster's memory
across an agent restart."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fedplane.agent.backend import CreateRequest, WorkloadEvent
from fedplane.agent.simulated import DURATION_ANNOTATION, SimulatedBackend, read_ledger
from fedplane.runtime.config import NodeShape, SimulatedBackendConfig
from fedplane.v1 import types_pb2 as pb


def backend(ledger: Path, cluster: str = "sim-a") -> SimulatedBackend:
    nodes = [NodeShape(name="n", count=2, resources={"cpu": 4})]
    config = SimulatedBackendConfig(nodes=nodes, start_delay_seconds=0.02, ledger_path=str(ledger))
    return SimulatedBackend(config, cluster=cluster)


def request(job_id: str, duration: str, generation: int = 1, node: str = "n-0") -> CreateRequest:
    spec = pb.JobSpec(name=job_id)
    spec.workload.manifest_json = json.dumps({"metadata": {"annotations": {DURATION_ANNOTATION: duration}}})
    pod_set = spec.pod_sets.add(name="main", count=1)
    pod_set.requests.quantities["cpu"] = 1000
    return CreateRequest(job_id, generation, spec, [pb.NodeAssignment(pod_set="main", node=node, count=1)])


class Events:
    def __init__(self) -> None:
        self.seen: list[WorkloadEvent] = []

    def __call__(self, event: WorkloadEvent) -> None:
        self.seen.append(event)

    def states(self, job_id: str) -> list[str]:
        return [pb.JobState.Name(e.state) for e in self.seen if e.job_id == job_id]

    async def until(self, job_id: str, state: int, within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while not any(e.job_id == job_id and e.state == state for e in self.seen):
            assert time.monotonic() < deadline, f"{job_id}: {self.states(job_id)}"
            await asyncio.sleep(0.01)


def files(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def lines(ledger: Path) -> list[tuple[str, str, int, str, str]]:
    return [
        (e["cluster"], e["job_id"], e["generation"], e["event"], e.get("state", ""))
        for e in read_ledger(ledger)
    ]


async def test_every_workload_event_is_a_line_with_cluster_job_generation_and_wall_time(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    sim, events = backend(ledger), Events()
    await sim.start(events, lambda: None)
    before = time.time()
    await sim.create(request("done", "0.1s"))
    await sim.create(request("gone", "60s", node="n-1"))
    await events.until("done", pb.SUCCEEDED)
    await events.until("gone", pb.RUNNING)
    await sim.delete("gone", 1, "cancelled")
    # Superseded by a newer dispatch: the old workload is deleted, the new one created.
    await sim.create(request("moved", "60s"))
    await events.until("moved", pb.RUNNING)
    await sim.create(request("moved", "60s", generation=2))
    await sim.stop()

    assert lines(ledger) == [
        ("sim-a", "done", 1, "created", ""),
        ("sim-a", "gone", 1, "created", ""),
        ("sim-a", "done", 1, "running", ""),
        ("sim-a", "gone", 1, "running", ""),
        ("sim-a", "done", 1, "ended", "SUCCEEDED"),
        ("sim-a", "gone", 1, "deleted", "CANCELLED"),
        ("sim-a", "moved", 1, "created", ""),
        ("sim-a", "moved", 1, "running", ""),
        ("sim-a", "moved", 1, "deleted", "CANCELLED"),
        ("sim-a", "moved", 2, "created", ""),
    ]
    times = [e["time"] for e in read_ledger(ledger)]
    assert before <= times[0] and times == sorted(times) and times[-1] <= time.time()
    done = {e["event"]: e["time"] for e in read_ledger(ledger) if e["job_id"] == "done"}
    assert 0.1 <= done["ended"] - done["running"] < 0.5


async def test_a_restarted_agent_resumes_the_workloads_its_ledger_shows_running(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    first, events = backend(ledger), Events()
    await first.start(events, lambda: None)
    await first.create(request("long", "1.0s"))
    await first.create(request("short", "0.3s", node="n-1"))
    await events.until("long", pb.RUNNING)
    await events.until("short", pb.RUNNING)
    await first.stop()  # as an agent's stop or crash: its workloads are not deleted
    await asyncio.sleep(0.5)  # "short" is due while no agent runs

    second, resumed = backend(ledger), Events()
    await second.start(resumed, lambda: None)
    assert {w.job_id for w in await second.list_workloads()} == {"long", "short"}
    inventory = await second.inventory()
    assert sorted(n.free.quantities["cpu"] for n in inventory.nodes) == [3000, 3000]
    await resumed.until("short", pb.SUCCEEDED)
    await resumed.until("long", pb.SUCCEEDED)
    await second.stop()

    # Reported again as a re-list would, then ended: never admitted or started twice.
    assert resumed.states("long") == ["RUNNING", "SUCCEEDED"]
    assert resumed.states("short") == ["RUNNING", "SUCCEEDED"]
    events_by_job: dict[str, dict[str, float]] = {}
    for e in read_ledger(ledger):
        events_by_job.setdefault(e["job_id"], {})[e["event"]] = e["time"]
    # The overdue one ended when it was due, not when the agent came back.
    short = events_by_job["short"]
    assert abs(short["ended"] - short["running"] - 0.3) < 0.1
    long = events_by_job["long"]
    assert abs(long["ended"] - long["running"] - 1.0) < 0.2
    assert [e["event"] for e in read_ledger(ledger)].count("running") == 2


async def test_a_torn_last_line_from_a_kill_is_skipped(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    sim, events = backend(ledger), Events()
    await sim.start(events, lambda: None)
    await sim.create(request("kept", "60s"))
    await events.until("kept", pb.RUNNING)
    await sim.stop()
    with ledger.open("a") as f:
        f.write('{"time": 1, "cluster": "sim-a", "job_id": "torn", "gen')

    again, resumed = backend(ledger), Events()
    await again.start(resumed, lambda: None)
    assert [w.job_id for w in await again.list_workloads()] == ["kept"]
    await again.stop()


async def test_without_a_ledger_path_nothing_is_written(tmp_path: Path) -> None:
    config = SimulatedBackendConfig(nodes=[NodeShape(name="n", count=2, resources={"cpu": 4})])
    sim, events = SimulatedBackend(config), Events()
    await sim.start(events, lambda: None)
    await sim.create(request("plain", "0.05s"))
    await events.until("plain", pb.SUCCEEDED)
    await sim.stop()
    assert sim.ledger is None
    assert files(tmp_path) == []
