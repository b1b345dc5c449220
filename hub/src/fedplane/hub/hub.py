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
  liveness.py   cluster leases in etcd: which clusters are alive, and which are lost
  lost.py       the jobs of lost clusters, by their disconnect policy
  gangs.py      gang timeouts: jobs not running in time, requeued with backoff
  feed.py       the watch on the hub's own status keys, into the table and the event log
  api.py        reads and administration (get, list, stats, cancel, explain, cordon, watch)
  admission.py  which agents take part: the NATS auth callout, approving and removing clusters
  leader.py     leadership among replicas: the leader lease, and the fence of its writes
  queuebook.py  queues, cohorts, flavors and priority classes: one etcd document, followed

Every replica takes submits, serves reads from its watch-fed table, and accepts cancels; only
the leading replica places, applies statuses and deletes finished jobs, each write fenced.

Time comes from an injected Clock, so that tests can drive it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fedplane.core import dispatch as sm
from fedplane.core.placement import Weights
from fedplane.core.queues import QueueConfig
from fedplane.hub import convert
from fedplane.hub.admission import ClusterAdmission
from fedplane.hub.api import HubApi
from fedplane.hub.clock import SYSTEM, Clock
from fedplane.hub.clusters import ClusterRegistry, health_thresholds
from fedplane.hub.commands import CommandSender, create_command, delete_command
from fedplane.hub.errors import HubError
from fedplane.hub.etcd import EtcdCredentials, EtcdError
from fedplane.hub.events import EventLog
from fedplane.hub.feed import StatusFeed
from fedplane.hub.gangs import GangTimeouts
from fedplane.hub.intake import Intake
from fedplane.hub.leader import Leadership, default_replica_id, hub_status
from fedplane.hub.liveness import Liveness
from fedplane.hub.lost import LostClusterJobs
from fedplane.hub.metrics import HubMetrics
from fedplane.hub.queuebook import QueueBook, unfinished_jobs
from fedplane.hub.reports import ClusterReports
from fedplane.hub.retention import Retention
from fedplane.hub.scheduler import Scheduler
from fedplane.hub.statuses import StatusIntake
from fedplane.hub.store import Fence, Store
from fedplane.hub.table import NOT_LEADING, JobRecord, JobTable
from fedplane.runtime import bus, logs, tasks
from fedplane.runtime.config import HubConfig
from fedplane.v1 import hub_pb2 as hub_pb
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
S = sm.S
EVENT_BUFFER = 20_000


