"""The hub's half of the protocol and an agent's simulated cluster, for the agent's tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fedplane.agent.simulated import DURATION_ANNOTATION
from fedplane.runtime import bus
from fedplane.runtime.config import AgentConfig
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb


class HubSide:
    """The hub's half of the protocol, played with bus's hub-side functions: it sends dispatch
    commands and collects (and acks) the status updates the agents send back."""

    def __init__(self, js: bus.JetStream) -> None:
        self.js = js
        self.updates: dict[str, list[agent_pb.StatusUpdate]] = {}
        # Every update in the order it arrived, across jobs.
        self.arrived: list[agent_pb.StatusUpdate] = []
        self._arrived = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._consume())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 5)

    async def _consume(self) -> None:
        async for msgs in bus.consume_statuses(self.js, lambda: self._stopping):
            for msg in msgs:
                for update in bus.status_updates_in(msg):
                    self.updates.setdefault(update.job_id, []).append(update)
                    self.arrived.append(update)
            await bus.ack_or_nak(msgs, (), delay=0.1)
            self._arrived.set()

    async def send(self, cluster: str, *commands: agent_pb.DispatchCommand) -> None:
        """One DispatchBatch message with these commands, as the hub's command sender publishes it."""
        batch = agent_pb.DispatchBatch(commands=commands).SerializeToString()
        assert await bus.publish_all(self.js, [bus.command_batch_message(cluster, batch)]) == [None]

    def states(self, job_id: str) -> list[pb.JobState.ValueType]:
        return [u.state for u in self.updates.get(job_id, [])]

    async def until(
        self, job_id: str, state: pb.JobState.ValueType, timeout: float = 10.0
    ) -> agent_pb.StatusUpdate:
        """The first update of `job_id` to `state`, once it has arrived."""
        deadline = time.monotonic() + timeout
        while True:
            for update in self.updates.get(job_id, []):
                if update.state == state:
                    return update
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{job_id}: no {pb.JobState.Name(state)} within {timeout}s: {self.states(job_id)}"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)


def agent_config(nats_url: str, cluster: str = "edge") -> AgentConfig:
    """A simulated cluster of two 8-CPU nodes, cpu-0 and cpu-1; workloads start after 50 ms."""
    nodes = [{"name": "cpu", "count": 2, "resources": {"cpu": "8", "memory": "32Gi"}}]
    return AgentConfig(
        cluster=cluster,
        nats_url=nats_url,
        heartbeat_interval_seconds=0.5,
        gc_interval_seconds=0,
        backend={"type": "simulated", "nodes": nodes, "start_delay_seconds": 0.05},
    )


def create_command(
    job_id: str,
    *,
    generation: int = 1,
    duration: str = "0.3s",
    max_run_seconds: int = 0,
    node: str = "cpu-0",
    fence_after_seconds: float = 0.0,
) -> agent_pb.DispatchCommand:
    """A create for one 1-CPU pod on `node`, running `duration` on the simulated backend."""
    manifest = {"kind": "Job", "metadata": {"annotations": {DURATION_ANNOTATION: duration}}}
    command = agent_pb.DispatchCommand(job_id=job_id, generation=generation)
    command.create.fence_after_seconds = fence_after_seconds
    spec = command.create.spec
    spec.name = job_id
    spec.max_run_seconds = max_run_seconds
    spec.workload.manifest_json = json.dumps(manifest)
    pod_set = spec.pod_sets.add(name="main", count=1)
    pod_set.requests.quantities["cpu"] = 1000
    command.create.assignments.add(pod_set="main", node=node, count=1)
    command.create.hub_id = "fedplane"
    return command


def delete_command(job_id: str, generation: int = 1, reason: str = "cancelled") -> agent_pb.DispatchCommand:
    return agent_pb.DispatchCommand(
        job_id=job_id, generation=generation, delete=agent_pb.DeleteWorkload(reason=reason)
    )
