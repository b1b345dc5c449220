"""The queue book on real etcd: atomic applies checked whole, compare-and-swap between replicas,
every replica following the one document; the conversions to the core's types; and the
intake's checks of a job's queue and priority class."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedplane.core import dispatch as sm
from fedplane.core.queues import (
    CohortSpec,
    Flavor,
    FlavorQuotas,
    Preemption,
    PriorityClass,
    QueueConfig,
    QueueSpec,
    QueueStatus,
    ReclaimWithinCohort,
    ResourceQuota,
    ResourceUsage,
    Strategy,
    WhenCanBorrow,
    WithinQueue,
)
from fedplane.hub.errors import HubError
from fedplane.hub.intake import Intake
from fedplane.hub.queuebook import (
    DOCUMENT,
    QueueBook,
    config_core,
    objects_pb,
    unfinished_jobs,
    view_pb,
)
from fedplane.hub.store import Store
from fedplane.local import servers as embedded
from fedplane.v1 import hub_pb2 as hub_pb
from fedplane.v1 import types_pb2 as pb
from tests.federation import eventually
from tests.hub.fakes import Parts, spec

pytestmark = pytest.mark.timeout(30)
S = sm.S
GPU = "nvidia.com/gpu"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[embedded.ServerProcess]:
    """One etcd for the module (starting one costs most of a second); each test has its own prefix."""
    server = embedded.start_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def store(etcd: embedded.ServerProcess, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    connected = await Store.connect(etcd.address, prefix=f"/{request.node.name}")
    try:
        yield connected
    finally:
        await connected.close()


class Jobs:
    """The job table's (queue, state) counts, as the hub hands them to the book."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, int]] = Counter()

    def in_queue(self, queue: str) -> int:
        return unfinished_jobs(self.counts, queue)


@pytest.fixture
def jobs() -> Jobs:
    return Jobs()


@pytest.fixture
async def book(store: Store, jobs: Jobs) -> AsyncIterator[QueueBook]:
    started = QueueBook(store, jobs.in_queue)
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


def quota(nominal: int, borrowing: int | None = None, lending: int | None = None) -> pb.ResourceQuota:
    out = pb.ResourceQuota(nominal=nominal)
    if borrowing is not None:
        out.borrowing_limit = borrowing
    if lending is not None:
        out.lending_limit = lending
    return out


def org() -> pb.QueueObjects:
    """A root cohort, a department, two team queues, two flavors and two priority classes."""
    return pb.QueueObjects(
        flavors=[
            pb.ResourceFlavor(name="cpu"),
            pb.ResourceFlavor(name="gpu-h100", gpu_type="H100", cluster_labels={"tier": "cloud"}),
        ],
        priority_classes=[
            pb.PriorityClass(name="guaranteed", value=1000),
            pb.PriorityClass(name="spot", value=0, never_preempt=True, interruptible=True),
        ],
        cohorts=[
            pb.Cohort(name="org"),
            pb.Cohort(name="ml", parent="org", weight=2),
        ],
        queues=[
            pb.Queue(
                name="team-a",
                cohort="ml",
                quotas=[pb.FlavorQuotas(flavor="gpu-h100", resources={GPU: quota(16, 8, 4)})],
                strategy=pb.STRICT_FIFO,
                when_can_borrow=pb.FUNGIBILITY_TRY_NEXT_FLAVOR,
                preemption=pb.QueuePreemption(reclaim_within_cohort=pb.RECLAIM_ANY, max_per_minute=10),
            ),
            pb.Queue(
                name="team-b",
                cohort="ml",
                weight=0,
                quotas=[pb.FlavorQuotas(flavor="cpu", resources={"cpu": quota(64_000)})],
            ),
        ],
    )


async def stored(store: Store) -> tuple[bytes | None, int]:
    blob, revision, _ = await store.read_document(DOCUMENT)
    return blob, revision


async def refused(apply: Awaitable[pb.QueueObjects], code: str) -> str:
    with pytest.raises(HubError) as caught:
        await apply
    assert caught.value.code == code, caught.value
    return str(caught.value)


