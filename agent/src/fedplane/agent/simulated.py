"""A simulated member cluster: nodes from a config file, workloads that run for a set time.

A product feature for the local federation, demos, benchmarks and capacity planning: it
keeps real per-node accounting, so the hub's gang placement is exercised as on a real
cluster. A workload runs for its `fedplane.io/simulated-duration` annotation (else the
configured default) and fails with the configured probability.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from fedplane.agent.backend import (
    Backend,
    BackendError,
    CreateRequest,
    EmitStatus,
    InventorySnapshot,
    NotifyChange,
    WorkloadEvent,
    WorkloadRef,
)
from fedplane.core import quantity
from fedplane.core.model import Taint
from fedplane.runtime.config import SimulatedBackendConfig
from fedplane.v1 import types_pb2 as pb

DURATION_ANNOTATION = "fedplane.io/simulated-duration"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str) -> float:
    """ "90s", "1m30s", "500ms", "2h" or a plain number of seconds."""
    text = text.strip()
    with contextlib.suppress(ValueError):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(a + u for a, u in parts) != text:
        raise ValueError(f"invalid duration {text!r} (examples: 30s, 1m30s, 500ms)")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(amount) * scale[unit] for amount, unit in parts)


@dataclass
class _SimNode:
    proto: pb.Node
    free: dict[str, int]
    # The node as last reported, rebuilt only after its free capacity changed.
    reported: pb.Node | None = None

    def take(self, used: dict[str, int], sign: int) -> None:
        free = self.free
        for resource, amount in used.items():
            free[resource] = free.get(resource, 0) - sign * amount
        self.reported = None


@dataclass
class _SimWorkload:
    job_id: str
    generation: int
    usage: list[tuple[str, dict[str, int]]]
    task: asyncio.Task[None] | None = None
    state: int = pb.ADMITTED
    done: bool = field(default=False)


class SimulatedBackend(Backend):
    def __init__(self, config: SimulatedBackendConfig) -> None:
        self.config = config
        self.random = random.Random(config.seed)
        self.nodes: dict[str, _SimNode] = {}
        for shape in config.nodes:
            allocatable = quantity.parse_map(shape.resources)
            labels = dict(shape.labels)
            if shape.gpu_type:
                labels[quantity.GPU_PRODUCT_LABEL] = shape.gpu_type
            taints = [Taint.parse(t) for t in shape.taints]
            for i in range(shape.count):
                name = f"{shape.name}-{i}" if shape.count > 1 else shape.name
                node = pb.Node(
                    name=name,
                    labels=labels,
                    taints=[pb.Taint(key=t.key, value=t.value, effect=t.effect) for t in taints],
                    ready=True,
                )
                node.allocatable.quantities.update(allocatable)
                self.nodes[name] = _SimNode(node, dict(allocatable))
        self._datasets = [
            pb.DatasetPresence(id=name, bytes=quantity.parse("storage", size))
            for name, size in sorted(config.datasets.items())
        ]
        self.workloads: dict[str, _SimWorkload] = {}
        # Workloads started per job id (a job dispatched once must show 1): capacity-planning stats.
        self.started: Counter[str] = Counter()
        self._emit: EmitStatus = lambda event: None
        self._changed: NotifyChange = lambda: None

    async def start(self, emit: EmitStatus, changed: NotifyChange) -> None:
        self._emit = emit
        self._changed = changed

    async def stop(self) -> None:
        for workload in self.workloads.values():
            if workload.task:
                workload.task.cancel()
        for workload in self.workloads.values():
            if workload.task:
                with contextlib.suppress(asyncio.CancelledError):
                    await workload.task

    async def inventory(self) -> InventorySnapshot:
        nodes = []
        for sim in self.nodes.values():
            node = sim.reported
            if node is None:
                node = sim.reported = pb.Node()
                node.CopyFrom(sim.proto)
                node.free.quantities.update(sim.free)
            nodes.append(node)
        accounted = [f"{w.job_id}:{w.generation}" for w in self.workloads.values() if not w.done]
        return InventorySnapshot(nodes, accounted)

    async def datasets(self) -> list[pb.DatasetPresence]:
        return list(self._datasets)

    async def create(self, request: CreateRequest) -> None:
        existing = self.workloads.get(request.job_id)
        if existing is not None and existing.generation == request.generation:
            return  # adopt: already created for this dispatch
        if existing is not None and not existing.done:
            await self.delete(existing.job_id, existing.generation, "superseded by a newer dispatch")
        requests = {p.name: dict(p.requests.quantities) for p in request.spec.pod_sets}
        usage: list[tuple[str, dict[str, int]]] = []
        for a in request.assignments:
            if a.node not in self.nodes:
                raise BackendError(
                    f"node {a.node} does not exist in this cluster", permanent=True, reason="NodeNotFound"
                )
            if a.pod_set not in requests:
                raise BackendError(
                    f"pod set {a.pod_set} not in the spec", permanent=True, reason="InvalidAssignment"
                )
            usage.append((a.node, {r: v * a.count for r, v in requests[a.pod_set].items()}))
        duration = self._duration(request.spec)
        for node, used in usage:
            self.nodes[node].take(used, 1)
        workload = _SimWorkload(request.job_id, request.generation, usage)
        self.workloads[request.job_id] = workload
        self.started[request.job_id] += 1
        workload.task = asyncio.create_task(self._run(workload, duration), name=f"sim-{request.job_id}")
        self._changed()

    def _duration(self, spec: pb.JobSpec) -> float:
        if spec.workload.manifest_json:
            try:
                manifest = json.loads(spec.workload.manifest_json)
                text = manifest.get("metadata", {}).get("annotations", {}).get(DURATION_ANNOTATION)
                if text is not None:
                    return parse_duration(str(text))
            except (ValueError, AttributeError) as exc:
                raise BackendError(
                    f"{DURATION_ANNOTATION}: {exc}", permanent=True, reason="InvalidWorkload"
                ) from exc
        return self.config.default_duration_seconds

    async def _run(self, workload: _SimWorkload, duration: float) -> None:
        delay = self.config.start_delay_seconds
        self._emit(WorkloadEvent(workload.job_id, workload.generation, pb.ADMITTED, "Admitted", "simulated"))
        await asyncio.sleep(delay)
        workload.state = pb.RUNNING
        self._emit(WorkloadEvent(workload.job_id, workload.generation, pb.RUNNING, "Started", ""))
        await asyncio.sleep(duration)
        if self.random.random() < self.config.failure_rate:
            self._finish(workload, pb.FAILED, "SimulatedFailure", "the simulated workload failed")
        else:
            self._finish(workload, pb.SUCCEEDED, "Completed", f"ran for {duration:g}s")

    def _finish(self, workload: _SimWorkload, state: int, reason: str, message: str) -> None:
        if workload.done:
            return
        workload.done = True
        workload.state = state
        for node, used in workload.usage:
            self.nodes[node].take(used, -1)
        self._emit(WorkloadEvent(workload.job_id, workload.generation, state, reason, message))  # type: ignore[arg-type]
        self._changed()

    async def delete(self, job_id: str, generation: int, reason: str) -> None:
        workload = self.workloads.get(job_id)
        if workload is None or workload.generation != generation:
            self._emit(WorkloadEvent(job_id, generation, pb.CANCELLED, "Deleted", "no workload was present"))
            return
        if workload.task and not workload.done:
            workload.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await workload.task
        self._finish(workload, pb.CANCELLED, "Deleted", reason)

    async def list_workloads(self) -> list[WorkloadRef]:
        return [WorkloadRef(w.job_id, w.generation) for w in self.workloads.values() if not w.done]
