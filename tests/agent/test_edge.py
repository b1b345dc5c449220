"""An edge site: its agent on a leaf nats-server, whose link to the hub's nats-server is cut and
restored (through a CutLink), and the agent's own side of a weak link: its outbox, its fences,
its limits across a restart, and its orphan collection when contact returns.

The hub's half is played through bus's hub-side functions on the hub's nats-server, as in
test_daemon.py, so each test sees exactly what a hub would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedplane.agent.backend import (
    Backend,
    CreateRequest,
    EmitStatus,
    InventorySnapshot,
    NotifyChange,
    WorkloadEvent,
    WorkloadRef,
)
from fedplane.agent.daemon import ORPHAN_REASON, Agent
from fedplane.agent.simulated import SimulatedBackend
from fedplane.local import servers as embedded
from fedplane.local.link import CutLink
from fedplane.runtime import bus
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb
from tests.agent.support import HubSide, agent_config, create_command

pytestmark = pytest.mark.timeout(40)


@dataclasses.dataclass
class Edge:
    """The hub's nats-server, and an edge site's leaf nats-server linked to it through `link`."""

    hub: embedded.ServerProcess
    link: CutLink
    leaf: embedded.ServerProcess

    @property
    def leaf_url(self) -> str:
        return f"nats://{self.leaf.address}"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[embedded.ServerProcess, embedded.ServerProcess, int]]:
    hub = embedded.start_nats(tmp_path / "hub-nats", leafnode_port=0)
    link_port = embedded.free_port()
    try:
        leaf = embedded.start_nats_leaf(tmp_path / "leaf-nats", f"127.0.0.1:{link_port}")
    except Exception:
        hub.stop()
        raise
    try:
        yield hub, leaf, link_port
    finally:
        leaf.stop()
        hub.stop()


@pytest.fixture
async def edge(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess, int],
) -> AsyncIterator[Edge]:
    hub, leaf, link_port = servers
    async with CutLink("127.0.0.1", hub.leafnode_port, port=link_port) as link:
        yield Edge(hub, link, leaf)


@pytest.fixture
async def hub(edge: Edge) -> AsyncIterator[tuple[bus.Connection, HubSide]]:
    """The streams as a hub creates them on its nats-server, and the hub's side of the protocol."""
    nc = await bus.connect(f"nats://{edge.hub.address}", "test-hub")
    js = bus.jetstream(nc)
    await bus.ensure_streams(js, 3600)
    side = HubSide(js)
    side.start()
    try:
        yield nc, side
    finally:
        await side.stop()
        await bus.close(nc)


@pytest.fixture
def hub_side(hub: tuple[bus.Connection, HubSide]) -> HubSide:
    return hub[1]


async def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for `check`; returns when it held (monotonic time)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic()


async def start_agent(
    edge: Edge, state_dir: Path | None = None, backend: Backend | None = None, **settings: Any
) -> Agent:
    """The edge site's agent on the leaf, in contact with the hub once this returns."""
    config = dataclasses.replace(
        agent_config(edge.leaf_url),
        heartbeat_interval_seconds=0.3,
        state_dir=str(state_dir) if state_dir else "",
        **settings,
    )
    agent = Agent(config, backend if backend is not None else SimulatedBackend(config.simulated()))
    await agent.start()
    await until(lambda: agent.in_contact, 15, "the agent's heartbeats to reach the hub through the leaf")
    return agent


async def last_heartbeat(edge: Edge, hub: tuple[bus.Connection, HubSide]) -> int:
    """The stream sequence of the last heartbeat the hub's JetStream stored for the edge cluster."""
    nc, _ = hub
    msg = await bus.jetstream(nc).get_last_msg(bus.REPORTS_STREAM, bus.subject("heartbeat", "edge"))
    return int(msg.seq or 0)


# ---------------------------------------------------------------------- through a leaf node