def nats_credentials(config: HubConfig, seed_file: str = "") -> bus.Credentials:
    """The hub's NATS identity (its NKey, which nats-server's auth callout lets through; or
    `seed_file`'s) and TLS."""
    tls = config.nats_tls
    seed_file = seed_file or config.nats_auth.seed_file
    return bus.Credentials(
        seed=Path(seed_file).read_bytes().strip() if seed_file else b"",
        tls=bus.tls_context(tls.ca_file, tls.cert_file, tls.key_file),
    )


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
        self.registry = ClusterRegistry(health_thresholds(config))
        self.events = EventLog(EVENT_BUFFER)
        self.commands = CommandSender(js)
        self.queue_book = QueueBook(store, lambda queue: unfinished_jobs(self.table.counts, queue), clock)
        self.intake = Intake(self.table, clock, lambda: self.queue_book.config, config.implicit_queues)
        # Every replica's queueing cycle follows the queue configuration in etcd; a change
        # (quota raised, queue released from hold) is worth a placement round at once.
        self.queue_book.subscribe(self._queues_changed)
        self.scheduler = Scheduler(
            self.table, self.registry, self.commands, clock, config, lambda: self.queue_book.config
        )
        self.admission = ClusterAdmission(config, self.registry, self.table, store, clock)
        admitted = self.admission.admitted
        self.statuses = StatusIntake(self.table, self.registry, clock, admitted)
        self.reports = ClusterReports(self.table, self.registry, store, clock, admitted)
        self.retention = Retention(self.table, clock, config.finished_job_retention_seconds)
        self.feed = StatusFeed(self.table, self.events)
        self.lost = LostClusterJobs(self.table, self.registry, self.commands, clock, config)
        self.gangs = GangTimeouts(self.table, self.registry, self.commands, clock, config)
        self.api = HubApi(
            self.table, self.registry, self.commands, self.events, clock, Weights(**vars(config.weights))
        )
        replica_id = config.replica_id or default_replica_id(config.listen)
        self.liveness = Liveness(self.registry, store, clock, replica_id)
        self.leadership = Leadership(
            store,
            replica_id,
            config.listen,
            config.leader_lease_seconds,
            self._lead,
            self._follow,
        )
        self.table.fence = NOT_LEADING
        self.table.fence_lost = self.leadership.fence_lost
        self._tasks: list[asyncio.Task[None]] = []
        self._leader_tasks: list[asyncio.Task[None]] = []
        self._subs: list[bus.Subscription] = []
        self._stopping = False
        # The parts count into the hub's own metrics; its state is read at each scrape.
        self.metrics = HubMetrics()
        store.on_txn = self.metrics.etcd_txn
        self.intake.metrics = self.scheduler.metrics = self.metrics
        self.commands.metrics = self.statuses.metrics = self.leadership.metrics = self.metrics
        self.metrics.watch(self)

    @classmethod
    async def start(cls, config: HubConfig, clock: Clock = SYSTEM) -> Hub:
        store = await Store.connect(
            config.etcd_endpoint,
            config.etcd_prefix,
            max_txn_ops=config.etcd_max_txn_ops,
            allow_unsafe_version=config.etcd_allow_unsafe_version,
            credentials=EtcdCredentials.load(
                config.etcd_endpoint, config.etcd_tls, config.etcd_username, config.etcd_password_file
            ),
        )
        nc = await bus.connect(
            config.nats_url, f"fedplane-hub-{config.hub_id}", credentials=nats_credentials(config)
        )
        js = bus.jetstream(nc)
        await bus.ensure_streams(js, config.stream_max_age_seconds)
        hub = cls(config, store, nc, js, clock)
        if config.nats_auth.system_seed_file:
            hub.admission.system = await bus.connect(
                config.nats_url,
                f"fedplane-hub-{config.hub_id}-system",
                credentials=nats_credentials(config, config.nats_auth.system_seed_file),
            )
        await hub._recover()
        return hub

    def _queues_changed(self, config: QueueConfig) -> None:
        self.table.queue.configure(config)
        self.table.wake.set()

    async def _recover(self) -> None:
        """Load every job and cluster, then run: the parts every replica runs at once, and the
        leader's parts whenever this replica leads (see leader.py)."""
        table, registry = self.table, self.registry
        stored, revision = await self.store.load_jobs()
        self.events.revision = revision
        admin_records, admin_revision = await self.store.load_clusters_at()
        for name, blob in admin_records.items():
            state, _ = registry.get_or_add(name)
            state.admin = pb.Cluster.FromString(blob)
        for item in stored:
            table.add(JobRecord.stored(item))
        log.info("hub recovered", jobs=len(stored), pending=len(table.queue), revision=revision)
        # Before taking submits: they are checked against the queues.
        await self.queue_book.start()
        stopping = self._is_stopping
        # Every replica: take submits, follow etcd into the table, hear the clusters, send the
        # commands it queues (a cancel's delete), and campaign.
        self._tasks = [
            asyncio.create_task(self.intake.run(), name="hub-intake"),
            asyncio.create_task(self.feed.run(stopping), name="hub-watch"),
            asyncio.create_task(self.reports.run_health(), name="hub-health"),
            asyncio.create_task(
                self.reports.follow_admin(admin_revision, stopping), name="hub-cluster-records"
            ),
            asyncio.create_task(self.commands.run(), name="hub-commands"),
            asyncio.create_task(self.liveness.run(), name="hub-liveness"),
            asyncio.create_task(self.leadership.run(), name="hub-leadership"),
        ]
        self._subs = await self.admission.serve(self.nc, self.js)
        self._subs += await self.reports.subscribe(self.nc, self.js)

    async def _lead(self, fence: Fence) -> None:
        """Take over: hold the capacity of the jobs on clusters, re-send what may be unsent,
        and start placing, applying statuses and cleaning up, under `fence`."""
        table, registry, commands = self.table, self.registry, self.commands
        table.fence = fence
        for state in registry.clusters.values():
            for key in list(state.reservations):
                job_id, _, generation = key.rpartition(":")
                state.release(job_id, int(generation))
        resend = 0
        for record in list(table.jobs.values()):
            if record.state in sm.ON_CLUSTER and record.cluster:
                # Hold the capacity until the cluster's inventory confirms it.
                job = record.job
                state, _ = registry.get_or_add(record.cluster)
                state.reserve(
                    convert.job_request(job, record.seq),
                    record.generation,
                    convert.assignments_core(job.status.assignments),
                )
            # The previous leader may have stopped between a write and its command's publish.
            if record.state == S.DISPATCHED:
                job = record.job
                cluster, _ = registry.get_or_add(record.cluster)
                fence_after = self.lost.policies.fence_after_seconds(job.spec, registry, cluster)
                commands.queue(job, create_command(job, self.config.hub_id, fence_after))
                resend += 1
            elif record.state == S.CANCELLING:
                job = record.job
                commands.queue(job, delete_command(job, job.status.message))
                resend += 1
        for state in registry.clusters.values():
            if state.inventory is not None:
                state.apply_inventory(state.inventory)  # drops what the last report already counts
        log.info("leader took over", jobs=len(table.jobs), pending=len(table.queue), resend=resend)

        def not_leading() -> bool:
            return self._stopping or table.fence is not fence

        self._leader_tasks = [
            asyncio.create_task(self.scheduler.run(), name="hub-schedule"),
            # Told to stop by the fence as well as cancelled: the consumer must let go of the
            # status messages, which the new leader takes, even if a cancellation went astray.
            asyncio.create_task(self.statuses.run(self.js, not_leading), name="hub-status"),
            asyncio.create_task(self.retention.run(), name="hub-retention"),
            asyncio.create_task(self.liveness.lead(fence, self.leadership.fence_lost), name="hub-leases"),
            asyncio.create_task(self._handle_lost_clusters(), name="hub-lost"),
        ]
        if self.config.gang_timeout_seconds > 0:
            self._leader_tasks.append(asyncio.create_task(self.gangs.run(), name="hub-gangs"))
        table.capacity_changed()

    async def _handle_lost_clusters(self) -> None:
        """Act on lost clusters only once this leader's first lease round has settled which
        clusters are alive: until then a cluster whose lease ran out while no replica led
        would be taken for lost."""
        await self.liveness.settled.wait()
        await self.lost.run()

    async def _follow(self) -> None:
        """Stop the leader's parts at once: from here on every fenced write is refused."""
        self.table.fence = NOT_LEADING
        leader_tasks, self._leader_tasks = self._leader_tasks, []
        await tasks.cancel_all(leader_tasks, grace=2)

    async def status(self) -> hub_pb.HubStatus:
        """Who leads and every replica, as etcd has it."""
        try:
            return await hub_status(self.store, self.leadership.me.id, self.config.leader_lease_seconds)
        except EtcdError as exc:
            raise HubError("UNAVAILABLE", f"the hub cannot reach etcd: {' '.join(str(exc).split())}") from exc

    def _is_stopping(self) -> bool:
        return self._stopping

    async def stop(self) -> None:
        self._stopping = True
        self.events.close()
        # Let the status consumer finish its batch, so no fetched update waits out its ack
        # deadline; then give up leading (the next leader need not wait out the lease).
        await tasks.finish_first(
            next((t for t in self._leader_tasks if t.get_name() == "hub-status"), None), 3
        )
        await tasks.cancel_all([t for t in self._tasks if t.get_name() == "hub-leadership"])
        # Commands not yet stored would be re-sent after a restart anyway; this only saves the wait.
        await tasks.bounded(self.commands.sent(), 2, "command publish")
        await tasks.cancel_all(self._tasks)
        await tasks.bounded(self.queue_book.stop(), 2, "queue book")
        self.intake.close(HubError("UNAVAILABLE", "the hub is shutting down; submit again"))
        for sub in self._subs:
            await tasks.bounded(bus.unsubscribe(sub), 2, "unsubscribe")
        await tasks.bounded(bus.close(self.nc), 5, "NATS close")
        if self.admission.system is not None:
            await tasks.bounded(bus.close(self.admission.system), 5, "NATS close")
        await tasks.bounded(self.store.close(), 5, "etcd close")
