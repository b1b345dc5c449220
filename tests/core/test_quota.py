"""Quota over queues and cohorts: Kueue's hierarchical cohorts, checked against a slow oracle."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from fedplane.core.queues import (
    CohortSpec,
    Flavor,
    FlavorQuotas,
    FlavorResource,
    PriorityClass,
    QueueConfig,
    QueueSpec,
    ResourceQuota,
    WhenCanBorrow,
)
from fedplane.core.quota import FlavorChoice, QuotaMisfit, QuotaTree, Shortfall, check_config, show

GPU = "nvidia.com/gpu"
FLAVORS = ("f1", "f2")
RESOURCES = ("cpu", "gpu")
FLAVOR_SPECS = {name: Flavor(name) for name in (*FLAVORS, "gpu-h100", "gpu-a100", "cpu")}


def quotas(*flavors: tuple[str, Mapping[str, ResourceQuota]]) -> tuple[FlavorQuotas, ...]:
    return tuple(FlavorQuotas(flavor, dict(resources)) for flavor, resources in flavors)


def config(queues: Sequence[QueueSpec], cohorts: Sequence[CohortSpec] = ()) -> QueueConfig:
    return QueueConfig(
        queues={q.name: q for q in queues}, cohorts={c.name: c for c in cohorts}, flavors=FLAVOR_SPECS
    )


# ---------------------------------------------------------------------- the oracle


@dataclass
class Oracle:
    """Kueue's formulas, recomputed from scratch by direct recursion."""

    config: QueueConfig
    held: dict[tuple[str, FlavorResource], int] = field(default_factory=dict)

    def charge(self, queue: str, flavor: str, demand: Mapping[str, int], sign: int = 1) -> None:
        for resource, amount in demand.items():
            key = (queue, (flavor, resource))
            self.held[key] = self.held.get(key, 0) + sign * amount

    def own(self, node: tuple[str, str], fr: FlavorResource) -> ResourceQuota | None:
        kind, name = node
        spec = self.config.queues[name] if kind == "queue" else self.config.cohorts[name]
        for flavor_quotas in spec.quotas:
            if flavor_quotas.flavor == fr[0]:
                return flavor_quotas.resources.get(fr[1])
        return None

    def children(self, node: tuple[str, str]) -> list[tuple[str, str]]:
        if node[0] == "queue":
            return []
        cohorts = [("cohort", c.name) for c in self.config.cohorts.values() if c.parent == node[1]]
        return cohorts + [("queue", q.name) for q in self.config.queues.values() if q.cohort == node[1]]

    def parent(self, node: tuple[str, str]) -> tuple[str, str] | None:
        kind, name = node
        above = self.config.queues[name].cohort if kind == "queue" else self.config.cohorts[name].parent
        return ("cohort", above) if above else None

    def subtree_quota(self, node: tuple[str, str], fr: FlavorResource) -> int:
        quota = self.own(node, fr)
        mine = quota.nominal if quota is not None else 0
        return mine + sum(self.subtree_quota(c, fr) - self.guaranteed(c, fr) for c in self.children(node))

    def guaranteed(self, node: tuple[str, str], fr: FlavorResource) -> int:
        quota = self.own(node, fr)
        if quota is None or quota.lending_limit is None:
            return 0
        return max(0, self.subtree_quota(node, fr) - quota.lending_limit)

    def usage(self, node: tuple[str, str], fr: FlavorResource) -> int:
        if node[0] == "queue":
            return self.held.get((node[1], fr), 0) if self.own(node, fr) is not None else 0
        return sum(max(0, self.usage(c, fr) - self.guaranteed(c, fr)) for c in self.children(node))

    def available(self, node: tuple[str, str], fr: FlavorResource) -> int:
        parent = self.parent(node)
        if parent is None:
            return max(0, self.subtree_quota(node, fr) - self.usage(node, fr))
        guaranteed = self.guaranteed(node, fr)
        used = self.usage(node, fr)
        local = max(0, guaranteed - used)
        from_parent = self.available(parent, fr)
        quota = self.own(node, fr)
        if quota is not None and quota.borrowing_limit is not None:
            stored_in_parent = self.subtree_quota(node, fr) - guaranteed
            used_in_parent = max(0, used - guaranteed)
            from_parent = min(from_parent, stored_in_parent - used_in_parent + quota.borrowing_limit)
        return max(0, local + from_parent)

    def subtree(self, node: tuple[str, str]) -> list[tuple[str, str]]:
        return [node] + [n for c in self.children(node) for n in self.subtree(c)]

    def root(self, node: tuple[str, str]) -> tuple[str, str]:
        parent = self.parent(node)
        return node if parent is None else self.root(parent)

    def expected_choice(self, queue: str, demand: Mapping[str, int]) -> FlavorChoice | None:
        spec = self.config.queues[queue]
        if not spec.quotas:
            return FlavorChoice("", False)
        fitting = []
        # A flavor naming none of the demand's resources is no choice; none naming any: not governed.
        choices = [f for f in spec.quotas if any(demand.get(r, 0) > 0 for r in f.resources)]
        if not choices:
            return FlavorChoice("", False)
        for flavor_quotas in choices:
            named = [r for r in flavor_quotas.resources if demand.get(r, 0) > 0]
            node = ("queue", queue)
            if all(demand[r] <= self.available(node, (flavor_quotas.flavor, r)) for r in named):
                borrows = any(
                    self.held.get((queue, (flavor_quotas.flavor, r)), 0) + demand[r]
                    > flavor_quotas.resources[r].nominal
                    for r in named
                )
                fitting.append(FlavorChoice(flavor_quotas.flavor, borrows))
        if not fitting:
            return None
        if spec.when_can_borrow == WhenCanBorrow.TRY_NEXT_FLAVOR:
            return next((c for c in fitting if not c.borrows), fitting[0])
        return fitting[0]


