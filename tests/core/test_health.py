"""Cluster health from plain facts: ready, unknown by the heartbeat's age, lost by etcd's word."""

from __future__ import annotations

import math

import pytest

from fedplane.core import health as hl
from fedplane.core.health import HealthThresholds, judge, lease_ttl
from fedplane.v1 import types_pb2 as pb

THRESHOLDS = HealthThresholds()  # 15 s / 60 s, edge 60 s / 900 s
NOW = 10_000.0


def health_at(age: float, edge: bool = False, **facts: object) -> hl.Health:
    args: dict[str, object] = {
        "reported": True,
        "inventoried": True,
        "last_seen": NOW - age,
        "lost_since": None,
        "now": NOW,
        "unknown_after": THRESHOLDS.unknown_for(edge),
        "lost_after": THRESHOLDS.lost_for(edge),
    }
    args.update(facts)
    return judge(**args)  # type: ignore[arg-type]


def test_the_states_are_the_wires_numbers() -> None:
    assert (hl.READY, hl.NOT_READY, hl.UNKNOWN, hl.LOST) == (pb.READY, pb.NOT_READY, pb.UNKNOWN, pb.LOST)
    assert all(pb.ClusterHealth.Name(n) == name for n, name in hl.NAMES.items())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("age", "edge", "state"),
    [
        (0.0, False, hl.READY),
        (15.0, False, hl.READY),
        (15.5, False, hl.UNKNOWN),
        (59.0, False, hl.UNKNOWN),
        (3600.0, False, hl.UNKNOWN),  # no longer than etcd says: lost only when the lease is gone
        (15.5, True, hl.READY),
        (60.0, True, hl.READY),
        (61.0, True, hl.UNKNOWN),
        (899.0, True, hl.UNKNOWN),
    ],
)
def test_a_silent_cluster_is_unknown_after_its_threshold(age: float, edge: bool, state: int) -> None:
    assert health_at(age, edge).state == state


def test_an_unknown_clusters_reason_says_how_long_and_what_comes_next() -> None:
    assert health_at(20).reason == "no heartbeat for 20s (lost after 60s)"
    assert health_at(65).reason == "no heartbeat for 65s; lost once its lease expires"
    assert health_at(0).reason == ""


def test_lost_wins_over_everything_else() -> None:
    lost = health_at(0, lost_since=NOW - 5)
    assert lost.state == hl.LOST and not lost.ready
    assert "lease expired" in lost.reason
    assert health_at(0, reported=False, lost_since=NOW).state == hl.LOST


def test_a_cluster_that_has_not_reported_is_not_ready() -> None:
    assert health_at(0, reported=False) == hl.Health(hl.NOT_READY, "agent has not reported yet")
    assert health_at(0, inventoried=False) == hl.Health(hl.NOT_READY, "no inventory reported yet")
    # Silence is the more important fact.
    assert health_at(30, inventoried=False).state == hl.UNKNOWN


def test_edge_clusters_are_told_by_their_label() -> None:
    assert THRESHOLDS.is_edge({"fedplane.io/edge": "true"})
    assert not THRESHOLDS.is_edge({"fedplane.io/edge": "false"})
    assert not THRESHOLDS.is_edge({})
    custom = HealthThresholds(edge_label="site/type")
    assert custom.is_edge({"site/type": "true"}) and not custom.is_edge({"fedplane.io/edge": "true"})
    assert THRESHOLDS.shortest_unknown == 15.0


def test_a_uniform_threshold_never_names_a_lost_time() -> None:
    uniform = HealthThresholds.uniform(10)
    assert uniform.unknown_for(True) == uniform.unknown_for(False) == 10
    assert math.isinf(uniform.lost_for(False))
    assert judge(
        reported=True,
        inventoried=True,
        last_seen=0,
        lost_since=None,
        now=11,
        unknown_after=10,
        lost_after=math.inf,
    ) == hl.Health(hl.UNKNOWN, "no heartbeat for 11s")


def test_the_lease_ttl_is_the_lost_threshold_rounded_up() -> None:
    assert lease_ttl(60) == 60
    assert lease_ttl(2.5) == 3
    assert lease_ttl(0.2) == 1
