"""A lost cluster's jobs: which disconnect policy each follows, and what is decided for it, when.

The decisions keep the work whenever they can: nothing happens before the policy's delay,
WAIT never acts, REQUEUE acts only when another cluster can take the job, FAIL fails it.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedplane.core import disconnect as dc
from fedplane.core import dispatch as sm

S = sm.S
A = dc.Action
LOST = 1000.0  # when the cluster was declared lost


def job(
    state: int = S.RUNNING,
    action: str = A.REQUEUE,
    after: float = 30.0,
    *,
    elsewhere: bool = True,
    why_not: str = "",
    cluster: str = "east",
    generation: int = 3,
) -> dc.LostJob:
    current = sm.DispatchState(state, "" if state == S.PENDING else cluster, generation)
    return dc.LostJob("j1", current, dc.Policy(action, after), elsewhere, why_not)


def decide(item: dc.LostJob, now: float) -> dc.Outcome | None:
    return dc.decide_job("east", LOST, now, item)


# -- the decisions, as a table -----------------------------------------------------------------

# (state, action, requeue_after, elsewhere, seconds since lost) -> (outcome, next state or until)
CASES = [
    # Before the delay nothing happens, whatever the policy; the job says when to look again.
    (S.RUNNING, A.REQUEUE, 30, True, 0, ("wait", LOST + 30)),
    (S.RUNNING, A.REQUEUE, 30, True, 29.9, ("wait", LOST + 30)),
    (S.RUNNING, A.FAIL, 30, True, 29, ("wait", LOST + 30)),
    (S.DISPATCHED, A.REQUEUE, 300, True, 10, ("wait", LOST + 300)),
    # At the delay: REQUEUE takes the job back to PENDING if another cluster can take it...
    (S.RUNNING, A.REQUEUE, 30, True, 30, ("requeue", S.PENDING)),
    (S.ADMITTED, A.REQUEUE, 30, True, 31, ("requeue", S.PENDING)),
    (S.DISPATCHED, A.REQUEUE, 0, True, 0, ("requeue", S.PENDING)),
    # ...and keeps waiting, for room rather than a time, if none can.
    (S.RUNNING, A.REQUEUE, 30, False, 30, ("room", None)),
    (S.RUNNING, A.REQUEUE, 0, False, 86400, ("room", None)),
    # FAIL fails it, whether or not another cluster could take it.
    (S.RUNNING, A.FAIL, 30, False, 30, ("fail", S.FAILED)),
    (S.DISPATCHED, A.FAIL, 0, True, 0, ("fail", S.FAILED)),
    # WAIT never acts.
    (S.RUNNING, A.WAIT, 0, True, 0, ("wait", None)),
    (S.RUNNING, A.WAIT, 30, True, 10 * 86400, ("wait", None)),
    (S.ADMITTED, A.WAIT, 0, False, 10 * 86400, ("wait", None)),
    # An action this code does not know never evicts.
    (S.RUNNING, "evict", 0, True, 86400, ("wait", None)),
    # A job being cancelled is finished as CANCELLED at once, whatever its policy.
    (S.CANCELLING, A.WAIT, 0, False, 0, ("requeue", S.CANCELLED)),
    (S.CANCELLING, A.REQUEUE, 300, False, 0, ("requeue", S.CANCELLED)),
    (S.CANCELLING, A.FAIL, 300, True, 1, ("requeue", S.CANCELLED)),
]


@pytest.mark.parametrize(("state", "action", "after", "elsewhere", "lost_for", "expected"), CASES)
def test_decisions(
    state: int,
    action: str,
    after: float,
    elsewhere: bool,
    lost_for: float,
    expected: tuple[str, float | None],
) -> None:
    item = job(state, action, after, elsewhere=elsewhere)
    outcome = decide(item, LOST + lost_for)
    kind, value = expected
    assert outcome is not None and outcome.job_id == "j1" and outcome.why
    if kind == "wait":
        assert isinstance(outcome, dc.Wait) and not outcome.needs_room
        assert outcome.until == value
    elif kind == "room":
        assert isinstance(outcome, dc.Wait) and outcome.needs_room and outcome.until is None
    else:
        assert isinstance(outcome, dc.Requeue if kind == "requeue" else dc.Fail)
        move = outcome.transition
        assert move.state == value and move.reason == "ClusterLost"
        # The generation is kept: the next dispatch bumps it, fencing off the old copy.
        assert move.generation == 3
        assert move.cluster == ("" if value == S.PENDING else "east")


def test_a_requeue_is_the_state_machines_requeue_with_the_time_lost_in_its_message() -> None:
    outcome = decide(job(S.RUNNING, A.REQUEUE, 30), LOST + 45)
    assert isinstance(outcome, dc.Requeue)
    current = sm.DispatchState(S.RUNNING, "east", 3)
    assert outcome.transition == sm.requeue(
        current, "ClusterLost", message="cluster east lost for 45s; requeued"
    )
    assert outcome.transition.replaces_placement and outcome.transition.assignments == ()


def test_a_failure_is_the_state_machines_give_up() -> None:
    outcome = decide(job(S.RUNNING, A.FAIL, 0), LOST + 61)
    assert isinstance(outcome, dc.Fail)
    current = sm.DispatchState(S.RUNNING, "east", 3)
    assert outcome.transition == sm.give_up(current, "ClusterLost", "cluster east lost for 61s")


def test_a_requeue_that_no_cluster_can_take_says_why() -> None:
    outcome = decide(job(elsewhere=False, why_not="no cluster fits: too little cpu"), LOST + 30)
    assert isinstance(outcome, dc.Wait) and outcome.needs_room
    assert outcome.why == "no other cluster can take it: no cluster fits: too little cpu"
    # Once one can, the same job is requeued.
    assert isinstance(decide(job(elsewhere=True), LOST + 31), dc.Requeue)


@pytest.mark.parametrize("state", [S.PENDING, S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_jobs_no_longer_on_the_cluster_get_no_decision(state: int) -> None:
    assert decide(job(state), LOST + 3600) is None


def test_a_job_now_on_another_cluster_gets_no_decision() -> None:
    assert decide(job(cluster="west"), LOST + 3600) is None


def test_decide_keeps_the_order_and_skips_what_moved_on() -> None:
    jobs = [
        dc.LostJob("a", sm.DispatchState(S.RUNNING, "east", 1), dc.Policy(A.WAIT)),
        dc.LostJob("b", sm.DispatchState(S.SUCCEEDED, "east", 1), dc.Policy(A.REQUEUE)),
        dc.LostJob("c", sm.DispatchState(S.RUNNING, "east", 1), dc.Policy(A.FAIL, 10)),
        dc.LostJob("d", sm.DispatchState(S.RUNNING, "east", 1), dc.Policy(A.REQUEUE, 60), True),
    ]
    outcomes = dc.decide("east", LOST, LOST + 20, jobs)
    assert [(type(o).__name__, o.job_id) for o in outcomes] == [("Wait", "a"), ("Fail", "c"), ("Wait", "d")]
    assert dc.next_look(outcomes) == LOST + 60
    assert dc.next_look([]) == math.inf


@given(
    state=st.sampled_from([S.DISPATCHED, S.ADMITTED, S.RUNNING]),
    action=st.sampled_from([*dc.ACTIONS, ""]),
    after=st.floats(0, 1e6),
    elsewhere=st.booleans(),
    lost_for=st.floats(0, 2e6),
)
def test_nothing_is_evicted_early_nor_without_a_place_unless_the_policy_fails_it(
    state: int, action: str, after: float, elsewhere: bool, lost_for: float
) -> None:
    outcome = decide(job(state, action, after, elsewhere=elsewhere), LOST + lost_for)
    assert outcome is not None
    if isinstance(outcome, dc.Requeue):
        assert action == A.REQUEUE and elsewhere and LOST + lost_for >= LOST + after
        assert outcome.transition.state == S.PENDING
    elif isinstance(outcome, dc.Fail):
        assert action == A.FAIL and LOST + lost_for >= LOST + after
    else:
        assert action != A.FAIL or LOST + lost_for < LOST + after
    if action not in (A.REQUEUE, A.FAIL):
        assert isinstance(outcome, dc.Wait) and outcome.until is None


# -- which policy a job follows ----------------------------------------------------------------

HUB = dc.Policy(A.REQUEUE, 0)
QUEUES = {"batch": dc.Policy(A.FAIL, 60), "edge": dc.Policy(A.WAIT, 0)}


@pytest.mark.parametrize(
    ("own", "queue", "expected"),
    [
        (None, "default", HUB),  # no policy of its own, a queue without a default: the hub's
        (None, "batch", dc.Policy(A.FAIL, 60)),  # the queue's default
        (dc.Policy(A.WAIT, 0), "batch", dc.Policy(A.WAIT, 0)),  # its own wins
        (dc.Policy(A.REQUEUE, 5), "edge", dc.Policy(A.REQUEUE, 5)),
        (dc.Policy("", 0), "batch", dc.Policy(A.FAIL, 60)),  # names nothing: the default
        (dc.Policy("", 120), "batch", dc.Policy(A.FAIL, 120)),  # only a delay: the default's action
        (dc.Policy("", 120), "default", dc.Policy(A.REQUEUE, 120)),
    ],
)
def test_resolve(own: dc.Policy | None, queue: str, expected: dc.Policy) -> None:
    assert dc.resolve(own, queue, QUEUES, HUB) == expected


# -- when the agent stops a cut-off job --------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "lost_after", "fence"),
    [
        (dc.Policy(A.WAIT, 30), 60, 0.0),  # never: the job waits for its cluster
        (dc.Policy(A.REQUEUE, 30), 60, 84.0),  # 60 + 30, less 10% of 60
        (dc.Policy(A.FAIL, 0), 900, 810.0),  # an edge cluster: 900, less 90
        (dc.Policy(A.REQUEUE, 0), 5, 4.0),  # the margin is at least a second
        (dc.Policy(A.REQUEUE, 0), 1, 0.5),  # ...but at most half of the whole
    ],
)
def test_fence_after(policy: dc.Policy, lost_after: float, fence: float) -> None:
    assert dc.fence_after(policy, lost_after) == pytest.approx(fence)


@given(action=st.sampled_from(dc.ACTIONS), after=st.floats(0, 1e6), lost_after=st.floats(0.001, 1e6))
def test_the_agent_stops_before_the_hub_may_act(action: str, after: float, lost_after: float) -> None:
    policy = dc.Policy(action, after)
    fence = dc.fence_after(policy, lost_after)
    acts = dc.acts_at(lost_after, policy)  # the cluster is lost lost_after after its last word
    if acts is None:
        assert fence == 0
    else:
        assert 0 < fence < acts


@pytest.mark.parametrize(
    ("lost", "known", "held"),
    [(0, 10, False), (1, 1, False), (1, 2, False), (2, 3, True), (5, 10, False), (6, 10, True)],
)
def test_evictions_are_held_when_most_clusters_are_lost_at_once(lost: int, known: int, held: bool) -> None:
    assert dc.disrupted(lost, known, 0.55) is held
