"""The queue book: every queue, cohort, resource flavor and priority class, kept in etcd as
one document (`<prefix>/queues/config`, a serialized QueueObjects) and followed by every replica.

One key makes every change atomic: an apply reads the document, changes it, checks the whole
result (each object's fields here, the cohort tree with `fedplane.core.quota.check_config`),
and writes it back by compare-and-swap on the key's mod revision, retrying when another
replica wrote first. So the stored tree is always consistent, and any replica may write it
(like a cordon: no fence, since the compare-and-swap alone decides between writers). Hundreds
of objects are a few tens of kilobytes.

Every replica watches the key and keeps `config` (the core's `QueueConfig`, converted once per
change) current; subscribers hear each new configuration. The conversions between the wire's
queue messages and the core's types live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError

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
    Strategy,
    WhenCanBorrow,
    WithinQueue,
)
from fedplane.core.quota import check_config
from fedplane.hub.clock import SYSTEM, Clock
from fedplane.hub.errors import HubError
from fedplane.hub.etcd import EtcdError
from fedplane.hub.store import RevisionCompacted
from fedplane.hub.validation import (
    MAX_LABELS,
    MAX_PROBLEMS,
    MAX_RESOURCES,
    clipped,
    is_name,
    is_resource_name,
    label_value_problem,
    qualified_name_problem,
    refusal,
    shown,
)
from fedplane.runtime import logs, timestamps
from fedplane.v1 import hub_pb2 as hub_pb
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub.queues")

# The document's key under the hub's prefix.
DOCUMENT = "queues/config"
# Kind (as ObjectRef and the YAML name it) -> the QueueObjects field holding that kind.
KINDS: dict[str, str] = {
    "Queue": "queues",
    "Cohort": "cohorts",
    "ResourceFlavor": "flavors",
    "PriorityClass": "priority_classes",
}
# Of each kind at most this many; the whole document at most this large (etcd's default
# request limit is 1.5 MiB).
MAX_OBJECTS_PER_KIND = 1000
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_FLAVORS_PER_QUEUE = 16
MAX_WEIGHT = 1e6
# Kubernetes' bound on user-defined priority class values.
MAX_PRIORITY = 1_000_000_000
# Compare-and-swap attempts before an apply gives up (only when others keep writing).
MAX_ATTEMPTS = 16
# States in which a job still belongs to its queue: deleting the queue would orphan it.
UNFINISHED = frozenset({sm.S.PENDING, sm.S.DISPATCHED, sm.S.ADMITTED, sm.S.RUNNING, sm.S.CANCELLING})

_STRATEGIES = {
    pb.QUEUEING_STRATEGY_UNSPECIFIED: Strategy.BEST_EFFORT_FIFO,
    pb.STRICT_FIFO: Strategy.STRICT_FIFO,
    pb.BEST_EFFORT_FIFO: Strategy.BEST_EFFORT_FIFO,
}
_FUNGIBILITY = {
    pb.FLAVOR_FUNGIBILITY_UNSPECIFIED: WhenCanBorrow.BORROW,
    pb.FUNGIBILITY_BORROW: WhenCanBorrow.BORROW,
    pb.FUNGIBILITY_TRY_NEXT_FLAVOR: WhenCanBorrow.TRY_NEXT_FLAVOR,
}
_WITHIN_QUEUE = {
    pb.PREEMPT_WITHIN_QUEUE_UNSPECIFIED: WithinQueue.LOWER_PRIORITY,
    pb.WITHIN_QUEUE_NEVER: WithinQueue.NEVER,
    pb.WITHIN_QUEUE_LOWER_PRIORITY: WithinQueue.LOWER_PRIORITY,
}
_RECLAIM = {
    pb.RECLAIM_WITHIN_COHORT_UNSPECIFIED: ReclaimWithinCohort.ANY,
    pb.RECLAIM_NEVER: ReclaimWithinCohort.NEVER,
    pb.RECLAIM_LOWER_PRIORITY: ReclaimWithinCohort.LOWER_PRIORITY,
    pb.RECLAIM_ANY: ReclaimWithinCohort.ANY,
}


# ---------------------------------------------------------------------------- wire -> core


def _quotas_core(quotas: Iterable[pb.FlavorQuotas]) -> tuple[FlavorQuotas, ...]:
    return tuple(
        FlavorQuotas(
            q.flavor,
            {
                resource: ResourceQuota(
                    quota.nominal,
                    quota.borrowing_limit if quota.HasField("borrowing_limit") else None,
                    quota.lending_limit if quota.HasField("lending_limit") else None,
                )
                for resource, quota in sorted(q.resources.items())
            },
        )
        for q in quotas
    )


def queue_core(queue: pb.Queue) -> QueueSpec:
    p = queue.preemption
    return QueueSpec(
        name=queue.name,
        cohort=queue.cohort,
        weight=queue.weight if queue.HasField("weight") else 1.0,
        quotas=_quotas_core(queue.quotas),
        strategy=_STRATEGIES[queue.strategy],
        held=queue.held,
        when_can_borrow=_FUNGIBILITY[queue.when_can_borrow],
        preemption=Preemption(
            _WITHIN_QUEUE[p.within_queue], _RECLAIM[p.reclaim_within_cohort], p.fair_share, p.max_per_minute
        ),
    )


def config_core(objects: pb.QueueObjects) -> QueueConfig:
    """The core's snapshot of checked objects (enum values the checks let through)."""
    return QueueConfig(
        queues={q.name: queue_core(q) for q in objects.queues},
        cohorts={
            c.name: CohortSpec(
                c.name, c.parent, _quotas_core(c.quotas), c.weight if c.HasField("weight") else 1.0
            )
            for c in objects.cohorts
        },
        flavors={
            f.name: Flavor(f.name, dict(f.cluster_labels), f.gpu_type, dict(f.node_labels))
            for f in objects.flavors
        },
        priority_classes={
            c.name: PriorityClass(c.name, c.value, not c.never_preempt, c.interruptible)
            for c in objects.priority_classes
        },
    )


