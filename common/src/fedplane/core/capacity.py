"""Capacity in flight: what a cluster's nodes have free once the hub's promises are counted.

An inventory reports each node's free capacity, but a job dispatched after that report still
shows as free in it. So each dispatch holds a `Reservation` of its pods on their nodes, and
placement sees each node's reported free capacity minus the reservations still in flight. An
inventory names the jobs it has counted (`accounted_jobs`); their reservations are dropped
then, so capacity is neither handed out twice nor subtracted twice.

Free capacity after a reservation or a release comes back as `changes`, {node position: free
capacity}, the form `ClusterView.with_free` takes, so that either costs the nodes it touches,
not the size of the cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from fedplane.core.model import Assignment, JobRequest, NodeView


def reservation_key(job_id: str, generation: int) -> str:
    """A reservation's key, as inventories name the jobs they have counted."""
    return f"{job_id}:{generation}"


@dataclass(frozen=True, slots=True)
class Reservation:
    """A dispatched job's pods on their nodes, until the cluster's inventory counts them."""

    # Per pod set, what each of its pods requests.
    requests: Mapping[str, Mapping[str, int]]
    assignments: Sequence[Assignment]

    @classmethod
    def of(cls, job: JobRequest, assignments: Sequence[Assignment]) -> Reservation:
        return cls({p.name: dict(p.requests) for p in job.pod_sets}, assignments)


def subtract(
    reservation: Reservation,
    nodes: Sequence[NodeView],
    position: Mapping[str, int],
    changes: dict[int, dict[str, int]],
    only: set[str] | None = None,
) -> None:
    """Take the reservation's pods out of the nodes' free capacity, into `changes`.

    A node's free capacity is copied into `changes` the first time it is touched, so several
    reservations can be taken out of one `changes` and the nodes are never modified.
    Assignments to nodes the cluster does not report (or not in `only`) are skipped: a node
    that left takes its pods' capacity with it.
    """
    for a in reservation.assignments:
        i = position.get(a.node)
        if i is None or (only is not None and a.node not in only):
            continue
        free = changes.get(i)
        if free is None:
            free = changes[i] = dict(nodes[i].free)
        for resource, amount in reservation.requests[a.pod_set].items():
            free[resource] = free.get(resource, 0) - amount * a.count


def free_nodes(reported: Sequence[NodeView], reservations: Iterable[Reservation]) -> list[NodeView]:
    """The reported nodes with every reservation taken out; nodes no reservation touches are shared."""
    nodes = list(reported)
    changes: dict[int, dict[str, int]] = {}
    position: dict[str, int] | None = None
    for reservation in reservations:
        if position is None:
            position = {n.name: i for i, n in enumerate(nodes)}
        subtract(reservation, nodes, position, changes)
    for i, free in changes.items():
        n = nodes[i]
        nodes[i] = NodeView(n.name, free, n.allocatable, n.labels, n.taints, n.schedulable)
    return nodes


def reserved(
    reservation: Reservation, nodes: Sequence[NodeView], position: Mapping[str, int]
) -> dict[int, dict[str, int]]:
    """The free capacity of the nodes `reservation` touches, once it is taken out of `nodes`."""
    changes: dict[int, dict[str, int]] = {}
    subtract(reservation, nodes, position, changes)
    return changes


def released(
    reservation: Reservation,
    reported: Sequence[NodeView],
    nodes: Sequence[NodeView],
    position: Mapping[str, int],
    left: Iterable[Reservation],
) -> dict[int, dict[str, int]]:
    """The free capacity of the nodes `reservation` touched, once it is given back.

    Recounted from the nodes as `reported` (by the same positions as `nodes`) minus the
    reservations `left`, rather than added back to `nodes`: that stays exact whatever was
    reserved, released or reported in between.
    """
    touched = {a.node for a in reservation.assignments if a.node in position}
    if not touched:
        return {}
    changes = {position[name]: dict(reported[position[name]].free) for name in touched}
    for other in left:
        subtract(other, nodes, position, changes, touched)
    return changes


def drop_accounted(reservations: MutableMapping[str, Reservation], accounted_jobs: Iterable[str]) -> None:
    """Drop the reservations of the jobs an inventory says it has counted (keys it does not hold are
    ignored: the hub may already have released them)."""
    for key in accounted_jobs:
        reservations.pop(key, None)
