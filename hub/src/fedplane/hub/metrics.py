"""The hub's Prometheus metrics (docs/operations.md, Metrics), in a registry of its own.

Events are counted where they happen, a batch at a time (a placement round's dispatches, a
status batch's updates, a group commit's submits). Everything that is state (jobs by queue
and state, the pending queue, each cluster's health, capacity and heartbeat age, watch
streams, leadership) is read from the hub's table and registry when Prometheus scrapes.

Labels are bounded: a queue, a state, a cluster (bounded by the registered clusters), a
resource, a kind of error; never a job id.
"""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fedplane.core import dispatch as sm
from fedplane.core import health as hl
from fedplane.core import quantity
from fedplane.hub.etcd import EtcdError, EtcdRefused, EtcdUnavailable
from fedplane.runtime import metrics
from fedplane.runtime.metrics import CALL_BUCKETS, JOB_BUCKETS, BatchHistogram, LoopCollector
from fedplane.v1 import types_pb2 as pb

if TYPE_CHECKING:
    from fedplane.hub.hub import Hub

S = sm.S
ETCD_ERROR_KINDS = ("unavailable", "refused", "other")
FINISHED = (S.SUCCEEDED, S.FAILED, S.CANCELLED)
HEALTH_NAMES = tuple(hl.NAMES.values())
# The resources whose unit is not a count: (unit label, factor from Fedplane's canonical unit).
_UNITS = {quantity.CPU: ("core", 1e-3), quantity.MEMORY: ("byte", 1.0), "ephemeral-storage": ("byte", 1.0)}


def etcd_error_kind(exc: EtcdError) -> str:
    if isinstance(exc, EtcdUnavailable):
        return "unavailable"
    if isinstance(exc, EtcdRefused):
        return "refused"
    return "other"


def _seconds(stamp: pb.Transition) -> float:
    return stamp.time.seconds + stamp.time.nanos / 1e9


def entered_pending(job: pb.Job) -> float:
    """When a job just dispatched last became PENDING: its submit, for its first dispatch (no
    history to read: this runs for every dispatch), else its requeue, from the history before
    its dispatch entry."""
    created = job.create_time
    at = created.seconds + created.nanos / 1e9
    if job.status.generation <= 1:
        return at
    history = job.status.history
    for index in range(len(history) - 2, -1, -1):
        entry = history[index]
        if entry.state != S.PENDING:
            break
        at = _seconds(entry)
    return at


def dispatched_at(status: pb.JobStatus) -> float | None:
    """When the job's current generation was dispatched: its history's last DISPATCHED entry
    (each dispatch starts a generation with one)."""
    for entry in reversed(status.history):
        if entry.state == S.DISPATCHED:
            return _seconds(entry)
    return None