# ---------------------------------------------------------------------------- core -> wire


def _first(table: Mapping[int, object], value: object) -> int:
    """The wire value of a core enum value (the first listed that is not UNSPECIFIED)."""
    return next(wire for wire, core in table.items() if core == value and wire)


def _quotas_pb(quotas: Iterable[FlavorQuotas]) -> list[pb.FlavorQuotas]:
    out = []
    for q in quotas:
        flavor = pb.FlavorQuotas(flavor=q.flavor)
        for resource, quota in q.resources.items():
            entry = flavor.resources[resource]
            entry.nominal = quota.nominal
            if quota.borrowing_limit is not None:
                entry.borrowing_limit = quota.borrowing_limit
            if quota.lending_limit is not None:
                entry.lending_limit = quota.lending_limit
        out.append(flavor)
    return out


def objects_pb(config: QueueConfig) -> pb.QueueObjects:
    """The wire form of a configuration, every enum and weight explicit, each kind by name."""
    out = pb.QueueObjects()
    for spec in sorted(config.queues.values(), key=lambda s: s.name):
        p = spec.preemption
        out.queues.append(
            pb.Queue(
                name=spec.name,
                cohort=spec.cohort,
                weight=spec.weight,
                quotas=_quotas_pb(spec.quotas),
                strategy=_first(_STRATEGIES, spec.strategy),  # type: ignore[arg-type]
                held=spec.held,
                when_can_borrow=_first(_FUNGIBILITY, spec.when_can_borrow),  # type: ignore[arg-type]
                preemption=pb.QueuePreemption(
                    within_queue=_first(_WITHIN_QUEUE, p.within_queue),  # type: ignore[arg-type]
                    reclaim_within_cohort=_first(_RECLAIM, p.reclaim_within_cohort),  # type: ignore[arg-type]
                    fair_share=p.fair_share,
                    max_per_minute=p.max_per_minute,
                ),
            )
        )
    for cohort in sorted(config.cohorts.values(), key=lambda c: c.name):
        out.cohorts.append(
            pb.Cohort(
                name=cohort.name, parent=cohort.parent, quotas=_quotas_pb(cohort.quotas), weight=cohort.weight
            )
        )
    for flavor in sorted(config.flavors.values(), key=lambda f: f.name):
        out.flavors.append(
            pb.ResourceFlavor(
                name=flavor.name,
                cluster_labels=dict(flavor.cluster_labels),
                gpu_type=flavor.gpu_type,
                node_labels=dict(flavor.node_labels),
            )
        )
    for cls in sorted(config.priority_classes.values(), key=lambda c: c.name):
        out.priority_classes.append(
            pb.PriorityClass(
                name=cls.name,
                value=cls.value,
                never_preempt=not cls.may_preempt,
                interruptible=cls.interruptible,
            )
        )
    return out


