"""Fair sharing: weighted dominant-resource shares, compared level by level down the cohort tree."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from fedplane.core import fairshare
from fedplane.core.queues import CohortSpec, FlavorQuotas, QueueConfig, QueueSpec, ResourceQuota
from fedplane.core.quota import FlavorChoice, QuotaTree

GB = 10**9
CAPACITY = {"cpu": 18_000, "memory": 72 * GB}


def tree_of(queues: Sequence[QueueSpec], cohorts: Sequence[CohortSpec] = ()) -> QuotaTree:
    return QuotaTree.build(
        QueueConfig(queues={q.name: q for q in queues}, cohorts={c.name: c for c in cohorts})
    )


def test_the_dominant_resource_decides_a_queues_share() -> None:
    # The brief's example: 6/18 CPU and 24/72 GB is a share of one third; 12/18 CPU is two thirds.
    tree = tree_of([QueueSpec("a"), QueueSpec("b")])
    tree.charge("a", "", {"cpu": 6_000, "memory": 24 * GB})
    tree.charge("b", "", {"cpu": 12_000})
    assert math.isclose(fairshare.share(tree, "a", CAPACITY), 1 / 3)
    assert math.isclose(fairshare.share(tree, "b", CAPACITY), 2 / 3)
    # After adding a job: 6 more cores make cpu the dominant resource.
    assert math.isclose(fairshare.share(tree, "a", CAPACITY, ("", {"cpu": 6_000})), 2 / 3)


def test_weight_divides_the_share_and_weight_zero_is_served_last() -> None:
    tree = tree_of(
        [QueueSpec("double", weight=2.0), QueueSpec("zero", weight=0.0), QueueSpec("idle", weight=0.0)]
    )
    for name in ("double", "zero"):
        tree.charge(name, "", {"cpu": 6_000, "memory": 24 * GB})
    assert math.isclose(fairshare.share(tree, "double", CAPACITY), 1 / 6)
    assert fairshare.share(tree, "zero", CAPACITY) == math.inf
    assert fairshare.share(tree, "idle", CAPACITY) == 0.0
    assert fairshare.share(tree, "idle", CAPACITY, ("", {"cpu": 1})) == math.inf


def test_only_usage_beyond_the_nominal_quota_counts() -> None:
    quota = (FlavorQuotas("cpu", {"cpu": ResourceQuota(6_000)}),)
    tree = tree_of(
        [QueueSpec("a", "org", quotas=quota), QueueSpec("b", "org", quotas=quota)], [CohortSpec("org")]
    )
    tree.charge("a", "cpu", {"cpu": 6_000})
    assert fairshare.share(tree, "a", CAPACITY) == 0.0
    tree.charge("a", "cpu", {"cpu": 3_000})
    assert math.isclose(fairshare.share(tree, "a", CAPACITY), 3 / 18)
    # A resource the caller gives no capacity for is skipped.
    tree.charge("b", "cpu", {"cpu": 6_000, "ephemeral": 5})
    assert fairshare.share(tree, "b", {"cpu": 18_000, "ephemeral": 0}) == 0.0
    # A released job's share is gone, whatever was cached.
    tree.release("a", "cpu", {"cpu": 3_000})
    assert fairshare.share(tree, "a", CAPACITY) == 0.0


def test_siblings_share_their_cohorts_entry_whatever_their_jobs_size() -> None:
    # Were the cohort's entry taken after adding each job, small jobs would win every time.
    tree = tree_of([QueueSpec("small", "org"), QueueSpec("big", "org"), QueueSpec("other", "rest")])
    tree.charge("small", "", {"cpu": 3_000})
    tree.charge("other", "", {"cpu": 1_800})
    small = fairshare.ordering_key(tree, "small", CAPACITY, "", {"cpu": 100})
    big = fairshare.ordering_key(tree, "big", CAPACITY, "", {"cpu": 1_800})
    assert small == (3_000 / 18_000, 3_100 / 18_000)
    assert big == (3_000 / 18_000, 1_800 / 18_000)
    assert big < small
    # Across cohorts the cohorts' shares decide first.
    assert fairshare.ordering_key(tree, "other", CAPACITY, "", {"cpu": 9_000}) < big
    assert fairshare.ordering_key(tree, "unknown", CAPACITY, "", {"cpu": 1}) == (math.inf,)


def admit_by_lowest_key(
    tree: QuotaTree, queues: Sequence[str], demands: Mapping[str, Mapping[str, int]], flavor: str, rounds: int
) -> None:
    """Saturated demand: every round admits one job from the queue whose key is lowest."""
    for _ in range(rounds):
        _, chosen = min((fairshare.ordering_key(tree, q, CAPACITY, flavor, demands[q]), q) for q in queues)
        choice = tree.assign(chosen, demands[chosen])
        assert isinstance(choice, FlavorChoice) and choice.flavor == flavor
        tree.charge(chosen, flavor, demands[chosen])


def job_share(demand: Mapping[str, int], weight: float) -> float:
    return max(amount / CAPACITY[resource] for resource, amount in demand.items()) / weight


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4_000), st.integers(1, 3_000), st.integers(0, 4 * GB)),
        min_size=2,
        max_size=5,
    ),
    st.sampled_from([0.5, 1.0, 3.0]),
    st.integers(1, 60),
)
def test_admitting_from_the_lowest_key_keeps_shares_within_one_job(
    queues: list[tuple[int, int, int]], weight: float, rounds: int
) -> None:
    specs = [
        QueueSpec(f"q{i}", "org", weight, (FlavorQuotas("big", {"cpu": ResourceQuota(nominal)}),))
        for i, (nominal, _, _) in enumerate(queues)
    ]
    pool = CohortSpec("org", quotas=(FlavorQuotas("big", {"cpu": ResourceQuota(10**9)}),))
    tree = tree_of(specs, [pool])
    demands = {f"q{i}": {"cpu": cpu, "memory": memory} for i, (_, cpu, memory) in enumerate(queues)}
    names = list(demands)
    admit_by_lowest_key(tree, names, demands, "big", rounds)
    shares = [fairshare.share(tree, name, CAPACITY) for name in names]
    largest_job = max(job_share(demand, weight) for demand in demands.values())
    assert max(shares) - min(shares) <= largest_job + 1e-9


def test_cohorts_share_fairly_first_then_their_queues() -> None:
    # One cohort of one queue, one of three: the cohorts converge, so the lone queue gets as
    # much as the other three together.
    tree = tree_of(
        [QueueSpec("solo", "small"), *(QueueSpec(f"many-{i}", "large") for i in range(3))],
        [CohortSpec("org"), CohortSpec("small", "org"), CohortSpec("large", "org")],
    )
    queues = ["solo", "many-0", "many-1", "many-2"]
    unit = {"cpu": 100}
    admit_by_lowest_key(tree, queues, dict.fromkeys(queues, unit), "", 60)
    small, large = (fairshare.share(tree, c, CAPACITY) for c in ("small", "large"))
    assert abs(small - large) <= 100 / 18_000 + 1e-9
    assert tree.usage("solo", "", "cpu") == 3_000
    assert [tree.usage(f"many-{i}", "", "cpu") for i in range(3)] == [1_000] * 3
    assert math.isclose(fairshare.share(tree, "org", CAPACITY), 6_000 / 18_000)


def test_the_report_carries_each_nodes_share() -> None:
    tree = tree_of([QueueSpec("a", "org")], [CohortSpec("org", weight=2.0)])
    tree.charge("a", "", {"cpu": 9_000})
    shares = {status.name: status.share for status in tree.report(CAPACITY)}
    assert shares == {"a": 0.5, "org": 0.25}
