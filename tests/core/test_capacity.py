"""Capacity in flight: reported free capacity minus the reservations not yet accounted for."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fedplane.core import capacity
from fedplane.core.capacity import Reservation, reservation_key
from fedplane.core.model import Assignment, JobRequest, NodeView, PodSetRequest, Taint

JOB = JobRequest(
    "job",
    (
        PodSetRequest("launcher", 1, 0, {"cpu": 500}),
        PodSetRequest("worker", 4, 0, {"cpu": 2000, "nvidia.com/gpu": 1}),
    ),
)


def reported() -> list[NodeView]:
    return [
        NodeView("n0", {"cpu": 8000}, {"cpu": 8000}, {"zone": "a"}),
        NodeView("n1", {"cpu": 16000, "nvidia.com/gpu": 4}, {"cpu": 16000, "nvidia.com/gpu": 8}),
        NodeView("n2", {"cpu": 4000}, {"cpu": 4000}, taints=(Taint("spot"),), schedulable=False),
    ]


def position(nodes: list[NodeView]) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(nodes)}


def free(nodes: list[NodeView]) -> dict[str, dict[str, int]]:
    return {n.name: n.free for n in nodes}


def test_a_reservation_is_keyed_as_inventories_name_the_jobs_they_counted() -> None:
    assert reservation_key("job", 3) == "job:3"


def test_a_reservation_holds_each_pod_sets_requests_and_the_assignments() -> None:
    assignments = [Assignment("worker", "n1", 3), Assignment("launcher", "n0", 1)]
    reservation = Reservation.of(JOB, assignments)
    assert reservation.requests == {"launcher": {"cpu": 500}, "worker": {"cpu": 2000, "nvidia.com/gpu": 1}}
    assert reservation.assignments == assignments


def test_subtract_takes_the_pods_out_of_copies_and_skips_nodes_that_are_gone() -> None:
    nodes = reported()
    reservation = Reservation.of(
        JOB, [Assignment("worker", "n1", 3), Assignment("launcher", "n0", 1), Assignment("worker", "gone", 1)]
    )
    changes: dict[int, dict[str, int]] = {}
    capacity.subtract(reservation, nodes, position(nodes), changes)
    assert changes == {0: {"cpu": 7500}, 1: {"cpu": 10000, "nvidia.com/gpu": 1}}
    assert free(nodes) == free(reported()), "the nodes were modified"
    # A second reservation comes out of the same copies; a resource a node lacks goes negative.
    capacity.subtract(Reservation.of(JOB, [Assignment("worker", "n0", 1)]), nodes, position(nodes), changes)
    assert changes[0] == {"cpu": 5500, "nvidia.com/gpu": -1}


def test_subtract_only_touches_the_nodes_asked_for() -> None:
    nodes = reported()
    reservation = Reservation.of(JOB, [Assignment("worker", "n1", 1), Assignment("launcher", "n0", 1)])
    changes: dict[int, dict[str, int]] = {}
    capacity.subtract(reservation, nodes, position(nodes), changes, only={"n0"})
    assert changes == {0: {"cpu": 7500}}


def test_free_nodes_replaces_only_the_nodes_a_reservation_touches() -> None:
    nodes = reported()
    assert capacity.free_nodes(nodes, []) == nodes
    assert all(a is b for a, b in zip(capacity.free_nodes(nodes, []), nodes, strict=True))
    reservations = [
        Reservation.of(JOB, [Assignment("worker", "n1", 2)]),
        Reservation.of(JOB, [Assignment("worker", "n1", 1), Assignment("launcher", "n1", 1)]),
    ]
    after = capacity.free_nodes(nodes, reservations)
    assert after[0] is nodes[0] and after[2] is nodes[2]
    assert after[1].free == {"cpu": 9500, "nvidia.com/gpu": 1}
    # The rest of the node is shared, not copied: the node index and caches carry over.
    assert after[1].allocatable is nodes[1].allocatable and after[1].labels is nodes[1].labels
    assert free(nodes) == free(reported())


def test_reserved_is_the_touched_nodes_free_capacity_after_the_reservation() -> None:
    nodes = reported()
    reservation = Reservation.of(JOB, [Assignment("worker", "n1", 4), Assignment("launcher", "n0", 1)])
    assert capacity.reserved(reservation, nodes, position(nodes)) == {
        0: {"cpu": 7500},
        1: {"cpu": 8000, "nvidia.com/gpu": 0},
    }
    assert (
        capacity.reserved(Reservation.of(JOB, [Assignment("worker", "gone", 1)]), nodes, position(nodes))
        == {}
    )


def test_released_recounts_the_touched_nodes_from_the_report_minus_the_reservations_left() -> None:
    nodes = reported()
    gone = Reservation.of(JOB, [Assignment("worker", "n1", 2)])
    left = [
        Reservation.of(JOB, [Assignment("worker", "n1", 1), Assignment("launcher", "n0", 1)]),
        Reservation.of(JOB, [Assignment("launcher", "n2", 1)]),
    ]
    view = capacity.free_nodes(nodes, [gone, *left])
    changes = capacity.released(gone, nodes, view, position(view), left)
    # Only n1 was touched by the released reservation; n0's and n2's reservations stay out.
    assert changes == {1: {"cpu": 14000, "nvidia.com/gpu": 3}}
    nothing = Reservation.of(JOB, [Assignment("worker", "gone", 1)])
    assert capacity.released(nothing, nodes, view, position(view), left) == {}


def test_drop_accounted_drops_what_the_inventory_counted_and_ignores_the_rest() -> None:
    reservations = {
        reservation_key("a", 1): Reservation.of(JOB, []),
        reservation_key("b", 2): Reservation.of(JOB, []),
    }
    capacity.drop_accounted(reservations, ["a:1", "a:2", "unknown:1"])
    assert list(reservations) == ["b:2"]


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("reserve"),
            st.integers(0, 4),
            st.lists(
                st.builds(
                    Assignment,
                    st.sampled_from(["launcher", "worker"]),
                    st.sampled_from(["n0", "n1", "n2", "gone"]),
                    st.integers(1, 3),
                ),
                max_size=3,
            ),
        ),
        st.tuples(st.just("release"), st.integers(0, 4), st.just([])),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(OPERATIONS)
def test_reserving_and_releasing_node_by_node_equals_recounting_from_the_report(
    operations: list[tuple[str, int, list[Assignment]]],
) -> None:
    """What the hub keeps up to date incrementally is always what a recount gives."""
    nodes = reported()
    reservations: dict[str, Reservation] = {}
    view = list(nodes)
    where = position(nodes)
    for operation, number, assignments in operations:
        key = reservation_key("job", number)
        if operation == "reserve" and key not in reservations:
            reservation = reservations[key] = Reservation.of(JOB, assignments)
            changes = capacity.reserved(reservation, view, where)
        elif operation == "release" and key in reservations:
            reservation = reservations.pop(key)
            changes = capacity.released(reservation, nodes, view, where, reservations.values())
        else:
            continue
        for i, after in changes.items():
            old = view[i]
            view[i] = NodeView(old.name, after, old.allocatable, old.labels, old.taints, old.schedulable)
        assert view == capacity.free_nodes(nodes, reservations.values())
    assert free(nodes) == free(reported())
