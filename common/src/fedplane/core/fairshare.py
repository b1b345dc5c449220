"""Hierarchical weighted dominant-resource fair sharing over a QuotaTree.

A node's share of one flavor-resource is what it holds beyond the quota it brings (a queue's
nominal, a cohort's SubtreeQuota; 0 for a resource no quota governs, so queues without quota
get Armada's plain DRF) over the federation's capacity of that resource; its dominant share is
the largest of these, divided by its weight. Kueue compares shares of borrowing the same way,
so a queue running within its own quota never competes for the next slot with one borrowing.

The order in which queues are served is hierarchical: cohorts are compared with their sibling
cohorts first, then queues within a cohort (`ordering_key`), so a cohort of three queues does
not get three times the share of a cohort of one. A queue is compared by its share after
adding its next job (Armada's rule, so a big gang does not win on a low share it is about to
overshoot); a cohort by its share as it stands (see `ordering_key`).

Each node caches its own dominant share until a charge or release below it (its version), so
ordering every queue's head after one admission recomputes only the admitted queue's path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedplane.core.quota import QuotaNode, QuotaTree


def share(
    tree: QuotaTree,
    node: str,
    capacity: Mapping[str, int],
    extra: tuple[str, Mapping[str, int]] | None = None,
) -> float:
    """The node's weighted dominant share; with `extra=(flavor, demand)`, after adding the
    demand to the node itself (for a cohort, as if none of it fell in a member's guaranteed
    part). 0.0 for an unknown node."""
    found = tree.node(node)
    if found is None:
        return 0.0
    ratio, above = _base(found, capacity)
    if extra is not None:
        flavor, demand = extra
        quota = found.subtree_quota
        for resource, amount in demand.items():
            if amount <= 0:
                continue
            fr = (flavor, resource)
            over = found.fair.get(fr, 0) + amount - quota.get(fr, 0)
            if over > 0:
                above = True
                total = capacity.get(resource, 0)
                if total > 0:
                    ratio = max(ratio, over / total)
    return _weighted(found.weight, ratio, above)


def node_share(node: QuotaNode, capacity: Mapping[str, int]) -> float:
    """A node's weighted dominant share as it stands."""
    return _weighted(node.weight, *_base(node, capacity))


def ordering_key(
    tree: QuotaTree, queue: str, capacity: Mapping[str, int], flavor: str, demand: Mapping[str, int]
) -> tuple[float, ...]:
    """The queue's cohorts' shares, root first, then the queue's own share after admitting
    `demand` of `flavor`: the next job comes from the queue with the lowest key. An unknown
    queue sorts after every known one.

    The cohorts' shares are taken as they stand, without the demand: siblings in a cohort
    share its entry, so they are compared by their own shares alone. Were the cohort's share
    after adding each one's demand, the member with the smaller jobs would win every time,
    however much it already holds."""
    node = tree.queue(queue)
    if node is None:
        return (math.inf,)
    keys = [node_share(step, capacity) for step in node.path[:-1]]
    keys.append(share(tree, queue, capacity, (flavor, demand)))
    return tuple(keys)


def _base(node: QuotaNode, capacity: Mapping[str, int]) -> tuple[float, bool]:
    """The node's unweighted dominant share, and whether it holds anything beyond its quota."""
    cached = node.share_cache
    if cached is not None and cached[0] == node.version and cached[1] == capacity:
        return cached[2], cached[3]
    ratio = 0.0
    above = False
    quota = node.subtree_quota
    for fr, used in node.fair.items():
        over = used - quota.get(fr, 0)
        if over > 0:
            above = True
            total = capacity.get(fr[1], 0)
            if total > 0:
                ratio = max(ratio, over / total)
    node.share_cache = (node.version, dict(capacity), ratio, above)
    return ratio, above


def _weighted(weight: float, ratio: float, above: bool) -> float:
    if weight > 0:
        return ratio / weight
    return math.inf if above else 0.0