def view_pb(statuses: Iterable[QueueStatus], config: QueueConfig) -> pb.QueueView:
    """The queue view's rows, with each queue's and cohort's configured weight beside its share."""
    view = pb.QueueView()
    for status in statuses:
        spec: QueueSpec | CohortSpec | None = (
            config.queues.get(status.name) if status.kind == "queue" else config.cohorts.get(status.name)
        )
        row = view.rows.add(
            name=status.name,
            kind=status.kind,
            parent=status.parent,
            share=status.share,
            pending=status.pending,
            admitted=status.admitted,
            held=status.held,
            weight=spec.weight if spec is not None else 1.0,
        )
        for usage in status.resources:
            entry = row.resources.add(
                flavor=usage.flavor,
                resource=usage.resource,
                nominal=usage.nominal,
                usage=usage.usage,
                borrowed=usage.borrowed,
                lent=usage.lent,
            )
            if usage.borrowing_limit is not None:
                entry.borrowing_limit = usage.borrowing_limit
            if usage.lending_limit is not None:
                entry.lending_limit = usage.lending_limit
    return view


# ---------------------------------------------------------------------------- what a caller sees


def visible_objects(objects: pb.QueueObjects, readable: frozenset[str] | None) -> pb.QueueObjects:
    """`objects` with only the `readable` queues (None: all); cohorts, flavors and priority
    classes are no secret."""
    if readable is None:
        return objects
    out = pb.QueueObjects()
    out.CopyFrom(objects)
    del out.queues[:]
    out.queues.extend(q for q in objects.queues if q.name in readable)
    return out


def visible_view(view: pb.QueueView, readable: frozenset[str] | None) -> pb.QueueView:
    if readable is None:
        return view
    return pb.QueueView(rows=[r for r in view.rows if r.kind != "queue" or r.name in readable])


# ---------------------------------------------------------------------------- checks


def _weight_problems(message: pb.Queue | pb.Cohort, where: str) -> list[str]:
    if not message.HasField("weight"):
        return []
    weight = message.weight
    if not math.isfinite(weight) or weight < 0 or weight > MAX_WEIGHT:
        return [f"{where}.weight: must be a number from 0 to {MAX_WEIGHT:g} (got {weight})"]
    return []


