"""The registry's cached cluster views are exactly the views built afresh from the reports.

The registry keeps every cluster's view and the list of them, updating them incrementally as
inventories, data reports, reservations, releases, cordons, heartbeats and lost clusters arrive
(with edge clusters' longer thresholds among them). Whatever
the sequence, `views()` must equal the views the straightforward code (kept here) builds
from scratch, and views handed out must never change afterwards.
"""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedplane.core.capacity import reservation_key
from fedplane.core.health import HealthThresholds
from fedplane.core.model import (
    GPU_PRODUCT_LABEL,
    Assignment,
    ClusterView,
    Fits,
    JobRequest,
    NodeIndex,
    NodeView,
    PodSetRequest,
    Taint,
)
from fedplane.core.placement import place_batch
from fedplane.hub.clusters import ClusterRegistry, ClusterState
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb

TIMEOUT = 10.0
EDGE_TIMEOUT = 30.0
THRESHOLDS = HealthThresholds(TIMEOUT, 40.0, EDGE_TIMEOUT, 120.0)
CLUSTERS = ["c0", "c1", "c2"]
NODES = ["n0", "n1", "n2", "n3"]
JOBS = [
    JobRequest("small", (PodSetRequest("w", 2, 0, {"cpu": 1000, "memory": 2**30}),)),
    JobRequest(
        "gang",
        (
            PodSetRequest("launcher", 1, 0, {"cpu": 500}),
            PodSetRequest("worker", 3, 0, {"cpu": 2000, "nvidia.com/gpu": 1}),
        ),
    ),
    JobRequest("zero", (PodSetRequest("w", 1, 0, {"cpu": 0, "example.com/thing": 1}),)),
    JobRequest("a100", (PodSetRequest("w", 1, 0, {"cpu": 1000, "nvidia.com/gpu": 1}, "A100"),)),
]


def fresh_view(state: ClusterState, now: float) -> ClusterView:
    """A cluster's view built from scratch, as the registry did before it cached anything."""
    ready, why = state.ready(now, THRESHOLDS)
    inventory = state.inventory if state.inventory is not None else agent_pb.Inventory()
    nodes = [
        NodeView(
            n.name,
            dict(n.free.quantities),
            dict(n.allocatable.quantities),
            dict(n.labels),
            tuple(Taint(t.key, t.value, t.effect or "NoSchedule") for t in n.taints),
            n.ready and not n.unschedulable,
        )
        for n in inventory.nodes
    ]
    by_name = {n.name: n for n in nodes}
    for reservation in state.reservations.values():
        for a in reservation.assignments:
            node = by_name.get(a.node)
            if node is None:
                continue
            for resource, amount in reservation.requests[a.pod_set].items():
                node.free[resource] = node.free.get(resource, 0) - amount * a.count
    return ClusterView(
        name=state.name,
        nodes=nodes,
        labels=dict(inventory.labels),
        taints=tuple(Taint(t.key, t.value, t.effect or "NoSchedule") for t in inventory.taints),
        datasets={d.id: d.bytes for d in (state.datasets.datasets if state.datasets else [])},
        cost=inventory.cost,
        ready=ready,
        cordoned=state.admin.cordoned,
        not_ready_reason=why,
    )


def assert_fits_current(view: ClusterView) -> None:
    """Every best-fit list cached on the view (and carried to views derived from it) is what
    its nodes' free capacity gives now."""
    for cached in view._fits.values():
        assert cached.entries == Fits.of(view.nodes, sorted(cached.positions), cached.wanted).entries


def assert_same(actual: ClusterView, expected: ClusterView) -> None:
    assert_fits_current(actual)
    assert actual == expected
    index, fresh_index = actual.index(), NodeIndex.of(expected.nodes)
    assert (index.position, index.products) == (fresh_index.position, fresh_index.products)
    for which in ("free", "allocatable"):
        assert actual.total(which) == expected.total(which), which
    # Room is only ever read with .get(resource, 0): zero entries may come and go.
    assert {r: a for r, a in actual.room().items() if a} == {r: a for r, a in expected.room().items() if a}


NODE_REPORTS = st.tuples(
    st.sampled_from(NODES),
    st.integers(-2, 16),  # free cores (negative: the cluster overcommitted)
    st.sampled_from([0, 8]),  # GPUs
    st.sampled_from([{}, {"zone": "a"}, {GPU_PRODUCT_LABEL: "A100"}]),
    st.sampled_from([(), (("gpu", "true", "NoSchedule"),)]),
    st.booleans(),  # ready
    st.sampled_from([False, False, False, True]),  # unschedulable
)


@st.composite
def inventories(draw: st.DrawFn, name: str, reservation_keys: list[str]) -> agent_pb.Inventory:
    """A report: some of the nodes in any order, accounting for some reservations (or unknown ones)."""
    message = agent_pb.Inventory(cluster=name, cost=draw(st.sampled_from([0.0, 1.0, 2.5])))
    message.labels.update(draw(st.sampled_from([{}, {"region": "eu"}, {THRESHOLDS.edge_label: "true"}])))
    if draw(st.booleans()):
        message.taints.add(key="spot", effect="NoExecute")
    for node_name, cores, gpus, labels, taints, ready, unschedulable in draw(
        st.lists(NODE_REPORTS, max_size=5)
    ):
        node = message.nodes.add(name=node_name, ready=ready, unschedulable=unschedulable, labels=labels)
        for key, value, effect in taints:
            node.taints.add(key=key, value=value, effect=effect)
        node.allocatable.quantities.update(
            {"cpu": 16000, "memory": 64 * 2**30, **({"nvidia.com/gpu": 8} if gpus else {})}
        )
        node.free.quantities.update(
            {"cpu": cores * 1000, "memory": 32 * 2**30, **({"nvidia.com/gpu": gpus} if gpus else {})}
        )
    accounted = draw(st.lists(st.sampled_from([*reservation_keys, "small:1", "unknown:1"]), max_size=3))
    message.accounted_jobs.extend(accounted)
    return message