# ------------------------------------------------------------------ apply and list


async def test_applied_objects_are_stored_whole_and_read_back_by_a_new_replica(
    store: Store, book: QueueBook, jobs: Jobs
) -> None:
    result = await book.apply(org(), by="root")
    assert result.revision > 0 and result.updated_by == "root"
    expected = org()
    expected.cohorts.sort(key=lambda c: c.name)
    for kind in ("queues", "cohorts", "flavors", "priority_classes"):
        assert list(getattr(result, kind)) == sorted(getattr(expected, kind), key=lambda o: o.name)
    config = book.config
    assert config.queues["team-a"] == QueueSpec(
        name="team-a",
        cohort="ml",
        weight=1.0,
        quotas=(FlavorQuotas("gpu-h100", {GPU: ResourceQuota(16, 8, 4)}),),
        strategy=Strategy.STRICT_FIFO,
        when_can_borrow=WhenCanBorrow.TRY_NEXT_FLAVOR,
        preemption=Preemption(WithinQueue.LOWER_PRIORITY, ReclaimWithinCohort.ANY, False, 10.0),
    )
    assert config.queues["team-b"].weight == 0.0  # an explicit 0 is not the default 1
    assert config.queues["team-b"].strategy is Strategy.BEST_EFFORT_FIFO
    assert config.cohorts["ml"] == CohortSpec("ml", "org", (), 2.0)
    assert config.flavors["gpu-h100"] == Flavor("gpu-h100", {"tier": "cloud"}, "H100")
    assert config.priority_classes["spot"] == PriorityClass("spot", 0, may_preempt=False, interruptible=True)
    assert config.priority_classes["guaranteed"].may_preempt

    other = QueueBook(store, jobs.in_queue)
    await other.start()
    try:
        assert other.objects == book.objects and other.config == config
    finally:
        await other.stop()


async def test_apply_replaces_objects_whole_and_leaves_the_others(book: QueueBook) -> None:
    await book.apply(org())
    changed = pb.Queue(name="team-a", cohort="ml", held=True)
    result = await book.apply(pb.QueueObjects(queues=[changed]))
    assert [q for q in result.queues if q.name == "team-a"] == [changed]  # quotas and all replaced
    assert {q.name for q in result.queues} == {"team-a", "team-b"}
    assert book.config.queues["team-a"].held and book.config.queues["team-a"].quotas == ()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (pb.QueueObjects(cohorts=[pb.Cohort(name="org", parent="ml")]), "cycle"),
        (pb.QueueObjects(queues=[pb.Queue(name="team-c", cohort="nowhere")]), "'nowhere' does not exist"),
        (
            pb.QueueObjects(
                queues=[
                    pb.Queue(
                        name="team-c",
                        quotas=[pb.FlavorQuotas(flavor="cpu", resources={"cpu": quota(4, None, 8)})],
                    )
                ]
            ),
            "lending_limit: 8 is more than the nominal quota 4",
        ),
        (
            pb.QueueObjects(queues=[pb.Queue(name="team-c", quotas=[pb.FlavorQuotas(flavor="tpu")])]),
            "'tpu' does not exist",
        ),
        (pb.QueueObjects(queues=[pb.Queue(name="Team C")]), "Team C"),
        (pb.QueueObjects(queues=[pb.Queue(name="team-c", weight=float("nan"))]), "weight"),
    ],
    ids=["cycle", "missing-cohort", "lending-over-nominal", "missing-flavor", "bad-name", "nan-weight"],
)
async def test_an_inconsistent_apply_is_refused_and_changes_nothing(
    store: Store, book: QueueBook, change: pb.QueueObjects, problem: str
) -> None:
    await book.apply(org())
    before = await stored(store)
    message = await refused(book.apply(change), "INVALID_ARGUMENT")
    assert problem in message
    assert await stored(store) == before
    assert set(book.config.queues) == {"team-a", "team-b"}