# ---------------------------------------------------------------------- random trees


@st.composite
def resource_quotas(draw: st.DrawFn) -> ResourceQuota:
    nominal = draw(st.integers(0, 8))
    borrowing = draw(st.none() | st.integers(0, 6))
    lending = draw(st.none() | st.integers(0, nominal))
    return ResourceQuota(nominal, borrowing, lending)


@st.composite
def some_quotas(draw: st.DrawFn, min_flavors: int) -> tuple[FlavorQuotas, ...]:
    flavors = draw(st.lists(st.sampled_from(FLAVORS), unique=True, min_size=min_flavors, max_size=2))
    result = []
    for flavor in flavors:
        resources = draw(st.lists(st.sampled_from(RESOURCES), unique=True, min_size=1, max_size=2))
        result.append(FlavorQuotas(flavor, {r: draw(resource_quotas()) for r in resources}))
    return tuple(result)


@st.composite
def trees(draw: st.DrawFn) -> QueueConfig:
    """Up to three levels: roots, cohorts under them, queues under any cohort or none."""
    cohorts = [
        CohortSpec(f"root{i}", "", draw(some_quotas(0)), draw(st.sampled_from([0.0, 1.0, 2.0])))
        for i in range(draw(st.integers(1, 2)))
    ]
    roots = [c.name for c in cohorts]
    for i in range(draw(st.integers(0, 3))):
        cohorts.append(CohortSpec(f"mid{i}", draw(st.sampled_from(roots)), draw(some_quotas(0))))
    homes = ["", *(c.name for c in cohorts)]
    queues = [
        QueueSpec(
            f"q{i}",
            draw(st.sampled_from(homes)),
            quotas=draw(some_quotas(draw(st.sampled_from([0, 1, 1, 1])))),
            when_can_borrow=draw(st.sampled_from(WhenCanBorrow)),
        )
        for i in range(draw(st.integers(1, 6)))
    ]
    return config(queues, cohorts)


# A queue (by index), a demand, and whether to release an admitted job instead.
OPERATIONS = st.lists(
    st.tuples(st.integers(0, 50), st.integers(0, 6), st.integers(0, 4), st.integers(0, 4)), max_size=25
)


