"""The hub: its parts wired together, and their lifecycle (start, recover, stop).

Everything that decides lives in fedplane.core, which speaks its own plain types; the hub
converts at its edge (convert.py for placement's inputs and outputs, records.py to write the
state machine's transitions into the stored JobStatus), and validates the specs that enter it
(validation.py). The hub's own state is the job table (table.py), over the store (store.py)
and beside the cluster registry (clusters.py); each concern is a driver over the table:

  intake.py     submits, stored by group commit
  scheduler.py  placement rounds, dispatching by compare-and-swap
  statuses.py   the agents' status batches
  reports.py    heartbeats, inventories, data reports, cluster health, orphan queries
  retention.py  deleting finished jobs
  feed.py       the watch on the hub's own status keys, into the table and the event log
  api.py        reads and administration (get, list, stats, cancel, explain, cordon, watch)

Time comes from an injected Clock, so that tests can drive it.
"""

from __future__ import annotations

import asyncio

from fedplane.core import dispatch as sm
from fedplane.core.placement import Weights
from fedplane.hub import convert
from fedplane.hub.api import HubApi
from fedplane.hub.clock import SYSTEM, Clock
from fedplane.hub.clusters import ClusterRegistry
from fedplane.hub.commands import CommandSender, create_command, delete_command
from fedplane.hub.errors import HubError
from fedplane.hub.events import EventLog
from fedplane.hub.feed import StatusFeed
from fedplane.hub.intake import Intake
from fedplane.hub.reports import ClusterReports
from fedplane.hub.retention import Retention
from fedplane.hub.scheduler import Scheduler
from fedplane.hub.statuses import StatusIntake
from fedplane.hub.store import Store
from fedplane.hub.table import JobRecord, JobTable
from fedplane.runtime import bus, logs, tasks
from fedplane.runtime.config import HubConfig
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
S = sm.S
EVENT_BUFFER = 20_000


class Hub:
    def __init__(
        self, config: HubConfig, store: Store, nc: bus.Connection, js: bus.JetStream, clock: Clock = SYSTEM
    ) -> None:
        self.config = config
        self.store = store
        self.nc = nc
        self.js = js
        self.clock = clock
        self.table = JobTable(store)
        self.registry = ClusterRegistry(config.cluster_unknown_after_seconds)
        self.events = EventLog(EVENT_BUFFER)
        self.commands = CommandSender(js)
        self.intake = Intake(self.table, clock)
        self.scheduler = Scheduler(self.table, self.registry, self.commands, clock, config)
        self.statuses = StatusIntake(self.table, self.registry, clock)
        self.reports = ClusterReports(self.table, self.registry, store, clock)
        self.retention = Retention(self.table, clock, config.finished_job_retention_seconds)
        self.feed = StatusFeed(self.table, self.events)
        self.api = HubApi(
            self.table, self.registry, self.commands, self.events, clock, Weights(**vars(config.weights))
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[bus.Subscription] = []
        self._stopping = False

    @classmethod
    async def start(cls, config: HubConfig, clock: Clock = SYSTEM) -> Hub:
        store = await Store.connect(
            config.etcd_endpoint,
            config.etcd_prefix,
            max_txn_ops=config.etcd_max_txn_ops,
            allow_unsafe_version=config.etcd_allow_unsafe_version,
        )
        nc = await bus.connect(config.nats_url, f"fedplane-hub-{config.hub_id}")
        js = bus.jetstream(nc)
        await bus.ensure_streams(js, config.stream_max_age_seconds)
        hub = cls(config, store, nc, js, clock)
        await hub._recover()
        return hub

    async def _recover(self) -> None:
        """Load every job and cluster, then resume: watch, consume, and re-send what may be unsent."""
        table, registry, commands = self.table, self.registry, self.commands
        stored, revision = await self.store.load_jobs()
        self.events.revision = revision
        for name, blob in (await self.store.load_clusters()).items():
            state, _ = registry.get_or_add(name)
            state.admin = pb.Cluster.FromString(blob)
        for item in stored:
            record = table.add(JobRecord.stored(item))
            if record.state in sm.ON_CLUSTER and record.cluster:
                # Hold the capacity until the cluster's inventory confirms it.
                job = record.job
                state, _ = registry.get_or_add(record.cluster)
                state.reserve(
                    convert.job_request(job, record.seq),
                    record.generation,
                    convert.assignments_core(job.status.assignments),
                )
            if record.state == S.DISPATCHED:
                job = record.job
                commands.queue(job, create_command(job, self.config.hub_id))
            elif record.state == S.CANCELLING:
                job = record.job
                commands.queue(job, delete_command(job, job.status.message))
        log.info(
            "hub recovered",
            jobs=len(stored),
            pending=len(table.queue),
            revision=revision,
            resend=len(commands),
        )
        stopping = self._is_stopping
        self._tasks = [
            asyncio.create_task(self.intake.run(), name="hub-intake"),
            asyncio.create_task(self.feed.run(stopping), name="hub-watch"),
            asyncio.create_task(self.scheduler.run(), name="hub-schedule"),
            asyncio.create_task(self.statuses.run(self.js, stopping), name="hub-status"),
            asyncio.create_task(self.reports.run_health(), name="hub-health"),
            asyncio.create_task(commands.run(), name="hub-commands"),
            asyncio.create_task(self.retention.run(), name="hub-retention"),
        ]
        self._subs = await self.reports.subscribe(self.nc, self.js)
        table.wake.set()

    def _is_stopping(self) -> bool:
        return self._stopping

    async def stop(self) -> None:
        self._stopping = True
        self.events.close()
        # Let the status consumer finish its batch, so no fetched update waits out its ack deadline.
        await tasks.finish_first(next((t for t in self._tasks if t.get_name() == "hub-status"), None), 3)
        # Commands not yet stored would be re-sent after a restart anyway; this only saves the wait.
        await tasks.bounded(self.commands.sent(), 2, "command publish")
        await tasks.cancel_all(self._tasks)
        self.intake.close(HubError("UNAVAILABLE", "the hub is shutting down; submit again"))
        for sub in self._subs:
            await tasks.bounded(bus.unsubscribe(sub), 2, "unsubscribe")
        await tasks.bounded(bus.close(self.nc), 5, "NATS close")
        await tasks.bounded(self.store.close(), 5, "etcd close")
