"""The agent daemon: one per member cluster, between the hub (over NATS) and a Backend.

It reports heartbeats, inventory and datasets; consumes its cluster's dispatch commands from
a durable JetStream consumer, acknowledging a command only once the backend has accepted
the workload; and reports workload state changes through the outbox. Commands are
idempotent by (job, generation), so a redelivered command never creates a second workload.

Cut off from the hub (no heartbeat acknowledged by JetStream: a dead link to an edge site's
leaf node, or NATS down), the agent keeps its workloads running and its updates queued, and
stops (fences) those whose create said the hub may run them elsewhere after so long. When
contact returns it replays its outbox at once and collects its orphans, so that workloads the
hub no longer assigns here are deleted soon after the link returns.

This module is the I/O shell: what to do about a command or a workload event is decided in
`decisions`, what must survive a restart is kept by `state`, and every NATS call goes through
`fedplane.runtime.bus`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

from opentelemetry import trace

from fedplane.agent import decisions
from fedplane.agent.backend import Backend, BackendError, CreateRequest, WorkloadEvent
from fedplane.agent.decisions import CREATE, DELETE, DELETE_AHEAD, DUPLICATE, Workload
from fedplane.agent.metrics import AgentMetrics
from fedplane.agent.outbox import Outbox
from fedplane.agent.state import AgentState, Limits
from fedplane.core.model import Taint
from fedplane.runtime import bus, entry, gcpolicy, logs, natsjwt, tasks, telemetry, timestamps
from fedplane.runtime.config import AgentConfig, ConfigError, StartupError, load_agent
from fedplane.runtime.metrics import MetricsServer
from fedplane.runtime.version import __version__
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.agent")
ORPHAN_REASON = "orphan: the hub no longer assigns it here"
# The most workloads asked about in one orphan query (the hub refuses larger ones).
ORPHAN_QUERY_CHUNK = 2000


def nats_credentials(config: AgentConfig) -> bus.Credentials:
    """The agent's NATS identity: its own NKey (made on first start, kept beside its state),
    a bootstrap token if it has one, its own inbox prefix, and TLS. An insecure agent connects
    anonymously."""
    tls = bus.tls_context(config.nats_tls.ca_file, config.nats_tls.cert_file, config.nats_tls.key_file)
    if config.insecure:
        return bus.Credentials(tls=tls)
    seed_path = config.nats_seed_file or (str(Path(config.state_dir) / "nats.nk") if config.state_dir else "")
    if seed_path:
        seed = natsjwt.load_or_create_seed(Path(seed_path))
    else:
        log.warning(
            "the agent's NATS key is not kept (no state_dir or nats_seed_file): after a restart it"
            " asks to join again with a new key",
            cluster=config.cluster,
        )
        seed = natsjwt.new_seed()
    token = Path(config.bootstrap_token_file).read_text().strip() if config.bootstrap_token_file else ""
    return bus.Credentials(
        seed=seed,
        token=token,
        inbox_prefix=bus.agent_inbox_prefix(config.cluster),
        tls=tls,
    )


def make_backend(config: AgentConfig) -> Backend:
    kind = config.backend.get("type", "simulated")
    if kind == "simulated":
        from fedplane.agent.simulated import SimulatedBackend

        return SimulatedBackend(config.simulated(), cluster=config.cluster)
    if kind == "kubernetes":
        from fedplane.agent.kubernetes_backend import KubernetesBackend, KubernetesBackendConfig

        settings = {k: v for k, v in config.backend.items() if k != "type"}
        settings.setdefault("hub_id", config.hub_id)
        return KubernetesBackend(KubernetesBackendConfig.from_mapping(settings))
    raise ValueError(f"backend.type: unknown backend {kind!r} (use simulated or kubernetes)")


class Agent:
    def __init__(self, config: AgentConfig, backend: Backend) -> None:
        self.check_cluster_name(config.cluster)
        self.config = config
        self.cluster = config.cluster
        self.backend = backend
        self.agent_id = uuid.uuid4().hex[:12]
        self.credentials = nats_credentials(config)
        if not self.credentials.seed:
            log.warning(
                "INSECURE: connecting to NATS without an identity (insecure: true)", cluster=self.cluster
            )
        self.taints = [Taint.parse(t) for t in config.taints]
        state_dir = Path(config.state_dir) if config.state_dir else None
        self.state = AgentState(state_dir)
        self.outbox = Outbox(state_dir / "outbox.log" if state_dir else None)
        # Highest generation seen per job: the idempotency record for commands.
        self.generations = self.state.generations
        self._traces: dict[str, dict[str, str]] = {}
        # The limits' state, per workload (job id, generation), so that one dispatch's clock or
        # stop is never taken for another's. The limits themselves (max run time, fence) are in
        # `state`; here are the clocks of workloads running under a max run time, those this agent
        # stopped for overrunning, those it fenced (with the message of the stop; see decisions),
        # and the tasks stopping either (held here: the loop keeps only weak references).
        self._deadlines: dict[Workload, asyncio.TimerHandle] = {}
        self._overrun: set[Workload] = set()
        self._fenced: dict[Workload, str] = {}
        self._stops: set[asyncio.Task[None]] = set()
        # Contact with the hub: the monotonic time the last acknowledged heartbeat was sent (a
        # restarted agent counts from its last contact before the restart), and whether the
        # last heartbeat was acknowledged.
        self._last_contact = time.monotonic()
        if self.state.last_contact is not None:
            self._last_contact -= max(0.0, time.time() - self.state.last_contact)
        self.in_contact = False
        # Set to collect orphans now rather than at the next interval (contact came back).
        self._collect_now = asyncio.Event()
        self._changed = asyncio.Event()
        # The datasets last published (serialized without sequence and time): sent again on change.
        self._datasets_sent = b""
        self._tasks: list[asyncio.Task[None]] = []
        self._seq = 0
        self.nc: bus.Connection | None = None
        self.js: bus.JetStream | None = None
        self.connected = asyncio.Event()
        self._stopping = False
        # Prometheus metrics in a registry of this agent's own, served on metrics.listen.
        self.metrics = AgentMetrics(self.cluster)
        self.metrics.watch(self)
        self.metrics_server: MetricsServer | None = None

    @staticmethod
    def check_cluster_name(name: str) -> None:
        """Refuse a name that cannot be a NATS subject token and a label value."""
        if not bus.valid_cluster_name(name):
            raise ValueError(f"cluster: {name!r} must be a DNS label (lowercase letters, digits, '-')")

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.config.metrics.listen:  # first: a taken port fails before anything starts
            self.metrics_server = await self.metrics.serve(self.config.metrics.listen)
        await self.backend.start(self._on_workload_event, self._changed.set)
        await self._resume_limits()
        self._changed.set()
        # Before connecting, which an edge agent may wait on for as long as its link is down.
        self._tasks = [asyncio.create_task(self._fence_loop(), name="agent-fence")]
        self.nc = await bus.connect(
            self.config.nats_url,
            bus.agent_connection_name(self.cluster),
            on_disconnect=self._on_disconnect,
            on_reconnect=self._on_reconnect,
            credentials=self.credentials,
        )
        self.js = bus.jetstream(self.nc)
        self.connected.set()
        self._tasks += [
            asyncio.create_task(self._heartbeat_loop(), name="agent-heartbeat"),
            asyncio.create_task(self._inventory_loop(), name="agent-inventory"),
            asyncio.create_task(self._command_loop(), name="agent-commands"),
            asyncio.create_task(self.outbox.run(self._publish_statuses, batch=1024), name="agent-outbox"),
        ]
        if self.config.gc_interval_seconds > 0:
            self._tasks.append(asyncio.create_task(self._gc_loop(), name="agent-gc"))
        log.info(
            "agent started",
            cluster=self.cluster,
            agent_id=self.agent_id,
            queued_updates=len(self.outbox),
            nats_key=natsjwt.public_key(self.credentials.seed) if self.credentials.seed else "",
        )

    async def stop(self) -> None:
        self._stopping = True
        # Let the command consumer finish the command in hand, so none waits out its ack deadline.
        await tasks.finish_first(next((t for t in self._tasks if t.get_name() == "agent-commands"), None), 3)
        await tasks.cancel_all(self._tasks)
        for handle in self._deadlines.values():
            handle.cancel()
        await tasks.cancel_all(self._stops)
        await tasks.bounded(self.backend.stop(), 10, "backend stop")
        if self.nc is not None:
            await tasks.bounded(bus.close(self.nc), 5, "NATS close")
        if self.metrics_server is not None:
            await self.metrics_server.stop()

    async def _on_disconnect(self) -> None:
        self.connected.clear()
        log.warning("disconnected from NATS; working offline", cluster=self.cluster)

    async def _on_reconnect(self) -> None:
        self.connected.set()
        self._changed.set()
        self._collect_now.set()
        self.outbox.wake()
        log.info("reconnected to NATS; replaying", cluster=self.cluster, queued_updates=len(self.outbox))

    # ------------------------------------------------------------------ contact with the hub
    async def _heartbeat_loop(self) -> None:
        """Heartbeats, and through their acknowledgements, whether the hub can hear this agent.

        Only JetStream's acknowledgement counts as contact: an agent on an edge site's leaf node
        stays connected to the leaf when the leaf's link to the hub is down.
        """
        assert self.js is not None
        while True:
            beat = agent_pb.Heartbeat(
                cluster=self.cluster, agent_id=self.agent_id, version=__version__, time=timestamps.now()
            )
            sent = time.monotonic()
            try:
                with self.metrics.publishing("heartbeat"):
                    await bus.publish_report(self.js, "heartbeat", self.cluster, beat.SerializeToString())
            except Exception as exc:
                self._no_contact(exc)
            else:
                self._contact(sent)
            await asyncio.sleep(self.config.heartbeat_interval_seconds)

    def _contact(self, sent: float) -> None:
        """A heartbeat sent at `sent` (monotonic) was stored: the hub hears this agent again.

        Counted from when it was sent, which is before the NATS server stored it, and the hub
        counts from when it was stored: the agent never counts itself cut off for less time
        than the hub counts it silent, so it fences no later than the hub may requeue.
        """
        self._last_contact = max(self._last_contact, sent)
        self.state.contact(time.time() - (time.monotonic() - self._last_contact))
        if not self.in_contact:
            self.in_contact = True
            log.info("in contact with the hub", cluster=self.cluster, queued_updates=len(self.outbox))
            self.outbox.wake()
            self._collect_now.set()
            self._changed.set()

    def _no_contact(self, exc: Exception) -> None:
        if self.in_contact:
            self.in_contact = False
            log.warning(
                "cut off from the hub: heartbeat not stored; working offline",
                cluster=self.cluster,
                error=str(exc),
            )
        else:
            log.debug("heartbeat not sent", error=str(exc))

    def cut_off_seconds(self) -> float:
        """How long since the last heartbeat that JetStream acknowledged was sent."""
        return time.monotonic() - self._last_contact

    async def _fence_loop(self) -> None:
        """Stop the workloads whose fence the time cut off from the hub has passed (see decisions)."""
        every = min(1.0, self.config.heartbeat_interval_seconds)
        while True:
            await asyncio.sleep(every)
            cut_off = self.cut_off_seconds()
            for workload in decisions.decide_fences(cut_off, self.state.fence_limits(), self._fenced):
                self._fence(workload, cut_off)

    def _fence(self, workload: Workload, cut_off: float) -> None:
        """Stop a workload the hub may run elsewhere by now. Marked before the delete starts, so
        that the CANCELLED it causes is reported as the fence (see decisions)."""
        job_id, generation = workload
        message = decisions.fence_message(cut_off)
        log.warning(
            "fencing workload: cut off from the hub past its fence",
            job_id=job_id,
            cluster=self.cluster,
            generation=generation,
            cut_off_seconds=round(cut_off, 1),
            fence_after_seconds=self.state.limits[workload].fence_after_seconds,
        )
        self._fenced[workload] = message
        self._spawn_stop(workload, message, "fencing", unmark=self._fenced)

    # ------------------------------------------------------------------ reports
    async def _inventory_loop(self) -> None:
        """Report on change and at least every interval.

        Changes are coalesced over `inventory_coalesce_seconds`: a busy cluster starts and
        ends many workloads a second, and each report costs the agent and the hub in
        proportion to the cluster's nodes and workloads. Capacity the hub has dispatched is
        held for it until a report counts it, so a later report never double-books a node.
        """
        while True:
            periodic = False
            try:
                await asyncio.wait_for(self._changed.wait(), self.config.inventory_interval_seconds)
            except TimeoutError:
                periodic = True
            await asyncio.sleep(self.config.inventory_coalesce_seconds)
            self._changed.clear()
            try:
                await self.publish_reports(datasets_unchanged_too=periodic)
            except Exception as exc:
                log.debug("inventory not sent", error=str(exc))
                await asyncio.sleep(1.0)
                self._changed.set()

    async def publish_reports(self, datasets_unchanged_too: bool = True) -> None:
        """Publish the inventory, and the data-locality report if it changed (or when asked)."""
        assert self.js is not None
        with self.metrics.backend_call("inventory"):
            snapshot = await self.backend.inventory()
        with self.metrics.backend_call("datasets"):
            datasets = await self.backend.datasets()
        self._seq += 1
        inventory = agent_pb.Inventory(
            cluster=self.cluster,
            agent_id=self.agent_id,
            sequence=self._seq,
            time=timestamps.now(),
            labels=self.config.labels,
            taints=[pb.Taint(key=t.key, value=t.value, effect=t.effect) for t in self.taints],
            nodes=snapshot.nodes,
            cost=self.config.cost,
            accounted_jobs=snapshot.accounted_jobs,
        )
        publishing = [bus.publish_report(self.js, "inventory", self.cluster, inventory.SerializeToString())]
        present = agent_pb.DataLocalityReport(datasets=datasets).SerializeToString()
        if datasets_unchanged_too or present != self._datasets_sent:
            report = agent_pb.DataLocalityReport(
                cluster=self.cluster,
                agent_id=self.agent_id,
                sequence=self._seq,
                time=timestamps.now(),
                datasets=datasets,
            )
            publishing.append(
                bus.publish_report(self.js, "datasets", self.cluster, report.SerializeToString())
            )
        await asyncio.gather(*publishing)
        self._datasets_sent = present

    # ------------------------------------------------------------------ commands
    async def _command_loop(self) -> None:
        assert self.js is not None
        async for msgs in bus.consume_commands(self.js, self.cluster, lambda: self._stopping, 1024):
            await self._handle_messages(msgs)

    async def _handle_messages(self, msgs: list[bus.Message]) -> None:
        """Handle the commands of a batch of messages; ack each message whose commands all took.

        Different jobs are handled concurrently; one job's commands stay in order, and after
        one fails its later ones wait for the redelivery (commands are idempotent).
        """
        self.metrics.command_messages(msgs)
        by_job: dict[str, list[tuple[int, agent_pb.DispatchCommand]]] = {}
        for index, msg in enumerate(msgs):
            if not bus.from_command_stream(msg, self.cluster):
                log.warning(
                    "command message dropped: not from this cluster's command stream",
                    cluster=self.cluster,
                    subject=msg.subject,
                )
                continue
            for command in bus.dispatch_commands_in(msg):
                by_job.setdefault(command.job_id, []).append((index, command))
        failed: set[int] = set()

        async def in_order(items: list[tuple[int, agent_pb.DispatchCommand]]) -> None:
            for i, (index, command) in enumerate(items):
                if self._stopping or not await self._handle_command(command):
                    failed.update(index for index, _ in items[i:])
                    return

        await asyncio.gather(*(in_order(items) for items in by_job.values()))
        await bus.ack_or_nak(msgs, failed, delay=2)

    async def _handle_command(self, command: agent_pb.DispatchCommand) -> bool:
        with telemetry.child_span(
            f"agent.{command.WhichOneof('action') or ''}",
            command.trace_context,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                telemetry.JOB_ID: command.job_id,
                telemetry.CLUSTER: self.cluster,
                "generation": command.generation,
            },
        ) as trace_ctx:
            try:
                return await self.handle(command, trace_ctx)
            except Exception:
                log.exception(
                    "command failed; will be redelivered", job_id=command.job_id, cluster=self.cluster
                )
                return False

    async def handle(self, command: agent_pb.DispatchCommand, trace_ctx: dict[str, str]) -> bool:
        """Apply one command; True when it may be acknowledged."""
        job_id, generation = command.job_id, command.generation
        known = self.generations.get(job_id, 0)
        action = decisions.decide_command(command, known)
        self.metrics.command(action)
        if action is CREATE:
            return await self._create(command, trace_ctx)
        if action is DELETE or action is DELETE_AHEAD:
            if action is DELETE_AHEAD:
                self._remember(job_id, generation)
            self._traces.setdefault(job_id, trace_ctx)
            with self.metrics.backend_call("delete"):
                await self.backend.delete(job_id, generation, command.delete.reason)
            log.info(
                "workload deleted",
                job_id=job_id,
                cluster=self.cluster,
                generation=generation,
                reason=command.delete.reason,
            )
        elif action is DUPLICATE:
            log.info(
                "duplicate or stale dispatch ignored",
                job_id=job_id,
                cluster=self.cluster,
                generation=generation,
                known=known,
            )
        return True

    async def _create(self, command: agent_pb.DispatchCommand, trace_ctx: dict[str, str]) -> bool:
        """Create the workload; the generation is held only once the backend has decided, so a
        temporary refusal leaves the redelivered command to be applied."""
        job_id, generation, create = command.job_id, command.generation, command.create
        workload = (job_id, generation)
        request = CreateRequest(job_id, generation, create.spec, list(create.assignments), create.hub_id)
        self._traces[job_id] = trace_ctx
        # The limits are in place before the create: a backend may report the workload running
        # before its create returns, and the clock must start then.
        accepted = decisions.decide_created(command, None)
        if accepted.max_run_seconds or accepted.fence_after_seconds:
            self.state.set_limits(workload, Limits(accepted.max_run_seconds, accepted.fence_after_seconds))
        error: BackendError | None = None
        try:
            with self.metrics.backend_call("create"):
                await self.backend.create(request)
        except BackendError as exc:
            error = exc
        except BaseException:
            self.metrics.created("error")
            self.state.forget([workload])
            raise
        outcome = accepted if error is None else decisions.decide_created(command, error)
        self.metrics.created("retry" if outcome.retry else "created" if outcome.report is None else "failed")
        if outcome.retry:
            self.state.forget([workload])
            log.warning(
                "backend refused workload for now", job_id=job_id, cluster=self.cluster, error=str(error)
            )
            return False
        self._remember(job_id, generation)
        if outcome.report is not None:
            self.state.forget([workload])
            self._report(outcome.report)
            return True
        log.info("workload created", job_id=job_id, cluster=self.cluster, generation=generation)
        return True

    def _remember(self, job_id: str, generation: int) -> None:
        self.state.hold(job_id, generation)

    async def _resume_limits(self) -> None:
        """After a restart: forget the limits of workloads that are gone, and start again the
        clocks of those that were running under a max run time, for the time they have left."""
        if not self.state.limits:
            return
        try:
            present = {(w.job_id, w.generation) for w in await self.backend.list_workloads()}
        except Exception as exc:
            log.warning(
                "workload limits not checked against the cluster", cluster=self.cluster, error=str(exc)
            )
            present = set(self.state.limits)
        self.state.forget([w for w in self.state.limits if w not in present])
        now = time.time()
        for workload, limits in self.state.limits.items():
            if limits.max_run_seconds and limits.running_since:
                left = decisions.clock_left(limits.max_run_seconds, now - limits.running_since)
                self._start_clock(workload, limits.max_run_seconds, left)

    # ------------------------------------------------------------------ garbage collection
    async def _gc_loop(self) -> None:
        """Collect orphans every interval, and at once when contact with the hub (re)starts."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._collect_now.wait(), self.config.gc_interval_seconds)
            self._collect_now.clear()
            try:
                await self.collect_orphans()
            except Exception as exc:
                log.debug("orphan collection skipped", error=str(exc))

    async def collect_orphans(self) -> list[str]:
        """Delete workloads the hub no longer assigns here (left by a failover or a lost cancel).

        The workloads are listed before the hub is asked, so one created meanwhile is never
        judged. Only workloads carrying this hub's labels are ever listed, so nothing else is
        touched. Returns the job ids deleted.
        """
        assert self.nc is not None
        with self.metrics.backend_call("list_workloads"):
            workloads = await self.backend.list_workloads()
        if not workloads:
            return []
        refs = [agent_pb.WorkloadRef(job_id=w.job_id, generation=w.generation) for w in workloads]
        deleted: list[str] = []
        for start in range(0, len(refs), ORPHAN_QUERY_CHUNK):
            query = agent_pb.OrphanQuery(
                cluster=self.cluster, workloads=refs[start : start + ORPHAN_QUERY_CHUNK]
            )
            reply = agent_pb.OrphanReply.FromString(
                await bus.request(self.nc, "gc", self.cluster, query.SerializeToString(), within=10)
            )
            for orphan in reply.orphans:
                log.warning(
                    "deleting orphaned workload",
                    job_id=orphan.job_id,
                    cluster=self.cluster,
                    generation=orphan.generation,
                )
                await self.backend.delete(orphan.job_id, orphan.generation, ORPHAN_REASON)
                deleted.append(orphan.job_id)
        return deleted

    # ------------------------------------------------------------------ status
    def _on_workload_event(self, event: WorkloadEvent) -> None:
        workload = (event.job_id, event.generation)
        limits = self.state.limits.get(workload)
        outcome = decisions.decide_event(
            event,
            limits.max_run_seconds if limits is not None else 0,
            workload in self._overrun,
            workload in self._deadlines,
            self._fenced.get(workload, ""),
        )
        if outcome is not decisions.AS_IS:
            limit = outcome.start_clock_seconds
            if limit:
                self._start_clock(workload, limit, limit)
                self.state.clock_started(workload, time.time())
            if outcome.finished:
                handle = self._deadlines.pop(workload, None)
                if handle is not None:
                    handle.cancel()
                self.state.forget([workload])
                self._overrun.discard(workload)
                self._fenced.pop(workload, None)
            if outcome.report is not None:
                event = outcome.report
        self._report(event)

    def _start_clock(self, workload: Workload, limit: int, left: float) -> None:
        self._deadlines[workload] = asyncio.get_running_loop().call_later(
            left, self._clock_ran_out, workload, limit
        )

    def _clock_ran_out(self, workload: Workload, limit: int) -> None:
        """Stop a workload that ran past its limit.

        It is marked as stopped by the agent here, before the delete starts, so that an ending
        reported meanwhile finds the mark (a CANCELLED is the stop; any ending clears it).
        """
        job_id, generation = workload
        log.warning(
            "workload exceeded its maximum run time",
            job_id=job_id,
            cluster=self.cluster,
            generation=generation,
            limit_seconds=limit,
        )
        self._overrun.add(workload)
        self._spawn_stop(workload, decisions.overrun_delete_reason(limit), "overrun")

    def _spawn_stop(
        self, workload: Workload, reason: str, why: str, unmark: dict[Workload, str] | None = None
    ) -> None:
        """Delete a workload in a task of its own (held by the agent). If the delete fails, the
        workload is taken out of `unmark`, so that a fence is tried again at its next check."""
        job_id, generation = workload

        async def stop() -> None:
            try:
                await self.backend.delete(job_id, generation, reason)
            except Exception:
                # Nobody awaits this task: say why the workload runs on.
                log.exception(
                    "stopping a workload failed",
                    why=why,
                    job_id=job_id,
                    cluster=self.cluster,
                    generation=generation,
                )
                if unmark is not None:
                    unmark.pop(workload, None)

        task = asyncio.get_running_loop().create_task(stop(), name=f"agent-{why}-{job_id}")
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    def _report(self, event: WorkloadEvent) -> None:
        update = agent_pb.StatusUpdate(
            cluster=self.cluster,
            job_id=event.job_id,
            generation=event.generation,
            state=event.state,
            reason=event.reason,
            message=event.message,
            time=timestamps.now(),
        )
        with telemetry.child_span(
            "agent.status",
            self._traces.get(event.job_id),
            attributes={
                telemetry.JOB_ID: event.job_id,
                telemetry.CLUSTER: self.cluster,
                "state": pb.JobState.Name(event.state),
            },
        ) as trace_ctx:
            self.outbox.put(update, trace_ctx)
        if event.state in decisions.TERMINAL:
            self._traces.pop(event.job_id, None)

    async def _publish_statuses(
        self, items: list[tuple[agent_pb.StatusUpdate, dict[str, str]]]
    ) -> list[BaseException | None]:
        """Publish queued updates in order as one StatusBatch (the hub applies each idempotently)."""
        if self.js is None or not self.connected.is_set():
            raise ConnectionError("not connected")
        batch = agent_pb.StatusBatch()
        for update, trace_ctx in items:
            added = batch.updates.add()
            added.CopyFrom(update)
            added.trace_context.update(trace_ctx)
        with self.metrics.publishing("status"):
            await bus.publish_status_batch(
                self.js, self.cluster, batch.SerializeToString(), trace=batch.updates[0].trace_context
            )
        return [None] * len(items)


