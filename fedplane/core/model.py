"""Plain data the placement core works on: what a job asks for and what a cluster offers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
class ClusterView:
    """One member cluster as the hub currently believes it to be."""

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

    def copy(self) -> ClusterView:
        """A copy whose node free capacity can be deducted without touching the original."""
        nodes = [
            NodeView(n.name, dict(n.free), n.allocatable, n.labels, n.taints, n.schedulable)
            for n in self.nodes
        ]
        return ClusterView(
            self.name,
            nodes,
            self.labels,
            self.taints,
            self.datasets,
            self.cost,
            self.ready,
            self.cordoned,
            self.not_ready_reason,
        )

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

    def took(self, resource: str, amount: int) -> None:
        """Keep the cached free total right after `amount` of `resource` left a node's free capacity."""
        free = self._totals.get("free")
        if free is not None:
            free[resource] = free.get(resource, 0) - amount


@dataclass(frozen=True, slots=True)
class PodSetRequest:
    name: str
    count: int
    min_count: int
    requests: Mapping[str, int]
    gpu_type: str = ""


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


@dataclass(frozen=True, slots=True)
class Assignment:
    pod_set: str
    node: str
    count: int
