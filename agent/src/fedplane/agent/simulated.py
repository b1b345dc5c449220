"""A simulated member cluster: nodes from a config file, workloads that run for a set time.

A product feature for the local federation, demos, benchmarks and capacity planning: it
keeps real per-node accounting, so the hub's gang placement is exercised as on a real
cluster. A workload runs for its `fedplane.io/simulated-duration` annotation (else the
configured default) and fails with the configured probability.

With `ledger_path` set it keeps a ledger: one JSON line per workload event that really
happened in the simulated cluster (created, running, ended with its state, deleted), with the
cluster, job, generation and wall time. It is what ran where, for capacity planning and for
the chaos checks, and it is the simulated cluster's memory: a real cluster's workloads outlive
its agent, so an agent restarted on the same ledger resumes the workloads that had not ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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
from fedplane.runtime.config import ConfigError, SimulatedBackendConfig
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


class Ledger:
    """The simulated cluster's append-only record of what really ran where.

    Each line is written by one unbuffered write, so a kill -9 of the agent loses at most the
    line being written (a machine crash may lose what the page cache held: no fsync, since a
    simulated cluster does not outlive its machine).
    """

    def __init__(self, path: str | Path, cluster: str) -> None:
        self.path = Path(path)
        self.cluster = cluster
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = None

    def record(
        self, event: str, job_id: str, generation: int, at: float | None = None, **fields: Any
    ) -> None:
        """Append one event, at `at` (wall time) or now."""
        if self._file is None:
            self._file = self.path.open("ab", buffering=0)
        line = {
            "time": time.time() if at is None else at,
            "cluster": self.cluster,
            "job_id": job_id,
            "generation": generation,
            "event": event,
            **fields,
        }
        self._file.write((json.dumps(line, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_ledger(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every event of a ledger, in the order written; a torn last line (a kill -9) is skipped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event


@dataclass
class _Open:
    """A workload the ledger shows created and not yet ended."""

    generation: int
    duration: float
    usage: list[tuple[str, dict[str, int]]]
    running_at: float | None = None


def _open_workloads(events: Iterator[dict[str, Any]]) -> dict[str, _Open]:
    """The ledger's workloads that have not ended, by job id (one per job, as in the cluster)."""
    found: dict[str, _Open] = {}
    for event in events:
        job_id, generation, kind = event.get("job_id"), event.get("generation"), event.get("event")
        if not isinstance(job_id, str) or not isinstance(generation, int):
            continue
        if kind == "created":
            usage = [(str(node), {str(r): int(v) for r, v in used.items()}) for node, used in event["usage"]]
            found[job_id] = _Open(generation, float(event["duration"]), usage)
            continue
        workload = found.get(job_id)
        if workload is None or workload.generation != generation:
            continue
        if kind == "running":
            workload.running_at = float(event["time"])
        elif kind in ("ended", "deleted"):
            del found[job_id]
    return found


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
    def __init__(self, config: SimulatedBackendConfig, cluster: str = "") -> None:
        """`cluster` names the cluster in the ledger's lines."""
        self.config = config
        self.random = random.Random(config.seed)
        self.nodes: dict[str, _SimNode] = {}
        for index, shape in enumerate(config.nodes):
            try:
                allocatable = quantity.parse_map(shape.resources)
                taints = [Taint.parse(t) for t in shape.taints]
            except ValueError as exc:
                raise ConfigError(f"backend.nodes[{index}] ({shape.name}): {exc}") from None
            labels = dict(shape.labels)
            if shape.gpu_type:
                labels[quantity.GPU_PRODUCT_LABEL] = shape.gpu_type
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
        self._datasets = []
        for name, size in sorted(config.datasets.items()):
            try:
                self._datasets.append(pb.DatasetPresence(id=name, bytes=quantity.parse("storage", size)))
            except ValueError as exc:
                raise ConfigError(f"backend.datasets.{name}: {exc}") from None
        self.workloads: dict[str, _SimWorkload] = {}
        # Workloads started per job id (a job dispatched once must show 1): capacity-planning stats.
        self.started: Counter[str] = Counter()
        self._emit: EmitStatus = lambda event: None
        self._changed: NotifyChange = lambda: None
        self.ledger = Ledger(config.ledger_path, cluster) if config.ledger_path else None

    async def start(self, emit: EmitStatus, changed: NotifyChange) -> None:
        self._emit = emit
        self._changed = changed
        if self.ledger is not None:
            self._resume(_open_workloads(read_ledger(self.ledger.path)))

    def _resume(self, found: dict[str, _Open]) -> None:
        """Carry on with the workloads the ledger shows running: they ran on while the agent was
        away, and one that should have ended meanwhile ends now, at the time it was due."""
        for job_id, sim in found.items():
            usage = [(node, used) for node, used in sim.usage if node in self.nodes]
            for node, used in usage:
                self.nodes[node].take(used, 1)
            workload = _SimWorkload(job_id, sim.generation, usage)
            self.workloads[job_id] = workload
            workload.task = asyncio.create_task(
                self._run(workload, sim.duration, sim.running_at), name=f"sim-{job_id}"
            )
        if found:
            self._changed()

    async def stop(self) -> None:
        for workload in self.workloads.values():
            if workload.task:
                workload.task.cancel()
        for workload in self.workloads.values():
            if workload.task:
                with contextlib.suppress(asyncio.CancelledError):
                    await workload.task
        if self.ledger is not None:
            self.ledger.close()

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
        if self.ledger is not None:
            self.ledger.record("created", request.job_id, request.generation, duration=duration, usage=usage)
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
            except (ValueError, AttributeError, RecursionError) as exc:
                # RecursionError: a manifest nested too deep to parse is as invalid as one that is no
                # JSON, not a passing failure to retry for good.
                raise BackendError(
                    f"{DURATION_ANNOTATION}: {exc}", permanent=True, reason="InvalidWorkload"
                ) from exc
        return self.config.default_duration_seconds

    async def _run(self, workload: _SimWorkload, duration: float, running_at: float | None = None) -> None:
        """Admit, run and end a workload; one resumed from the ledger started running at `running_at`."""
        job_id, generation = workload.job_id, workload.generation
        if running_at is None:
            self._emit(WorkloadEvent(job_id, generation, pb.ADMITTED, "Admitted", "simulated"))
            await asyncio.sleep(self.config.start_delay_seconds)
            running_at = time.time()
            if self.ledger is not None:
                self.ledger.record("running", job_id, generation, at=running_at)
        workload.state = pb.RUNNING
        self._emit(WorkloadEvent(job_id, generation, pb.RUNNING, "Started", ""))
        due = running_at + duration
        # Ended while the agent was away: at the time it was due; else now.
        at = due if due <= time.time() else None
        await asyncio.sleep(max(0.0, due - time.time()))
        if self.random.random() < self.config.failure_rate:
            self._finish(workload, pb.FAILED, "SimulatedFailure", "the simulated workload failed", at=at)
        else:
            self._finish(workload, pb.SUCCEEDED, "Completed", f"ran for {duration:g}s", at=at)

    def _finish(
        self, workload: _SimWorkload, state: int, reason: str, message: str, at: float | None = None
    ) -> None:
        if workload.done:
            return
        workload.done = True
        workload.state = state
        for node, used in workload.usage:
            self.nodes[node].take(used, -1)
        if self.ledger is not None:
            kind = "deleted" if state == pb.CANCELLED else "ended"
            self.ledger.record(
                kind,
                workload.job_id,
                workload.generation,
                at=at,
                state=pb.JobState.Name(state),  # type: ignore[arg-type]
                reason=reason,
            )
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