def _quota_problems(quotas: Sequence[pb.FlavorQuotas], where: str) -> list[str]:
    if len(quotas) > MAX_FLAVORS_PER_QUEUE:
        return [f"{where}.quotas: {len(quotas)} flavors; at most {MAX_FLAVORS_PER_QUEUE} allowed"]
    problems: list[str] = []
    seen: set[str] = set()
    for i, flavor_quotas in enumerate(quotas):
        at = f"{where}.quotas[{i}]"
        flavor = flavor_quotas.flavor
        if not flavor:
            problems.append(f"{at}.flavor: required")
        elif flavor in seen:
            problems.append(f"{at}.flavor: flavor {shown(flavor)} is listed twice")
        seen.add(flavor)
        resources = flavor_quotas.resources
        if len(resources) > MAX_RESOURCES:
            problems.append(f"{at}.resources: {len(resources)} resources; at most {MAX_RESOURCES} allowed")
            continue
        for resource, quota in resources.items():
            path = f"{at}.resources.{clipped(resource)}"
            if not is_resource_name(resource):
                problems.append(f"{path}: not a valid resource name")
            if quota.nominal < 0:
                problems.append(f"{path}.nominal: must not be negative (got {quota.nominal})")
            if quota.HasField("borrowing_limit") and quota.borrowing_limit < 0:
                problems.append(f"{path}.borrowing_limit: must not be negative (got {quota.borrowing_limit})")
            if quota.HasField("lending_limit"):
                if quota.lending_limit < 0:
                    problems.append(f"{path}.lending_limit: must not be negative (got {quota.lending_limit})")
                elif quota.lending_limit > quota.nominal:
                    problems.append(
                        f"{path}.lending_limit: {quota.lending_limit} is more than the nominal quota"
                        f" {quota.nominal}: nobody can lend what it does not have"
                    )
    return problems


def _name_problems(name: str, where: str) -> list[str]:
    if not name:
        return [f"{where}.name: required"]
    if not is_name(name):
        return [f"{where}.name: {shown(name)} must be at most 63 lowercase letters, digits and '-'"]
    return []


def _queue_problems(queue: pb.Queue, where: str) -> list[str]:
    problems = _name_problems(queue.name, where) + _weight_problems(queue, where)
    if queue.cohort and not is_name(queue.cohort):
        problems.append(f"{where}.cohort: {shown(queue.cohort)} is not a cohort name (a DNS label)")
    problems += _quota_problems(queue.quotas, where)
    if queue.strategy not in _STRATEGIES:
        problems.append(f"{where}.strategy: {queue.strategy} is not a QueueingStrategy")
    if queue.when_can_borrow not in _FUNGIBILITY:
        problems.append(f"{where}.when_can_borrow: {queue.when_can_borrow} is not a FlavorFungibility")
    p = queue.preemption
    if p.within_queue not in _WITHIN_QUEUE:
        problems.append(f"{where}.preemption.within_queue: {p.within_queue} is not a PreemptWithinQueue")
    if p.reclaim_within_cohort not in _RECLAIM:
        problems.append(
            f"{where}.preemption.reclaim_within_cohort: {p.reclaim_within_cohort}"
            " is not a ReclaimWithinCohort"
        )
    if not math.isfinite(p.max_per_minute) or p.max_per_minute < 0:
        problems.append(
            f"{where}.preemption.max_per_minute: must be a finite number, not negative"
            f" (got {p.max_per_minute})"
        )
    return problems


def _cohort_problems(cohort: pb.Cohort, where: str) -> list[str]:
    problems = _name_problems(cohort.name, where) + _weight_problems(cohort, where)
    if cohort.parent and not is_name(cohort.parent):
        problems.append(f"{where}.parent: {shown(cohort.parent)} is not a cohort name (a DNS label)")
    return problems + _quota_problems(cohort.quotas, where)


def _flavor_problems(flavor: pb.ResourceFlavor, where: str) -> list[str]:
    problems = _name_problems(flavor.name, where)
    for field, labels in (("cluster_labels", flavor.cluster_labels), ("node_labels", flavor.node_labels)):
        if len(labels) > MAX_LABELS:
            problems.append(f"{where}.{field}: {len(labels)} labels; at most {MAX_LABELS}")
            continue
        for key, value in labels.items():
            problem = qualified_name_problem(key)
            if problem is not None:
                problems.append(f"{where}.{field}.{clipped(key)}: not a valid label key: {problem}")
            problem = label_value_problem(value)
            if problem is not None:
                problems.append(
                    f"{where}.{field}.{clipped(key)}: {shown(value)} is not a label value: {problem}"
                )
    problem = label_value_problem(flavor.gpu_type)
    if problem is not None:
        problems.append(f"{where}.gpu_type: {shown(flavor.gpu_type)} is not a label value: {problem}")
    return problems