def answers(tree: QuotaTree, config: QueueConfig) -> list[object]:
    """Everything admission asks of the tree, for comparing before and after."""
    out: list[object] = []
    for name in config.queues:
        for flavor in FLAVORS:
            for resource in RESOURCES:
                out.append(tree.available(name, flavor, resource))
        out.append(tree.assign(name, {"cpu": 3, "gpu": 1}))
    return out


def check_invariants(tree: QuotaTree, oracle: Oracle, config: QueueConfig) -> None:
    frs = [(f, r) for f in FLAVORS for r in RESOURCES]
    nodes = [("queue", q) for q in config.queues] + [("cohort", c) for c in config.cohorts]
    for node in nodes:
        for fr in frs:
            quota = oracle.own(node, fr)
            used = oracle.usage(node, fr)
            if node[0] == "queue":
                # The tree's arithmetic is the formulas'.
                expected = oracle.available(node, fr) if quota is not None else None
                assert tree.available(node[1], *fr) == expected, (node, fr)
                assert tree.usage(node[1], *fr) == oracle.held.get((node[1], fr), 0)
            else:
                found = tree.node(node[1])
                assert found is not None
                assert found.stored.get(fr, 0) == used, (node, fr)
                assert found.subtree_quota.get(fr, 0) == oracle.subtree_quota(node, fr)
            parent = oracle.parent(node)
            if quota is None or parent is None:
                if parent is None:
                    # A root never hands out more than its subtree brings.
                    assert used <= oracle.subtree_quota(node, fr)
                continue
            if node[0] == "queue" and quota.borrowing_limit is not None:
                assert used <= quota.nominal + quota.borrowing_limit, (node, fr)
            guaranteed = oracle.guaranteed(node, fr)
            if used < guaranteed:
                assert oracle.available(node, fr) >= guaranteed - used
                if node[0] == "queue":
                    assert (tree.available(node[1], *fr) or 0) >= guaranteed - used
            if quota.lending_limit is not None:
                # Everyone outside the node's subtree together holds at most their own quota
                # plus what the node lends.
                inside = oracle.subtree(node)
                outside = [n for n in oracle.subtree(oracle.root(node)) if n not in inside]
                held_outside = sum(oracle.usage(n, fr) for n in outside if n[0] == "queue")
                quota_outside = sum(q.nominal for n in outside if (q := oracle.own(n, fr)) is not None)
                assert held_outside <= quota_outside + quota.lending_limit, (node, fr)


@settings(max_examples=120, deadline=None)
@given(trees(), OPERATIONS)
def test_admissions_keep_kueues_limits_and_match_the_formulas(
    config: QueueConfig, operations: list[tuple[int, int, int, int]]
) -> None:
    assert check_config(config) == []
    tree = QuotaTree.build(config)
    oracle = Oracle(config)
    names = list(config.queues)
    admitted: list[tuple[str, str, dict[str, int]]] = []
    for pick, cpu, gpu, release in operations:
        if release == 0 and admitted:
            queue, flavor, demand = admitted.pop(pick % len(admitted))
            tree.release(queue, flavor, demand)
            oracle.charge(queue, flavor, demand, -1)
        else:
            queue = names[pick % len(names)]
            demand = {"cpu": cpu, "gpu": gpu}
            choice = tree.assign(queue, demand)
            expected = oracle.expected_choice(queue, demand)
            if expected is None:
                assert isinstance(choice, QuotaMisfit)
                assert [s.flavor for s in choice.shortfalls] == [
                    f.flavor
                    for f in config.queues[queue].quotas
                    if any(demand.get(r, 0) > 0 for r in f.resources)
                ]
                for short in choice.shortfalls:
                    assert short.wanted > short.available
                continue
            assert choice == expected
            before = answers(tree, config)
            tree.charge(queue, choice.flavor, demand)
            tree.release(queue, choice.flavor, demand)
            assert answers(tree, config) == before, "release did not undo the charge"
            tree.charge(queue, choice.flavor, demand)
            oracle.charge(queue, choice.flavor, demand)
            admitted.append((queue, choice.flavor, demand))
        check_invariants(tree, oracle, config)


# ---------------------------------------------------------------------- worked examples


