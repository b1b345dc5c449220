"""How fast a federation recovers: a dead leader hub replaced, a dead cluster declared lost and
its jobs running elsewhere, measured on real processes on loopback.

    python -m fedplane.bench.failover [--rounds 3] [--leases 2,5] [--defaults] [--json FILE]

**Leader failover**, for each leader lease in `--leases`: etcd and nats-server
(fedplane.local.servers), two hub replicas (`python -m fedplane.hub --config F`, each its own
port and replica id), simulated clusters (`python -m fedplane.agent --config F`, one process
each), and a steady stream of submissions through the client SDK to the gRPC target
`ipv4:127.0.0.1:P1,127.0.0.1:P2` (whichever replica answers). Each round kill -9s the leader
and measures, from the kill, when the survivor's GetHubStatus names it the leader and when it
made its first dispatch (the earliest DISPATCHED transition in the jobs' histories stamped
after the kill: the dead leader wrote nothing after it). The killed replica is then started
again as a follower, so every round has two replicas.

**Cluster lost**, with short thresholds (and the defaults with `--defaults`): one hub, a cluster
running long jobs and a second one with room (cordoned while the jobs are placed, so that they
all land on the first). The first cluster's agent is killed with SIGKILL (its heartbeats stop,
its simulated workloads die with it), and GetCluster is polled every 100 ms: from the cluster's
last heartbeat (the hub's `last_heartbeat`, its last report of any kind) to UNKNOWN, to LOST,
and to its jobs requeued and RUNNING on the other cluster (their transition histories). Both
runs requeue at once (requeue_after 0), so that the move itself is measured; the default
policy's 120 s wait adds to it, and the report gives the defaults' figures by formula too.

Both check what must never happen, from the hub's records and the simulated clusters' ledgers:
jobs accepted and then missing, jobs dispatched twice (a generation above one plus the job's
requeues), jobs started more often than that. Every figure is a wall-clock difference on this
machine, whose clock stamps the hub's transitions too.

The run is bounded, and stops every process and deletes its directories on failure or Ctrl-C
(each child also gets SIGTERM if this process dies: setpriv --pdeathsig).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from fedplane.agent.simulated import read_ledger
from fedplane.bench import fleet, loadgen
from fedplane.bench.federation import (
    BenchError,
    Child,
    bounded,
    machine,
    spawn,
    stop_children,
    versions,
    wait_listening,
    wait_ready,
)
from fedplane.bench.pace import Pacer
from fedplane.client.sdk import FedplaneClient, FedplaneError
from fedplane.local import servers as embedded
from fedplane.runtime.config import AgentConfig, DisconnectConfig, HubConfig
from fedplane.v1 import hub_pb2
from fedplane.v1 import types_pb2 as pb

__all__ = ["FailoverParams", "main", "render", "run", "run_async"]

HOST = "127.0.0.1"
QUEUE = "failover"
# Calls that fail because a replica is down or busy are tried again, with the same key.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
    }
)
CALL_TIMEOUT = 3.0
# A submission not accepted this long after its first try is given up (counted, not lost).
GIVE_UP_AFTER = 30.0
MAX_IN_FLIGHT = 64
STATUS_POLL = 0.05
CLUSTER_POLL = 0.1
JOB_POLL = 0.2
# Jobs submitted this long before a kill are searched for the new leader's first dispatch
# (one pending when the leader died counts as much as one submitted after).
PENDING_WINDOW = 10.0
# Beyond the figure it waits for, how long any wait may take before the run is called failed.
WAIT_SLACK = 30.0
STARTUP = 60.0
# Each simulated cluster: 4 nodes of 32 cpus; every job is one pod of 1 cpu.
NODES = 4
NODE_CPU = 32
# etcd's lessor looks for expired leases every 500 ms.
ETCD_EXPIRY_CHECK = 0.5
Progress = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class FailoverParams:
    rounds: int = 3
    # Leader leases measured, seconds: a federation of their own each.
    leases: tuple[float, ...] = (2.0, 5.0)
    clusters: int = 2
    # Submissions per second during the failover rounds.
    rate: float = 20.0
    # How long each failover job runs (simulated), seconds.
    job_seconds: float = 1.0
    # Steady submitting and dispatching before each kill, seconds.
    steady_seconds: float = 2.0
    agent_heartbeat: float = 0.5
    # The cluster-lost thresholds measured (a requeue_after of 0: the jobs move at once).
    unknown_after: float = 2.0
    lost_after: float = 5.0
    lost_jobs: int = 8
    lost_job_seconds: float = 60.0
    # Also measure the default thresholds (15 s unknown, 60 s lost, agents' 5 s heartbeat).
    defaults: bool = False

    def problems(self) -> list[str]:
        """Every invalid setting, as `--option: problem`."""
        out: list[str] = []
        if self.rounds < 1:
            out.append(f"--rounds: must be at least 1 (got {self.rounds})")
        if not self.leases:
            out.append("--leases: give at least one leader lease")
        for lease in self.leases:
            if not math.isfinite(lease) or lease < 2:
                out.append(f"--leases: {lease:g} is below etcd's shortest lease (2 s)")
        if self.clusters < 2:
            out.append(
                f"--clusters: must be at least 2, one to lose and one to take its jobs (got {self.clusters})"
            )
        if not math.isfinite(self.rate) or not 1 <= self.rate <= 500:
            out.append(f"--rate: must be between 1 and 500 submissions/s (got {self.rate:g})")
        if not 0 < self.unknown_after < self.lost_after:
            out.append(
                "--unknown-after/--lost-after: need 0 < unknown < lost "
                f"(got {self.unknown_after:g} and {self.lost_after:g})"
            )
        if self.agent_heartbeat <= 0 or self.agent_heartbeat >= self.unknown_after:
            out.append(
                "--heartbeat: must be positive and shorter than --unknown-after "
                f"(got {self.agent_heartbeat:g})"
            )
        if not 1 <= self.lost_jobs <= NODES * NODE_CPU:
            out.append(f"--lost-jobs: must be between 1 and {NODES * NODE_CPU} (got {self.lost_jobs})")
        return out


# -- what the jobs' records say (pure) -----------------------------------------------------------


def _seconds(stamp: Any) -> float:
    return float(stamp.ToNanoseconds()) / 1e9


def requeues(job: pb.Job) -> int:
    """How often the hub sent the job back to PENDING (a requeue, with its reason), by history."""
    history = job.status.history
    return sum(1 for i, t in enumerate(history) if i > 0 and t.state == pb.PENDING)


def dispatched_twice(job: pb.Job) -> bool:
    """A generation above one dispatch plus one per requeue: the job went out twice for one attempt."""
    return job.status.generation > 1 + requeues(job)


def first_dispatch_after(jobs: Iterable[pb.Job], after: float) -> tuple[float, str] | None:
    """The earliest DISPATCHED transition stamped at or after `after`, and its job."""
    best: tuple[float, str] | None = None
    for job in jobs:
        for t in job.status.history:
            if t.state == pb.DISPATCHED:
                at = _seconds(t.time)
                if at >= after and (best is None or at < best[0]):
                    best = (at, job.id)
    return best


def transition_time(job: pb.Job, state: int, cluster: str = "", generation: int = 0) -> float | None:
    """When the job first entered `state` (on `cluster`, at `generation`, when given)."""
    for t in job.status.history:
        if (
            t.state != state
            or (cluster and t.cluster != cluster)
            or (generation and t.generation != generation)
        ):
            continue
        return _seconds(t.time)
    return None


def starts(ledgers: Iterable[Path]) -> dict[str, set[tuple[str, int]]]:
    """Per job, every (cluster, generation) whose workload the simulated clusters really started."""
    out: dict[str, set[tuple[str, int]]] = {}
    for path in ledgers:
        for event in read_ledger(path):
            if event.get("event") == "running":
                job_id = str(event.get("job_id", ""))
                out.setdefault(job_id, set()).add(
                    (str(event.get("cluster", "")), int(event.get("generation", 0)))
                )
    return out


def integrity(
    accepted: Iterable[str], jobs: Mapping[str, pb.Job], started: Mapping[str, set[tuple[str, int]]]
) -> dict[str, Any]:
    """What must be zero: accepted jobs missing, dispatched twice, or started more often than dispatched."""
    wanted = set(accepted)
    missing = sorted(wanted - set(jobs))
    twice = sorted(i for i in wanted & set(jobs) if dispatched_twice(jobs[i]))
    ran_twice = sorted(i for i in wanted & set(jobs) if len(started.get(i, ())) > 1 + requeues(jobs[i]))
    unfinished = sorted(i for i in wanted & set(jobs) if jobs[i].status.state in (pb.PENDING, pb.DISPATCHED))
    return {
        "accepted": len(wanted),
        "found": len(wanted & set(jobs)),
        "lost": len(missing),
        "dispatched_twice": len(twice),
        "ran_twice": len(ran_twice),
        "not_started_at_end": len(unfinished),
        "examples": {"lost": missing[:5], "dispatched_twice": twice[:5], "ran_twice": ran_twice[:5]},
    }


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """min, median and max, in seconds rounded to the millisecond."""
    if not values:
        return {"min": None, "median": None, "max": None}
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def expected(unknown: float, lost: float, requeue_after: float, lease: float) -> dict[str, Any]:
    """The figures the design promises, by formula (docs/architecture.md, hub/liveness.py, hub/leader.py).

    A dead leader's lease expires between two thirds of its TTL (it renews every third) and the
    TTL after the kill, and etcd revokes expired leases every half second (ETCD_EXPIRY_CHECK); a
    follower looks for the key every min(0.5, TTL/8) s. A silent cluster is UNKNOWN at its
    unknown threshold; its lease, renewed at most one round after its last heartbeat (a round is
    a quarter of the unknown threshold, 0.1 to 5 s), expires at the lost threshold after that
    renewal. Its jobs are requeued `requeue_after` later, and run elsewhere within about a second
    (a placement round and the agent's start).
    """
    renewal_round = min(5.0, max(0.1, unknown / 4))
    poll = min(0.5, lease / 8)
    lost_by = lost + renewal_round + ETCD_EXPIRY_CHECK
    return {
        "leader_lease_s": lease,
        "takeover_s": {"min": round(lease * 2 / 3, 3), "max": round(lease + ETCD_EXPIRY_CHECK + poll, 3)},
        "unknown_after_s": unknown,
        "lost_after_s": {"min": lost, "max": round(lost_by, 3)},
        "requeue_after_s": requeue_after,
        "running_elsewhere_s": {
            "min": lost + requeue_after,
            "max": round(lost_by + requeue_after + 1.0, 3),
        },
    }


def expected_defaults() -> dict[str, Any]:
    hub = HubConfig()
    return expected(
        hub.cluster_unknown_after_seconds,
        hub.cluster_lost_after_seconds,
        DisconnectConfig().requeue_after_seconds,
        hub.leader_lease_seconds,
    )


# -- the processes --------------------------------------------------------------------------------


@dataclass
class Federation:
    """etcd, nats-server, hub replicas and agents of one measurement, in one directory."""

    root: Path
    children: list[Child] = field(default_factory=list)
    servers: list[embedded.ServerProcess] = field(default_factory=list)
    hubs: dict[str, Child] = field(default_factory=dict)
    hub_ports: dict[str, int] = field(default_factory=dict)
    agents: dict[str, Child] = field(default_factory=dict)
    ledgers: dict[str, Path] = field(default_factory=dict)
    etcd: embedded.ServerProcess | None = None
    nats: embedded.ServerProcess | None = None

    def start_servers(self) -> None:
        """etcd and nats-server. Started from this (the main) thread: the children's parent-death
        signal follows the thread that started them."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.etcd = embedded.start_etcd(self.root / "etcd")
        self.servers.append(self.etcd)
        self.nats = embedded.start_nats(self.root / "nats")
        self.servers.append(self.nats)

    @property
    def nats_url(self) -> str:
        assert self.nats is not None
        return f"nats://{self.nats.address}"

    def add_hub(self, name: str, *, lease: float, unknown: float, lost: float, requeue_after: float) -> None:
        assert self.etcd is not None
        port = embedded.free_port(HOST)
        settings = {
            "listen": f"{HOST}:{port}",
            "replica_id": name,
            "insecure": True,
            "implicit_queues": True,
            "etcd_endpoint": self.etcd.address,
            "nats_url": self.nats_url,
            "leader_lease_seconds": lease,
            "cluster_unknown_after_seconds": unknown,
            "cluster_lost_after_seconds": lost,
            "disconnect": {"action": "requeue", "requeue_after_seconds": requeue_after},
            # Every job stays readable for the checks at the end.
            "finished_job_retention_seconds": 0,
            "telemetry": {"exporter": "none", "log_level": "info", "log_format": "json"},
        }
        (self.root / f"{name}.yaml").write_text(yaml.safe_dump(settings))
        self.hub_ports[name] = port

    def address(self, hub: str) -> str:
        return f"{HOST}:{self.hub_ports[hub]}"

    @property
    def target(self) -> str:
        """Every replica, for gRPC's pick-first: a client need not know which one leads."""
        return "ipv4:" + ",".join(self.address(name) for name in self.hub_ports)

    async def start_hub(self, name: str) -> None:
        """Start (or start again) a replica, as an operator runs it, and wait until it serves."""
        config = self.root / f"{name}.yaml"
        child = spawn(name, [sys.executable, "-m", "fedplane.hub", "--config", str(config)], self.root)
        self.children.append(child)
        self.hubs[name] = child
        await wait_listening(child, HOST, self.hub_ports[name])

    def start_agents(self, count: int, heartbeat: float) -> list[str]:
        """One agent process per simulated cluster (sim-000, ...), each with its ledger."""
        configs = fleet.agent_configs(self.nats_url, count, NODES, node_cpu=NODE_CPU, heartbeat=heartbeat)
        for config in configs:
            settings = dataclasses.asdict(config)
            ledger = self.root / f"{config.cluster}.ledger.jsonl"
            settings["backend"]["ledger_path"] = str(ledger)
            settings["telemetry"] = {"exporter": "none", "log_level": "info", "log_format": "json"}
            path = self.root / f"{config.cluster}.yaml"
            path.write_text(yaml.safe_dump(settings))
            child = spawn(
                config.cluster, [sys.executable, "-m", "fedplane.agent", "--config", str(path)], self.root
            )
            self.children.append(child)
            self.agents[config.cluster] = child
            self.ledgers[config.cluster] = ledger
        return [config.cluster for config in configs]

    def check(self, *names: str) -> None:
        """Fail the run with a process's last line if one that should run has exited."""
        for name in names:
            (self.hubs.get(name) or self.agents[name]).check()

    def stop(self) -> None:
        stop_children(self.children)
        for server in reversed(self.servers):
            server.stop()


async def kill(child: Child) -> float:
    """kill -9 the child's process group, as in a crash; the wall time of the kill."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    killed_at = time.time()
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(child.process.wait, 10)
    return killed_at


def replica_client(address: str) -> FedplaneClient:
    """A client of one replica alone, that tries once: polls must see that replica's own answer."""
    return FedplaneClient(address, interceptors=[], timeout=1.0, retry_attempts=1)


async def hub_status(address: str, client: FedplaneClient | None = None) -> hub_pb2.HubStatus | None:
    """One replica's own answer to GetHubStatus; None while it does not answer."""
    if client is not None:
        try:
            return await client.hub_status()
        except FedplaneError:
            return None
    async with replica_client(address) as own:
        return await hub_status(address, own)


async def until(
    probe: Callable[[], Awaitable[T | None]], within: float, what: str, every: float = STATUS_POLL
) -> T:
    """Poll `probe` until it returns something; BenchError saying `what` did not happen otherwise."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = await probe()
        if found is not None:
            return found
        await asyncio.sleep(every)
    raise BenchError(f"{what} within {within:.0f}s")


# -- the submission stream ------------------------------------------------------------------------


@dataclass
class Submission:
    key: str
    first_try: float  # wall time
    job_id: str = ""
    accepted_at: float = 0.0
    attempts: int = 0
    error: str = ""


class Stream:
    """Submissions at a steady rate through one client (every replica in its target), each
    retried with its idempotency key until a replica accepts it: a job stored by a replica that
    died before answering is found again, never made twice."""

    def __init__(self, client: FedplaneClient, run_id: str, rate: float, job_seconds: float) -> None:
        self.client = client
        self.run_id = run_id
        self.spec = loadgen.job_spec(run_id, 1, job_seconds, QUEUE)
        self.submissions: list[Submission] = []
        self._pacer = Pacer(self._submit, rate, MAX_IN_FLIGHT, "failover-submit")

    async def run(self) -> None:
        """Submit on a fixed timetable until `stop`."""
        await self._pacer.run()

    def stop(self) -> None:
        self._pacer.stop()

    async def drain(self) -> None:
        """Wait for the submissions in flight; each gives up on its own after GIVE_UP_AFTER."""
        await self._pacer.drain()

    async def _submit(self, n: int) -> None:
        sub = Submission(f"{self.run_id}-{n}", time.time())
        self.submissions.append(sub)
        while True:
            sub.attempts += 1
            try:
                job, _ = await self.client.submit(self.spec, sub.key)
            except FedplaneError as exc:
                sub.error = exc.code.name
                if exc.code not in RETRYABLE or time.time() - sub.first_try > GIVE_UP_AFTER:
                    return
                await asyncio.sleep(0.1)
                continue
            sub.job_id, sub.accepted_at = job.id, time.time()
            return

    def accepted(self) -> list[Submission]:
        return [s for s in self.submissions if s.job_id]

    def summary(self) -> dict[str, Any]:
        errors: dict[str, int] = {}
        for s in self.submissions:
            if s.error:
                errors[s.error] = errors.get(s.error, 0) + 1
        return {
            "submitted": len(self.submissions),
            "accepted": len(self.accepted()),
            "retried": sum(1 for s in self.submissions if s.attempts > 1),
            "given_up": sum(1 for s in self.submissions if not s.job_id),
            "errors_seen": errors,
        }


# -- leader failover ------------------------------------------------------------------------------


async def _replicas_settled(fed: Federation) -> hub_pb2.HubStatus | None:
    """A status in which one running replica leads and every other one follows."""
    for name, child in fed.hubs.items():
        if child.process.poll() is not None:
            continue
        status = await hub_status(fed.address(name))
        if status is None or status.leader not in fed.hubs:
            continue
        roles = {r.id: r.role for r in status.replicas}
        if all(
            roles.get(other) == ("leader" if other == status.leader else "follower") for other in fed.hubs
        ):
            return status
    return None


async def failover_round(
    fed: Federation, client: FedplaneClient, stream: Stream, lease: float, number: int, say: Progress
) -> dict[str, Any]:
    """kill -9 the leader; time the survivor's GetHubStatus and first dispatch; restart the dead one."""
    settled = await until(
        lambda: _replicas_settled(fed), WAIT_SLACK, "the replicas did not settle (one leader)"
    )
    leader = settled.leader
    survivor = next(name for name in fed.hubs if name != leader)
    async with replica_client(fed.address(survivor)) as survivor_client:
        await hub_status(fed.address(survivor), survivor_client)  # connected before the kill
        killed_at = await kill(fed.hubs[leader])
        say(f"round {number}: killed the leader {leader} (kill -9)")

        async def names_survivor() -> tuple[float, hub_pb2.HubStatus] | None:
            status = await hub_status(fed.address(survivor), survivor_client)
            return (time.time(), status) if status is not None and status.leader == survivor else None

        async def dispatched_since_kill() -> bool | None:
            """Whether the first job submitted after the kill has left PENDING."""
            after = [s for s in stream.accepted() if s.first_try >= killed_at]
            if not after:
                return None
            with contextlib.suppress(FedplaneError):
                job = await client.get(after[0].job_id)
                if job.status.state != pb.PENDING:
                    return True
            return None

        within = lease * 2 + WAIT_SLACK
        named, _ = await asyncio.gather(
            until(names_survivor, within, f"{survivor} did not say it leads"),
            until(dispatched_since_kill, within, "no job submitted after the kill was dispatched", JOB_POLL),
        )
    named_at, status = named
    fed.check(survivor)
    # Every job that may have waited for the new leader: pending at the kill, or submitted since.
    candidates = [s.job_id for s in stream.accepted() if s.first_try >= killed_at - PENDING_WINDOW]
    first = first_dispatch_after(await client.get_many(candidates), killed_at)
    if first is None:
        raise BenchError("no DISPATCHED transition after the kill in the jobs' histories")
    first_at, first_job = first
    say(
        f"round {number}: {survivor} named leader after {named_at - killed_at:.2f}s, "
        f"first dispatch after {first_at - killed_at:.2f}s"
    )
    await fed.start_hub(leader)
    await until(lambda: _replicas_settled(fed), WAIT_SLACK, f"{leader} did not come back as a follower")
    return {
        "round": number,
        "killed": leader,
        "new_leader": survivor,
        "killed_at": round(killed_at, 3),
        "status_names_new_leader_s": round(named_at - killed_at, 3),
        "leader_since_s": round(_seconds(status.leader_since) - killed_at, 3),
        "first_dispatch_s": round(first_at - killed_at, 3),
        "first_dispatch_job": first_job,
        # The new leader's fencing token is a newer leader key than the dead one's.
        "fencing_revision": {"before": settled.fencing_revision, "after": status.fencing_revision},
    }


async def failover(params: FailoverParams, lease: float, root: Path, say: Progress) -> dict[str, Any]:
    """Two replicas, `params.clusters` clusters, a stream of submissions, `params.rounds` kills."""
    fed = Federation(root)
    defaults = HubConfig()
    try:
        fed.start_servers()
        for name in ("hub-a", "hub-b"):
            fed.add_hub(
                name,
                lease=lease,
                unknown=defaults.cluster_unknown_after_seconds,
                lost=defaults.cluster_lost_after_seconds,
                requeue_after=defaults.disconnect.requeue_after_seconds,
            )
        # The first replica alone first, so that it leads; the second follows.
        await fed.start_hub("hub-a")
        clusters = fed.start_agents(params.clusters, params.agent_heartbeat)
        await fed.start_hub("hub-b")
        say(f"lease {lease:g}s: two hub replicas and {len(clusters)} clusters on {fed.target}")
        run_id = f"failover-{lease:g}-{int(time.time() * 1000):x}"
        async with FedplaneClient(
            fed.target, interceptors=[], timeout=CALL_TIMEOUT, retry_attempts=1
        ) as client:
            await wait_ready(client, clusters, NODES, list(fed.children))
            stream = Stream(client, run_id, params.rate, params.job_seconds)
            submitting = asyncio.create_task(stream.run(), name="failover-stream")
            rounds: list[dict[str, Any]] = []
            try:
                for number in range(1, params.rounds + 1):
                    await asyncio.sleep(params.steady_seconds)
                    fed.check(*clusters)
                    rounds.append(await failover_round(fed, client, stream, lease, number, say))
                await asyncio.sleep(params.steady_seconds)
            finally:
                stream.stop()
                await submitting
                await stream.drain()
            accepted = [s.job_id for s in stream.accepted()]
            jobs = await _read_finished(client, run_id, len(accepted), params.job_seconds + WAIT_SLACK)
        checks = integrity(accepted, jobs, starts(fed.ledgers.values()))
        say(
            f"lease {lease:g}s: {checks['accepted']} jobs accepted, {checks['lost']} lost, "
            f"{checks['dispatched_twice']} dispatched twice"
        )
        return {
            "lease_s": lease,
            "clusters": len(clusters),
            "rate_per_s": params.rate,
            "rounds": rounds,
            "status_names_new_leader_s": spread([r["status_names_new_leader_s"] for r in rounds]),
            "leader_since_s": spread([r["leader_since_s"] for r in rounds]),
            "first_dispatch_s": spread([r["first_dispatch_s"] for r in rounds]),
            "expected": expected(
                defaults.cluster_unknown_after_seconds, defaults.cluster_lost_after_seconds, 0.0, lease
            )["takeover_s"],
            "submissions": stream.summary(),
            "integrity": checks,
        }
    finally:
        fed.stop()


async def _read_finished(
    client: FedplaneClient, run_id: str, accepted: int, within: float
) -> dict[str, pb.Job]:
    """Every job of the run, once none is waiting to start (or after `within` seconds)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(FedplaneError):
            stats = await client.job_stats(QUEUE)
            waiting = sum(stats.by_state.get(s, 0) for s in ("PENDING", "DISPATCHED", "ADMITTED"))
            if stats.total >= accepted and waiting == 0:
                break
        await asyncio.sleep(JOB_POLL)
    jobs: dict[str, pb.Job] = {}
    async for page in client.pages(labels={loadgen.RUN_LABEL: run_id}, page_size=loadgen.PAGE_SIZE):
        for job in page.jobs:
            jobs[job.id] = job
    return jobs


# -- cluster lost ---------------------------------------------------------------------------------


def requeue_of(job: pb.Job) -> tuple[float, str] | None:
    """When and why the hub first sent the job back to PENDING."""
    for i, t in enumerate(job.status.history):
        if i > 0 and t.state == pb.PENDING:
            return _seconds(t.time), t.reason
    return None


async def cluster_lost(
    params: FailoverParams,
    *,
    label: str,
    unknown: float,
    lost: float,
    heartbeat: float,
    root: Path,
    say: Progress,
) -> dict[str, Any]:
    """Long jobs on one cluster, its agent killed, the other cluster with room: time the loss."""
    fed = Federation(root)
    try:
        fed.start_servers()
        fed.add_hub(
            "hub-a", lease=HubConfig().leader_lease_seconds, unknown=unknown, lost=lost, requeue_after=0.0
        )
        await fed.start_hub("hub-a")
        victim, spare, *_ = fed.start_agents(2, heartbeat)
        run_id = f"lost-{label}-{int(time.time() * 1000):x}"
        async with FedplaneClient(fed.address("hub-a"), interceptors=[], timeout=CALL_TIMEOUT) as client:
            await wait_ready(client, [victim, spare], NODES, list(fed.children))
            # Cordoned while the jobs are placed, so that all of them run on the victim.
            await client.cordon(spare, "fedplane.bench.failover: jobs go to the cluster to lose")
            spec = loadgen.job_spec(run_id, 1, params.lost_job_seconds, QUEUE)
            submitted = await client.submit_many([(spec, f"{run_id}-{i}") for i in range(params.lost_jobs)])
            ids = [job.id for job, _ in submitted]

            async def running_on(cluster: str) -> list[pb.Job] | None:
                jobs = await client.get_many(ids)
                ok = all(j.status.state == pb.RUNNING and j.status.cluster == cluster for j in jobs)
                return jobs if ok else None

            await until(
                lambda: running_on(victim), WAIT_SLACK, f"the jobs did not all run on {victim}", JOB_POLL
            )
            await client.uncordon(spare)
            say(f"{label}: {len(ids)} jobs running on {victim}; killing its agent (SIGKILL)")
            killed_at = await kill(fed.agents[victim])
            seen: dict[int, float] = {}

            async def lost_seen() -> tuple[float, pb.Cluster] | None:
                cluster = await client.cluster(victim)
                now = time.time()
                seen.setdefault(cluster.health, now)
                return (now, cluster) if cluster.health == pb.LOST else None

            lost_at, record = await until(
                lost_seen, lost + WAIT_SLACK, f"{victim} was not LOST", CLUSTER_POLL
            )
            last_heartbeat = _seconds(record.last_heartbeat)
            say(f"{label}: {victim} LOST {lost_at - last_heartbeat:.2f}s after its last heartbeat")
            jobs = await until(
                lambda: running_on(spare), WAIT_SLACK, f"the jobs did not all run on {spare}", CLUSTER_POLL
            )
            fed.check(spare)
            recorded = await client.cluster(victim)
            everything = {job.id: job for job in await client.get_many(ids)}
        checks = integrity(ids, everything, starts(fed.ledgers.values()))
        requeued = [r for r in (requeue_of(j) for j in jobs) if r is not None]
        running = [t for t in (transition_time(j, pb.RUNNING, cluster=spare) for j in jobs) if t is not None]
        if len(running) != len(jobs) or len(requeued) != len(jobs):
            raise BenchError("a moved job's history lacks its requeue or its RUNNING on the other cluster")

        def since(at: float | None) -> float | None:
            return round(at - last_heartbeat, 3) if at is not None else None

        return {
            "label": label,
            "heartbeat_s": heartbeat,
            "unknown_after_s": unknown,
            "lost_after_s": lost,
            "requeue_after_s": 0.0,
            "jobs": len(ids),
            "lost_cluster": victim,
            "other_cluster": spare,
            "killed_after_last_heartbeat_s": since(killed_at),
            # From the cluster's last heartbeat (as the hub recorded it), by polling GetCluster.
            "unknown_s": since(seen.get(pb.UNKNOWN)),
            "lost_s": since(lost_at),
            # The loss as the leader recorded it in the cluster's record (lost_time).
            "lost_recorded_s": since(
                _seconds(recorded.lost_time) if recorded.HasField("lost_time") else None
            ),
            # From the jobs' histories.
            "requeued_s": {
                "first": since(min(t for t, _ in requeued)),
                "last": since(max(t for t, _ in requeued)),
            },
            "requeue_reasons": sorted({reason for _, reason in requeued}),
            "running_elsewhere_s": {"first": since(min(running)), "last": since(max(running))},
            "from_kill": {
                "lost_s": round(lost_at - killed_at, 3),
                "running_elsewhere_last_s": round(max(running) - killed_at, 3),
            },
            "expected": expected(unknown, lost, 0.0, HubConfig().leader_lease_seconds),
            "integrity": checks,
        }
    finally:
        fed.stop()


# -- the run --------------------------------------------------------------------------------------


def _limit(params: FailoverParams) -> float:
    """A bound on the whole run, far above what it takes, so that it always ends."""
    failovers = sum(
        2 * STARTUP + params.rounds * (2 * lease + 3 * WAIT_SLACK + params.steady_seconds) + 2 * WAIT_SLACK
        for lease in params.leases
    )
    lost = [params.lost_after] + ([HubConfig().cluster_lost_after_seconds] if params.defaults else [])
    return failovers + sum(STARTUP + value + 4 * WAIT_SLACK for value in lost)


def run(params: FailoverParams, progress: Progress | None = None) -> dict[str, Any]:
    """Run every measurement and return the result. Call it from the main thread: the children's
    parent-death signal follows the thread that started them."""
    return asyncio.run(run_async(params, progress))


async def run_async(params: FailoverParams, progress: Progress | None = None) -> dict[str, Any]:
    problems = params.problems()
    if problems:
        raise BenchError("; ".join(problems))
    say = progress or (lambda _: None)
    root = Path(tempfile.mkdtemp(prefix="fedplane-failover-"))
    started = time.time()
    limit = _limit(params)
    try:
        async with bounded(limit, hub="a hub"):
            failovers = [
                await failover(params, lease, root / f"failover-{lease:g}s", say) for lease in params.leases
            ]
            losses = [
                await cluster_lost(
                    params,
                    label="short",
                    unknown=params.unknown_after,
                    lost=params.lost_after,
                    heartbeat=params.agent_heartbeat,
                    root=root / "lost-short",
                    say=say,
                )
            ]
            if params.defaults:
                hub, agent = HubConfig(), AgentConfig()
                losses.append(
                    await cluster_lost(
                        params,
                        label="defaults",
                        unknown=hub.cluster_unknown_after_seconds,
                        lost=hub.cluster_lost_after_seconds,
                        heartbeat=agent.heartbeat_interval_seconds,
                        root=root / "lost-defaults",
                        say=say,
                    )
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    checks = [f["integrity"] for f in failovers] + [c["integrity"] for c in losses]
    return {
        "params": {**dataclasses.asdict(params), "leases": list(params.leases)},
        "failover": failovers,
        "cluster_lost": losses,
        "expected_defaults": expected_defaults(),
        "ok": all(c["lost"] == 0 and c["dispatched_twice"] == 0 and c["ran_twice"] == 0 for c in checks),
        "versions": versions(),
        "machine": machine(),
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
    }


# -- the report -----------------------------------------------------------------------------------


def _s(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _spread(figures: Mapping[str, Any]) -> str:
    return "/".join(_s(figures.get(k)) for k in ("min", "median", "max"))


def _range(figures: Mapping[str, Any], low: str = "min", high: str = "max") -> str:
    return f"{_s(figures.get(low))}-{_s(figures.get(high))}"


def _count(value: int) -> Text:
    return Text(str(value), "bold red" if value else "")


def render(result: Mapping[str, Any]) -> RenderableType:
    """Rich tables: the failovers, the cluster losses, and the defaults' figures by formula."""
    leader = Table(
        title="Leader failover: kill -9 the leading hub (seconds from the kill)",
        title_justify="left",
        caption="min/median/max over the rounds; twice: dispatched twice, or started more than dispatched",
        caption_justify="left",
    )
    for column in (
        "lease",
        "rounds",
        "new leader named",
        "its first dispatch",
        "expected",
        "jobs",
        "lost",
        "twice",
    ):
        leader.add_column(column, justify="right")
    for f in result["failover"]:
        checks = f["integrity"]
        leader.add_row(
            f"{f['lease_s']:g}",
            str(len(f["rounds"])),
            _spread(f["status_names_new_leader_s"]),
            _spread(f["first_dispatch_s"]),
            _range(f["expected"]),
            str(checks["accepted"]),
            _count(checks["lost"]),
            _count(checks["dispatched_twice"] + checks["ran_twice"]),
        )
    lost = Table(
        title="Cluster lost: its agent killed (seconds from its last heartbeat)",
        title_justify="left",
        caption="thresholds: unknown/lost/requeue after, seconds; first-last job",
        caption_justify="left",
    )
    for column in (
        "thresholds",
        "UNKNOWN",
        "LOST",
        "expected",
        "requeued",
        "RUNNING elsewhere",
        "jobs",
        "lost",
        "twice",
    ):
        lost.add_column(column, justify="right")
    for c in result["cluster_lost"]:
        checks = c["integrity"]
        lost.add_row(
            f"{c['unknown_after_s']:g}/{c['lost_after_s']:g}/{c['requeue_after_s']:g}",
            _s(c["unknown_s"]),
            _s(c["lost_recorded_s"] if c["lost_recorded_s"] is not None else c["lost_s"]),
            _range(c["expected"]["lost_after_s"]),
            _range(c["requeued_s"], "first", "last"),
            _range(c["running_elsewhere_s"], "first", "last"),
            str(checks["accepted"]),
            _count(checks["lost"]),
            _count(checks["dispatched_twice"] + checks["ran_twice"]),
        )
    d = result["expected_defaults"]
    formula = Text(
        f"With the defaults, by formula: a dead leader is replaced {_range(d['takeover_s'])}s after it dies "
        f"(lease {d['leader_lease_s']:g}s); a silent cluster is UNKNOWN at {d['unknown_after_s']:g}s "
        f"and LOST at {_range(d['lost_after_s'])}s after its last heartbeat, and its jobs are requeued "
        f"{d['requeue_after_s']:g}s later (running elsewhere at {_range(d['running_elsewhere_s'])}s)."
    )
    verdict = (
        Text("No job lost, none dispatched or run twice.", "green")
        if result["ok"]
        else Text(
            "A CHECK FAILED: jobs lost, or dispatched or run twice (see the JSON's examples).", "bold red"
        )
    )
    return Group(leader, Text(""), lost, Text(""), formula, verdict)


def parse_args(argv: Sequence[str] | None = None) -> tuple[FailoverParams, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m fedplane.bench.failover",
        description=(__doc__ or "").split("\n\n")[0],
    )
    d = FailoverParams()
    parser.add_argument("--rounds", type=int, default=d.rounds, help="leader kills per lease")
    parser.add_argument(
        "--leases",
        default=",".join(f"{x:g}" for x in d.leases),
        help="leader leases to measure, seconds (e.g. 2,5)",
    )
    parser.add_argument(
        "--clusters", type=int, default=d.clusters, help="simulated clusters in the failover runs"
    )
    parser.add_argument("--rate", type=float, default=d.rate, help="submissions per second during failover")
    parser.add_argument(
        "--heartbeat", type=float, default=d.agent_heartbeat, help="agents' heartbeat, seconds"
    )
    parser.add_argument(
        "--unknown-after", type=float, default=d.unknown_after, help="cluster unknown threshold"
    )
    parser.add_argument("--lost-after", type=float, default=d.lost_after, help="cluster lost threshold")
    parser.add_argument("--lost-jobs", type=int, default=d.lost_jobs, help="jobs on the cluster that is lost")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="also measure a cluster lost with the default thresholds (15 s / 60 s; about 80 s more)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result JSON here")
    args = parser.parse_args(argv)
    try:
        leases = tuple(float(x) for x in args.leases.split(",") if x.strip())
    except ValueError:
        parser.error(f"--leases: {args.leases!r} must be comma-separated seconds, e.g. 2,5")
    params = FailoverParams(
        rounds=args.rounds,
        leases=leases,
        clusters=args.clusters,
        rate=args.rate,
        agent_heartbeat=args.heartbeat,
        unknown_after=args.unknown_after,
        lost_after=args.lost_after,
        lost_jobs=args.lost_jobs,
        defaults=args.defaults,
    )
    problems = params.problems()
    if problems:
        parser.error("; ".join(problems))
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: {args.json.parent} is not a directory")
    return params, args.json


async def _until_terminated(params: FailoverParams, progress: Progress) -> dict[str, Any]:
    """`run_async`, cancelled by SIGTERM as by Ctrl-C, so that it stops its processes either way."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run_async(params, progress)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> None:
    """Exit 0 when every check passed, 1 when a job was lost or run twice, 2 when the run failed,
    130 when interrupted (Ctrl-C or SIGTERM), having stopped every process it started."""
    params, json_path = parse_args(argv)
    say: Progress = lambda line: print(f"failover: {line}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        result = asyncio.run(_until_terminated(params, say))
    except BenchError as exc:
        print(f"failover: {exc}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("failover: interrupted; every process stopped", file=sys.stderr)
        sys.exit(130)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # a file or a pipe: whole tables, not 80 columns
    console.print(render(result))
    if not result["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