def _priority_class_problems(cls: pb.PriorityClass, where: str) -> list[str]:
    problems = _name_problems(cls.name, where)
    if abs(cls.value) > MAX_PRIORITY:
        problems.append(
            f"{where}.value: must be between -{MAX_PRIORITY} and {MAX_PRIORITY} (got {cls.value})"
        )
    return problems


def object_problems(objects: pb.QueueObjects) -> list[str]:
    """Every problem with the objects themselves, each as "Kind name.field: problem"; the tree
    they make (cohorts that exist, no cycles, flavors that exist) is `check_config`'s."""
    problems: list[str] = []
    checks: dict[str, Callable[..., list[str]]] = {
        "Queue": _queue_problems,
        "Cohort": _cohort_problems,
        "ResourceFlavor": _flavor_problems,
        "PriorityClass": _priority_class_problems,
    }
    for kind, field in KINDS.items():
        items = getattr(objects, field)
        if len(items) > MAX_OBJECTS_PER_KIND:
            problems.append(f"{field}: {len(items)} objects; at most {MAX_OBJECTS_PER_KIND} of each kind")
            continue
        seen: set[str] = set()
        for i, item in enumerate(items):
            where = f"{kind} {item.name}" if is_name(item.name) else f"{field}[{i}]"
            if item.name in seen:
                problems.append(f"{where}: given twice")
            seen.add(item.name)
            problems += checks[kind](item, where)
    return problems


def _ref_name(ref: hub_pb.ObjectRef) -> str:
    return (
        f"{ref.kind} {ref.name}"
        if ref.kind in KINDS and is_name(ref.name)
        else f"{shown(ref.kind)} {shown(ref.name)}"
    )


@dataclass(frozen=True)
class Change:
    """An apply's outcome: the whole configuration after it, and what it deleted."""

    objects: pb.QueueObjects
    deleted: list[tuple[str, str]]
    # Deletes naming an object that does not exist.
    missing: list[str]


def merge(
    current: pb.QueueObjects, objects: pb.QueueObjects, deletes: Sequence[hub_pb.ObjectRef]
) -> tuple[Change, list[str]]:
    """`current` with `objects` created or replaced whole and `deletes` deleted; and the
    problems with the request itself (an object both applied and deleted, an unknown kind)."""
    problems: list[str] = []
    deleting: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for i, ref in enumerate(deletes):
        if ref.kind not in KINDS:
            problems.append(
                f"deletes[{i}].kind: {shown(ref.kind)} is not a kind"
                " (Queue, Cohort, ResourceFlavor or PriorityClass)"
            )
        elif not ref.name:
            problems.append(f"deletes[{i}].name: required")
        elif ref.name in deleting[ref.kind]:
            problems.append(f"deletes[{i}]: {_ref_name(ref)} is deleted twice")
        else:
            deleting[ref.kind].add(ref.name)
    result = pb.QueueObjects(revision=current.revision, updated_by=current.updated_by)
    result.update_time.CopyFrom(current.update_time)
    deleted: list[tuple[str, str]] = []
    missing: list[str] = []
    for kind, field in KINDS.items():
        held = {item.name: item for item in getattr(current, field)}
        for item in getattr(objects, field):
            if item.name in deleting[kind]:
                problems.append(f"{kind} {shown(item.name)}: both applied and deleted")
            held[item.name] = item
        for name in sorted(deleting[kind]):
            if held.pop(name, None) is None:
                missing.append(f"{kind} {name}")
            else:
                deleted.append((kind, name))
        getattr(result, field).extend(held[name] for name in sorted(held))
    return Change(result, deleted, missing), problems