async def test_an_apply_is_all_or_nothing(store: Store, book: QueueBook) -> None:
    await book.apply(org())
    before = await stored(store)
    good = pb.Queue(name="team-c", cohort="ml")
    bad = pb.Queue(name="team-d", cohort="nowhere")
    await refused(book.apply(pb.QueueObjects(queues=[good, bad])), "INVALID_ARGUMENT")
    assert await stored(store) == before and "team-c" not in book.config.queues


async def test_a_dry_run_answers_with_the_outcome_and_changes_nothing(store: Store, book: QueueBook) -> None:
    await book.apply(org())
    before = await stored(store)
    result = await book.apply(
        pb.QueueObjects(queues=[pb.Queue(name="team-c", cohort="org")]),
        [hub_pb.ObjectRef(kind="Queue", name="team-b")],
        dry_run=True,
    )
    assert {q.name for q in result.queues} == {"team-a", "team-c"}
    assert result.revision == before[1]
    assert await stored(store) == before
    assert set(book.config.queues) == {"team-a", "team-b"}
    # A dry run is checked like the real thing.
    await refused(
        book.apply(pb.QueueObjects(queues=[pb.Queue(name="x", cohort="no")]), dry_run=True),
        "INVALID_ARGUMENT",
    )


async def test_an_apply_against_a_stale_revision_is_refused(store: Store, book: QueueBook) -> None:
    first = await book.apply(org())
    second = await book.apply(pb.QueueObjects(queues=[pb.Queue(name="team-c")]))
    message = await refused(
        book.apply(pb.QueueObjects(queues=[pb.Queue(name="team-d")]), expected_revision=first.revision),
        "ABORTED",
    )
    assert f"revision {second.revision}" in message
    assert "team-d" not in book.config.queues
    await book.apply(pb.QueueObjects(queues=[pb.Queue(name="team-d")]), expected_revision=second.revision)
    assert "team-d" in book.config.queues


async def test_concurrent_applies_from_two_replicas_both_land(
    store: Store, book: QueueBook, jobs: Jobs
) -> None:
    await book.apply(org())
    other = QueueBook(store, jobs.in_queue)
    await other.start()
    try:
        await asyncio.gather(
            *(
                replica.apply(pb.QueueObjects(queues=[pb.Queue(name=f"q{i}", cohort="org")]))
                for i, replica in enumerate([book, other] * 4)
            )
        )
        _, revision = await stored(store)

        async def caught_up() -> bool:
            return book.revision == other.revision == revision

        await eventually(caught_up, 5, "both replicas at the last revision")
        assert {f"q{i}" for i in range(8)} <= set(book.config.queues) == set(other.config.queues)
    finally:
        await other.stop()


async def test_another_replica_sees_each_change_through_its_watch(
    store: Store, book: QueueBook, jobs: Jobs
) -> None:
    other = QueueBook(store, jobs.in_queue)
    heard: list[QueueConfig] = []
    other.subscribe(heard.append)
    await other.start()
    try:
        await book.apply(org())

        async def seen() -> bool:
            return bool(heard) and "team-a" in heard[-1].queues

        await eventually(seen, 5, "the second replica to see team-a")
        assert other.config == book.config and other.objects == book.objects
        await book.apply(pb.QueueObjects(), [hub_pb.ObjectRef(kind="Queue", name="team-a")])

        async def gone() -> bool:
            return "team-a" not in other.config.queues

        await eventually(gone, 5, "the second replica to see team-a deleted")
        assert heard[-1] is other.config
    finally:
        await other.stop()


# ------------------------------------------------------------------ deletes


async def test_a_queue_holding_unfinished_jobs_is_not_deleted(
    store: Store, book: QueueBook, jobs: Jobs
) -> None:
    await book.apply(org())
    jobs.counts[("team-b", S.PENDING)] = 2
    jobs.counts[("team-b", S.RUNNING)] = 1
    jobs.counts[("team-a", S.SUCCEEDED)] = 5  # finished jobs do not hold a queue
    before = await stored(store)
    message = await refused(
        book.apply(
            pb.QueueObjects(),
            [hub_pb.ObjectRef(kind="Queue", name="team-a"), hub_pb.ObjectRef(kind="Queue", name="team-b")],
        ),
        "FAILED_PRECONDITION",
    )
    assert 'queue "team-b" holds 3 unfinished jobs' in message and "team-a" not in message
    assert await stored(store) == before
    await book.apply(pb.QueueObjects(), [hub_pb.ObjectRef(kind="Queue", name="team-a")])
    assert set(book.config.queues) == {"team-b"}