def check(config: AgentConfig) -> Backend:
    """The agent's backend, once every setting the agent itself reads is known to be usable: a
    cluster name that is no DNS label, a taint, an unknown backend or a quantity that does not
    parse is a ConfigError, reported in one line before anything is logged or connected."""
    try:
        Agent.check_cluster_name(config.cluster)
        for index, taint in enumerate(config.taints):
            try:
                Taint.parse(taint)
            except ValueError as exc:
                raise ConfigError(f"taints[{index}]: {exc}") from None
        return make_backend(config)
    except ValueError as exc:  # ConfigError, QuantityError and the backends' own checks
        raise ConfigError(str(exc)) from None


async def run(config: AgentConfig, backend: Backend | None = None) -> None:
    agent = Agent(config, backend or check(config))
    try:
        await agent.start()
    except BackendError as exc:  # a Kubernetes config or API the backend cannot use
        raise StartupError(f"cluster {config.cluster}: backend: {exc}") from None
    await tasks.stop_event().wait()
    log.info("agent stopping", cluster=config.cluster)
    await agent.stop()


def main(config_path: str) -> None:
    config = load_agent(config_path)
    try:
        backend = check(config)
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    logs.configure(config.telemetry.log_level, config.telemetry.log_format)
    # One cluster per agent process: every line carries it, the backend's and the NATS client's too.
    logs.bind(cluster=config.cluster)
    gcpolicy.for_daemon()
    telemetry.configure(
        f"fedplane-agent-{config.cluster}", config.telemetry.exporter, config.telemetry.endpoint or None
    )
    started = time.monotonic()
    try:
        asyncio.run(run(config, backend))
    finally:
        telemetry.shutdown()
        log.info("agent exited", uptime_seconds=round(time.monotonic() - started, 1))


def cli() -> None:
    """`fedplane-agent --config FILE`: the agent alone, as the agent distribution installs it."""
    entry.run_daemon("fedplane-agent", lambda path: main(path or ""), config_required=True)