async def test_updates_made_while_the_link_is_cut_arrive_in_order_when_it_returns(
    edge: Edge, hub: tuple[bus.Connection, HubSide], tmp_path: Path
) -> None:
    hub_side = hub[1]
    agent = await start_agent(edge, tmp_path / "state")
    try:
        jobs = [f"j-{i}" for i in range(3)]
        await hub_side.send(
            "edge", *(create_command(j, duration=f"{1.0 + 0.4 * i}s") for i, j in enumerate(jobs))
        )
        for job in jobs:
            await hub_side.until(job, pb.RUNNING)

        await edge.link.cut()
        await until(lambda: not agent.in_contact, 5, "the agent to notice that its heartbeats fail")
        stored = await last_heartbeat(edge, hub)
        await until(lambda: len(agent.outbox) == 3, 10, "the jobs to finish while the link is cut")
        await asyncio.sleep(0.5)
        # The jobs ran to their end offline; the hub heard nothing of it, nor any heartbeat.
        assert all(pb.SUCCEEDED not in hub_side.states(j) for j in jobs)
        assert await last_heartbeat(edge, hub) == stored
        assert await agent.backend.list_workloads() == []

        await edge.link.restore()
        for job in jobs:
            await hub_side.until(job, pb.SUCCEEDED, timeout=15)
        assert [u.job_id for u in hub_side.arrived if u.state == pb.SUCCEEDED] == jobs  # in order
        for job in jobs:
            assert hub_side.states(job) == [pb.ADMITTED, pb.RUNNING, pb.SUCCEEDED]
        await until(lambda: agent.in_contact and not len(agent.outbox), 5, "the outbox to drain")
        assert await last_heartbeat(edge, hub) > stored
    finally:
        await agent.stop()


async def test_a_command_sent_while_the_link_is_cut_arrives_when_it_returns(
    edge: Edge, hub_side: HubSide
) -> None:
    agent = await start_agent(edge)
    try:
        await edge.link.cut()
        await until(lambda: not agent.in_contact, 5, "the agent to notice the cut")
        await hub_side.send(
            "edge", create_command("j-late", duration="0.2s")
        )  # stored by the hub's JetStream
        await asyncio.sleep(1.5)
        assert hub_side.states("j-late") == []
        assert await agent.backend.list_workloads() == []

        await edge.link.restore()
        await hub_side.until("j-late", pb.SUCCEEDED, timeout=15)
        assert hub_side.states("j-late") == [pb.ADMITTED, pb.RUNNING, pb.SUCCEEDED]
    finally:
        await agent.stop()


