"""Cluster reports: heartbeats, inventories and data reports into the registry, cluster health,
and the agents' orphan queries.

A cluster's health is judged by the time the NATS server stored its heartbeat, not by the
agent's own clock, and never later than the hub's own now (a server clock running ahead must
not keep a silent cluster alive).
"""

from __future__ import annotations

from fedplane.core import dispatch as sm
from fedplane.hub.clock import Clock
from fedplane.hub.clusters import ClusterRegistry
from fedplane.hub.store import JobStore
from fedplane.hub.table import JobTable
from fedplane.runtime import bus, logs
from fedplane.v1 import agent_pb2 as agent_pb

log = logs.get("fedplane.hub")


class ClusterReports:
    def __init__(self, table: JobTable, registry: ClusterRegistry, store: JobStore, clock: Clock) -> None:
        self.table = table
        self.registry = registry
        self.store = store
        self.clock = clock
        self.ready: frozenset[str] = frozenset()

    async def subscribe(self, nc: bus.Connection, js: bus.JetStream) -> list[bus.Subscription]:
        """Subscribe to every cluster's reports (their last values first) and to orphan queries."""
        subs = await bus.subscribe_latest_reports(js, self.on_report)
        subs.append(await bus.serve_requests(nc, "gc", self.answer_orphan_query))
        return subs

    async def answer_orphan_query(self, query_bytes: bytes) -> bytes:
        """Answer an agent's garbage-collection question from the dispatch records (a query that
        fails to parse is logged by the bus and left unanswered: the agent skips that round)."""
        query = agent_pb.OrphanQuery.FromString(query_bytes)
        orphans = []
        jobs = self.table.jobs
        for ref in query.workloads:
            record = jobs.get(ref.job_id)
            if sm.is_orphan(record.dispatch_state if record else None, query.cluster, ref.generation):
                orphans.append(ref)
        return agent_pb.OrphanReply(orphans=orphans).SerializeToString()

    async def on_report(self, msg: bus.Message) -> None:
        try:
            kind = bus.kind_of(msg.subject)
            cluster = bus.cluster_of(msg.subject)
            state, added = self.registry.get_or_add(cluster)
            if added:
                await self.store.put_cluster(cluster, state.admin.SerializeToString())
                log.info("cluster registered", cluster=cluster)
            now = self.clock.time()
            stamped = bus.stored_at(msg)
            if stamped is None:
                stamped = now
            if kind == "heartbeat":
                state.heartbeat = agent_pb.Heartbeat.FromString(msg.data)
                state.last_seen = min(max(state.last_seen, stamped), now)
                self.check_health()
            elif kind == "inventory":
                state.apply_inventory(agent_pb.Inventory.FromString(msg.data))
                state.last_seen = max(state.last_seen, min(stamped, now))
                self.table.capacity_changed()
            elif kind == "datasets":
                state.datasets = agent_pb.DataLocalityReport.FromString(msg.data)
                self.table.capacity_changed()
        except Exception:
            log.exception("bad cluster report", subject=msg.subject)

    def check_health(self) -> None:
        """Log clusters becoming ready or not, and let placement look again when any did."""
        ready = self.registry.ready_names(self.clock.time())
        if ready != self.ready:
            for name in ready - self.ready:
                log.info("cluster ready", cluster=name)
            for name in self.ready - ready:
                log.warning("cluster not ready", cluster=name)
            self.ready = ready
            self.table.capacity_changed()

    async def run_health(self) -> None:
        """Notice heartbeats going stale, which no message announces."""
        while True:
            await self.clock.sleep(max(0.2, self.registry.timeout / 4))
            self.check_health()
