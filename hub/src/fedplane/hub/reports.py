"""Cluster reports: heartbeats, inventories and data reports into the registry, cluster health,
and the agents' orphan queries.

A cluster's health is judged by the time the NATS server stored its heartbeat, not by the
agent's own clock, and never later than the hub's own now (a server clock running ahead must
not keep a silent cluster alive). Every change of a cluster's health is logged as one line an
operator can grep for: "cluster ready", "cluster unknown", "cluster lost", "cluster back"
(no longer lost) and "cluster not ready", each with the cluster, the health before and after,
and why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from google.protobuf.message import DecodeError

from fedplane.core import dispatch as sm
from fedplane.core import health as hl
from fedplane.core.health import Health
from fedplane.hub import records
from fedplane.hub.clock import Clock
from fedplane.hub.clusters import ClusterRegistry, ClusterState
from fedplane.hub.store import JobStore
from fedplane.hub.table import JobTable
from fedplane.runtime import bus, logs
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
# The most workloads one orphan query may ask about (an agent sends them in chunks of this).
MAX_ORPHAN_QUERY = 5000


class ClusterReports:
    def __init__(
        self,
        table: JobTable,
        registry: ClusterRegistry,
        store: JobStore,
        clock: Clock,
        admitted: Callable[[str], bool] = lambda _cluster: True,
    ) -> None:
        self.table = table
        self.registry = registry
        self.store = store
        self.clock = clock
        # Whether the hub acts on what a cluster sends (admission.ClusterAdmission.admitted).
        self.admitted = admitted
        self.ready: frozenset[str] = frozenset()
        # Each cluster's health as last logged.
        self.health: dict[str, int] = {}
        registry.on_lost_change(lambda name, _since: self.check_health((name,)))

    async def subscribe(self, nc: bus.Connection, js: bus.JetStream) -> list[bus.Subscription]:
        """Subscribe to every cluster's reports (their last values first) and to orphan queries."""
        subs = await bus.subscribe_latest_reports(js, self.on_report)
        subs.append(await bus.serve_requests(nc, "gc", self.answer_orphan_query))
        return subs

    async def answer_orphan_query(self, sender: str, query_bytes: bytes) -> bytes:
        """Answer an agent's garbage-collection question from the dispatch records (a query that
        fails to parse is logged by the bus and left unanswered: the agent skips that round).

        Any replica may answer, and a replica's table may lag etcd (a job just submitted through
        another replica, a watch resuming after an etcd restart): a job it does not hold is read
        from etcd before its workload is called an orphan, and a workload newer than the record
        is never one (`is_orphan`). A wrong "orphan" would delete a running job.
        """
        query = agent_pb.OrphanQuery.FromString(query_bytes)
        orphans: list[agent_pb.WorkloadRef] = []
        if query.cluster != sender or not self.admitted(sender):
            # A cluster asks only about itself, and only while it is admitted.
            log.warning("orphan query dropped", cluster=sender[:80], claimed_cluster=query.cluster[:80])
            return agent_pb.OrphanReply(orphans=orphans).SerializeToString()
        if len(query.workloads) > MAX_ORPHAN_QUERY:
            # Each unknown job costs an etcd read: a forged query must not turn into a flood.
            log.warning(
                "orphan query dropped: too many workloads", cluster=sender, count=len(query.workloads)
            )
            return agent_pb.OrphanReply(orphans=orphans).SerializeToString()
        jobs = self.table.jobs
        for ref in query.workloads:
            record = jobs.get(ref.job_id)
            current = record.dispatch_state if record is not None else None
            if current is None:
                stored = await self.store.read_job(ref.job_id)
                if stored is not None:
                    current = records.state_of(pb.JobStatus.FromString(stored.status_blob))
            if sm.is_orphan(current, query.cluster, ref.generation):
                orphans.append(ref)
        return agent_pb.OrphanReply(orphans=orphans).SerializeToString()

    async def on_report(self, msg: bus.Message) -> None:
        try:
            kind = bus.kind_of(msg.subject)
            cluster = bus.cluster_of(msg.subject)
            if not bus.valid_cluster_name(cluster):
                # Never registered, never stored: a name no agent may have (a DNS label).
                log.warning("report dropped: not a valid cluster name", cluster=cluster[:80])
                return
            if not self.admitted(cluster):
                # Without admission a cluster never heard of is admitted, and registered below;
                # with it, only an approved cluster is.
                log.debug("report dropped: its cluster is not admitted", cluster=cluster, kind=kind)
                return
            # Parsed before anything else: bytes that are no report register no cluster.
            report = _parse_report(kind, msg.data)
            if report is None:
                log.warning(
                    "report dropped: it does not parse", cluster=cluster, kind=kind, bytes=len(msg.data)
                )
                return
            state, added = self.registry.get_or_add(cluster)
            if added and await self.store.create_cluster(cluster, state.admin.SerializeToString()):
                log.info("cluster registered", cluster=cluster)
            now = self.clock.time()
            stamped = bus.stored_at(msg)
            if stamped is None:
                stamped = now
            if isinstance(report, agent_pb.Heartbeat):
                state.heartbeat = report
                state.last_seen = min(max(state.last_seen, stamped), now)
                self.registry.heard(cluster)
                self.check_health((cluster,))
            elif isinstance(report, agent_pb.Inventory):
                state.apply_inventory(report)
                state.last_seen = max(state.last_seen, min(stamped, now))
                self.check_health((cluster,))
                self.table.capacity_changed()
            else:
                state.datasets = report
                self.table.capacity_changed()
        except Exception:
            log.exception("bad cluster report", subject=msg.subject)

    def check_health(self, names: Iterable[str] | None = None) -> None:
        """Log the clusters (`names`, or all) whose health changed, and let placement look again
        when any became ready or stopped being ready."""
        now = self.clock.time()
        clusters, thresholds, seen = self.registry.clusters, self.registry.thresholds, self.health
        readiness_changed = False
        for name in list(clusters) if names is None else names:
            state = clusters.get(name)
            if state is None:
                continue
            health = state.health(now, thresholds)
            before = seen.get(name)
            if before == health.state:
                continue
            seen[name] = health.state
            _log_change(state, before, health, now, thresholds.lost_for(state.is_edge(thresholds)))
            readiness_changed |= (before == hl.READY) != health.ready
        if readiness_changed:
            self.ready = frozenset(name for name, h in seen.items() if h == hl.READY)
            self.table.capacity_changed()

    async def follow_admin(self, from_revision: int, stopping: Callable[[], bool]) -> None:
        """Keep every cluster's admin record (cordon, recorded loss) as etcd has it, whichever
        replica wrote it: a cordon through a follower must stop the leader's placements."""
        revision = from_revision
        while not stopping():
            try:
                async for at, name, blob in self.store.watch_clusters(revision):
                    revision = at
                    admin = pb.Cluster.FromString(blob)
                    state, _ = self.registry.get_or_add(name)
                    if admin != state.admin:
                        state.admin = admin
                        self.table.capacity_changed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cluster record watch interrupted; resuming", error=str(exc), revision=revision)
                await asyncio.sleep(0.5)

    async def run_health(self) -> None:
        """Notice heartbeats going stale, which no message announces."""
        while True:
            await self.clock.sleep(min(5.0, max(0.2, self.registry.thresholds.shortest_unknown / 4)))
            self.check_health()