def cpu(nominal: int, borrowing: int | None = None, lending: int | None = None) -> dict[str, ResourceQuota]:
    return {"cpu": ResourceQuota(nominal, borrowing, lending)}


def test_a_lending_limit_keeps_the_rest_of_a_queues_quota_for_it_across_three_levels() -> None:
    # org <- dept <- (a1 lends at most 4 of its 10, a2 has none); x sits directly under org.
    tree = QuotaTree.build(
        config(
            [
                QueueSpec("a1", "dept", quotas=quotas(("cpu", cpu(10, lending=4)))),
                QueueSpec("a2", "dept", quotas=quotas(("cpu", cpu(0)))),
                QueueSpec("x", "org", quotas=quotas(("cpu", cpu(0)))),
            ],
            [CohortSpec("org"), CohortSpec("dept", "org")],
        )
    )
    assert tree.path("a1") == ("org", "dept", "a1")
    assert [tree.available(q, "cpu", "cpu") for q in ("a1", "a2", "x")] == [10, 4, 4]
    tree.charge("x", "cpu", {"cpu": 4})
    assert [tree.available(q, "cpu", "cpu") for q in ("a1", "a2", "x")] == [6, 0, 0]
    assert isinstance(tree.assign("a2", {"cpu": 1}), QuotaMisfit)
    assert tree.assign("a1", {"cpu": 6}) == FlavorChoice("cpu", False)
    assert tree.usage("org", "cpu", "cpu") == 4
    assert tree.borrowed("x", "cpu", "cpu") == 4


def test_a_borrowing_limit_caps_what_a_queue_takes_beyond_its_nominal() -> None:
    tree = QuotaTree.build(
        config(
            [
                QueueSpec("a", "org", quotas=quotas(("cpu", cpu(2, borrowing=3)))),
                QueueSpec("b", "org", quotas=quotas(("cpu", cpu(10)))),
            ],
            [CohortSpec("org")],
        )
    )
    assert tree.available("a", "cpu", "cpu") == 5
    assert tree.assign("a", {"cpu": 5}) == FlavorChoice("cpu", True)
    assert isinstance(tree.assign("a", {"cpu": 6}), QuotaMisfit)
    assert tree.available("b", "cpu", "cpu") == 12


def test_a_queue_without_a_cohort_or_in_an_undefined_one_has_only_its_nominal() -> None:
    tree = QuotaTree.build(
        config(
            [
                QueueSpec("alone", quotas=quotas(("cpu", cpu(3)))),
                QueueSpec("orphan", "nowhere", quotas=quotas(("cpu", cpu(2, borrowing=5)))),
                QueueSpec("free"),
            ]
        )
    )
    assert tree.available("alone", "cpu", "cpu") == 3
    assert tree.available("orphan", "cpu", "cpu") == 2
    assert tree.cohort_names() == ("nowhere",)
    assert tree.assign("free", {"cpu": 10**9}) == FlavorChoice("", False)
    assert tree.assign("unknown", {"cpu": 1}) == FlavorChoice("", False)
    # A resource no flavor of the queue names is not limited.
    assert tree.available("alone", "cpu", "memory") is None
    assert tree.assign("alone", {"cpu": 3, "memory": 10**12}) == FlavorChoice("cpu", False)


def fungible(when: WhenCanBorrow, second_nominal: int) -> QuotaTree:
    return QuotaTree.build(
        config(
            [
                QueueSpec(
                    "team",
                    "org",
                    quotas=quotas(("f1", cpu(2)), ("f2", cpu(second_nominal))),
                    when_can_borrow=when,
                ),
                QueueSpec("lender", "org", quotas=quotas(("f1", cpu(8)), ("f2", cpu(0)))),
            ],
            [CohortSpec("org")],
        )
    )


def test_borrow_takes_the_first_flavor_that_fits_even_by_borrowing() -> None:
    assert fungible(WhenCanBorrow.BORROW, 4).assign("team", {"cpu": 3}) == FlavorChoice("f1", True)