def describe(
    objects: pb.QueueObjects, deletes: Iterable[hub_pb.ObjectRef], limit: int = 20
) -> dict[str, object]:
    """What a request changes, for its audit line: "Kind/name" of the first `limit` objects
    applied and deleted (with their counts when there are more)."""
    applied = [f"{kind}/{item.name}" for kind, field in KINDS.items() for item in getattr(objects, field)]
    removed = [f"{ref.kind}/{ref.name}" for ref in deletes]
    fields: dict[str, object] = {}
    if applied:
        fields["applied"] = applied[:limit]
        if len(applied) > limit:
            fields["applied_count"] = len(applied)
    if removed:
        fields["deleted"] = removed[:limit]
        if len(removed) > limit:
            fields["deleted_count"] = len(removed)
    return fields


# ---------------------------------------------------------------------------- the book


class DocumentStore(Protocol):
    """What the book needs of etcd (store.Store's documents)."""

    async def read_document(self, name: str) -> tuple[bytes | None, int, int]: ...

    async def swap_document(self, name: str, blob: bytes, expected_revision: int) -> int | None: ...

    def watch_document(self, name: str, from_revision: int) -> AsyncIterator[tuple[int, bytes | None]]: ...


def _listed(items: Sequence[str], separator: str) -> str:
    """The first MAX_PROBLEMS of `items`, and how many more: a refusal must fit gRPC's trailers."""
    more = len(items) - MAX_PROBLEMS
    return separator.join(items[:MAX_PROBLEMS]) + (f"{separator}and {more} more" if more > 0 else "")


def unfinished_jobs(counts: Mapping[tuple[str, int], int], queue: str) -> int:
    """How many jobs in `queue` have not finished, from the job table's (queue, state) counts."""
    return sum(n for (name, state), n in counts.items() if name == queue and state in UNFINISHED)


def _parse(blob: bytes | None, revision: int) -> pb.QueueObjects:
    objects = pb.QueueObjects.FromString(blob) if blob else pb.QueueObjects()
    objects.revision = revision
    return objects


