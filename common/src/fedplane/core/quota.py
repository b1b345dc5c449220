"""Quota arithmetic over the tree of queues and cohorts: Kueue's hierarchical cohorts.

Queues are the leaves and cohorts the inner nodes. Each node's quota is held as Kueue holds it
(pkg/cache/resource_node.go), per (flavor, resource):

- SubtreeQuota: a queue's nominal; a cohort's own nominal plus each child's SubtreeQuota
  minus the child's guaranteed part.
- guaranteed: the part a node never lends, max(0, SubtreeQuota - lending_limit) when a
  lending limit is set, else 0.
- stored usage: a queue's usage; a cohort's is the sum of its children's usage beyond their
  guaranteed parts. A cohort therefore holds only what its children took from the pool.
- available: a root's SubtreeQuota minus its stored usage; any other node's unused guaranteed
  part plus what its parent has available, capped by its borrowing limit.

SubtreeQuota and guaranteed do not change with usage, so they are computed once at build;
stored usage is kept up to date on every charge and release by walking the queue's path up,
so `assign` and `available` cost the depth of the tree, not its size.

A resource that none of a queue's flavors names is not governed: it is never checked and
never charged against any cohort's quota, but its usage is still counted for fair sharing
and for the queue view.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from fedplane.core.queues import (
    FlavorQuotas,
    FlavorResource,
    QueueConfig,
    QueueStatus,
    ResourceQuota,
    ResourceUsage,
    WhenCanBorrow,
)

QUEUE = "queue"
COHORT = "cohort"
# How many of the biggest holders a shortfall names.
MAX_HOLDERS = 5
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GIB = 2**30


@dataclass(frozen=True, slots=True)
class FlavorChoice:
    """The flavor an admission takes its quota from ("" when the queue has no quotas)."""

    flavor: str
    # The admission takes quota beyond the queue's own nominal (it may be reclaimed).
    borrows: bool


@dataclass(frozen=True, slots=True)
class Shortfall:
    """One resource of one flavor that does not fit."""

    flavor: str
    resource: str
    wanted: int
    available: int
    # The queues of the tree that hold most of this flavor-resource: (queue, amount), largest first.
    holders: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class QuotaMisfit:
    """Why a queue's quota cannot take a job: one shortfall per flavor tried."""

    queue: str
    shortfalls: tuple[Shortfall, ...]

    def summary(self) -> str:
        parts = []
        for short in self.shortfalls:
            text = (
                f"{short.flavor} {short.resource} needs {show(short.resource, short.wanted)}, "
                f"{show(short.resource, short.available)} available"
            )
            if short.holders:
                held = ", ".join(f"{name} {show(short.resource, amount)}" for name, amount in short.holders)
                text += f" (held by {held})"
            parts.append(text)
        return f"queue {self.queue}: no quota: " + "; ".join(parts)