@st.composite
def assignments(draw: st.DrawFn, job: JobRequest) -> list[Assignment]:
    return draw(
        st.lists(
            st.builds(
                Assignment,
                st.sampled_from([p.name for p in job.pod_sets]),
                st.sampled_from([*NODES, "gone"]),
                st.integers(1, 3),
            ),
            max_size=3,
        )
    )


OPERATIONS = [
    "inventory",
    "same inventory",
    "reserve",
    "reserve",
    "reserve again",
    "release",
    "release",
    "cordon",
    "heartbeat",
    "silence",
    "lost",
    "datasets",
    "time",
    "place",
]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_cached_views_equal_fresh_ones_whatever_happens(data: st.DataObject) -> None:
    draw = data.draw
    registry = ClusterRegistry(THRESHOLDS)
    now = 1000.0
    handed_out: list[tuple[ClusterView, ClusterView]] = []  # (view, a deep copy when handed out)
    for name in CLUSTERS[: draw(st.integers(1, len(CLUSTERS)))]:
        state, _ = registry.get_or_add(name)
        if draw(st.booleans()):  # mostly healthy, reporting clusters
            state.heartbeat = agent_pb.Heartbeat(cluster=name)
            state.last_seen = now
            state.apply_inventory(draw(inventories(name, [])))

    def check() -> None:
        views = registry.views(now)
        states = [registry.clusters[name] for name in sorted(registry.clusters)]
        assert [v.name for v in views] == [s.name for s in states]
        fresh = [fresh_view(state, now) for state in states]
        for view, expected in zip(views, fresh, strict=True):
            assert_same(view, expected)
        # Placement on the cached views (and their cached node indexes) decides as on fresh ones.
        for job in JOBS:
            (got,), (want,) = place_batch([job], views), place_batch([job], fresh)
            assert got.cluster == want.cluster
            assert (got.chosen and got.chosen.assignments) == (want.chosen and want.chosen.assignments)
        handed_out.extend((v, copy.deepcopy(v)) for v in views)

    check()
    for _ in range(draw(st.integers(1, 20))):
        operation = draw(st.sampled_from(OPERATIONS))
        state = registry.clusters[draw(st.sampled_from(sorted(registry.clusters)))]
        keys = list(state.reservations)
        if operation == "inventory":
            state.apply_inventory(draw(inventories(state.name, keys)))
        elif operation == "same inventory" and state.inventory is not None:
            state.apply_inventory(state.inventory)
        elif operation in ("reserve", "reserve again"):
            job = draw(st.sampled_from(JOBS))
            generation = 1 if operation == "reserve again" else draw(st.integers(1, 2))
            state.reserve(job, generation, draw(assignments(job)))
        elif operation == "release":
            key = draw(st.sampled_from([*keys, "small:1"]))
            job_id, _, number = key.partition(":")
            state.release(job_id, int(number))
        elif operation == "cordon":
            state.admin = pb.Cluster(name=state.name, cordoned=draw(st.booleans()))
        elif operation == "heartbeat":
            state.heartbeat = agent_pb.Heartbeat(cluster=state.name)
            state.last_seen = now
        elif operation == "silence":
            state.last_seen = now - draw(
                st.sampled_from([TIMEOUT - 1, TIMEOUT + 1, EDGE_TIMEOUT - 1, EDGE_TIMEOUT + 1, 100.0])
            )
        elif operation == "lost":
            state.lost_since = draw(st.sampled_from([None, now]))
        elif operation == "datasets":
            report = agent_pb.DataLocalityReport(cluster=state.name)
            for dataset in draw(st.lists(st.sampled_from(["d1", "d2"]), unique=True)):
                report.datasets.add(id=dataset, bytes=100)
            state.datasets = report
        elif operation == "time":
            now += draw(st.sampled_from([0.5, 3.0, TIMEOUT / 2, TIMEOUT + 1, EDGE_TIMEOUT + 1]))
        elif operation == "place":
            # As the hub does: place on the (cached, shared) views, then reserve the choice.
            job = draw(st.sampled_from(JOBS))
            generation = draw(st.integers(1, 2))
            for decision in place_batch([job], registry.views(now)):
                chosen = decision.chosen
                if decision.cluster is not None and chosen is not None:
                    registry.clusters[decision.cluster].reserve(job, generation, chosen.assignments)
                    assert (
                        reservation_key(job.id, generation)
                        in registry.clusters[decision.cluster].reservations
                    )
        if draw(st.booleans()):
            check()
        # The view the hub shows (ClusterState.to_pb) comes from the same cache.
        assert_same(state.view(now, THRESHOLDS), fresh_view(state, now))
    check()
    for view, snapshot in handed_out:
        assert view == snapshot, "a view changed after it was handed out"
        assert view.total("free") == snapshot.total("free")


def test_clusters_added_behind_get_or_adds_back_are_still_seen() -> None:
    registry = ClusterRegistry(THRESHOLDS)
    registry.get_or_add("a")
    assert [v.name for v in registry.views(0.0)] == ["a"]
    registry.clusters["b"] = ClusterState("b", pb.Cluster(name="b"))
    assert [v.name for v in registry.views(0.0)] == ["a", "b"]
    state = registry.clusters["b"]
    state.heartbeat = agent_pb.Heartbeat(cluster="b")
    state.last_seen = 0.0
    state.apply_inventory(agent_pb.Inventory(cluster="b"))
    assert [v.ready for v in registry.views(1.0)] == [False, True]
