"""A member cluster's health: READY, NOT_READY, UNKNOWN or LOST, judged from plain facts.

Two thresholds per cluster, longer for edge clusters (weak links drop for minutes without
anything being wrong):

- READY: it has reported (a heartbeat and an inventory) and its last heartbeat is at most
  `unknown_after` old. Only READY clusters get new jobs.
- UNKNOWN: its last heartbeat is older than that. It gets no new jobs, and nothing on it is
  touched: a silence may be a slow link.
- LOST: its lease in etcd expired, `lost_after` after the last heartbeat that renewed it. The
  hub does not judge this by its own clock: etcd does, by deleting the cluster's alive key,
  so every hub replica, and a new leader, sees the same verdict (`lost_since` is when that was
  observed). Only now do its jobs follow their disconnect policy.
- NOT_READY: registered, but no heartbeat or no inventory yet.

The numbers are the wire's `ClusterHealth` values (a hub test checks them against fedplane.v1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

READY = 1
NOT_READY = 2
UNKNOWN = 3
LOST = 4
NAMES = {READY: "READY", NOT_READY: "NOT_READY", UNKNOWN: "UNKNOWN", LOST: "LOST"}


@dataclass(frozen=True, slots=True)
class HealthThresholds:
    """When silent clusters become UNKNOWN and LOST, for ordinary and for edge clusters.

    A cluster is an edge cluster when its inventory carries `edge_label` with the value "true".
    """

    unknown_after: float = 15.0
    lost_after: float = 60.0
    edge_unknown_after: float = 60.0
    edge_lost_after: float = 900.0
    edge_label: str = "fedplane.io/edge"

    @classmethod
    def uniform(cls, unknown_after: float) -> HealthThresholds:
        """One unknown threshold for every cluster and no lost threshold of the hub's own (a
        registry given only a heartbeat timeout, as hubs before cluster leases made it)."""
        return cls(unknown_after, math.inf, unknown_after, math.inf)

    def is_edge(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.edge_label) == "true"

    def unknown_for(self, edge: bool) -> float:
        return self.edge_unknown_after if edge else self.unknown_after

    def lost_for(self, edge: bool) -> float:
        return self.edge_lost_after if edge else self.lost_after

    @property
    def shortest_unknown(self) -> float:
        return min(self.unknown_after, self.edge_unknown_after)


class Health(NamedTuple):
    state: int
    # Why the cluster is not READY, in words ("" when it is).
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.state == READY


def judge(
    *,
    reported: bool,
    inventoried: bool,
    last_seen: float,
    lost_since: float | None,
    now: float,
    unknown_after: float,
    lost_after: float,
) -> Health:
    """A cluster's health at `now`.

    `reported`: a heartbeat was ever heard; `inventoried`: an inventory was; `last_seen`: when
    the last heartbeat was stored; `lost_since`: when its alive key was seen gone (None while it
    is there, or before the cluster ever had one).
    """
    if lost_since is not None:
        if math.isinf(lost_after):
            return Health(LOST, "lost: its lease expired")
        return Health(LOST, f"lost: its lease expired (no heartbeat for over {lost_after:g}s)")
    if not reported:
        return Health(NOT_READY, "agent has not reported yet")
    age = now - last_seen
    if age > unknown_after:
        if math.isinf(lost_after):
            return Health(UNKNOWN, f"no heartbeat for {age:.0f}s")
        if age > lost_after:
            return Health(UNKNOWN, f"no heartbeat for {age:.0f}s; lost once its lease expires")
        return Health(UNKNOWN, f"no heartbeat for {age:.0f}s (lost after {lost_after:g}s)")
    if not inventoried:
        return Health(NOT_READY, "no inventory reported yet")
    return Health(READY)


def lease_ttl(lost_after: float) -> int:
    """The TTL in whole seconds of a cluster's lease in etcd: its lost threshold, rounded up
    (and at least 1 s; etcd itself raises a shorter TTL to its minimum, about 2 s)."""
    return max(1, math.ceil(lost_after))