async def test_deletes_that_break_the_tree_or_name_nothing_are_refused(book: QueueBook) -> None:
    await book.apply(org())
    ref = hub_pb.ObjectRef
    assert "does not exist" in await refused(
        book.apply(pb.QueueObjects(), [ref(kind="Cohort", name="ml")]), "INVALID_ARGUMENT"
    )
    assert "Queue nope: not found" in await refused(
        book.apply(pb.QueueObjects(), [ref(kind="Queue", name="nope")]), "NOT_FOUND"
    )
    assert "is not a kind" in await refused(
        book.apply(pb.QueueObjects(), [ref(kind="Widget", name="x")]), "INVALID_ARGUMENT"
    )
    assert "both applied and deleted" in await refused(
        book.apply(pb.QueueObjects(queues=[pb.Queue(name="team-a")]), [ref(kind="Queue", name="team-a")]),
        "INVALID_ARGUMENT",
    )
    # A priority class pending jobs name may go: they keep the priority they were given.
    await book.apply(pb.QueueObjects(), [ref(kind="PriorityClass", name="spot")])
    assert set(book.config.priority_classes) == {"guaranteed"}


# ------------------------------------------------------------------ conversions


_names = st.sampled_from(["a", "b", "c", "d"])
_quota = st.builds(
    ResourceQuota,
    st.integers(0, 10**12),
    st.none() | st.integers(0, 10**12),
    st.none() | st.integers(0, 10**12),
)
_flavor_quotas = st.builds(
    FlavorQuotas, st.sampled_from(["cpu", "gpu"]), st.dictionaries(st.sampled_from(["cpu", GPU]), _quota)
)
_weight = st.sampled_from([0.0, 0.5, 1.0, 3.0])


@st.composite
def configs(draw: st.DrawFn) -> QueueConfig:
    queues = {
        name: QueueSpec(
            name,
            draw(st.sampled_from(["", "x", "y"])),
            draw(_weight),
            tuple(draw(st.lists(_flavor_quotas, max_size=2))),
            draw(st.sampled_from(Strategy)),
            draw(st.booleans()),
            draw(st.sampled_from(WhenCanBorrow)),
            Preemption(
                draw(st.sampled_from(WithinQueue)),
                draw(st.sampled_from(ReclaimWithinCohort)),
                draw(st.booleans()),
                draw(st.sampled_from([0.0, 2.5])),
            ),
        )
        for name in draw(st.sets(_names))
    }
    cohorts = {
        name: CohortSpec(
            name,
            draw(st.sampled_from(["", "x"])),
            tuple(draw(st.lists(_flavor_quotas, max_size=1))),
            draw(_weight),
        )
        for name in draw(st.sets(st.sampled_from(["x", "y"])))
    }
    flavors = {
        n: Flavor(n, draw(st.dictionaries(st.sampled_from(["tier"]), st.sampled_from(["a"]))), "")
        for n in ["cpu", "gpu"]
    }
    classes = {
        n: PriorityClass(n, draw(st.integers(-100, 100)), draw(st.booleans()), draw(st.booleans()))
        for n in draw(st.sets(_names))
    }
    return QueueConfig(queues, cohorts, flavors, classes)


@settings(max_examples=40, deadline=None)
@given(configs())
def test_the_wire_form_converts_back_to_the_same_configuration(config: QueueConfig) -> None:
    wire = objects_pb(config)
    assert config_core(pb.QueueObjects.FromString(wire.SerializeToString())) == config


