"""Plain data the placement core works on: what a job asks for and what a cluster offers."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
NO_SCHEDULE_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
TAINT_EFFECTS = frozenset({"NoSchedule", "PreferNoSchedule", "NoExecute"})


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    value: str = ""
    effect: str = "NoSchedule"

    def __str__(self) -> str:
        return f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"

    @classmethod
    def parse(cls, text: str) -> Taint:
        """Parse kubectl's form "key=value:Effect" (value and effect optional)."""
        body, _, effect = text.partition(":")
        key, _, value = body.partition("=")
        if not key or (effect and effect not in TAINT_EFFECTS):
            raise ValueError(f"invalid taint {text!r}: use key=value:NoSchedule|PreferNoSchedule|NoExecute")
        return cls(key, value, effect or "NoSchedule")


@dataclass(frozen=True, slots=True)
class Toleration:
    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""

    def tolerates(self, taint: Taint) -> bool:
        """Kubernetes toleration semantics (an empty key with Exists tolerates everything)."""
        if self.effect and self.effect != taint.effect:
            return False
        if not self.key:
            return self.operator == "Exists"
        if self.key != taint.key:
            return False
        return self.operator == "Exists" or self.value == taint.value


def untolerated(taints: tuple[Taint, ...], tolerations: tuple[Toleration, ...]) -> list[Taint]:
    """Taints that keep work off (NoSchedule/NoExecute) and that no toleration covers."""
    return [
        t
        for t in taints
        if t.effect in NO_SCHEDULE_EFFECTS and not any(tol.tolerates(t) for tol in tolerations)
    ]


@dataclass(slots=True)
class NodeView:
    name: str
    free: dict[str, int]
    allocatable: dict[str, int] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    schedulable: bool = True


@dataclass(slots=True)
class NodeIndex:
    """What placement derives once from a view's node names, labels, taints and schedulability.

    None of these change when capacity is deducted, so the index is shared by a view, its
    copies and its copy-on-write successors (`with_free`) instead of being rebuilt per job.
    """

    position: dict[str, int]
    # GPU products of schedulable nodes: a pod set of another type cannot fit at all.
    products: frozenset[str]
    # (tolerations, GPU type, node selector) -> positions of the nodes such pods may use, filled on demand.
    usable: dict[tuple[tuple[Toleration, ...], str, tuple[tuple[str, str], ...]], list[int]] = field(
        default_factory=dict
    )

    @classmethod
    def of(cls, nodes: list[NodeView]) -> NodeIndex:
        return cls(
            {n.name: i for i, n in enumerate(nodes)},
            frozenset(
                n.labels[GPU_PRODUCT_LABEL] for n in nodes if n.schedulable and GPU_PRODUCT_LABEL in n.labels
            ),
        )


