"""The agent daemon: one per member cluster, between the hub (over NATS) and a Backend.

It reports heartbeats, inventory and datasets; consumes its cluster's dispatch commands from
a durable JetStream consumer, acknowledging a command only once the backend has accepted
the workload; and reports workload state changes through the outbox. Commands are
idempotent by (job, generation), so a redelivered command never creates a second workload.

This module is the I/O shell: what to do about a command or a workload event is decided in
`decisions`, and every NATS call goes through `fedplane.runtime.bus`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from opentelemetry import trace

from fedplane.agent import decisions
from fedplane.agent.backend import Backend, BackendError, CreateRequest, WorkloadEvent
from fedplane.agent.decisions import CREATE, DELETE, DUPLICATE
from fedplane.agent.outbox import Outbox
from fedplane.core.model import Taint
from fedplane.runtime import bus, entry, gcpolicy, logs, tasks, telemetry, timestamps
from fedplane.runtime.config import AgentConfig, load_agent
from fedplane.runtime.version import __version__
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.agent")
ORPHAN_REASON = "orphan: the hub no longer assigns it here"


def make_backend(config: AgentConfig) -> Backend:
    kind = config.backend.get("type", "simulated")
    if kind == "simulated":
        from fedplane.agent.simulated import SimulatedBackend

        return SimulatedBackend(config.simulated())
    if kind == "kubernetes":
        from fedplane.agent.kubernetes_backend import KubernetesBackend, KubernetesBackendConfig

        settings = {k: v for k, v in config.backend.items() if k != "type"}
        settings.setdefault("hub_id", config.hub_id)
        return KubernetesBackend(KubernetesBackendConfig.from_mapping(settings))
    raise ValueError(f"backend.type: unknown backend {kind!r} (use simulated or kubernetes)")


class Agent:
    def __init__(self, config: AgentConfig, backend: Backend) -> None:
        if not bus.valid_cluster_name(config.cluster):
            raise ValueError(
                f"cluster: {config.cluster!r} must be a DNS label (lowercase letters, digits, '-')"
            )
        self.config = config
        self.cluster = config.cluster
        self.backend = backend
        self.agent_id = uuid.uuid4().hex[:12]
        self.taints = [Taint.parse(t) for t in config.taints]
        state_dir = Path(config.state_dir) if config.state_dir else None
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
        self._state_path = state_dir / "generations.json" if state_dir else None
        self.outbox = Outbox(state_dir / "outbox.log" if state_dir else None)
        # Highest generation seen per job: the idempotency record for commands.
        self.generations: dict[str, int] = {}
        if self._state_path and self._state_path.exists():
            self.generations = {k: int(v) for k, v in json.loads(self._state_path.read_text()).items()}
        self._traces: dict[str, dict[str, str]] = {}
        # The max-run policy's state, per workload (job id, generation), so that one dispatch's
        # clock or stop is never taken for another's: the limits of the workloads that have one,
        # the clocks of those running under one, those this agent stopped for overrunning (see
        # decisions), and the tasks stopping them (held here: the loop keeps only weak references).
        self._max_run: dict[tuple[str, int], int] = {}
        self._deadlines: dict[tuple[str, int], asyncio.TimerHandle] = {}
        self._overrun: set[tuple[str, int]] = set()
        self._overrun_stops: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        # The datasets last published (serialized without sequence and time): sent again on change.
        self._datasets_sent = b""
        self._tasks: list[asyncio.Task[None]] = []
        self._seq = 0
        self.nc: bus.Connection | None = None
        self.js: bus.JetStream | None = None
        self.connected = asyncio.Event()
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.backend.start(self._on_workload_event, self._changed.set)
        self._changed.set()
        self.nc = await bus.connect(
            self.config.nats_url,
            f"fedplane-agent-{self.cluster}",
            on_disconnect=self._on_disconnect,
            on_reconnect=self._on_reconnect,
        )
        self.js = bus.jetstream(self.nc)
        self.connected.set()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="agent-heartbeat"),
            asyncio.create_task(self._inventory_loop(), name="agent-inventory"),
            asyncio.create_task(self._command_loop(), name="agent-commands"),
            asyncio.create_task(self.outbox.run(self._publish_statuses, batch=1024), name="agent-outbox"),
        ]
        if self.config.gc_interval_seconds > 0:
            self._tasks.append(asyncio.create_task(self._gc_loop(), name="agent-gc"))
        log.info(
            "agent started", cluster=self.cluster, agent_id=self.agent_id, queued_updates=len(self.outbox)
        )

    async def stop(self) -> None:
        self._stopping = True
        # Let the command consumer finish the command in hand, so none waits out its ack deadline.
        await tasks.finish_first(next((t for t in self._tasks if t.get_name() == "agent-commands"), None), 3)
        await tasks.cancel_all(self._tasks)
        for handle in self._deadlines.values():
            handle.cancel()
        await tasks.cancel_all(self._overrun_stops)
        await tasks.bounded(self.backend.stop(), 10, "backend stop")
        if self.nc is not None:
            await tasks.bounded(bus.close(self.nc), 5, "NATS close")

    async def _on_disconnect(self) -> None:
        self.connected.clear()
        log.warning("disconnected from NATS; working offline", cluster=self.cluster)

    async def _on_reconnect(self) -> None:
        self.connected.set()
        self._changed.set()
        log.info("reconnected to NATS; replaying", cluster=self.cluster, queued_updates=len(self.outbox))

    # ------------------------------------------------------------------ reports
    async def _heartbeat_loop(self) -> None:
        assert self.js is not None
        while True:
            beat = agent_pb.Heartbeat(
                cluster=self.cluster, agent_id=self.agent_id, version=__version__, time=timestamps.now()
            )
            try:
                await bus.publish_report(self.js, "heartbeat", self.cluster, beat.SerializeToString())
            except Exception as exc:
                log.debug("heartbeat not sent", error=str(exc))
            await asyncio.sleep(self.config.heartbeat_interval_seconds)

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
        snapshot = await self.backend.inventory()
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
        by_job: dict[str, list[tuple[int, agent_pb.DispatchCommand]]] = {}
        for index, msg in enumerate(msgs):
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
            attributes={"job.id": command.job_id, "cluster": self.cluster, "generation": command.generation},
        ) as trace_ctx:
            try:
                return await self.handle(command, trace_ctx)
            except Exception:
                log.exception("command failed; will be redelivered", job_id=command.job_id)
                return False

    async def handle(self, command: agent_pb.DispatchCommand, trace_ctx: dict[str, str]) -> bool:
        """Apply one command; True when it may be acknowledged."""
        job_id, generation = command.job_id, command.generation
        known = self.generations.get(job_id, 0)
        action = decisions.decide_command(command, known)
        if action is CREATE:
            return await self._create(command, trace_ctx)
        if action is DELETE:
            self._traces.setdefault(job_id, trace_ctx)
            await self.backend.delete(job_id, generation, command.delete.reason)
            log.info("workload deleted", job_id=job_id, generation=generation, reason=command.delete.reason)
        elif action is DUPLICATE:
            log.info("duplicate or stale dispatch ignored", job_id=job_id, generation=generation, known=known)
        return True

    async def _create(self, command: agent_pb.DispatchCommand, trace_ctx: dict[str, str]) -> bool:
        """Create the workload; the generation is held only once the backend has decided, so a
        temporary refusal leaves the redelivered command to be applied."""
        job_id, generation, create = command.job_id, command.generation, command.create
        request = CreateRequest(job_id, generation, create.spec, list(create.assignments), create.hub_id)
        self._traces[job_id] = trace_ctx
        error: BackendError | None = None
        try:
            await self.backend.create(request)
        except BackendError as exc:
            error = exc
        outcome = decisions.decide_created(command, error)
        if outcome.retry:
            log.warning("backend refused workload for now", job_id=job_id, error=str(error))
            return False
        self._remember(job_id, generation)
        if outcome.report is not None:
            self._report(outcome.report)
            return True
        if outcome.max_run_seconds:
            self._max_run[job_id, generation] = outcome.max_run_seconds
        log.info("workload created", job_id=job_id, generation=generation)
        return True

    def _remember(self, job_id: str, generation: int) -> None:
        self.generations[job_id] = generation
        if self._state_path is not None:
            tmp = self._state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.generations))
            tmp.replace(self._state_path)

    # ------------------------------------------------------------------ garbage collection
    async def _gc_loop(self) -> None:
        while True:
            try:
                await self.collect_orphans()
            except Exception as exc:
                log.debug("orphan collection skipped", error=str(exc))
            await asyncio.sleep(self.config.gc_interval_seconds)

    async def collect_orphans(self) -> list[str]:
        """Delete workloads the hub no longer assigns here (left by a failover or a lost cancel).

        The workloads are listed before the hub is asked, so one created meanwhile is never
        judged. Only workloads carrying this hub's labels are ever listed, so nothing else is
        touched. Returns the job ids deleted.
        """
        assert self.nc is not None
        workloads = await self.backend.list_workloads()
        if not workloads:
            return []
        query = agent_pb.OrphanQuery(
            cluster=self.cluster,
            workloads=[agent_pb.WorkloadRef(job_id=w.job_id, generation=w.generation) for w in workloads],
        )
        reply = agent_pb.OrphanReply.FromString(
            await bus.request(self.nc, "gc", self.cluster, query.SerializeToString(), within=10)
        )
        for orphan in reply.orphans:
            log.warning("deleting orphaned workload", job_id=orphan.job_id, generation=orphan.generation)
            await self.backend.delete(orphan.job_id, orphan.generation, ORPHAN_REASON)
        return [o.job_id for o in reply.orphans]

    # ------------------------------------------------------------------ status
    def _on_workload_event(self, event: WorkloadEvent) -> None:
        workload = (event.job_id, event.generation)
        outcome = decisions.decide_event(
            event, self._max_run.get(workload, 0), workload in self._overrun, workload in self._deadlines
        )
        if outcome is not decisions.AS_IS:
            limit = outcome.start_clock_seconds
            if limit:
                self._deadlines[workload] = asyncio.get_running_loop().call_later(
                    limit, self._clock_ran_out, workload, limit
                )
            if outcome.finished:
                handle = self._deadlines.pop(workload, None)
                if handle is not None:
                    handle.cancel()
                self._max_run.pop(workload, None)
                self._overrun.discard(workload)
            if outcome.report is not None:
                event = outcome.report
        self._report(event)

    def _clock_ran_out(self, workload: tuple[str, int], limit: int) -> None:
        """Stop a workload that ran past its limit.

        It is marked as stopped by the agent here, before the delete starts, so that an ending
        reported meanwhile finds the mark (a CANCELLED is the stop; any ending clears it).
        """
        job_id, generation = workload
        log.warning(
            "workload exceeded its maximum run time",
            job_id=job_id,
            generation=generation,
            limit_seconds=limit,
        )
        self._overrun.add(workload)
        task = asyncio.get_running_loop().create_task(
            self._stop_overrun(job_id, generation, limit), name=f"agent-overrun-{job_id}"
        )
        self._overrun_stops.add(task)
        task.add_done_callback(self._overrun_stops.discard)

    async def _stop_overrun(self, job_id: str, generation: int, limit: int) -> None:
        try:
            await self.backend.delete(job_id, generation, decisions.overrun_delete_reason(limit))
        except Exception:
            # Nobody awaits this task: say why the workload runs on past its limit.
            log.exception("stopping an overrunning workload failed", job_id=job_id, generation=generation)

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
            attributes={"job.id": event.job_id, "state": pb.JobState.Name(event.state)},
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
        await bus.publish_status_batch(self.js, self.cluster, batch.SerializeToString())
        return [None] * len(items)


async def run(config: AgentConfig) -> None:
    agent = Agent(config, make_backend(config))
    await agent.start()
    await tasks.stop_event().wait()
    log.info("agent stopping", cluster=config.cluster)
    await agent.stop()


def main(config_path: str) -> None:
    config = load_agent(config_path)
    logs.configure(config.telemetry.log_level, config.telemetry.log_format)
    gcpolicy.for_daemon()
    telemetry.configure(
        f"fedplane-agent-{config.cluster}", config.telemetry.exporter, config.telemetry.endpoint or None
    )
    started = time.monotonic()
    try:
        asyncio.run(run(config))
    finally:
        telemetry.shutdown()
        log.info("agent exited", uptime_seconds=round(time.monotonic() - started, 1))


def cli() -> None:
    """`fedplane-agent --config FILE`: the agent alone, as the agent distribution installs it."""
    entry.run_daemon("fedplane-agent", lambda path: main(path or ""), config_required=True)
