"""The hub's picture of its member clusters: latest reports, cordons and capacity in flight.

Capacity promised to a dispatched job is reserved here until the cluster's own inventory
says it has accounted for the job (Inventory.accounted_jobs), so the next placement cycle
never hands the same free capacity out twice, yet never subtracts it twice either. The
arithmetic of it is the core's (`fedplane.core.capacity`); this module keeps the reports and
the reservations, and the views built from them.

Every placement cycle asks for every cluster's view, and in a large federation almost none
changed since the last cycle, so views are cached at two levels:

- each cluster keeps its view and changes it only as much as it has to: a new inventory or
  data report rebuilds it (reusing the nodes reported unchanged), a reservation or release
  replaces just the nodes it touches, and health and cordon are refreshed when asked;
- the registry keeps the list of views and asks a cluster again only when something about
  it was set (every setter and method of ClusterState tells the registry), when it is not
  ready (its reason says for how long), or when a heartbeat may have grown too old: each ready
  view stays ready until its last heartbeat plus its cluster's unknown threshold (longer for
  edge clusters), and the earliest of those is the registry's `_deadline`.

Health (`fedplane.core.health`): READY, NOT_READY, UNKNOWN by the age of the last heartbeat,
and LOST once the cluster's lease in etcd has expired, which liveness.py observes and records
here as `lost_since`. Only READY clusters' views are ready for placement. Whoever acts on lost
clusters (lost.py) waits on `ClusterRegistry.lost_changed` or registers `on_lost_change`.

Views are never modified once handed out (placement is copy-on-write too), so one view
object serves every cycle until its cluster changes, with the totals, node index and memo
placement caches on it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from fedplane.core import capacity, model
from fedplane.core import health as hl
from fedplane.core.capacity import Reservation, reservation_key
from fedplane.core.health import Health, HealthThresholds
from fedplane.hub import convert
from fedplane.runtime import timestamps
from fedplane.runtime.config import HubConfig
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb

_NO_INVENTORY = agent_pb.Inventory()
_WIRE_HEALTH = {
    hl.READY: pb.READY,
    hl.NOT_READY: pb.NOT_READY,
    hl.UNKNOWN: pb.UNKNOWN,
    hl.LOST: pb.LOST,
}


def health_thresholds(config: HubConfig) -> HealthThresholds:
    """The hub's cluster health settings, as the registry and the lease driver use them."""
    return HealthThresholds(
        unknown_after=config.cluster_unknown_after_seconds,
        lost_after=config.cluster_lost_after_seconds,
        edge_unknown_after=config.edge_cluster_unknown_after_seconds,
        edge_lost_after=config.edge_cluster_lost_after_seconds,
        edge_label=config.edge_label,
    )