def test_try_next_flavor_prefers_a_later_flavor_within_nominal_to_borrowing() -> None:
    tree = fungible(WhenCanBorrow.TRY_NEXT_FLAVOR, 4)
    assert tree.assign("team", {"cpu": 3}) == FlavorChoice("f2", False)
    # Within nominal, the first flavor still wins.
    assert tree.assign("team", {"cpu": 2}) == FlavorChoice("f1", False)
    # No flavor fits within nominal: the first that fits by borrowing.
    assert fungible(WhenCanBorrow.TRY_NEXT_FLAVOR, 2).assign("team", {"cpu": 3}) == FlavorChoice("f1", True)


def test_a_misfit_names_each_flavors_first_shortfall_and_its_biggest_holders() -> None:
    tree = QuotaTree.build(
        config(
            [
                QueueSpec(
                    "team-a",
                    "org",
                    quotas=quotas(
                        ("gpu-h100", {GPU: ResourceQuota(8)}),
                        ("gpu-a100", {"cpu": ResourceQuota(4000), GPU: ResourceQuota(0)}),
                    ),
                ),
                QueueSpec("team-b", "org", quotas=quotas(("gpu-h100", {GPU: ResourceQuota(12)}))),
            ],
            [CohortSpec("org")],
        )
    )
    tree.charge("team-a", "gpu-h100", {GPU: 6})
    tree.charge("team-b", "gpu-h100", {GPU: 12})
    misfit = tree.assign("team-a", {GPU: 8, "cpu": 16000})
    assert misfit == QuotaMisfit(
        "team-a",
        (
            Shortfall("gpu-h100", GPU, 8, 2, (("team-b", 12), ("team-a", 6))),
            Shortfall("gpu-a100", "cpu", 16000, 4000, ()),
        ),
    )
    assert misfit.summary() == (
        "queue team-a: no quota: gpu-h100 nvidia.com/gpu needs 8, 2 available (held by team-b 12, team-a 6); "
        "gpu-a100 cpu needs 16, 4 available"
    )


def test_amounts_show_exactly_in_the_units_people_use() -> None:
    assert [show("cpu", 2000), show("cpu", 1500), show("memory", 3 * 2**30), show("memory", 1000)] == [
        "2",
        "1500m",
        "3Gi",
        "1000",
    ]


def test_release_never_takes_usage_below_zero() -> None:
    tree = QuotaTree.build(
        config([QueueSpec("a", "org", quotas=quotas(("cpu", cpu(4))))], [CohortSpec("org")])
    )
    tree.charge("a", "cpu", {"cpu": 1})
    tree.release("a", "cpu", {"cpu": 5})
    assert tree.usage("a", "cpu", "cpu") == 0
    assert tree.usage("org", "cpu", "cpu") == 0
    assert tree.available("a", "cpu", "cpu") == 4


def test_the_report_shows_every_queue_and_cohort_with_borrowed_and_lent() -> None:
    tree = QuotaTree.build(
        config(
            [
                QueueSpec("a", "org", quotas=quotas(("cpu", cpu(10)))),
                QueueSpec("b", "org", quotas=quotas(("cpu", cpu(10, borrowing=6)))),
                QueueSpec("free", "org"),
            ],
            [CohortSpec("org")],
        )
    )
    tree.charge("b", "cpu", {"cpu": 14})
    tree.charge("free", "", {"memory": 5})
    report = {status.name: status for status in tree.report(capacity={"cpu": 20})}
    assert [(s.kind, s.parent) for s in report.values()] == [("queue", "org")] * 3 + [("cohort", "")]
    (a,) = report["a"].resources
    (b,) = report["b"].resources
    assert (a.usage, a.borrowed, a.lent) == (0, 0, 4)
    assert (b.nominal, b.borrowing_limit, b.usage, b.borrowed, b.lent) == (10, 6, 14, 4, 0)
    assert report["b"].share == 4 / 20
    # Ungoverned usage is shown, borrowed from nobody.
    (free,) = report["free"].resources
    assert (free.flavor, free.resource, free.usage, free.borrowed) == ("", "memory", 5, 0)
    org = {(r.flavor, r.resource): r for r in report["org"].resources}
    assert (org["cpu", "cpu"].usage, org["cpu", "cpu"].borrowed) == (14, 0)


