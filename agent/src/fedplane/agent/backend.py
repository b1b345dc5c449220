"""The interface between the agent daemon and the cluster it manages.

The daemon owns NATS, durability and idempotency bookkeeping; a backend only knows its
cluster. Both the simulated backend and the Kubernetes backend implement it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

from fedplane.v1 import types_pb2 as pb


@dataclass(frozen=True)
class WorkloadEvent:
    """A workload's state change, to be reported to the hub as a StatusUpdate."""

    job_id: str
    generation: int
    state: pb.JobState.ValueType
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class WorkloadRef:
    """A workload that exists in the cluster and carries this hub's labels."""

    job_id: str
    generation: int


@dataclass(frozen=True)
class CreateRequest:
    job_id: str
    generation: int
    spec: pb.JobSpec
    assignments: list[pb.NodeAssignment] = field(default_factory=list)
    hub_id: str = "fedplane"


@dataclass
class InventorySnapshot:
    # Read-only: a backend may hand out the same messages again while its nodes do not change.
    nodes: list[pb.Node]
    # "job_id:generation" of workloads whose pods are already subtracted from nodes' free capacity.
    accounted_jobs: list[str] = field(default_factory=list)


class BackendError(Exception):
    """The backend refused a workload; `permanent` means retrying cannot help (reported as FAILED)."""

    def __init__(self, message: str, *, permanent: bool, reason: str = "BackendError") -> None:
        super().__init__(message)
        self.permanent = permanent
        self.reason = reason


EmitStatus = Callable[[WorkloadEvent], None]
NotifyChange = Callable[[], None]


class Backend(abc.ABC):
    """A member cluster as the agent sees it. All methods are called on the agent's event loop."""

    @abc.abstractmethod
    async def start(self, emit: EmitStatus, changed: NotifyChange) -> None:
        """Begin watching the cluster.

        `emit` is called for every workload state change (ADMITTED, RUNNING, SUCCEEDED, FAILED,
        CANCELLED); `changed` whenever inventory or datasets changed (the daemon coalesces).
        """

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop watches and background tasks; never deletes workloads."""

    @abc.abstractmethod
    async def inventory(self) -> InventorySnapshot:
        """Nodes with allocatable and free resources, labels, taints and readiness."""

    @abc.abstractmethod
    async def datasets(self) -> list[pb.DatasetPresence]:
        """Datasets present in the cluster and their bytes."""

    @abc.abstractmethod
    async def create(self, request: CreateRequest) -> None:
        """Create the workload, or adopt it if it already exists for the same job and generation.

        Returns once the cluster has accepted it; raises BackendError otherwise.
        """

    @abc.abstractmethod
    async def delete(self, job_id: str, generation: int, reason: str) -> None:
        """Delete the workload (cancel or preemption); a missing workload is not an error.

        Emits CANCELLED for it once it is gone.
        """

    @abc.abstractmethod
    async def list_workloads(self) -> list[WorkloadRef]:
        """Workloads in the cluster that carry this hub's labels (for garbage collection)."""