class ClusterState:
    """One member cluster: its latest reports, admin record and reservations, and its cached view.

    Replace `admin`, `heartbeat`, `inventory`, `datasets`, `last_seen` and `lost_since` by
    assignment (never modify them in place) and change `reservations` through the methods: each
    change tells the registry (`changed`), which asks for this cluster's view again only then.
    """

    __slots__ = (
        "_admin",
        "_built_from",
        "_datasets",
        "_heartbeat",
        "_inventory",
        "_last_seen",
        "_lost_since",
        "_reported",
        "_stale",
        "_view",
        "changed",
        "lost_changed",
        "name",
        "reservations",
    )

    def __init__(
        self,
        name: str,
        admin: pb.Cluster,
        heartbeat: agent_pb.Heartbeat | None = None,
        inventory: agent_pb.Inventory | None = None,
        datasets: agent_pb.DataLocalityReport | None = None,
        last_seen: float = 0.0,
        reservations: dict[str, Reservation] | None = None,
        changed: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self._admin = admin
        self._heartbeat = heartbeat
        self._inventory = inventory
        self._datasets = datasets
        # Wall-clock seconds of the last heartbeat, as stamped by the NATS server.
        self._last_seen = last_seen
        self.reservations: dict[str, Reservation] = reservations if reservations is not None else {}
        self.changed = changed
        # Told (with the name and the new lost_since) when the cluster becomes lost or returns.
        self.lost_changed: Callable[[str, float | None], None] | None = None
        # Wall-clock seconds when the hub saw the cluster's alive key gone (its lease expired);
        # None unless it is LOST.
        self._lost_since: float | None = None
        # The view of the inventory and datasets messages in _built_from, minus the
        # reservations; stale once a report replaces either message.
        self._view: model.ClusterView | None = None
        self._built_from: tuple[agent_pb.Inventory | None, agent_pb.DataLocalityReport | None] = (None, None)
        self._stale = False
        # The nodes of _built_from's inventory as reported (before reservations), by position.
        self._reported: list[model.NodeView] = []

    def __repr__(self) -> str:
        return f"ClusterState(name={self.name!r}, reservations={len(self.reservations)})"

    def _touch(self) -> None:
        if self.changed is not None:
            self.changed(self.name)

    @property
    def admin(self) -> pb.Cluster:
        return self._admin

    @admin.setter
    def admin(self, admin: pb.Cluster) -> None:
        self._admin = admin
        self._touch()

    @property
    def heartbeat(self) -> agent_pb.Heartbeat | None:
        return self._heartbeat

    @heartbeat.setter
    def heartbeat(self, heartbeat: agent_pb.Heartbeat | None) -> None:
        self._heartbeat = heartbeat
        self._touch()

    @property
    def inventory(self) -> agent_pb.Inventory | None:
        return self._inventory

    @inventory.setter
    def inventory(self, inventory: agent_pb.Inventory | None) -> None:
        """Prefer apply_inventory(), which also drops the reservations the report accounts for."""
        self._inventory = inventory
        self._touch()

    @property
    def datasets(self) -> agent_pb.DataLocalityReport | None:
        return self._datasets

    @datasets.setter
    def datasets(self, datasets: agent_pb.DataLocalityReport | None) -> None:
        self._datasets = datasets
        self._touch()

    @property
    def last_seen(self) -> float:
        return self._last_seen

    @last_seen.setter
    def last_seen(self, last_seen: float) -> None:
        self._last_seen = last_seen
        self._touch()

    @property
    def lost_since(self) -> float | None:
        """When the hub declared the cluster LOST (wall-clock seconds), or None unless it is."""
        return self._lost_since

    @lost_since.setter
    def lost_since(self, since: float | None) -> None:
        if since == self._lost_since:
            return
        self._lost_since = since
        self._touch()
        if self.lost_changed is not None:
            self.lost_changed(self.name, since)

    def is_edge(self, thresholds: HealthThresholds) -> bool:
        """Labelled as an edge cluster by its inventory (longer thresholds)."""
        inventory = self._inventory
        return inventory is not None and thresholds.is_edge(inventory.labels)

    def health(self, now: float, thresholds: HealthThresholds) -> Health:
        edge = self.is_edge(thresholds)
        return hl.judge(
            reported=self._heartbeat is not None,
            inventoried=self._inventory is not None,
            last_seen=self._last_seen,
            lost_since=self._lost_since,
            now=now,
            unknown_after=thresholds.unknown_for(edge),
            lost_after=thresholds.lost_for(edge),
        )

    def ready(self, now: float, thresholds: HealthThresholds) -> tuple[bool, str]:
        """Whether placement may use the cluster, and if not why."""
        health = self.health(now, thresholds)
        return health.state == hl.READY, health.reason

    def ready_until(self, thresholds: HealthThresholds) -> float:
        """Until when a READY cluster stays READY if nothing else happens."""
        return self._last_seen + thresholds.unknown_for(self.is_edge(thresholds))

    def view(self, now: float, thresholds: HealthThresholds) -> model.ClusterView:
        """The cluster as placement sees it: the cached view, rebuilt only if a report replaced it."""
        view = self._current()
        ready, why = self.ready(now, thresholds)
        cordoned = self._admin.cordoned
        if view is None:
            view = self._rebuild(ready, cordoned, why)
        elif view.ready != ready or view.cordoned != cordoned or view.not_ready_reason != why:
            view = self._view = view.with_status(ready, cordoned, why)
        return view

    def _current(self) -> model.ClusterView | None:
        """The cached view if it was built from the current inventory and datasets messages."""
        built = self._built_from
        if built[0] is self._inventory and built[1] is self._datasets and not self._stale:
            return self._view
        return None

    def _rebuild(self, ready: bool, cordoned: bool, why: str) -> model.ClusterView:
        inventory = self._inventory if self._inventory is not None else _NO_INVENTORY
        reported = _node_views(inventory, self._built_from[0], self._reported)
        nodes = capacity.free_nodes(reported, self.reservations.values())
        datasets = self._datasets
        view = model.ClusterView(
            name=self.name,
            nodes=nodes,
            labels=dict(inventory.labels),
            taints=convert.taints(inventory.taints),
            datasets={d.id: d.bytes for d in (datasets.datasets if datasets else [])},
            cost=inventory.cost,
            ready=ready,
            cordoned=cordoned,
            not_ready_reason=why,
        )
        if self._view is not None:
            view.reuse_caches(self._view)
        # Made now (if not carried over) rather than in the middle of a placement: every
        # placement needs them.
        view.index()
        view.total("free")
        view.total("allocatable")
        self._view, self._built_from, self._stale = view, (self._inventory, datasets), False
        self._reported = reported
        return view

    def reserve(self, job: model.JobRequest, generation: int, assignments: list[model.Assignment]) -> None:
        key = reservation_key(job.id, generation)
        if key in self.reservations:
            self.release(job.id, generation)  # replaced: give the old one back first
        reservation = Reservation.of(job, assignments)
        self.reservations[key] = reservation
        view = self._current()
        if view is not None:
            changes = capacity.reserved(reservation, view.nodes, view.index().position)
            if changes:
                self._view = view.with_free(changes)
        self._touch()

    def release(self, job_id: str, generation: int) -> None:
        reservation = self.reservations.pop(reservation_key(job_id, generation), None)
        if reservation is None:
            return
        self._touch()
        view = self._current()
        if view is None:
            return
        changes = capacity.released(
            reservation, self._reported, view.nodes, view.index().position, self.reservations.values()
        )
        if changes:
            self._view = view.with_free(changes)

    def apply_inventory(self, inventory: agent_pb.Inventory) -> None:
        """Take a new report: the view is rebuilt from it when next asked for."""
        self._inventory = inventory
        self._stale = True  # even if the same message came again
        capacity.drop_accounted(self.reservations, inventory.accounted_jobs)
        self._touch()

    def to_pb(self, now: float, thresholds: HealthThresholds, active_jobs: int) -> pb.Cluster:
        health = self.health(now, thresholds)
        view = self.view(now, thresholds)
        inventory = self.inventory or agent_pb.Inventory()
        cluster = pb.Cluster(
            name=self.name,
            labels=dict(inventory.labels),
            taints=list(inventory.taints),
            cordoned=self.admin.cordoned,
            cordon_reason=self.admin.cordon_reason,
            health=_WIRE_HEALTH[health.state],
            health_reason=health.reason,
            edge=self.is_edge(thresholds),
            nodes=list(inventory.nodes),
            datasets=list(self.datasets.datasets) if self.datasets else [],
            cost=inventory.cost,
            agent_version=self.heartbeat.version if self.heartbeat else "",
            active_jobs=active_jobs,
            admission=self.admin.admission,
            public_key=self.admin.public_key,
            requested_key=self.admin.requested_key,
            approved_by=self.admin.approved_by,
        )
        if self.admin.HasField("requested_time"):
            cluster.requested_time.CopyFrom(self.admin.requested_time)
        if self.last_seen:
            cluster.last_heartbeat.CopyFrom(timestamps.at(self.last_seen))
            cluster.heartbeat_age_seconds = max(0.0, now - self.last_seen)
        if self._lost_since is not None:
            cluster.lost_time.CopyFrom(timestamps.at(self._lost_since))
        cluster.allocatable.quantities.update(view.total("allocatable"))
        # Free as the hub schedules against it: reported free minus capacity still in flight.
        cluster.free.quantities.update(view.total("free"))
        return cluster


def _node_views(
    inventory: agent_pb.Inventory, previous: agent_pb.Inventory | None, views: list[model.NodeView]
) -> list[model.NodeView]:
    """The inventory's nodes as views, reusing the views of nodes `previous` reported the same.

    Reports mostly repeat themselves, and comparing messages costs far less than converting
    them. `views` are `previous`'s nodes' views, by position; nodes are matched by position,
    or by name when the order changed.
    """
    old = previous.nodes if previous is not None else None
    by_name: dict[str, int] | None = None
    result = []
    for i, message in enumerate(inventory.nodes):
        j = -1
        if old is not None:
            if i < len(old) and old[i].name == message.name:
                j = i
            else:
                if by_name is None:
                    by_name = {n.name: k for k, n in enumerate(old)}
                j = by_name.get(message.name, -1)
        if j < 0 or old is None:
            result.append(convert.node_view(message))
            continue
        before = old[j]
        if before == message:
            result.append(views[j])
            continue
        # Usually only free capacity changed: keep the other parts, so the node index carries over.
        node = convert.node_view(message)
        was = views[j]
        if before.labels == message.labels:
            node.labels = was.labels
        if before.taints == message.taints:
            node.taints = was.taints
        if before.allocatable == message.allocatable:
            node.allocatable = was.allocatable
        result.append(node)
    return result


class ClusterRegistry:
    """Every known cluster, and the list of their views as the last placement cycle got it.

    Made with the health thresholds (`health_thresholds(config)`); a plain number is taken as
    one unknown threshold for every cluster (hubs before cluster leases).

    Clusters becoming LOST or returning (`ClusterState.lost_since` set or cleared): the
    registry sets `lost_changed` (for one waiter, which clears it, then looks at `lost()`) and
    calls every `on_lost_change` listener with the cluster's name and its new `lost_since`.
    """

    def __init__(self, thresholds: HealthThresholds | float) -> None:
        if not isinstance(thresholds, HealthThresholds):
            thresholds = HealthThresholds.uniform(float(thresholds))
        self.thresholds = thresholds
        self.lost_changed = asyncio.Event()
        self._lost_listeners: list[Callable[[str, float | None], None]] = []
        self._heartbeat_listeners: list[Callable[[str], None]] = []
        # Add clusters through get_or_add(), so that the registry hears of their changes.
        self.clusters: dict[str, ClusterState] = {}
        self._names: list[str] = []  # sorted, as in _views
        self._slots: dict[str, int] = {}
        self._views: list[model.ClusterView] = []
        self._changed: set[str] = set()  # clusters that changed since _views was made
        self._not_ready: set[str] = set()  # clusters whose cached view is not ready
        # Until then every cached view that is ready still is (a lower bound: heartbeats only
        # push it later).
        self._deadline = -math.inf

    def get_or_add(self, name: str) -> tuple[ClusterState, bool]:
        state = self.clusters.get(name)
        if state is not None:
            return state, False
        state = ClusterState(name, pb.Cluster(name=name), changed=self._changed.add)
        state.lost_changed = self._lost_changed
        self.clusters[name] = state
        self._changed.add(name)
        return state, True

    # ------------------------------------------------------------------ health
    def health(self, name: str, now: float) -> Health:
        return self.clusters[name].health(now, self.thresholds)

    def lost(self) -> dict[str, float]:
        """Every LOST cluster, with when it was declared lost."""
        return {n: s.lost_since for n, s in self.clusters.items() if s.lost_since is not None}

    def on_lost_change(self, listener: Callable[[str, float | None], None]) -> None:
        """Call `listener(name, lost_since)` whenever a cluster becomes LOST or stops being LOST."""
        self._lost_listeners.append(listener)

    def _lost_changed(self, name: str, since: float | None) -> None:
        self.lost_changed.set()
        for listener in self._lost_listeners:
            listener(name, since)

    def on_heartbeat(self, listener: Callable[[str], None]) -> None:
        """Call `listener(name)` after each heartbeat the hub takes (see `heard`)."""
        self._heartbeat_listeners.append(listener)

    def heard(self, name: str) -> None:
        """A heartbeat of `name` was just recorded (reports.py calls this)."""
        for listener in self._heartbeat_listeners:
            listener(name)

    # ------------------------------------------------------------------ views
    def views(self, now: float) -> list[model.ClusterView]:
        """Every cluster's view, by name; asks again only the clusters that may have changed."""
        clusters, thresholds = self.clusters, self.thresholds
        if len(clusters) != len(self._names) or now > self._deadline:
            return self._rebuild(now)
        asked = [*self._changed, *self._not_ready] if self._changed or self._not_ready else ()
        self._changed.clear()
        for name in asked:
            state = clusters.get(name)
            slot = self._slots.get(name)
            if state is None or slot is None:
                return self._rebuild(now)
            view = self._views[slot] = state.view(now, thresholds)
            if view.ready:
                self._not_ready.discard(name)
                self._deadline = min(self._deadline, state.ready_until(thresholds))
            else:
                self._not_ready.add(name)
        return list(self._views)

    def _rebuild(self, now: float) -> list[model.ClusterView]:
        clusters, thresholds = self.clusters, self.thresholds
        names = sorted(clusters)
        views = []
        not_ready = set()
        deadline = math.inf
        for name in names:
            state = clusters[name]
            # In case it was added behind get_or_add()'s back.
            state.changed, state.lost_changed = self._changed.add, self._lost_changed
            view = state.view(now, thresholds)
            views.append(view)
            if view.ready:
                deadline = min(deadline, state.ready_until(thresholds))
            else:
                not_ready.add(name)
        self._names, self._slots, self._views = names, {n: i for i, n in enumerate(names)}, views
        self._changed.clear()
        self._not_ready, self._deadline = not_ready, deadline
        return list(views)

    def ready_names(self, now: float) -> frozenset[str]:
        thresholds = self.thresholds
        return frozenset(name for name, c in self.clusters.items() if c.ready(now, thresholds)[0])
