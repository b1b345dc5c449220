"""Fakes for the hub drivers' unit tests: a clock the test moves, NATS messages, a command
queue, and the table, registry and drivers wired over an in-memory store."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

from fedplane.core import dispatch as sm
from fedplane.core.placement import Verdict
from fedplane.hub import records
from fedplane.hub.clusters import ClusterRegistry, ClusterState, health_thresholds
from fedplane.hub.intake import Intake
from fedplane.hub.table import JobRecord, JobTable, StatusWrite
from fedplane.runtime import bus
from fedplane.runtime.config import HubConfig
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb
from tests.hub.memory_store import MemoryStore

START = 1_700_000_000.0


class FakeClock:
    """Wall time that moves only when the test says; sleepers wake as it passes their deadline."""

    def __init__(self, now: float = START) -> None:
        self.now = now
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time on, stopping at each sleeper's deadline so that periodic loops tick in turn."""
        target = self.now + seconds
        while True:
            due = [deadline for deadline, _ in self._sleepers if deadline <= target]
            if not due:
                break
            self.now = min(due)
            woken = [f for deadline, f in self._sleepers if deadline <= self.now]
            self._sleepers = [(d, f) for d, f in self._sleepers if d > self.now]
            for future in woken:
                if not future.done():
                    future.set_result(None)
            await settle()
        self.now = target
        await settle()


async def settle(turns: int = 20) -> None:
    """Let every runnable task run until it waits on something the test controls."""
    for _ in range(turns):
        await asyncio.sleep(0)


@dataclass
class FakeMsg:
    """A consumed status message as the status intake reads and settles it (bus.Incoming, bus.Ackable)."""

    data: bytes
    subject: str = ""
    headers: dict[str, str] | None = None
    acked: bool = False
    naked: bool = False

    async def ack(self) -> None:
        self.acked = True

    async def nak(self, delay: float | None = None) -> None:
        self.naked = True


def report_msg(kind: str, cluster: str, payload: bytes, stored_at: float) -> bus.Message:
    """A report as the hub's ordered consumer delivers it: a real nats-py message whose reply
    subject carries the JetStream metadata, so bus.stored_at reads `stored_at` from it as it would
    from the server."""
    reply = f"$JS.ACK.{bus.REPORTS_STREAM}.ordered.1.1.1.{round(stored_at * 1e9)}.0"
    return bus.Message(_client=cast(Any, None), subject=bus.subject(kind, cluster), reply=reply, data=payload)


def status_msg(*updates: agent_pb.StatusUpdate) -> FakeMsg:
    cluster = updates[0].cluster if updates else "c"
    return FakeMsg(
        agent_pb.StatusBatch(updates=updates).SerializeToString(),
        subject=bus.subject("status", cluster),
        headers={bus.MSG_TYPE_HEADER: "StatusBatch"},
    )


@dataclass
class FakeCommands:
    queued: list[tuple[pb.Job, agent_pb.DispatchCommand]] = field(default_factory=list)

    def queue(self, job: pb.Job, command: agent_pb.DispatchCommand) -> None:
        self.queued.append((job, command))


def dispatched_status(status: pb.JobStatus, cluster: str, now: float) -> pb.JobStatus:
    """`status` dispatched to `cluster` (with no assignments and a zero score), as a round records it."""
    return records.record(status, sm.dispatch(records.state_of(status), Verdict(cluster, True)), now)


def reported_status(status: pb.JobStatus, state: int, now: float) -> pb.JobStatus:
    """`status` after its own cluster reported `state` at its generation, which must apply."""
    outcome = sm.apply_update(records.state_of(status), status.cluster, status.generation, state)
    assert isinstance(outcome, sm.Transition), outcome
    return records.record(status, outcome, now)


def cancelled_status(status: pb.JobStatus, reason: str, now: float) -> pb.JobStatus:
    """`status` after a cancel that moves it (to CANCELLED, or CANCELLING on a cluster)."""
    transition = sm.request_cancel(records.state_of(status), reason).transition
    assert transition is not None
    return records.record(status, transition, now)


def spec(name: str = "job", cpu_millis: int = 1000, queue: str = "") -> pb.JobSpec:
    job_spec = pb.JobSpec(name=name, queue=queue, pod_sets=[pb.PodSet(name="main", count=1)])
    job_spec.pod_sets[0].requests.quantities["cpu"] = cpu_millis
    return job_spec


def ready_cluster(registry: ClusterRegistry, name: str, now: float, cpu_millis: int = 8000) -> ClusterState:
    """A cluster with one node of `cpu_millis` free, its heartbeat seen at `now`."""
    state, _ = registry.get_or_add(name)
    node = pb.Node(name=f"{name}-n0", ready=True)
    node.allocatable.quantities["cpu"] = cpu_millis
    node.free.quantities["cpu"] = cpu_millis
    state.heartbeat = agent_pb.Heartbeat(cluster=name)
    state.apply_inventory(agent_pb.Inventory(cluster=name, nodes=[node]))
    state.last_seen = now
    return state


def free_cpu(registry: ClusterRegistry, name: str, now: float) -> int:
    """The cluster's free cpu as placement sees it: reported, minus capacity in flight."""
    (view,) = [v for v in registry.views(now) if v.name == name]
    return sum(node.free.get("cpu", 0) for node in view.nodes)


@dataclass
class Parts:
    """A table over a memory store, with a registry, a clock and a command queue."""

    store: MemoryStore = field(default_factory=MemoryStore)
    clock: FakeClock = field(default_factory=FakeClock)
    commands: FakeCommands = field(default_factory=FakeCommands)
    config: HubConfig = field(default_factory=HubConfig)
    table: JobTable = field(init=False)
    registry: ClusterRegistry = field(init=False)

    def __post_init__(self) -> None:
        self.table = JobTable(self.store)
        self.registry = ClusterRegistry(health_thresholds(self.config))
        self.store.clock = self.clock  # its cluster leases expire by the test's clock

    async def submit(self, *specs: pb.JobSpec) -> list[JobRecord]:
        """Jobs stored through the intake, as a submit stores them."""
        intake = Intake(self.table, self.clock)
        runner = asyncio.create_task(intake.run())
        try:
            results = await intake.submit([(s, "") for s in specs], batch=True)
        finally:
            runner.cancel()
        return [self.table.jobs[job.id] for job, _ in results]

    async def set_status(self, record: JobRecord, status: pb.JobStatus) -> JobRecord:
        """Write a status through the table (as a driver would), expecting it to land."""
        (written,) = await self.table.write([StatusWrite.of(record.id, status, record.revision)])
        assert written is not None
        return written

    async def dispatched(self, record: JobRecord, cluster: str) -> JobRecord:
        status = dispatched_status(record.status, cluster, self.clock.time())
        return await self.set_status(record, status)