def show(resource: str, amount: int) -> str:
    """An amount as a person reads it, exactly (a shortfall's numbers must not round)."""
    if resource == "cpu":
        return str(amount // 1000) if amount % 1000 == 0 else f"{amount}m"
    if resource == "memory" and amount and amount % _GIB == 0:
        return f"{amount // _GIB}Gi"
    return str(amount)


class QuotaNode:
    """One queue or cohort of a QuotaTree, for fairshare.py and the tests to read; only the
    tree changes it."""

    __slots__ = (
        "children",
        "fair",
        "flavors",
        "guaranteed",
        "kind",
        "name",
        "parent",
        "path",
        "queues",
        "quotas",
        "share_cache",
        "stored",
        "subtree_quota",
        "try_next",
        "usage",
        "version",
        "weight",
    )

    def __init__(self, name: str, kind: str, weight: float) -> None:
        self.name = name
        self.kind = kind
        self.weight = weight
        self.parent: QuotaNode | None = None
        self.children: list[QuotaNode] = []
        # The node's own quotas, and (queues) its flavors in order with the resources each names.
        self.quotas: dict[FlavorResource, ResourceQuota] = {}
        self.flavors: tuple[tuple[str, tuple[str, ...]], ...] = ()
        # WhenCanBorrow.TRY_NEXT_FLAVOR: a flavor within nominal beats an earlier borrowing one.
        self.try_next = False
        self.subtree_quota: dict[FlavorResource, int] = {}
        # Only the non-zero guaranteed parts.
        self.guaranteed: dict[FlavorResource, int] = {}
        # A queue's own usage (every resource), a cohort's whole subtree's.
        self.usage: dict[FlavorResource, int] = {}
        # Kueue's usage: a queue's governed usage (its `usage`, read only where governed), a
        # cohort's children's governed usage beyond their guaranteed parts.
        self.stored: dict[FlavorResource, int] = self.usage if kind == QUEUE else {}
        # As `stored`, over every resource: what fair sharing compares with SubtreeQuota.
        self.fair: dict[FlavorResource, int] = self.usage if kind == QUEUE else {}
        # The nodes from the root down to this one.
        self.path: tuple[QuotaNode, ...] = ()
        # A root's queues, for naming a shortfall's holders.
        self.queues: list[QuotaNode] = []
        # Bumped by every charge and release below this node: fair sharing caches on it.
        self.version = 0
        # fairshare.py's: (version, capacity, unweighted dominant share, anything above quota).
        self.share_cache: tuple[int, Mapping[str, int], float, bool] | None = None

    def __repr__(self) -> str:
        return f"QuotaNode({self.kind} {self.name})"


class QuotaTree:
    """The quota of every queue and cohort of one configuration, and what admitted jobs hold."""

    def __init__(self, queues: dict[str, QuotaNode], cohorts: dict[str, QuotaNode]) -> None:
        self._queues = queues
        self._cohorts = cohorts

    @classmethod
    def build(cls, config: QueueConfig) -> QuotaTree:
        """The tree of `config`, holding nothing. It tolerates what check_config refuses: an
        undefined cohort is an empty root cohort, a cycle is cut, a repeated flavor's first
        entry counts."""
        cohorts: dict[str, QuotaNode] = {}
        for name, cohort_spec in config.cohorts.items():
            node = cohorts[name] = QuotaNode(name, COHORT, cohort_spec.weight)
            _own_quotas(node, cohort_spec.quotas)

        def cohort(name: str) -> QuotaNode:
            if name not in cohorts:
                cohorts[name] = QuotaNode(name, COHORT, 1.0)
            return cohorts[name]

        for name in sorted(config.cohorts):
            parent = config.cohorts[name].parent
            if parent and not _reaches(cohort(parent), cohorts[name]):
                _attach(cohorts[name], cohort(parent))
        queues: dict[str, QuotaNode] = {}
        for name, spec in config.queues.items():
            node = queues[name] = QuotaNode(name, QUEUE, spec.weight)
            node.flavors = _own_quotas(node, spec.quotas)
            node.try_next = spec.when_can_borrow == WhenCanBorrow.TRY_NEXT_FLAVOR
            if spec.cohort:
                _attach(node, cohort(spec.cohort))
        for root in [*cohorts.values(), *queues.values()]:
            if root.parent is None:
                _settle(root, (), root)
        return cls(queues, cohorts)

    # ------------------------------------------------------------------ names
    def queue_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._queues))

    def cohort_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._cohorts))

    def node(self, name: str) -> QuotaNode | None:
        """The queue of that name, else the cohort (check_config refuses a name used by both)."""
        found = self._queues.get(name)
        return found if found is not None else self._cohorts.get(name)

    def queue(self, name: str) -> QuotaNode | None:
        return self._queues.get(name)

    def path(self, queue: str) -> tuple[str, ...]:
        node = self._queues.get(queue)
        return tuple(n.name for n in node.path) if node is not None else ()

    # ------------------------------------------------------------------ usage
    def charge(self, queue: str, flavor: str, demand: Mapping[str, int]) -> None:
        """An admitted job holds `demand` of `flavor` from now on. Flavor "" (a queue without
        quotas) is counted for fair sharing and the view, and governs nothing."""
        node = self._queues.get(queue)
        if node is not None:
            self._add(node, flavor, demand, 1)

    def release(self, queue: str, flavor: str, demand: Mapping[str, int]) -> None:
        """The reverse of `charge`; a queue's usage never goes below 0."""
        node = self._queues.get(queue)
        if node is not None:
            self._add(node, flavor, demand, -1)

    def _add(self, queue: QuotaNode, flavor: str, demand: Mapping[str, int], sign: int) -> None:
        changed = False
        for resource, amount in demand.items():
            if amount <= 0:
                continue
            fr = (flavor, resource)
            held = queue.usage.get(fr, 0)
            delta = amount if sign > 0 else -min(amount, held)
            if not delta:
                continue
            changed = True
            queue.usage[fr] = held + delta
            # The queue's fair and stored usage are its usage; each cohort's is recomputed
            # from its child's change, through the child's guaranteed part.
            fair_delta = delta
            stored_delta = delta if fr in queue.quotas else 0
            child = queue
            parent = queue.parent
            while parent is not None:
                parent.usage[fr] = parent.usage.get(fr, 0) + delta
                guaranteed = child.guaranteed.get(fr, 0)
                if fair_delta:
                    fair_delta = _beyond_delta(child.fair[fr], fair_delta, guaranteed)
                    if fair_delta:
                        parent.fair[fr] = parent.fair.get(fr, 0) + fair_delta
                if stored_delta:
                    stored_delta = _beyond_delta(child.stored[fr], stored_delta, guaranteed)
                    if stored_delta:
                        parent.stored[fr] = parent.stored.get(fr, 0) + stored_delta
                child = parent
                parent = parent.parent
        if changed:
            for node in queue.path:
                node.version += 1

    def usage(self, node: str, flavor: str, resource: str) -> int:
        """A queue's own usage; a cohort's whole subtree's."""
        found = self.node(node)
        return found.usage.get((flavor, resource), 0) if found is not None else 0

    def nominal(self, node: str, flavor: str, resource: str) -> int:
        """The node's own nominal quota (a cohort's, not counting its members')."""
        found = self.node(node)
        quota = found.quotas.get((flavor, resource)) if found is not None else None
        return quota.nominal if quota is not None else 0

    def subtree_quota(self, node: str, flavor: str, resource: str) -> int:
        """Kueue's SubtreeQuota: the quota the node brings to its parent's pool, plus its
        guaranteed part (a queue's: its nominal)."""
        found = self.node(node)
        return found.subtree_quota.get((flavor, resource), 0) if found is not None else 0

    def borrowed(self, queue: str, flavor: str, resource: str) -> int:
        """What a node holds beyond the quota it brings: a queue's governed usage beyond its
        nominal; a cohort's members' usage that came from outside the cohort (0 for a root)."""
        found = self.node(queue)
        return _borrowed(found, (flavor, resource)) if found is not None else 0

    # ------------------------------------------------------------------ admission
    def available(self, queue: str, flavor: str, resource: str) -> int | None:
        """What the queue may still take of the flavor-resource; None: it is not limited."""
        node = self._queues.get(queue)
        fr = (flavor, resource)
        if node is None or fr not in node.quotas:
            return None
        return _available(node, fr)

    def assign(
        self, queue: str, demand: Mapping[str, int], skip: Collection[str] = ()
    ) -> FlavorChoice | QuotaMisfit:
        """The flavor whose quota takes `demand`, tried in the queue's order, or why none can;
        flavors in `skip` (tried already: their clusters had no room) are passed over.

        A flavor fits when every resource of the demand that it names fits what is available.
        A flavor that names none of the demand's resources is no choice for it (a cpu-only job
        does not take a GPU flavor and its clusters); a job whose resources no flavor names is
        not governed by the queue's quota (flavor ""). With WhenCanBorrow.TRY_NEXT_FLAVOR a
        flavor that fits only by borrowing is taken only when no later flavor fits within the
        queue's nominal."""
        node = self._queues.get(queue)
        if node is None or not node.flavors:
            return FlavorChoice("", False)
        try_next = node.try_next
        first_borrowing: str | None = None
        shortfalls: list[Shortfall] = []
        named = False
        for flavor, resources in node.flavors:
            if not any(demand.get(resource, 0) > 0 for resource in resources):
                continue
            named = True
            if flavor in skip:
                continue
            borrows = False
            short: Shortfall | None = None
            for resource in resources:
                wanted = demand.get(resource, 0)
                if wanted <= 0:
                    continue
                fr = (flavor, resource)
                free = _available(node, fr)
                if wanted > free:
                    short = Shortfall(flavor, resource, wanted, free, self._holders(node, fr))
                    break
                if node.usage.get(fr, 0) + wanted > node.quotas[fr].nominal:
                    borrows = True
            if short is not None:
                shortfalls.append(short)
            elif not borrows:
                return FlavorChoice(flavor, False)
            elif not try_next:
                return FlavorChoice(flavor, True)
            elif first_borrowing is None:
                first_borrowing = flavor
        if first_borrowing is not None:
            return FlavorChoice(first_borrowing, True)
        if not named:
            return FlavorChoice("", False)
        return QuotaMisfit(queue, tuple(shortfalls))

    def _holders(self, queue: QuotaNode, fr: FlavorResource) -> tuple[tuple[str, int], ...]:
        held = [(n.name, n.usage.get(fr, 0)) for n in queue.path[0].queues]
        held = sorted((h for h in held if h[1] > 0), key=lambda h: (-h[1], h[0]))
        return tuple(held[:MAX_HOLDERS])

    # ------------------------------------------------------------------ the view
    def total_quota(self) -> dict[str, int]:
        """Every node's own nominal quota summed by resource name: fair sharing's denominators
        when no capacity is given."""
        total: dict[str, int] = {}
        for node in [*self._queues.values(), *self._cohorts.values()]:
            for (_, resource), quota in node.quotas.items():
                total[resource] = total.get(resource, 0) + quota.nominal
        return total

    def report(self, capacity: Mapping[str, int] | None = None) -> list[QueueStatus]:
        """Every queue, then every cohort, with a row per flavor-resource it names or uses.

        `lent` attributes what a cohort's members borrow to its own quota first, then to its
        members' unused lendable quota in proportion to how much each leaves unused.
        `share` is over `capacity` (default: the total quota, `total_quota`).
        """
        from fedplane.core import fairshare

        denominators = capacity if capacity is not None else self.total_quota()
        lent = self._lent()
        statuses = []
        for kind, nodes in ((QUEUE, self._queues), (COHORT, self._cohorts)):
            for name in sorted(nodes):
                node = nodes[name]
                rows = []
                for fr in _row_keys(node):
                    quota = node.quotas.get(fr)
                    rows.append(
                        ResourceUsage(
                            flavor=fr[0],
                            resource=fr[1],
                            nominal=quota.nominal if quota is not None else 0,
                            borrowing_limit=quota.borrowing_limit if quota is not None else None,
                            lending_limit=quota.lending_limit if quota is not None else None,
                            usage=node.usage.get(fr, 0),
                            borrowed=_borrowed(node, fr),
                            lent=lent.get((id(node), fr), 0),
                        )
                    )
                statuses.append(
                    QueueStatus(
                        name=name,
                        kind=kind,
                        parent=node.parent.name if node.parent is not None else "",
                        resources=tuple(rows),
                        share=fairshare.node_share(node, denominators),
                    )
                )
        return statuses

    def _lent(self) -> dict[tuple[int, FlavorResource], int]:
        """How much of each node's unused lendable quota others hold, top down."""
        lent: dict[tuple[int, FlavorResource], int] = {}
        pending = [n for n in self._cohorts.values() if n.parent is None]
        while pending:
            pool = pending.pop()
            pending.extend(c for c in pool.children if c.kind == COHORT)
            for fr in pool.subtree_quota:
                demand = lent.get((id(pool), fr), 0)
                unused: list[tuple[QuotaNode, int]] = []
                for child in pool.children:
                    if child.kind == QUEUE and fr not in child.quotas:
                        continue
                    demand += _borrowed(child, fr)
                    guaranteed = child.guaranteed.get(fr, 0)
                    lendable = child.subtree_quota.get(fr, 0) - guaranteed
                    left = lendable - max(0, child.stored.get(fr, 0) - guaranteed)
                    if left > 0:
                        unused.append((child, left))
                own = pool.quotas[fr].nominal if fr in pool.quotas else 0
                excess = max(0, demand - own)
                total_unused = sum(left for _, left in unused)
                if excess and total_unused:
                    taken = min(excess, total_unused)
                    for child, left in unused:
                        lent[(id(child), fr)] = left * taken // total_unused
        return lent