@dataclass(slots=True)
class ClusterView:
    """One member cluster as the hub currently believes it to be.

    Placement caches what it derives from the view on it (totals, `NodeIndex`, memo), so treat
    a view handed to placement as fixed: change free capacity only through `deduct()` (in
    place) or `with_free()` (a new view), and nothing else.
    """

    name: str
    nodes: list[NodeView]
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    datasets: Mapping[str, int] = field(default_factory=dict)
    cost: float = 0.0
    ready: bool = True
    cordoned: bool = False
    not_ready_reason: str = ""
    _totals: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, compare=False)
    _index: NodeIndex | None = field(default=None, repr=False, compare=False)
    # Placement's results for this view by gang shape (see placement._screen): a view that does
    # not change is screened once per shape, not once per job. Cleared by deduct() and took().
    _memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Per pod shape, the usable nodes that can take such a pod, in best-fit order (see
    # placement._fits): carried to deducted views node by node. Cleared with the memo.
    _fits: dict[Any, Fits] = field(default_factory=dict, repr=False, compare=False)

    def copy(self) -> ClusterView:
        """A copy whose node free capacity can be deducted without touching the original.

        The cached totals are copied and the node index shared (deducting does not change it).
        """
        nodes = [
            NodeView(n.name, dict(n.free), n.allocatable, n.labels, n.taints, n.schedulable)
            for n in self.nodes
        ]
        return self._sharing(nodes, {which: dict(totals) for which, totals in self._totals.items()})

    def with_free(self, changes: Mapping[int, dict[str, int]]) -> ClusterView:
        """A new view in which node `i` has free capacity `changes[i]` (the dict is taken over).

        Copy-on-write: every other node, the labels and the caches are shared, and the cached
        totals are adjusted rather than recomputed, so a deduction costs what it changes, not
        the size of the cluster. This view is left as it was.
        """
        nodes = list(self.nodes)
        pairs = []
        for i, free in changes.items():
            old = nodes[i]
            nodes[i] = NodeView(old.name, free, old.allocatable, old.labels, old.taints, old.schedulable)
            pairs.append((old, nodes[i]))
        fits = _carried_fits(self, changes) if self._fits else None
        return self._sharing(nodes, _carried_totals(self._totals, pairs), fits=fits)

    def with_status(self, ready: bool, cordoned: bool, not_ready_reason: str) -> ClusterView:
        """A new view with other health and cordon, sharing nodes and caches with this one."""
        return self._sharing(
            self.nodes, self._totals, self._memo, (ready, cordoned, not_ready_reason), self._fits
        )

    def _sharing(
        self,
        nodes: list[NodeView],
        totals: dict[str, dict[str, int]],
        memo: dict[str, Any] | None = None,
        status: tuple[bool, bool, str] | None = None,
        fits: dict[Any, Fits] | None = None,
    ) -> ClusterView:
        """A view of this cluster with these nodes and totals; the rest (and the index) shared.

        The memo and the fits start empty unless given: they hold for unchanged nodes only.
        """
        ready, cordoned, why = (
            status if status is not None else (self.ready, self.cordoned, self.not_ready_reason)
        )
        return ClusterView(
            self.name,
            nodes,
            self.labels,
            self.taints,
            self.datasets,
            self.cost,
            ready,
            cordoned,
            why,
            totals,
            self._index,
            memo if memo is not None else {},
            fits if fits is not None else {},
        )

    def index(self) -> NodeIndex:
        """The node index, built on first use."""
        if self._index is None:
            self._index = NodeIndex.of(self.nodes)
        return self._index

    def reuse_caches(self, previous: ClusterView) -> None:
        """Adopt what placement cached on `previous` that still holds for this (uncached) view.

        For a view rebuilt from a new report that repeats most nodes: when the nodes line up by
        name, the totals are `previous`'s adjusted for the nodes that are not the very same
        objects, and the node index is `previous`'s if those also kept their schedulability,
        labels and taints objects. Costs what changed, not the size of the cluster.
        """
        if self._totals or self._index is not None or len(previous.nodes) != len(self.nodes):
            return
        pairs = []
        same_index = True
        for old, new in zip(previous.nodes, self.nodes, strict=True):
            if old is new:
                continue
            if old.name != new.name:
                return
            if (
                old.schedulable != new.schedulable
                or old.labels is not new.labels
                or old.taints is not new.taints
            ):
                same_index = False
            pairs.append((old, new))
        if same_index:
            self._index = previous._index
        self._totals = _carried_totals(previous._totals, pairs)

    def total(self, which: str) -> dict[str, int]:
        """Sum of the nodes' "free" or "allocatable", cached: change node free capacity only via deduct()."""
        cached = self._totals.get(which)
        if cached is not None:
            return cached
        totals: dict[str, int] = {}
        for node in self.nodes:
            for resource, amount in getattr(node, which).items():
                totals[resource] = totals.get(resource, 0) + amount
        self._totals[which] = totals
        return totals

    def room(self) -> dict[str, int]:
        """Per resource, the sum of schedulable nodes' positive free capacity (cached).

        No set of pods needing more than this can fit, whatever the node shapes: a cheap
        proof that a gang does not fit, without packing it.
        """
        cached = self._totals.get("room")
        if cached is not None:
            return cached
        room: dict[str, int] = {}
        for node in self.nodes:
            if node.schedulable:
                for resource, amount in node.free.items():
                    room[resource] = room.get(resource, 0) + max(0, amount)
        self._totals["room"] = room
        return room

    def took(self, resource: str, amount: int) -> None:
        """Keep the cached free total right after `amount` of `resource` left a node's free capacity."""
        free = self._totals.get("free")
        if free is not None:
            free[resource] = free.get(resource, 0) - amount
        self._totals.pop("room", None)  # which node it left is unknown here: recount when needed
        self._memo.clear()
        self._fits.clear()


@dataclass(frozen=True, slots=True)
class PodSetRequest:
    name: str
    count: int
    min_count: int
    requests: Mapping[str, int]
    gpu_type: str = ""
    # Node labels its pods need, as (key, value) pairs (a resource flavor's node labels).
    node_selector: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class DatasetRequest:
    id: str
    size: int
    required: bool = False


@dataclass(frozen=True, slots=True)
class ClusterGroup:
    clusters: frozenset[str] = frozenset()
    match_labels: Mapping[str, str] = field(default_factory=dict)

    def contains(self, cluster: ClusterView) -> bool:
        if cluster.name in self.clusters:
            return True
        return bool(self.match_labels) and all(
            cluster.labels.get(k) == v for k, v in self.match_labels.items()
        )


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What placement needs to know about a job; `seq` orders jobs of equal priority (FIFO)."""

    id: str
    pod_sets: tuple[PodSetRequest, ...]
    priority: int = 0
    seq: int = 0
    cluster_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    groups: tuple[ClusterGroup, ...] = ()
    strict_groups: bool = False
    datasets: tuple[DatasetRequest, ...] = ()
    # The queue it waits in (not part of its shape: placement does not look at it).
    queue: str = ""


@dataclass(frozen=True, slots=True)
class Assignment:
    pod_set: str
    node: str
    count: int


# Pods of a shape fitting a node: more than any node holds when the shape requests nothing.
UNBOUNDED_PODS = 1 << 30


def pods_fitting(free: Mapping[str, int], wanted: tuple[tuple[str, int], ...]) -> int:
    """How many pods requesting `wanted` fit in `free`; uncapped, so that best fit can tell a
    nearly full node from an empty one."""
    n = UNBOUNDED_PODS
    for resource, amount in wanted:
        fits = free.get(resource, 0) // amount
        if fits < n:
            n = fits
            if n <= 0:
                return 0
    return n


@dataclass(frozen=True, slots=True)
class Fits:
    """The usable nodes that can take a pod of one shape, as sorted (pods that fit, node name)."""

    positions: frozenset[int]
    wanted: tuple[tuple[str, int], ...]
    entries: list[tuple[int, str]]

    @classmethod
    def of(cls, nodes: list[NodeView], positions: list[int], wanted: tuple[tuple[str, int], ...]) -> Fits:
        """Built from scratch: the nodes at `positions` that can take such a pod, best fit first."""
        entries = []
        for i in positions:
            n = pods_fitting(nodes[i].free, wanted)
            if n > 0:
                entries.append((n, nodes[i].name))
        entries.sort()
        return cls(frozenset(positions), wanted, entries)


def _carried_fits(before: ClusterView, changes: Mapping[int, Mapping[str, int]]) -> dict[Any, Fits]:
    """`before`'s cached fits, updated for nodes whose free capacity is now `changes[i]`."""
    carried: dict[Any, Fits] = {}
    for cache_key, cached in before._fits.items():
        entries: list[tuple[int, str]] | None = None
        for i, free in changes.items():
            if i not in cached.positions:
                continue
            if entries is None:
                entries = list(cached.entries)
            node = before.nodes[i]
            old = pods_fitting(node.free, cached.wanted)
            if old > 0:
                del entries[bisect.bisect_left(entries, (old, node.name))]
            new = pods_fitting(free, cached.wanted)
            if new > 0:
                bisect.insort(entries, (new, node.name))
        carried[cache_key] = cached if entries is None else Fits(cached.positions, cached.wanted, entries)
    return carried


def _carried_totals(
    totals: Mapping[str, dict[str, int]], pairs: list[tuple[NodeView, NodeView]]
) -> dict[str, dict[str, int]]:
    """ClusterView's cached totals after each (old, new) pair's old node was replaced by new.

    A total is dropped (to be recounted when needed) if a resource left a node, so that totals
    list exactly the resources the nodes have.
    """
    carried: dict[str, dict[str, int]] = {}
    for which in ("free", "allocatable"):
        total = totals.get(which)
        if total is None:
            continue
        if which == "allocatable" and all(old.allocatable is new.allocatable for old, new in pairs):
            carried[which] = total  # shared: only the free total is ever changed in place (took)
            continue
        adjusted: dict[str, int] | None = dict(total)
        for old, new in pairs:
            before, after = getattr(old, which), getattr(new, which)
            if before is after or adjusted is None:
                continue
            if any(resource not in after for resource in before):
                adjusted = None
                break
            for resource, amount in after.items():
                adjusted[resource] = adjusted.get(resource, 0) + amount - before.get(resource, 0)
        if adjusted is not None:
            carried[which] = adjusted
    room = totals.get("room")
    if room is not None:
        room = dict(room)
        for old, new in pairs:
            before = old.free if old.schedulable else {}
            after = new.free if new.schedulable else {}
            for resource in before.keys() | after.keys():
                room[resource] = (
                    room.get(resource, 0) + max(0, after.get(resource, 0)) - max(0, before.get(resource, 0))
                )
        carried["room"] = room
    return carried