def _parse_report(
    kind: str, data: bytes
) -> agent_pb.Heartbeat | agent_pb.Inventory | agent_pb.DataLocalityReport | None:
    """The report a message of `kind` carries; None when it does not parse (or is no report)."""
    report: agent_pb.Heartbeat | agent_pb.Inventory | agent_pb.DataLocalityReport
    if kind == "heartbeat":
        report = agent_pb.Heartbeat()
    elif kind == "inventory":
        report = agent_pb.Inventory()
    elif kind == "datasets":
        report = agent_pb.DataLocalityReport()
    else:
        return None
    try:
        report.ParseFromString(data)
    except DecodeError:
        return None
    return report


def _log_change(
    state: ClusterState, before: int | None, health: Health, now: float, lost_after: float
) -> None:
    fields: dict[str, object] = {
        "cluster": state.name,
        "health": hl.NAMES[health.state],
        "previous": hl.NAMES[before] if before is not None else "",
        "reason": health.reason,
    }
    if state.heartbeat is not None:
        fields["heartbeat_age_seconds"] = round(now - state.last_seen, 1)
    if before == hl.LOST:
        log.info("cluster back", **fields)
    if health.state == hl.READY:
        log.info("cluster ready", **fields)
    elif health.state == hl.UNKNOWN:
        log.warning("cluster unknown", lost_after_seconds=lost_after, **fields)
    elif health.state == hl.LOST:
        since = state.lost_since
        lost_since = datetime.fromtimestamp(since, UTC).isoformat() if since is not None else ""
        log.warning("cluster lost", lost_since=lost_since, **fields)
    elif before is not None and before != hl.LOST:
        log.warning("cluster not ready", **fields)