def _row_keys(node: QuotaNode) -> list[FlavorResource]:
    named = list(node.quotas)
    used = sorted(fr for fr, amount in node.usage.items() if amount > 0 and fr not in node.quotas)
    return named + used


def _borrowed(node: QuotaNode, fr: FlavorResource) -> int:
    if node.kind == QUEUE and fr not in node.quotas:
        return 0
    return max(0, node.stored.get(fr, 0) - node.subtree_quota.get(fr, 0))


def _beyond_delta(new: int, delta: int, guaranteed: int) -> int:
    """How a child's usage beyond its guaranteed part changed when its usage moved by `delta`
    to `new`."""
    return max(0, new - guaranteed) - max(0, new - delta - guaranteed)


def _available(node: QuotaNode, fr: FlavorResource) -> int:
    path = node.path
    root = path[0]
    free = max(0, root.subtree_quota.get(fr, 0) - root.stored.get(fr, 0))
    for step in path[1:]:
        guaranteed = step.guaranteed.get(fr, 0)
        used = step.stored.get(fr, 0)
        from_parent = free
        quota = step.quotas.get(fr)
        if quota is not None and quota.borrowing_limit is not None:
            stored_in_parent = step.subtree_quota.get(fr, 0) - guaranteed
            used_in_parent = max(0, used - guaranteed)
            from_parent = min(from_parent, stored_in_parent - used_in_parent + quota.borrowing_limit)
        free = max(0, guaranteed - used) + max(0, from_parent)
    return free