class HubMetrics:
    """The hub's metrics. Made with the hub; the parts it is handed to count into it."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.submitted = Counter(
            "fedplane_jobs_submitted",
            "Jobs stored by this replica's submits (retries excluded).",
            registry=registry,
        )
        self.dispatched = Counter(
            "fedplane_jobs_dispatched", "Jobs dispatched to a cluster.", registry=registry
        )
        self.finished = Counter(
            "fedplane_jobs_finished",
            "Jobs that reached a final state, by state.",
            ["state"],
            registry=registry,
        )
        self._finished = {state: self.finished.labels(sm.state_name(state)) for state in FINISHED}
        self.submit_to_dispatch = BatchHistogram(
            "fedplane_job_submit_to_dispatch_seconds",
            "From a job's submit (or requeue) to its dispatch.",
            JOB_BUCKETS,
            registry,
        )
        self.dispatch_to_running = BatchHistogram(
            "fedplane_job_dispatch_to_running_seconds",
            "From a job's dispatch to its cluster reporting it RUNNING.",
            JOB_BUCKETS,
            registry,
        )
        self.placement_cycle = BatchHistogram(
            "fedplane_placement_cycle_seconds",
            "How long a placement cycle took to decide (etcd writes excluded).",
            CALL_BUCKETS,
            registry,
        )
        self.etcd_txn_seconds = BatchHistogram(
            "fedplane_etcd_txn_seconds", "etcd transactions, failed ones included.", CALL_BUCKETS, registry
        )
        self.etcd_errors = Counter(
            "fedplane_etcd_errors", "etcd calls that failed, by kind.", ["kind"], registry=registry
        )
        self._etcd_errors = {kind: self.etcd_errors.labels(kind) for kind in ETCD_ERROR_KINDS}
        self.nats_publish = BatchHistogram(
            "fedplane_nats_publish_seconds",
            "A round of JetStream publishes until every ack is in, by kind of message.",
            CALL_BUCKETS,
            registry,
            ["kind"],
            [("cmd",)],
        )
        self.nats_publish_failures = Counter(
            "fedplane_nats_publish_failures",
            "Messages JetStream did not store (retried), by kind.",
            ["kind"],
            registry=registry,
        )
        self._command_failures = self.nats_publish_failures.labels("cmd")
        self.redeliveries = Counter(
            "fedplane_nats_redeliveries",
            "JetStream messages consumed that had been delivered before, by kind.",
            ["kind"],
            registry=registry,
        )
        self._status_redeliveries = self.redeliveries.labels("status")
        self.leader_changes = Counter(
            "fedplane_leader_changes", "Times this replica became the leader.", registry=registry
        )
        # What the hub holds, read at each scrape once `watch` has named the hub.
        self.state = LoopCollector(lambda: ())
        registry.register(self.state)

    # ------------------------------------------------------------------ counted where they happen
    def etcd_txn(self, seconds: float, error: EtcdError | None) -> None:
        """A transaction done (the store's `on_txn`)."""
        self.etcd_txn_seconds.observe(seconds)
        if error is not None:
            self._etcd_errors[etcd_error_kind(error)].inc()

    def dispatches(self, waits: Sequence[float]) -> None:
        """A placement round's dispatches that landed, each with how long its job waited."""
        if waits:
            self.dispatched.inc(len(waits))
            self.submit_to_dispatch.observe_many(waits)

    def statuses(self, written: Iterable[pb.JobStatus], now: float) -> None:
        """A status batch's writes (each recorded at `now`): the jobs that started RUNNING in it
        (their start latency), and those finished."""
        started: list[float] = []
        finished: Tally[int] = Tally()
        batch_time = divmod(int(now * 1e9), 1_000_000_000)
        for status in written:
            state = int(status.state)
            if state == S.RUNNING:
                at = dispatched_at(status)
                if at is not None:
                    started.append(max(0.0, now - at))
            elif state in self._finished:
                finished[state] += 1
                # Started and finished within this one batch: RUNNING is the entry before.
                history = status.history
                if len(history) > 1:
                    before = history[-2]
                    stamp = before.time
                    if before.state == S.RUNNING and (stamp.seconds, stamp.nanos) == batch_time:
                        at = dispatched_at(status)
                        if at is not None:
                            started.append(max(0.0, now - at))
        if started:
            self.dispatch_to_running.observe_many(started)
        for state, count in finished.items():
            self._finished[state].inc(count)

    def command_round(self, seconds: float, failed: int) -> None:
        self.nats_publish.observe(seconds, "cmd")
        if failed:
            self._command_failures.inc(failed)

    def status_messages(self, msgs: Iterable[object]) -> None:
        count = metrics.redelivered(msgs)
        if count:
            self._status_redeliveries.inc(count)

    # ------------------------------------------------------------------ read at scrape time
    def watch(self, hub: Hub) -> None:
        """Read `hub`'s state at each scrape."""
        self.state.read = lambda: _hub_state(hub)

    async def serve(self, listen: str) -> metrics.MetricsServer:
        self.state.loop = asyncio.get_running_loop()
        return await metrics.serve(self.registry, listen)


def _hub_state(hub: Hub) -> list[Metric]:
    """What the hub holds now, as metrics (run on the hub's event loop)."""
    table = hub.table
    now = hub.clock.time()
    jobs = GaugeMetricFamily("fedplane_jobs", "Jobs held, by queue and state.", labels=["queue", "state"])
    for (queue, state), count in table.counts.items():
        jobs.add_metric([queue, sm.state_name(state)], count)
    pending = GaugeMetricFamily(
        "fedplane_pending_jobs", "Jobs in the pending queue, waiting for placement (not backing off)."
    )
    pending.add_metric([], len(table.queue))
    backoff = GaugeMetricFamily("fedplane_backoff_jobs", "PENDING jobs backing off after a gang timeout.")
    backoff.add_metric([], len(table.delayed))
    leader = GaugeMetricFamily("fedplane_leader", "1 while this replica leads, else 0.")
    leader.add_metric([], 1 if hub.leadership.leading else 0)
    unsent = GaugeMetricFamily(
        "fedplane_commands_unsent", "Commands queued or in flight, not yet stored by JetStream."
    )
    unsent.add_metric([], len(hub.commands))
    streams = GaugeMetricFamily("fedplane_watch_streams", "WatchJobs streams open on this replica.")
    lag = GaugeMetricFamily(
        "fedplane_watch_lag_events", "Events queued for the slowest WatchJobs stream (cut off at its limit)."
    )
    backlogs = hub.events.backlogs()
    streams.add_metric([], len(backlogs))
    lag.add_metric([], max(backlogs, default=0))
    behind = CounterMetricFamily(
        "fedplane_watch_fell_behind", "WatchJobs streams cut off for falling behind (they resume)."
    )
    behind.add_metric([], hub.events.fell_behind)
    rounds = CounterMetricFamily("fedplane_cluster_lease_rounds", "Cluster lease renewal rounds (leader).")
    rounds.add_metric([], hub.liveness.rounds)
    keepalives = CounterMetricFamily(
        "fedplane_cluster_lease_keepalives", "Cluster lease keepalives sent to etcd (leader)."
    )
    keepalives.add_metric([], hub.liveness.keepalives)
    out: list[Metric] = [jobs, pending, backoff, leader, unsent, streams, lag, behind, rounds, keepalives]
    return out + _cluster_state(hub, now)


def _cluster_state(hub: Hub, now: float) -> list[Metric]:
    registry, thresholds, active = hub.registry, hub.registry.thresholds, hub.table.active
    health = GaugeMetricFamily(
        "fedplane_cluster_health",
        "1 for the cluster's health, 0 for the others.",
        labels=["cluster", "health"],
    )
    cordoned = GaugeMetricFamily(
        "fedplane_cluster_cordoned", "1 while the cluster is cordoned.", labels=["cluster"]
    )
    age = GaugeMetricFamily(
        "fedplane_cluster_heartbeat_age_seconds",
        "Time since the cluster's last heartbeat was stored.",
        labels=["cluster"],
    )
    held = GaugeMetricFamily(
        "fedplane_cluster_jobs", "Jobs dispatched to the cluster and not finished.", labels=["cluster"]
    )
    labels = ["cluster", "resource", "unit"]
    capacity = GaugeMetricFamily(
        "fedplane_cluster_capacity", "Allocatable capacity the cluster reports, by resource.", labels=labels
    )
    allocated = GaugeMetricFamily(
        "fedplane_cluster_allocated",
        "Capacity in use or promised to dispatched jobs (allocatable minus free), by resource.",
        labels=labels,
    )
    for name, state in list(registry.clusters.items()):
        current = hl.NAMES[state.health(now, thresholds).state]
        for value in HEALTH_NAMES:
            health.add_metric([name, value], 1 if value == current else 0)
        cordoned.add_metric([name], 1 if state.admin.cordoned else 0)
        if state.last_seen:
            age.add_metric([name], max(0.0, now - state.last_seen))
        held.add_metric([name], active.get(name, 0))
        view = state.view(now, thresholds)
        free = view.total("free")
        for resource, total in view.total("allocatable").items():
            unit, factor = _UNITS.get(resource, ("integer", 1.0))
            capacity.add_metric([name, resource, unit], total * factor)
            allocated.add_metric([name, resource, unit], max(0, total - free.get(resource, 0)) * factor)
    return [health, cordoned, age, held, capacity, allocated]


# Where the parts count until the hub hands them its own (parts made alone, in tests).
UNWIRED = HubMetrics()