class QueueBook:
    """The queue configuration as etcd holds it, current on every replica.

    `jobs_in_queue(name)` says how many unfinished jobs a queue holds (the job table's count),
    so that a queue with work in it is never deleted; the book itself knows no jobs.
    """

    def __init__(
        self, store: DocumentStore, jobs_in_queue: Callable[[str], int], clock: Clock = SYSTEM
    ) -> None:
        self.store = store
        self.jobs_in_queue = jobs_in_queue
        self.clock = clock
        # As stored, with `revision` set to the document's mod revision (0: never written).
        self.objects = pb.QueueObjects()
        self.config = QueueConfig()
        self._subscribers: list[Callable[[QueueConfig], None]] = []
        self._watch: asyncio.Task[None] | None = None

    @property
    def revision(self) -> int:
        return self.objects.revision

    def subscribe(self, callback: Callable[[QueueConfig], None]) -> None:
        """Call `callback` with every configuration the book takes from now on: the one `start`
        loads (for a subscriber that comes before it), then every change."""
        self._subscribers.append(callback)

    async def start(self) -> None:
        """Load the configuration, then follow every change to it."""
        blob, revision, at = await self.store.read_document(DOCUMENT)
        self._install(blob, revision, force=True)
        self._watch = asyncio.create_task(self._follow(at), name="hub-queue-book")
        log.info(
            "queue configuration loaded",
            revision=revision,
            queues=len(self.objects.queues),
            cohorts=len(self.objects.cohorts),
        )

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    def _install(self, blob: bytes | None, revision: int, force: bool = False) -> None:
        """Take the document at `revision` unless this replica already holds a later one (its
        own apply got there before the watch)."""
        if revision <= self.objects.revision and not force:
            return
        try:
            objects = _parse(blob, revision)
        except DecodeError:
            log.error(
                "the stored queue configuration does not parse; keeping the previous one", revision=revision
            )
            return
        config = config_core(objects)
        self.objects, self.config = objects, config
        for callback in list(self._subscribers):
            try:
                callback(config)
            except Exception:
                log.exception("a queue configuration subscriber failed", revision=revision)

    async def _follow(self, after: int) -> None:
        """Follow the document from etcd revision `after`, reloading when etcd compacted the
        history the watch needs, and reconnecting (with backoff) when etcd is away."""
        delay = 0.2
        while True:
            try:
                async for revision, blob in self.store.watch_document(DOCUMENT, after):
                    self._install(blob, revision)
                    after = max(after, revision)
                    delay = 0.2
            except RevisionCompacted:
                try:
                    blob, revision, after = await self.store.read_document(DOCUMENT)
                except EtcdError as exc:
                    log.warning("cannot reload the queue configuration", error=str(exc))
                else:
                    self._install(blob, revision)
                    continue
            except EtcdError as exc:
                log.warning("queue configuration watch failed; retrying", error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def apply(
        self,
        objects: pb.QueueObjects,
        deletes: Sequence[hub_pb.ObjectRef] = (),
        dry_run: bool = False,
        expected_revision: int = 0,
        by: str = "",
    ) -> pb.QueueObjects:
        """Create or replace `objects` whole and delete `deletes`, all or nothing; the whole
        configuration after it (with `dry_run`, as it would be, and nothing written).

        Refused (HubError), changing nothing: objects with bad fields or an unknown kind, an
        inconsistent tree (INVALID_ARGUMENT); a delete of something that does not exist
        (NOT_FOUND); deleting a queue that still holds unfinished jobs (FAILED_PRECONDITION);
        a stored configuration not at `expected_revision`, when given (ABORTED)."""
        problems = object_problems(objects)
        if problems:
            raise refusal(problems)
        for _ in range(MAX_ATTEMPTS):
            blob, revision, _ = await self.store.read_document(DOCUMENT)
            if expected_revision and revision != expected_revision:
                raise HubError(
                    "ABORTED",
                    f"the queue configuration is at revision {revision}, not {expected_revision}:"
                    " someone changed it meanwhile; list it again and reapply",
                )
            change = self._change(_parse(blob, revision), objects, deletes)
            result = change.objects
            if dry_run:
                return result
            result.ClearField("revision")
            result.updated_by = by
            result.update_time.CopyFrom(timestamps.at(self.clock.time()))
            stored = result.SerializeToString()
            written = await self.store.swap_document(DOCUMENT, stored, revision)
            if written is None:
                if expected_revision:
                    raise HubError(
                        "ABORTED", "the queue configuration changed meanwhile; list it again and reapply"
                    )
                continue  # another replica wrote first: decide again on what it wrote
            self._install(stored, written)
            log.info(
                "queue configuration changed",
                revision=written,
                by=by,
                **describe(objects, deletes),
            )
            return self.objects
        raise HubError("ABORTED", "the queue configuration kept changing; try again")

    def _change(
        self, current: pb.QueueObjects, objects: pb.QueueObjects, deletes: Sequence[hub_pb.ObjectRef]
    ) -> Change:
        change, problems = merge(current, objects, deletes)
        if problems:
            raise refusal(problems)
        if change.missing:
            raise HubError("NOT_FOUND", f"{_listed(change.missing, ', ')}: not found; nothing was changed")
        result = change.objects
        if result.ByteSize() > MAX_DOCUMENT_BYTES:
            raise HubError(
                "INVALID_ARGUMENT",
                f"the queue configuration would be {result.ByteSize()} bytes, more than the"
                f" {MAX_DOCUMENT_BYTES} allowed",
            )
        problems = [
            f"{field}: {len(getattr(result, field))} objects; at most {MAX_OBJECTS_PER_KIND} of each kind"
            for field in KINDS.values()
            if len(getattr(result, field)) > MAX_OBJECTS_PER_KIND
        ]
        problems += check_config(config_core(result))
        if problems:
            raise refusal(problems)
        busy = [(name, self.jobs_in_queue(name)) for kind, name in change.deleted if kind == "Queue"]
        held = [
            f'queue "{name}" holds {count} unfinished job{"s" * (count > 1)}' for name, count in busy if count
        ]
        if held:
            raise HubError(
                "FAILED_PRECONDITION",
                f"{_listed(held, '; ')}: cancel them or let them finish before deleting"
                " (nothing was changed)",
            )
        return change