def _own_quotas(node: QuotaNode, quotas: tuple[FlavorQuotas, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    flavors: list[tuple[str, tuple[str, ...]]] = []
    for flavor_quotas in quotas:
        if any(f == flavor_quotas.flavor for f, _ in flavors):
            continue
        for resource, quota in flavor_quotas.resources.items():
            node.quotas[(flavor_quotas.flavor, resource)] = quota
        flavors.append((flavor_quotas.flavor, tuple(flavor_quotas.resources)))
    return tuple(flavors)


def _reaches(start: QuotaNode, target: QuotaNode) -> bool:
    node: QuotaNode | None = start
    while node is not None:
        if node is target:
            return True
        node = node.parent
    return False


def _attach(child: QuotaNode, parent: QuotaNode) -> None:
    child.parent = parent
    parent.children.append(child)


def _settle(node: QuotaNode, above: tuple[QuotaNode, ...], root: QuotaNode) -> None:
    """Set paths, then SubtreeQuota and guaranteed parts bottom up."""
    node.path = (*above, node)
    if node.kind == QUEUE:
        root.queues.append(node)
    for child in node.children:
        _settle(child, node.path, root)
    subtree = {fr: quota.nominal for fr, quota in node.quotas.items()}
    for child in node.children:
        for fr, amount in child.subtree_quota.items():
            subtree[fr] = subtree.get(fr, 0) + amount - child.guaranteed.get(fr, 0)
    node.subtree_quota = subtree
    for fr, amount in subtree.items():
        quota = node.quotas.get(fr)
        if quota is not None and quota.lending_limit is not None:
            guaranteed = max(0, amount - quota.lending_limit)
            if guaranteed:
                node.guaranteed[fr] = guaranteed


# ---------------------------------------------------------------------- consistency


def check_config(config: QueueConfig) -> list[str]:
    """The configuration's consistency problems as "where: problem" lines (empty: consistent)."""
    problems: list[str] = []

    def name_ok(where: str, key: str, name: str) -> None:
        if key != name:
            problems.append(f"{where}: is named {name!r} under the key {key!r}")
        if len(key) > 63 or not _DNS_LABEL.match(key):
            problems.append(
                f"{where}: {key!r} is not a DNS label (lowercase letters, digits and '-', "
                "starting and ending with a letter or digit, at most 63)"
            )

    def weight_ok(where: str, weight: float) -> None:
        if not math.isfinite(weight) or weight < 0:
            problems.append(f"{where}: weight {weight} must be finite and not negative")

    def quotas_ok(where: str, quotas: tuple[FlavorQuotas, ...]) -> None:
        seen: set[str] = set()
        for flavor_quotas in quotas:
            flavor = flavor_quotas.flavor
            if flavor in seen:
                problems.append(f"{where}: flavor {flavor!r} appears more than once")
            seen.add(flavor)
            if flavor not in config.flavors:
                problems.append(f"{where}: flavor {flavor!r} does not exist")
            for resource, quota in flavor_quotas.resources.items():
                at = f"{where}: {flavor} {resource}"
                for label, amount in (
                    ("nominal", quota.nominal),
                    ("borrowing limit", quota.borrowing_limit),
                    ("lending limit", quota.lending_limit),
                ):
                    if amount is not None and amount < 0:
                        problems.append(f"{at}: {label} {amount} is negative")
                if quota.lending_limit is not None and quota.lending_limit > quota.nominal:
                    problems.append(
                        f"{at}: lending limit {quota.lending_limit} exceeds the nominal quota {quota.nominal}"
                    )

    for key, flavor_spec in config.flavors.items():
        name_ok(f"flavor {key}", key, flavor_spec.name)
    for key, priority_class in config.priority_classes.items():
        where = f"priority class {key}"
        name_ok(where, key, priority_class.name)
        if not INT32_MIN <= priority_class.value <= INT32_MAX:
            problems.append(f"{where}: value {priority_class.value} is outside int32")
    for key, cohort_spec in config.cohorts.items():
        where = f"cohort {key}"
        name_ok(where, key, cohort_spec.name)
        weight_ok(where, cohort_spec.weight)
        quotas_ok(where, cohort_spec.quotas)
        if cohort_spec.parent and cohort_spec.parent not in config.cohorts:
            problems.append(f"{where}: parent {cohort_spec.parent!r} does not exist")
        if key in config.queues:
            problems.append(f"{where}: a queue has the same name")
    problems.extend(_cycles(config))
    for key, queue_spec in config.queues.items():
        where = f"queue {key}"
        name_ok(where, key, queue_spec.name)
        weight_ok(where, queue_spec.weight)
        quotas_ok(where, queue_spec.quotas)
        if queue_spec.cohort and queue_spec.cohort not in config.cohorts:
            problems.append(f"{where}: cohort {queue_spec.cohort!r} does not exist")
    return problems


def _cycles(config: QueueConfig) -> list[str]:
    """Each cycle of cohort parents once, named from its smallest member."""
    found: list[str] = []
    done: set[str] = set()
    for start in sorted(config.cohorts):
        walk: list[str] = []
        name = start
        while name in config.cohorts and name not in done and name not in walk:
            walk.append(name)
            name = config.cohorts[name].parent
        if name in walk:
            cycle = walk[walk.index(name) :]
            first = cycle.index(min(cycle))
            cycle = cycle[first:] + cycle[:first]
            found.append(f"cohort {cycle[0]}: cohorts form a cycle: {' -> '.join([*cycle, cycle[0]])}")
        done.update(walk)
    return found