def test_the_queue_view_carries_every_row_and_each_configured_weight() -> None:
    config = QueueConfig(
        queues={"team-a": QueueSpec("team-a", cohort="ml", weight=3.0)},
        cohorts={"ml": CohortSpec("ml", weight=0.5)},
    )
    usage = ResourceUsage("gpu-h100", GPU, 16, 8, None, 20, 4, 0)
    view = view_pb(
        [
            QueueStatus("team-a", "queue", "ml", (usage,), 1.25, pending=7, admitted=2, held=True),
            QueueStatus("ml", "cohort", "", (), 0.5),
            QueueStatus("implicit", "queue", "", (), 0.0, pending=1),
        ],
        config,
    )
    team_a, ml, implicit = view.rows
    assert (team_a.name, team_a.kind, team_a.parent, team_a.share, team_a.weight) == (
        "team-a",
        "queue",
        "ml",
        1.25,
        3.0,
    )
    assert (team_a.pending, team_a.admitted, team_a.held) == (7, 2, True)
    [row] = team_a.resources
    assert (row.flavor, row.resource, row.nominal, row.usage, row.borrowed, row.lent) == (
        "gpu-h100",
        GPU,
        16,
        20,
        4,
        0,
    )
    assert row.HasField("borrowing_limit") and row.borrowing_limit == 8 and not row.HasField("lending_limit")
    assert (ml.kind, ml.weight) == ("cohort", 0.5)
    assert (implicit.weight, implicit.pending) == (1.0, 1)  # not configured: the default weight


# ------------------------------------------------------------------ intake


def intake_with(parts: Parts, config: QueueConfig, implicit: bool) -> Intake:
    return Intake(parts.table, parts.clock, lambda: config, implicit)


CONFIG = QueueConfig(
    queues={"default": QueueSpec("default"), "team-a": QueueSpec("team-a", held=True)},
    priority_classes={"guaranteed": PriorityClass("guaranteed", 1000)},
)


async def submit(intake: Intake, job: pb.JobSpec) -> pb.Job:
    runner = asyncio.create_task(intake.run())
    try:
        [(out, _)] = await intake.submit([(job, "")], batch=False)
    finally:
        runner.cancel()
    return out


async def test_a_job_must_name_a_queue_that_exists_unless_queues_are_implicit() -> None:
    job = spec("j")
    job.queue = "nowhere"
    with pytest.raises(HubError) as caught:
        await submit(intake_with(Parts(), CONFIG, implicit=False), job)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert str(caught.value) == 'spec.queue: queue "nowhere" does not exist (fedplane queues lists them)'
    accepted = await submit(intake_with(Parts(), CONFIG, implicit=True), job)
    assert accepted.spec.queue == "nowhere"
    job.queue = "team-a"  # held: the job is taken, and waits
    assert (await submit(intake_with(Parts(), CONFIG, implicit=False), job)).spec.queue == "team-a"
    job.queue = ""  # no queue: "default"
    assert (await submit(intake_with(Parts(), CONFIG, implicit=False), job)).spec.queue == "default"


async def test_a_priority_class_gives_the_job_its_priority() -> None:
    intake = intake_with(Parts(), CONFIG, implicit=False)
    job = spec("j")
    job.queue, job.priority_class = "team-a", "guaranteed"
    assert (await submit(intake, job)).spec.priority == 1000
    job.priority = 1000  # the same value, given twice: fine
    assert (await submit(intake, job)).spec.priority == 1000
    cases: list[tuple[dict[str, object], str]] = [
        ({"priority": 5}, "spec.priority: 5 contradicts priority class 'guaranteed'"),
        (
            {"priority": 0, "priority_class": "vip"},
            'spec.priority_class: priority class "vip" does not exist',
        ),
        (
            {"priority_class": "", "min_run_seconds": 8 * 86400},
            "spec.min_run_seconds: must be between 0 and 604800",
        ),
        ({"min_run_seconds": -1}, "spec.min_run_seconds"),
    ]
    for change, problem in cases:
        for field, value in change.items():
            setattr(job, field, value)
        with pytest.raises(HubError) as caught:
            await submit(intake, job)
        assert problem in str(caught.value)