async def test_an_agent_restarted_while_the_link_is_cut_keeps_and_replays_its_outbox(
    edge: Edge, hub_side: HubSide, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    agent = await start_agent(edge, state)
    try:
        await hub_side.send(
            "edge", create_command("j-a", duration="0.6s"), create_command("j-b", duration="1s")
        )
        await hub_side.until("j-b", pb.RUNNING)
        await edge.link.cut()
        await until(lambda: len(agent.outbox) == 2, 10, "both jobs to finish while cut")
    finally:
        await agent.stop()

    config = dataclasses.replace(
        agent_config(edge.leaf_url), heartbeat_interval_seconds=0.3, state_dir=str(state)
    )
    restarted = Agent(config, SimulatedBackend(config.simulated()))
    await restarted.start()  # the link is still cut: it starts anyway, on the leaf
    try:
        assert len(restarted.outbox) == 2
        await asyncio.sleep(1.0)
        assert not restarted.in_contact
        assert hub_side.states("j-a") == hub_side.states("j-b") == [pb.ADMITTED, pb.RUNNING]

        await edge.link.restore()
        await hub_side.until("j-b", pb.SUCCEEDED, timeout=15)
        await hub_side.until("j-a", pb.SUCCEEDED)
        assert [u.job_id for u in hub_side.arrived if u.state == pb.SUCCEEDED] == ["j-a", "j-b"]
        await until(lambda: not len(restarted.outbox), 5, "the outbox to drain")
        assert restarted.generations == {"j-a": 1, "j-b": 1}
    finally:
        await restarted.stop()


# ---------------------------------------------------------------------- self-fencing


async def test_a_workload_is_fenced_once_the_agent_is_cut_off_past_its_limit(
    edge: Edge, hub_side: HubSide
) -> None:
    agent = await start_agent(edge)
    try:
        await hub_side.send(
            "edge",
            create_command("j-fenced", duration="60s", fence_after_seconds=2),
            create_command("j-waits", duration="60s", node="cpu-1"),  # fence 0: waits for the hub
        )
        await hub_side.until("j-fenced", pb.RUNNING)
        await hub_side.until("j-waits", pb.RUNNING)

        await edge.link.cut()
        cut_at = time.monotonic()
        await asyncio.sleep(1.2)
        assert {w.job_id for w in await agent.backend.list_workloads()} == {"j-fenced", "j-waits"}
        fenced_at = await until(lambda: len(agent.outbox) >= 1, 6, "the fenced workload's end")
        # The cut-off counts from the last heartbeat stored, up to an interval (0.3 s) before the cut.
        assert 2.0 - 0.3 <= fenced_at - cut_at < 4.5
        assert [w.job_id for w in await agent.backend.list_workloads()] == ["j-waits"]

        await edge.link.restore()
        fenced = await hub_side.until("j-fenced", pb.CANCELLED, timeout=15)
        assert (fenced.reason, fenced.generation) == ("Fenced", 1)
        assert fenced.message.startswith("fenced: cut off from the hub for ")
        assert fenced.message.endswith(" s; the hub may run it elsewhere")
        assert hub_side.states("j-fenced") == [pb.ADMITTED, pb.RUNNING, pb.CANCELLED]
        await asyncio.sleep(0.5)
        assert hub_side.states("j-waits") == [pb.ADMITTED, pb.RUNNING]  # still running
        assert [w.job_id for w in await agent.backend.list_workloads()] == ["j-waits"]
    finally:
        await agent.stop()


class StandingCluster:
    """Workloads that run until deleted, kept outside any agent: a cluster that outlives its agent."""

    def __init__(self) -> None:
        self.workloads: dict[str, int] = {}
        self.deleted_at: dict[str, float] = {}


class StandingBackend(Backend):
    """A StandingCluster as one agent sees it: a create runs at once, a delete ends it."""

    def __init__(self, cluster: StandingCluster) -> None:
        self.cluster = cluster
        self._emit: EmitStatus = lambda event: None

    async def start(self, emit: EmitStatus, changed: NotifyChange) -> None:
        self._emit = emit

    async def stop(self) -> None:
        pass

    async def inventory(self) -> InventorySnapshot:
        return InventorySnapshot(nodes=[])

    async def datasets(self) -> list[pb.DatasetPresence]:
        return []

    async def create(self, request: CreateRequest) -> None:
        self.cluster.workloads[request.job_id] = request.generation
        for state in (pb.ADMITTED, pb.RUNNING):
            self._emit(WorkloadEvent(request.job_id, request.generation, state))

    async def delete(self, job_id: str, generation: int, reason: str) -> None:
        if self.cluster.workloads.get(job_id) == generation:
            del self.cluster.workloads[job_id]
            self.cluster.deleted_at[job_id] = time.monotonic()
        self._emit(WorkloadEvent(job_id, generation, pb.CANCELLED, "Deleted", reason))

    async def list_workloads(self) -> list[WorkloadRef]:
        return [WorkloadRef(job, generation) for job, generation in self.cluster.workloads.items()]


async def test_a_restarted_agent_still_fences_counting_from_its_last_contact_before_the_restart(
    edge: Edge, hub_side: HubSide, tmp_path: Path
) -> None:
    cluster, state = StandingCluster(), tmp_path / "state"
    agent = await start_agent(edge, state, StandingBackend(cluster))
    try:
        await hub_side.send(
            "edge",
            create_command("j-fenced", fence_after_seconds=4),
            create_command("j-waits"),
        )
        await hub_side.until("j-fenced", pb.RUNNING)
        await hub_side.until("j-waits", pb.RUNNING)
        await edge.link.cut()
        cut_at = time.monotonic()
        await asyncio.sleep(2.0)
    finally:
        await agent.stop()

    config = dataclasses.replace(
        agent_config(edge.leaf_url), heartbeat_interval_seconds=0.3, state_dir=str(state)
    )
    restarted = Agent(config, StandingBackend(cluster))
    restarted_at = time.monotonic()
    await restarted.start()
    try:
        fenced_at = await until(lambda: "j-fenced" in cluster.deleted_at, 8, "the fence after the restart")
        # Counted from the contact before the restart, not from the restart itself.
        assert 4.0 - 0.3 <= fenced_at - cut_at < 6.0
        assert fenced_at - restarted_at < 4.0
        assert set(cluster.workloads) == {"j-waits"}

        await edge.link.restore()
        fenced = await hub_side.until("j-fenced", pb.CANCELLED, timeout=15)
        assert fenced.reason == "Fenced"
        assert "j-waits" not in cluster.deleted_at
    finally:
        await restarted.stop()


async def test_a_max_run_clock_carries_on_across_an_agent_restart(
    edge: Edge, hub_side: HubSide, tmp_path: Path
) -> None:
    cluster, state = StandingCluster(), tmp_path / "state"
    agent = await start_agent(edge, state, StandingBackend(cluster))
    try:
        await hub_side.send("edge", create_command("j-long", max_run_seconds=3))
        running = await hub_side.until("j-long", pb.RUNNING)
        started = time.monotonic()
        await asyncio.sleep(1.5)
    finally:
        await agent.stop()
    restarted = await start_agent(edge, state, StandingBackend(cluster))
    try:
        failed = await hub_side.until("j-long", pb.FAILED, timeout=10)
        assert failed.reason == "MaxRunTimeExceeded"
        # Stopped 3 s after it started running, not 3 s after the restart.
        assert 2.8 <= cluster.deleted_at["j-long"] - started < 4.0
        ran = (failed.time.ToNanoseconds() - running.time.ToNanoseconds()) / 1e9
        assert ran < 4.0
        assert hub_side.states("j-long") == [pb.ADMITTED, pb.RUNNING, pb.FAILED]
    finally:
        await restarted.stop()


# ---------------------------------------------------------------------- orphans when contact returns


async def test_orphans_are_collected_as_soon_as_the_link_returns(
    edge: Edge, hub: tuple[bus.Connection, HubSide]
) -> None:
    nc, hub_side = hub
    orphans: set[str] = set()
    asked: list[set[str]] = []

    async def answer(cluster: str, payload: bytes) -> bytes:
        query = agent_pb.OrphanQuery.FromString(payload)
        asked.append({w.job_id for w in query.workloads})
        return agent_pb.OrphanReply(
            orphans=[w for w in query.workloads if w.job_id in orphans]
        ).SerializeToString()

    served = await bus.serve_requests(nc, "gc", answer)
    # Collecting every hour only: any collection within the test is the one contact set off.
    agent = await start_agent(edge, gc_interval_seconds=3600)
    try:
        await hub_side.send(
            "edge",
            create_command("j-requeued", duration="60s"),
            create_command("j-kept", duration="60s", node="cpu-1"),
        )
        await hub_side.until("j-requeued", pb.RUNNING)
        await hub_side.until("j-kept", pb.RUNNING)
        await edge.link.cut()
        await until(lambda: not agent.in_contact, 5, "the agent to notice the cut")
        orphans.add("j-requeued")  # meanwhile the hub ran the job elsewhere
        asked.clear()

        await edge.link.restore()
        cancelled = await hub_side.until("j-requeued", pb.CANCELLED, timeout=15)
        assert cancelled.message == ORPHAN_REASON
        assert asked and asked[0] == {"j-requeued", "j-kept"}
        assert [w.job_id for w in await agent.backend.list_workloads()] == ["j-kept"]
        assert hub_side.states("j-kept") == [pb.ADMITTED, pb.RUNNING]
    finally:
        await agent.stop()
        await bus.unsubscribe(served)
