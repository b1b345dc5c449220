"""The agent's Prometheus metrics (docs/operations.md, Metrics), in a registry of its own.

Several agents may run in one process (tests, `fedplane up`), each with its own registry and
port; every metric also carries the agent's cluster, so that dashboards can group by it.
Commands, creates and backend calls are counted where they happen; the outbox and contact
with the hub are read when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fedplane.agent.decisions import Command
from fedplane.runtime import metrics
from fedplane.runtime.metrics import CALL_BUCKETS, BatchHistogram, LoopCollector

if TYPE_CHECKING:
    from fedplane.agent.daemon import Agent

BACKEND_CALLS = ("create", "delete", "inventory", "datasets", "list_workloads")
CREATE_RESULTS = ("created", "retry", "failed", "error")
PUBLISHES = ("status", "heartbeat")


class AgentMetrics:
    def __init__(self, cluster: str) -> None:
        self.registry = registry = CollectorRegistry()
        self.cluster = cluster
        self.commands = Counter(
            "fedplane_agent_commands",
            "Commands received from the hub, by what the agent made of them.",
            ["cluster", "action"],
            registry=registry,
        )
        self._commands = {action: self.commands.labels(cluster, action.name.lower()) for action in Command}
        self.creates = Counter(
            "fedplane_agent_creates",
            "Workload creates, by result: created, retry (refused for now, redelivered),"
            " failed (refused for good, reported FAILED), error (an unexpected failure, redelivered).",
            ["cluster", "result"],
            registry=registry,
        )
        self._creates = {result: self.creates.labels(cluster, result) for result in CREATE_RESULTS}
        self.backend_calls = BatchHistogram(
            "fedplane_agent_backend_call_seconds",
            "Calls to the cluster's backend (failed ones included), by call.",
            CALL_BUCKETS,
            registry,
            ["cluster", "call"],
            [(cluster, call) for call in BACKEND_CALLS],
        )
        self.backend_errors = Counter(
            "fedplane_agent_backend_errors",
            "Backend calls that raised, by call.",
            ["cluster", "call"],
            registry=registry,
        )
        self._backend_errors = {call: self.backend_errors.labels(cluster, call) for call in BACKEND_CALLS}
        self.nats_publish = BatchHistogram(
            "fedplane_nats_publish_seconds",
            "A JetStream publish until its ack, by kind of message.",
            CALL_BUCKETS,
            registry,
            ["cluster", "kind"],
            [(cluster, kind) for kind in PUBLISHES],
        )
        self.nats_publish_failures = Counter(
            "fedplane_nats_publish_failures",
            "Publishes JetStream did not acknowledge (retried), by kind.",
            ["cluster", "kind"],
            registry=registry,
        )
        self._publish_failures = {
            kind: self.nats_publish_failures.labels(cluster, kind) for kind in PUBLISHES
        }
        self.redeliveries = Counter(
            "fedplane_nats_redeliveries",
            "JetStream messages consumed that had been delivered before, by kind.",
            ["cluster", "kind"],
            registry=registry,
        )
        self._command_redeliveries = self.redeliveries.labels(cluster, "cmd")
        # The outbox and contact with the hub, read at each scrape once `watch` has named the agent.
        self.state = LoopCollector(lambda: ())
        registry.register(self.state)

    # ------------------------------------------------------------------ counted where they happen
    def command(self, action: Command) -> None:
        self._commands[action].inc()

    def created(self, result: str) -> None:
        self._creates[result].inc()

    @contextlib.contextmanager
    def backend_call(self, call: str) -> Iterator[None]:
        """Time a backend call; one that raises is counted as an error too."""
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self._backend_errors[call].inc()
            raise
        finally:
            self.backend_calls.observe(time.perf_counter() - started, self.cluster, call)

    @contextlib.contextmanager
    def publishing(self, kind: str) -> Iterator[None]:
        """Time a publish until its ack; one that raises is counted as a failure instead."""
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self._publish_failures[kind].inc()
            raise
        self.nats_publish.observe(time.perf_counter() - started, self.cluster, kind)

    def command_messages(self, msgs: Iterable[object]) -> None:
        count = metrics.redelivered(msgs)
        if count:
            self._command_redeliveries.inc(count)

    # ------------------------------------------------------------------ read at scrape time
    def watch(self, agent: Agent) -> None:
        self.state.read = lambda: _agent_state(agent)

    async def serve(self, listen: str) -> metrics.MetricsServer:
        self.state.loop = asyncio.get_running_loop()
        return await metrics.serve(self.registry, listen)


def _agent_state(agent: Agent) -> list[Metric]:
    labels = [agent.cluster]
    depth = GaugeMetricFamily(
        "fedplane_agent_outbox_updates",
        "Status updates waiting in the outbox for JetStream to store them.",
        labels=["cluster"],
    )
    depth.add_metric(labels, len(agent.outbox))
    sent = CounterMetricFamily(
        "fedplane_agent_status_updates_sent", "Status updates JetStream stored.", labels=["cluster"]
    )
    sent.add_metric(labels, agent.outbox.published)
    contact = GaugeMetricFamily(
        "fedplane_agent_in_contact",
        "1 while the hub's JetStream acknowledges this agent's heartbeats, else 0.",
        labels=["cluster"],
    )
    contact.add_metric(labels, 1 if agent.in_contact else 0)
    cut_off = GaugeMetricFamily(
        "fedplane_agent_cut_off_seconds",
        "Time since the last heartbeat JetStream acknowledged was sent (0 while in contact).",
        labels=["cluster"],
    )
    cut_off.add_metric(labels, 0.0 if agent.in_contact else agent.cut_off_seconds())
    return [depth, sent, contact, cut_off]
