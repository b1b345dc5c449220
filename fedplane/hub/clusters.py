"""The hub's picture of its member clusters: latest reports, cordons and capacity in flight.

Capacity promised to a dispatched job is reserved here until the cluster's own inventory
says it has accounted for the job (Inventory.accounted_jobs), so the next placement cycle
never hands the same free capacity out twice, yet never subtracts it twice either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from fedplane.core import model
from fedplane.hub import convert
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb


def reservation_key(job_id: str, generation: int) -> str:
    return f"{job_id}:{generation}"


@dataclass
class Reservation:
    requests: dict[str, dict[str, int]]
    assignments: list[model.Assignment]


@dataclass
class ClusterState:
    name: str
    admin: pb.Cluster
    heartbeat: agent_pb.Heartbeat | None = None
    inventory: agent_pb.Inventory | None = None
    datasets: agent_pb.DataLocalityReport | None = None
    # Wall-clock seconds of the last heartbeat, as stamped by the NATS server.
    last_seen: float = 0.0
    reservations: dict[str, Reservation] = field(default_factory=dict)

    def ready(self, now: float, timeout: float) -> tuple[bool, str]:
        if self.heartbeat is None:
            return False, "agent has not reported yet"
        if now - self.last_seen > timeout:
            return False, f"no heartbeat for {now - self.last_seen:.0f}s"
        if self.inventory is None:
            return False, "no inventory reported yet"
        return True, ""

    def view(self, now: float, timeout: float) -> model.ClusterView:
        ready, why = self.ready(now, timeout)
        inventory = self.inventory or agent_pb.Inventory()
        nodes = [convert.node_view(n) for n in inventory.nodes]
        by_name = {n.name: n for n in nodes}
        for reservation in self.reservations.values():
            for a in reservation.assignments:
                node = by_name.get(a.node)
                if node is None:
                    continue
                for resource, amount in reservation.requests[a.pod_set].items():
                    node.free[resource] = node.free.get(resource, 0) - amount * a.count
        return model.ClusterView(
            name=self.name,
            nodes=nodes,
            labels=dict(inventory.labels),
            taints=convert.taints(inventory.taints),
            datasets={d.id: d.bytes for d in (self.datasets.datasets if self.datasets else [])},
            cost=inventory.cost,
            ready=ready,
            cordoned=self.admin.cordoned,
            not_ready_reason=why,
        )

    def reserve(self, job: model.JobRequest, generation: int, assignments: list[model.Assignment]) -> None:
        requests = {p.name: dict(p.requests) for p in job.pod_sets}
        self.reservations[reservation_key(job.id, generation)] = Reservation(requests, assignments)

    def release(self, job_id: str, generation: int) -> None:
        self.reservations.pop(reservation_key(job_id, generation), None)

    def apply_inventory(self, inventory: agent_pb.Inventory) -> None:
        self.inventory = inventory
        for key in inventory.accounted_jobs:
            self.reservations.pop(key, None)

    def to_pb(self, now: float, timeout: float, active_jobs: int) -> pb.Cluster:
        ready, _ = self.ready(now, timeout)
        view = self.view(now, timeout)
        inventory = self.inventory or agent_pb.Inventory()
        cluster = pb.Cluster(
            name=self.name,
            labels=dict(inventory.labels),
            taints=list(inventory.taints),
            cordoned=self.admin.cordoned,
            cordon_reason=self.admin.cordon_reason,
            health=pb.READY if ready else pb.NOT_READY,
            nodes=list(inventory.nodes),
            datasets=list(self.datasets.datasets) if self.datasets else [],
            cost=inventory.cost,
            agent_version=self.heartbeat.version if self.heartbeat else "",
            active_jobs=active_jobs,
        )
        if self.last_seen:
            ts = Timestamp()
            ts.FromNanoseconds(int(self.last_seen * 1e9))
            cluster.last_heartbeat.CopyFrom(ts)
        cluster.allocatable.quantities.update(view.total("allocatable"))
        # Free as the hub schedules against it: reported free minus capacity still in flight.
        cluster.free.quantities.update(view.total("free"))
        return cluster


class ClusterRegistry:
    def __init__(self, heartbeat_timeout: float) -> None:
        self.timeout = heartbeat_timeout
        self.clusters: dict[str, ClusterState] = {}

    def get_or_add(self, name: str) -> tuple[ClusterState, bool]:
        state = self.clusters.get(name)
        if state is not None:
            return state, False
        state = ClusterState(name, pb.Cluster(name=name))
        self.clusters[name] = state
        return state, True

    def views(self, now: float) -> list[model.ClusterView]:
        return [c.view(now, self.timeout) for c in sorted(self.clusters.values(), key=lambda c: c.name)]

    def ready_names(self, now: float) -> frozenset[str]:
        return frozenset(name for name, c in self.clusters.items() if c.ready(now, self.timeout)[0])