# ---------------------------------------------------------------------- check_config


def good_config() -> QueueConfig:
    return QueueConfig(
        queues={
            "team-a": QueueSpec("team-a", "ml", quotas=quotas(("gpu-h100", {GPU: ResourceQuota(8, 4, 2)}))),
            "team-b": QueueSpec("team-b", "web", weight=2.0, quotas=quotas(("cpu", cpu(64_000)))),
        },
        cohorts={
            "org": CohortSpec("org", quotas=quotas(("cpu", cpu(10_000)))),
            "ml": CohortSpec("ml", "org"),
            "web": CohortSpec("web", "org"),
        },
        flavors={name: FLAVOR_SPECS[name] for name in ("gpu-h100", "cpu")},
        priority_classes={"p0": PriorityClass("p0", 1000)},
    )


def test_a_consistent_three_level_tree_passes() -> None:
    assert check_config(good_config()) == []


def with_changes(
    queues: Mapping[str, QueueSpec] = {},
    cohorts: Mapping[str, CohortSpec] = {},
    priority_classes: Mapping[str, PriorityClass] = {},
) -> QueueConfig:
    base = good_config()
    return QueueConfig(
        queues={**base.queues, **queues},
        cohorts={**base.cohorts, **cohorts},
        flavors=base.flavors,
        priority_classes={**base.priority_classes, **priority_classes},
    )


def test_check_config_names_each_problem_where_it_is() -> None:
    problems = check_config(
        with_changes(
            cohorts={
                "a": CohortSpec("a", "b"),
                "b": CohortSpec("b", "c"),
                "c": CohortSpec("c", "a"),
                "lost": CohortSpec("lost", "gone"),
            },
            queues={
                "team-c": QueueSpec("team-c", "absent"),
                "team-d": QueueSpec(
                    "team-d",
                    "ml",
                    weight=float("nan"),
                    quotas=quotas(("gpu-a100", {GPU: ResourceQuota(1)}), ("cpu", cpu(4, lending=5))),
                ),
                "Team_E": QueueSpec("Team_E", quotas=quotas(("cpu", cpu(-1))), weight=-1.0),
            },
            priority_classes={"huge": PriorityClass("huge", 2**31)},
        )
    )
    assert sorted(problems) == sorted(
        [
            "cohort a: cohorts form a cycle: a -> b -> c -> a",
            "cohort lost: parent 'gone' does not exist",
            "queue team-c: cohort 'absent' does not exist",
            "queue team-d: weight nan must be finite and not negative",
            "queue team-d: flavor 'gpu-a100' does not exist",
            "queue team-d: cpu cpu: lending limit 5 exceeds the nominal quota 4",
            "queue Team_E: 'Team_E' is not a DNS label (lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63)",
            "queue Team_E: weight -1.0 must be finite and not negative",
            "queue Team_E: cpu cpu: nominal -1 is negative",
            "priority class huge: value 2147483648 is outside int32",
        ]
    )


def test_check_config_refuses_a_repeated_flavor_and_a_name_used_twice() -> None:
    problems = check_config(
        with_changes(
            queues={
                "team-a": QueueSpec("team-a", "ml", quotas=quotas(("cpu", cpu(1)), ("cpu", cpu(2)))),
                "ml": QueueSpec("ml"),
            }
        )
    )
    assert problems == [
        "cohort ml: a queue has the same name",
        "queue team-a: flavor 'cpu' appears more than once",
    ]


def test_a_tree_with_a_cycle_still_builds_and_charges() -> None:
    cyclic = config(
        [QueueSpec("q", "a", quotas=quotas(("cpu", cpu(1))))],
        [CohortSpec("a", "b", quotas=quotas(("cpu", cpu(2)))), CohortSpec("b", "a")],
    )
    tree = QuotaTree.build(cyclic)
    assert tree.path("q") in {("a", "q"), ("b", "a", "q")}
    assert tree.available("q", "cpu", "cpu") == 3
    tree.charge("q", "cpu", {"cpu": 3})
    assert tree.available("q", "cpu", "cpu") == 0
