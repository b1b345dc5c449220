"""The `fedplane bench` orchestrator: start a federation, load it from outside, measure it, stop it.

Processes: etcd and nats-server (`fedplane.embedded`), the hub (`python -m fedplane hub`, as an
operator runs it), the fleet of simulated clusters and the load generator. The hub, fleet and
load generator are separate Python processes, so each one's CPU and memory can be read apart
from /proc. Every child gets SIGTERM if this process dies (setpriv --pdeathsig), and the whole
run has a deadline, so a benchmark never hangs and never leaves a server behind.

Capacity: every pod requests 1 cpu, so the federation must hold every job's whole gang at
the same time:

    clusters x nodes x node_cpu  >=  sum of the gang sizes of all jobs (measured + --queued)

A smaller federation would make jobs wait for others to finish, and the run would measure the
jobs' duration instead of the control plane; such parameters are refused up front.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from fedplane.bench import kube, loadgen, procstat
from fedplane.bench.fleet import cluster_name
from fedplane.client.sdk import FedplaneClient, FedplaneError
from fedplane.local import kubeapiserver
from fedplane.local import servers as embedded
from fedplane.local.security import LocalSecurity
from fedplane.runtime.version import __version__
from fedplane.v1 import types_pb2 as pb

__all__ = ["BenchError", "BenchParams", "bounded", "run", "run_async"]

# Big transactions and a big database: the benchmark must not measure etcd's default limits.
ETCD_ARGS = ("--quota-backend-bytes=8589934592", "--max-txn-ops=1024")
BACKLOG_QUEUE = "bench-backlog"
# `--queues`: at most the hub's limit on queues; the tree's one flavor (every cluster's cpus).
MAX_QUEUES = 1000
QUEUE_QUOTAS = ("generous", "tight")
BENCH_FLAVOR = "bench-cpu"
BACKLOG_PRIORITY = -1
BACKLOG_BATCH = 1000
BACKLOG_CONCURRENCY = 4
SAMPLE_INTERVAL = 0.2
PROGRESS_INTERVAL = 5.0
STOP_GRACE = 10.0
# Starting the servers, the hub and the fleet, and waiting for every cluster to be ready.
STARTUP_TIMEOUT = 120.0
# Reading the run back and stopping everything, on top of --timeout.
FINISH_ALLOWANCE = loadgen.READ_TIMEOUT + 60.0
Progress = Callable[[str], None]
# `--backend kubernetes`: called with the result and the member clusters by name before they
# stop, to check the Jobs in them (tests/kube/test_kube_bench.py).
Inspect = Callable[[dict[str, Any], Mapping[str, kubeapiserver.KubeAPIServer]], Awaitable[None]]


class BenchError(RuntimeError):
    """Bad parameters or a federation that failed to start or run; printable on one line."""


@dataclass(frozen=True)
class BenchParams:
    clusters: int = 10
    nodes: int = 100
    node_cpu: int = 64
    node_memory: str = "256Gi"
    gpus_per_node: int = 0
    heartbeat: float = 2.0
    jobs: int = 20_000
    # Offered jobs/s; 0 = as fast as the hub accepts.
    rate: float = 0.0
    # Simulated run time of each job, seconds.
    duration: float = 30.0
    # 1 = one SubmitJob per job; more = SubmitJobs of this many jobs.
    batch_size: int = 1
    gangs: tuple[int, ...] = (1,)
    # RPCs in flight with rate 0; 0 = 64 for single submits, 4 for batches.
    concurrency: int = 0
    max_in_flight: int = 5000
    # Jobs queued (all clusters cordoned) before the measured load, then drained.
    queued: int = 0
    # With a backlog: watch the drain this long instead of until the queue is empty (0), so a
    # deep queue is measured dispatching without the federation having room for all of it.
    drain_seconds: float = 0.0
    # Bound on the measured load (submitting and waiting for every job to run), seconds.
    timeout: float = 600.0
    # Run as production must: TLS and a token on gRPC, etcd over TLS with RBAC, agents
    # admitted by key through the hub's NATS auth callout (what security costs is measured so).
    secure: bool = False
    # 0: every job in one implicit queue (the hub runs with implicit_queues). N: the jobs go
    # round-robin to N queues of a cohort tree applied first (`queue_objects`).
    queues: int = 0
    # The tree's quotas: "generous" never blocks (the figure is the queueing layer's cost);
    # "tight" holds half the measured jobs' pods, so jobs also wait for quota.
    queue_quota: str = "generous"
    # simulated: one fleet process of simulated clusters. kubernetes: each cluster a real
    # kube-apiserver and etcd with its own agent process (`fedplane.bench.kube`).
    backend: str = "simulated"

    @property
    def capacity_cpus(self) -> int:
        return self.clusters * self.nodes * self.node_cpu

    @property
    def pods_needed(self) -> int:
        """Pods (of 1 cpu each) of the measured jobs plus the backlog, gangs cycled over each."""
        queued = self.queued if not self.drain_seconds else 0
        return _pods(self.jobs, self.gangs) + _pods(queued, self.gangs)

    def load_params(self, hub: str, run_id: str, ca_file: str = "", token: str = "") -> loadgen.LoadParams:
        return loadgen.LoadParams(
            ca_file=ca_file,
            token=token,
            hub=hub,
            jobs=self.jobs,
            rate=self.rate,
            batch_size=self.batch_size,
            gangs=self.gangs,
            duration=self.duration,
            run_id=run_id,
            queues=self.queues,
            concurrency=self.concurrency,
            max_in_flight=self.max_in_flight,
            timeout=self.timeout,
            backend=self.backend,
        )

    def problems(self) -> list[str]:
        """Every invalid setting, as `--option: problem`; the capacity check only once they are valid."""
        out = self.load_params("-", "-").problems()
        for name in ("clusters", "nodes", "node_cpu"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')}: must be at least 1 (got {getattr(self, name)})")
        if self.gpus_per_node < 0:
            out.append(f"--gpus-per-node: must not be negative (got {self.gpus_per_node})")
        if self.queued < 0:
            out.append(f"--queued: must not be negative (got {self.queued})")
        if not math.isfinite(self.heartbeat) or self.heartbeat <= 0:
            out.append(f"--heartbeat: must be a positive number of seconds (got {self.heartbeat})")
        if self.queues > MAX_QUEUES:
            out.append(f"--queues: at most {MAX_QUEUES} (got {self.queues})")
        if self.queue_quota not in QUEUE_QUOTAS:
            out.append(f"--queue-quota: one of {', '.join(QUEUE_QUOTAS)} (got {self.queue_quota!r})")
        if self.backend == "kubernetes" and self.clusters > kube.MAX_CLUSTERS:
            out.append(
                f"--clusters: at most {kube.MAX_CLUSTERS} with --backend kubernetes "
                f"(each is a kube-apiserver, an etcd and an agent; got {self.clusters})"
            )
        if self.backend == "kubernetes" and self.queued:
            out.append("--queued: not supported with --backend kubernetes")
        if self.queues and self.queued and self.drain_seconds:
            # The load's jobs are then told apart from the backlog left queued by their queue,
            # which a run over many queues cannot do (it polls every queue's counts).
            out.append("--queues: cannot be combined with --queued and --drain-seconds")
        if out:
            return out
        per_cluster = self.nodes * self.node_cpu
        if max(self.gangs) > per_cluster:
            out.append(
                f"--gangs: a gang of {max(self.gangs)} pods (1 cpu each) cannot fit in one cluster of "
                f"{self.nodes} nodes x {self.node_cpu} cpus = {per_cluster} cpus"
            )
        elif self.pods_needed > self.capacity_cpus:
            jobs = f"{self.jobs:,} jobs" + (f" + {self.queued:,} queued" if self.queued else "")
            out.append(
                f"the federation is too small: {jobs} with gangs {','.join(map(str, self.gangs))} need "
                f"{self.pods_needed:,} cpus at once (1 per pod), but {self.clusters} clusters x "
                f"{self.nodes} nodes x {self.node_cpu} cpus = {self.capacity_cpus:,}; "
                "raise --clusters, --nodes or --node-cpu"
            )
        return out


def _pods(jobs: int, gangs: Sequence[int]) -> int:
    whole, rest = divmod(jobs, len(gangs))
    return whole * sum(gangs) + sum(gangs[:rest])


def departments(queues: int) -> int:
    return max(1, round(math.sqrt(queues)))


def queue_objects(params: BenchParams) -> pb.QueueObjects:
    """The cohort tree `--queues N` applies before the load: a root cohort, sqrt(N)
    departments under it, the N queues the jobs go to (`loadgen.queue_names`) spread over
    them, and one flavor, every cluster's cpus (the jobs request nothing else).

    generous: each queue's nominal is an Nth of the federation's cpus, without limits, so
    together the quotas hold every job at once and never block. tight: 80% of half the
    measured jobs' pods is split over the queues (each lends at most half), 10% over the
    departments and 10% is the root's, so half the jobs wait for earlier ones to finish.
    """
    load = params.load_params("-", "-")
    names = loadgen.queue_names(load.queue, load.queues)
    count = len(names)
    groups = departments(count)
    millicores = 1000
    objects = pb.QueueObjects(flavors=[pb.ResourceFlavor(name=BENCH_FLAVOR)])

    def quota(nominal: int, lending: int | None = None) -> list[pb.FlavorQuotas]:
        flavor = pb.FlavorQuotas(flavor=BENCH_FLAVOR)
        flavor.resources["cpu"].nominal = nominal
        if lending is not None:
            flavor.resources["cpu"].lending_limit = lending
        return [flavor]

    root = "bench-org"
    if params.queue_quota == "tight":
        total = _pods(params.jobs, params.gangs) // 2 * millicores
        per_queue = max(1, total * 8 // 10 // count)
        queue_quotas = quota(per_queue, per_queue // 2)
        objects.cohorts.add(name=root, quotas=quota(total // 10))
        department_quotas = quota(total // 10 // groups)
    else:
        per_queue = -(-params.capacity_cpus * millicores // count)
        queue_quotas = quota(per_queue)
        objects.cohorts.add(name=root)
        department_quotas = []
    width = len(str(groups - 1))
    for d in range(groups):
        objects.cohorts.add(name=f"bench-dept-{d:0{width}d}", parent=root, quotas=department_quotas)
    for k, name in enumerate(names):
        dept = f"bench-dept-{k * groups // count:0{width}d}"
        objects.queues.add(name=name, cohort=dept, quotas=queue_quotas)
    return objects


# -- child processes ------------------------------------------------------------------------------


@dataclass
class Child:
    """A Python child process (hub, fleet, load generator) with its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def last_line(self) -> str:
        """The last non-empty line of the log: usually the error that ended the process."""
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1][:500] if lines else ""

    def check(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise BenchError(f"the {self.name} exited with code {code}: {self.last_line() or 'no output'}")


def _child_env() -> dict[str, str]:
    """This environment, minus overrides that would change the hub's config behind the benchmark."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FEDPLANE_HUB_", "FEDPLANE_LOG_", "OTEL_"))
    }
    return env


def spawn(name: str, args: Sequence[str], root: Path) -> Child:
    log_path = root / f"{name}.log"
    return Child(name, embedded.spawn_logged(args, log_path, _child_env()), log_path)


def stop_children(children: Sequence[Child], grace: float = STOP_GRACE) -> None:
    """SIGTERM every child at once, then SIGKILL whatever is still running after `grace` seconds."""
    running = [c for c in children if c.process.poll() is None]
    for child in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in running:
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.process.wait(5)


# -- /proc sampling -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far; None once it is gone."""
    try:
        return procstat.cpu_seconds(pid)
    except OSError:
        return None


def memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak resident set) of a process in bytes, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


@dataclass
class Sampler:
    """CPU time and RSS of named processes every SAMPLE_INTERVAL, for figures over any window."""

    pids: dict[str, int]
    samples: list[tuple[float, dict[str, float], dict[str, int]]] = field(default_factory=list)

    def sample(self) -> None:
        cpu: dict[str, float] = {}
        rss: dict[str, int] = {}
        for name, pid in self.pids.items():
            used = cpu_seconds(pid)
            if used is not None:
                cpu[name] = used
            resident = memory(pid).get("VmRSS")
            if resident is not None:
                rss[name] = resident
        self.samples.append((time.time(), cpu, rss))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)

    def _cpu_at(self, name: str, when: float) -> float | None:
        """CPU seconds used by `when`, interpolated between the samples around it."""
        points = [(t, cpu[name]) for t, cpu, _ in self.samples if name in cpu]
        if not points:
            return None
        if when <= points[0][0]:
            return points[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(points):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * ((when - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return points[-1][1]

    def window(self, start: float, end: float) -> dict[str, dict[str, Any]]:
        """Per process: CPU seconds and average cores used in [start, end], and the largest RSS seen."""
        out: dict[str, dict[str, Any]] = {}
        span = end - start
        for name in self.pids:
            before, after = self._cpu_at(name, start), self._cpu_at(name, end)
            used = after - before if before is not None and after is not None else None
            seen = [rss[name] for t, _, rss in self.samples if start <= t <= end and name in rss]
            out[name] = {
                "cpu_seconds": round(used, 2) if used is not None else None,
                "cores": round(used / span, 2) if used is not None and span > 0 else None,
                "rss_max_sampled_bytes": max(seen, default=None),
            }
        return out


def peak_memory(sampler: Sampler) -> dict[str, int | None]:
    """Each process's peak resident set: VmHWM while it runs, else the most sampled (an upper
    bound of what they need together, since each peaks at its own time)."""
    out: dict[str, int | None] = {}
    for name, pid in sampler.pids.items():
        sampled = max((rss[name] for _, _, rss in sampler.samples if name in rss), default=None)
        out[name] = memory(pid).get("VmHWM") or sampled
    return out


# -- the run --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bounded(limit: float, hub: str = "the hub") -> AsyncIterator[None]:
    """Bound a run to `limit` seconds and raise what can end it (the deadline, a server that does
    not start, a refused call, the OS) as one BenchError: the CLI prints a line, not a traceback.
    `hub` names, in that line, who refused a call."""
    try:
        async with asyncio.timeout(limit):
            yield
    except TimeoutError:
        raise BenchError(f"the benchmark did not finish within {limit:.0f}s and was stopped") from None
    except embedded.EmbeddedError as exc:
        raise BenchError(str(exc).splitlines()[0]) from None
    except FedplaneError as exc:
        raise BenchError(f"{hub} refused a benchmark call: {exc}") from None
    except OSError as exc:
        raise BenchError(f"cannot run the benchmark: {exc}") from None


def run(params: BenchParams, progress: Progress | None = None) -> dict[str, Any]:
    """Run one benchmark and return its result (see docs/performance.md for every figure).

    Call it from the main thread: the children's parent-death signal follows the thread that
    started them. Raises BenchError for invalid parameters or a federation that fails.
    """
    return asyncio.run(run_async(params, progress))


async def run_async(
    params: BenchParams, progress: Progress | None = None, inspect: Inspect | None = None
) -> dict[str, Any]:
    problems = params.problems()
    if problems:
        raise BenchError("; ".join(problems))
    say = progress or (lambda _: None)
    root = Path(tempfile.mkdtemp(prefix="fedplane-benchmark-"))
    children: list[Child] = []
    servers: list[embedded.ServerProcess] = []
    members = Members()
    limit = STARTUP_TIMEOUT + params.timeout * (2 if params.queued else 1) + FINISH_ALLOWANCE
    started = time.time()
    try:
        async with bounded(limit):
            result = await _bench(params, root, children, servers, members, say, inspect)
    finally:
        say("stopping the federation")
        kube.stop_watches(list(members.watches.values()))
        stop_children(children)
        for member in members.servers.values():
            member.terminate()
        for member in members.servers.values():
            member.stop()
        kube.join_watches(list(members.watches.values()))
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    result["started_at"] = datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds")
    result["wall_seconds"] = round(time.time() - started, 1)
    return result


@dataclass
class Members:
    """`--backend kubernetes`: the member apiservers and the watches on their Jobs, by cluster."""

    servers: dict[str, kubeapiserver.KubeAPIServer] = field(default_factory=dict)
    watches: dict[str, kube.JobWatch] = field(default_factory=dict)


async def _launch_members(params: BenchParams, root: Path, members: Members, say: Progress) -> None:
    """Start every member's etcd and kube-apiserver, without waiting for the apiservers (they
    get ready while the hub starts). Run from the main thread (the servers' parent-death signal)."""
    try:
        binary = await asyncio.to_thread(kubeapiserver.build_binary)
    except kubeapiserver.KubeAPIServerError as exc:
        raise BenchError(str(exc).splitlines()[0]) from None
    say(f"starting {params.clusters} kube-apiservers, each on its own etcd ({binary})")
    for i in range(params.clusters):
        name = kube.cluster_name(i)
        try:
            members.servers[name] = kubeapiserver.launch(binary, root / name)
        except subprocess.CalledProcessError as exc:  # openssl, making the apiserver's keys
            raise BenchError(f"cannot start the kube-apiserver of {name}: {exc}") from None


async def _start_members(
    params: BenchParams,
    root: Path,
    nats_url: str,
    security: LocalSecurity | None,
    members: Members,
    children: list[Child],
    pids: dict[str, int],
    say: Progress,
) -> list[Child]:
    """Once the launched apiservers are ready: one agent each, the Job watches and the fake
    Nodes; returns the agents."""
    try:
        await asyncio.gather(
            *(asyncio.to_thread(s.wait_ready, STARTUP_TIMEOUT) for s in members.servers.values())
        )
    except kubeapiserver.KubeAPIServerError as exc:
        raise BenchError(str(exc).splitlines()[0]) from None
    agents: list[Child] = []
    for i, (name, server) in enumerate(members.servers.items()):
        config = kube.agent_config(
            name,
            server,
            nats_url,
            params.heartbeat,
            bootstrap_token_file=str(security.nats.bootstrap_token_file) if security is not None else "",
            nats_ca_file=str(security.ca.cert_file) if security is not None else "",
        )
        path = kube.write_agent_config(root / f"agent-{name}.yaml", config)
        agent = spawn(
            f"agent {name}", [sys.executable, "-m", "fedplane.client", "agent", "--config", str(path)], root
        )
        children.append(agent)
        agents.append(agent)
        pids[f"agent-{i}"] = agent.pid
        pids[f"kube-apiserver-{i}"] = server.process.pid
        pids[f"kube-etcd-{i}"] = server.etcd.process.pid
        watch = kube.JobWatch(server)
        watch.start()
        members.watches[name] = watch
    # While the agents start: they report the Nodes as their watches see them appear.
    say(f"creating {params.nodes} fake Nodes of {params.node_cpu} cpus per cluster (no kubelet runs)")
    await asyncio.gather(
        *(
            kube.create_nodes(s, params.nodes, params.node_cpu, params.node_memory)
            for s in members.servers.values()
        )
    )
    return agents


async def _bench(
    params: BenchParams,
    root: Path,
    children: list[Child],
    servers: list[embedded.ServerProcess],
    members: Members,
    say: Progress,
    inspect: Inspect | None = None,
) -> dict[str, Any]:
    run_id = f"b{int(time.time() * 1000):x}"
    say(f"starting etcd and NATS in {root}" + (" (secured)" if params.secure else ""))
    security = LocalSecurity.create(root / "security") if params.secure else None
    settings: dict[str, Any] = {"insecure": True, "implicit_queues": True}
    if security is not None:
        etcd, secured = security.start_etcd(root / "etcd", extra_args=ETCD_ARGS)
        servers.append(etcd)
        # The bench submits to one implicit queue, secured or not.
        settings = {**security.hub_settings(secured), "implicit_queues": True}
    else:
        etcd = embedded.start_etcd(root / "etcd", extra_args=ETCD_ARGS)
        servers.append(etcd)
        settings["etcd_endpoint"] = etcd.address
    nats = security.start_nats(root / "nats") if security is not None else embedded.start_nats(root / "nats")
    servers.append(nats)
    if params.backend == "kubernetes":
        await _launch_members(params, root, members, say)
    port = embedded.free_port()
    hub_address = f"127.0.0.1:{port}"
    ca_file = str(security.ca.cert_file) if security is not None else ""
    token = security.admin_token if security is not None else ""
    config = root / "hub.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": hub_address,
                **settings,
                "nats_url": f"nats://{nats.address}",
                # Generous: a saturated 2-core machine must not make a cluster look dead.
                "cluster_unknown_after_seconds": 30.0,
                # The embedded etcd allows 1,024 operations per transaction (ETCD_ARGS).
                "etcd_max_txn_ops": 1024,
                # Production logging: one JSON line per dispatched job, as operators run it.
                "telemetry": {"exporter": "none", "log_level": "info", "log_format": "json"},
            }
        )
    )
    say(f"starting the hub on {hub_address}")
    hub = spawn("hub", [sys.executable, "-m", "fedplane.client", "hub", "--config", str(config)], root)
    children.append(hub)
    await wait_listening(hub, "127.0.0.1", port)
    pids = {"hub": hub.pid, "etcd": etcd.process.pid, "nats": nats.process.pid}
    if params.backend == "kubernetes":
        agents = await _start_members(
            params, root, f"nats://{nats.address}", security, members, children, pids, say
        )
        watched = (hub, *agents)
        names = list(members.servers)
    else:
        say(f"starting {params.clusters} simulated clusters x {params.nodes} nodes")
        fleet_args = _fleet_args(params, f"nats://{nats.address}")
        if security is not None:
            fleet_args.append(f"--bootstrap-token-file={security.nats.bootstrap_token_file}")
            fleet_args.append(f"--nats-ca-file={security.ca.cert_file}")
        fleet = spawn("fleet", fleet_args, root)
        children.append(fleet)
        pids["fleet"] = fleet.pid
        watched = (hub, fleet)
        names = [cluster_name(i) for i in range(params.clusters)]
    sampler = Sampler(pids)
    sampling = asyncio.create_task(sampler.run(), name="bench-sampler")
    try:
        async with params.load_params(hub_address, run_id, ca_file, token).client() as client:
            await wait_ready(client, names, params.nodes, watched)
            say(f"{params.clusters} clusters ready")
            if params.queues:
                await client.apply_queue_objects(queue_objects(params))
                say(
                    f"applied a cohort tree: {params.queues} queues under "
                    f"{departments(params.queues)} departments, {params.queue_quota} quotas"
                )
            backlog = None
            if params.queued:
                backlog = await _backlog(client, params, names, f"{run_id}-backlog", sampler, hub, say)
            load = params.load_params(hub_address, run_id, ca_file, token)
            say(
                f"loading: {params.jobs:,} jobs, "
                f"{f'{params.rate:g} jobs/s' if params.rate else 'as fast as accepted'}, "
                f"batch {params.batch_size}, gangs {','.join(map(str, params.gangs))}"
            )
            result = await _load(client, load, root, children, sampler, watched, say)
            hub_memory = memory(hub.pid)
            workloads = None
            if members.watches:
                sends: dict[str, float] = json.loads((root / "sends.json").read_text())
                watches = list(members.watches.values())
                await kube.catch_up(watches, len(sends))
                workloads = kube.figures(members.watches, sends)
                result["latency_ms"]["submit_to_workload_created"] = workloads.pop(
                    "submit_to_workload_created"
                )
                say(
                    f"{workloads['created']:,} Jobs created in {len(watches)} clusters "
                    f"({workloads['duplicated']} duplicated, {workloads['missing']} missing)"
                )
            peaks = peak_memory(sampler)
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
    window = result.get("window", {})
    begin = window.get("first_send") or (sampler.samples[0][0] if sampler.samples else time.time())
    end = window.get("last_running") or window.get("settled") or time.time()
    if workloads is not None:
        # No job runs: the window ends at the last workload created.
        end = max(
            (t for t in (window.get("last_dispatched"), workloads.get("last_created")) if t), default=end
        )
    resources = sampler.window(begin, end)
    hub_figures = {
        **resources["hub"],
        "peak_rss_bytes": hub_memory.get("VmHWM"),
        "rss_end_bytes": hub_memory.get("VmRSS"),
    }
    out = {
        "params": {**asdict(params), "gangs": list(params.gangs)},
        "capacity": {"cpus": params.capacity_cpus, "pods_needed": params.pods_needed},
        "results": {k: v for k, v in result.items() if k != "params"},
        "hub": hub_figures,
        "resources": {"window_s": round(end - begin, 3), **resources},
        "memory": {"peak_rss_bytes": peaks, "peak_rss_sum_bytes": sum(v for v in peaks.values() if v)},
        "workloads": workloads,
        "backlog": backlog,
        "versions": versions(),
        "machine": machine(),
    }
    if inspect is not None:
        await inspect(out, members.servers)
    return out


def _fleet_args(params: BenchParams, nats_url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedplane.bench.fleet",
        f"--nats={nats_url}",
        f"--clusters={params.clusters}",
        f"--nodes={params.nodes}",
        f"--node-cpu={params.node_cpu}",
        f"--node-memory={params.node_memory}",
        f"--gpus-per-node={params.gpus_per_node}",
        f"--heartbeat={params.heartbeat}",
    ]


async def wait_listening(child: Child, host: str, port: int) -> None:
    """Until the hub accepts connections: it binds its port only once recovered and serving."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        child.check()
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        await asyncio.sleep(0.1)
    raise BenchError(f"the {child.name} did not listen on {host}:{port} within {STARTUP_TIMEOUT:.0f}s")


async def wait_ready(
    client: FedplaneClient, names: Sequence[str], nodes: int, watch: Sequence[Child]
) -> None:
    """Until every simulated cluster is READY and has reported all its nodes."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    missing = set(names)
    while time.monotonic() < deadline:
        for child in watch:
            child.check()
        with contextlib.suppress(FedplaneError):
            listed = await client.clusters()
            ready = {c.name for c in listed if c.health == pb.READY and len(c.nodes) == nodes}
            missing = set(names) - ready
            if not missing:
                return
        await asyncio.sleep(0.2)
    raise BenchError(
        f"{len(missing)} of {len(names)} clusters not ready after {STARTUP_TIMEOUT:.0f}s "
        f"(e.g. {sorted(missing)[0]})"
    )


async def _load(
    client: FedplaneClient,
    load: loadgen.LoadParams,
    root: Path,
    children: list[Child],
    sampler: Sampler,
    watch: Sequence[Child],
    say: Progress,
) -> dict[str, Any]:
    """Run the load generator process to its end and return its result."""
    out = root / "loadgen.json"
    args = [
        sys.executable,
        "-m",
        "fedplane.bench.loadgen",
        f"--hub={load.hub}",
        f"--jobs={load.jobs}",
        f"--rate={load.rate}",
        f"--batch-size={load.batch_size}",
        f"--gangs={','.join(map(str, load.gangs))}",
        f"--duration={load.duration}",
        f"--run-id={load.run_id}",
        f"--queue={load.queue}",
        f"--queues={load.queues}",
        f"--concurrency={load.concurrency}",
        f"--max-in-flight={load.max_in_flight}",
        f"--timeout={load.timeout}",
        f"--out={out}",
    ]
    if load.backend != "simulated":
        args += [f"--backend={load.backend}", f"--sends-out={root / 'sends.json'}"]
    if load.ca_file:
        args.append(f"--ca-file={load.ca_file}")
    if load.token:
        # Not on the command line, where every process could read it.
        token_file = root / "security" / "admin.token"
        args.append(f"--token-file={token_file}")
    generator = spawn("load generator", args, root)
    children.append(generator)
    sampler.pids["loadgen"] = generator.pid
    deadline = time.monotonic() + load.timeout + FINISH_ALLOWANCE
    next_report = time.monotonic() + PROGRESS_INTERVAL
    started = time.monotonic()
    while generator.process.poll() is None:
        if time.monotonic() > deadline:
            raise BenchError("the load generator did not finish in time")
        for child in watch:
            child.check()
        if time.monotonic() >= next_report:
            next_report += PROGRESS_INTERVAL
            with contextlib.suppress(FedplaneError):
                stats = await client.job_stats(load.polled_queue)
                counts = ", ".join(f"{k.lower()} {v:,}" for k, v in sorted(stats.by_state.items()))
                say(f"{time.monotonic() - started:.0f}s: {stats.total:,} jobs accepted ({counts})")
        await asyncio.sleep(SAMPLE_INTERVAL)
    if generator.process.returncode != 0 or not out.exists():
        raise BenchError(
            f"the load generator failed (exit {generator.process.returncode}): "
            f"{generator.last_line() or 'no output'}"
        )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


async def _backlog(
    client: FedplaneClient,
    params: BenchParams,
    names: Sequence[str],
    run_id: str,
    sampler: Sampler,
    hub: Child,
    say: Progress,
) -> dict[str, Any]:
    """Queue `params.queued` jobs behind cordoned clusters, then uncordon and time the drain."""
    for name in names:
        await client.cordon(name, "fedplane bench: building a backlog")
    rss_before = memory(hub.pid).get("VmRSS")
    # Below the measured jobs' priority (0): those are measured with this queue behind them,
    # not waiting for it to drain.
    specs = {
        g: loadgen.job_spec(run_id, g, params.duration, BACKLOG_QUEUE, BACKLOG_PRIORITY)
        for g in set(params.gangs)
    }
    limit = asyncio.Semaphore(BACKLOG_CONCURRENCY)
    say(f"queueing a backlog of {params.queued:,} jobs behind cordoned clusters")

    async def submit(offset: int) -> None:
        count = min(BACKLOG_BATCH, params.queued - offset)
        gangs = params.gangs
        batch = [(specs[gangs[i % len(gangs)]], f"{run_id}-{i}") for i in range(offset, offset + count)]
        async with limit:
            await client.submit_many(batch)

    began = time.time()
    await asyncio.gather(*(submit(o) for o in range(0, params.queued, BACKLOG_BATCH)))
    submitted = time.time() - began
    rss_queued = memory(hub.pid).get("VmRSS")
    say(f"backlog queued in {submitted:.1f}s; uncordoning every cluster")
    uncordoned = time.time()
    await asyncio.gather(*(client.uncordon(name) for name in names))
    if params.drain_seconds:
        return await _partial_drain(
            client, params, uncordoned, submitted, rss_before, rss_queued, sampler, say
        )
    deadline = time.monotonic() + params.timeout
    drained = False
    while time.monotonic() < deadline:
        with contextlib.suppress(FedplaneError):
            stats = await client.job_stats(BACKLOG_QUEUE)
            waiting = stats.by_state.get("PENDING", 0) + stats.by_state.get("DISPATCHED", 0)
            if stats.total >= params.queued and waiting == 0:
                drained = True
                break
        await asyncio.sleep(loadgen.POLL_INTERVAL)
    admitted: list[float] = []
    async for page in client.pages(labels={loadgen.RUN_LABEL: run_id}, page_size=loadgen.PAGE_SIZE):
        for job in page.jobs:
            mark = loadgen.first_marks(job).get(pb.ADMITTED)
            if mark is not None:
                admitted.append(mark)
    last = max(admitted, default=math.nan)
    drain = last - uncordoned
    window = sampler.window(uncordoned, last) if admitted else {}
    return {
        **_queued_figures(params, submitted, rss_before, rss_queued),
        "dispatched": len(admitted),
        "timed_out": not drained,
        "first_dispatch_ms": round((min(admitted) - uncordoned) * 1000, 1) if admitted else None,
        "drain_seconds": round(drain, 3) if admitted else None,
        "dispatch_per_s": round(len(admitted) / drain, 1) if admitted and drain > 0 else None,
        "hub_cpu_seconds": window.get("hub", {}).get("cpu_seconds"),
        "hub_cores": window.get("hub", {}).get("cores"),
    }


def _queued_figures(
    params: BenchParams, submitted: float, rss_before: int | None, rss_queued: int | None
) -> dict[str, Any]:
    """What building the backlog measured: how fast it was queued, and the hub's memory for it."""
    return {
        "jobs": params.queued,
        "submit_seconds": round(submitted, 3),
        "submitted_per_s": round(params.queued / submitted, 1) if submitted > 0 else None,
        "hub_rss_before_bytes": rss_before,
        "hub_rss_queued_bytes": rss_queued,
        "hub_bytes_per_queued_job": (
            round((rss_queued - rss_before) / params.queued) if rss_queued and rss_before else None
        ),
    }


async def _partial_drain(
    client: FedplaneClient,
    params: BenchParams,
    uncordoned: float,
    submitted: float,
    rss_before: int | None,
    rss_queued: int | None,
    sampler: Sampler,
    say: Progress,
) -> dict[str, Any]:
    """Count dispatches (jobs past DISPATCHED) out of a deep queue for `drain_seconds` at most."""
    first: float | None = None
    dispatched = 0
    end = uncordoned + params.drain_seconds
    peak_rss = rss_queued
    while time.time() < end:
        with contextlib.suppress(FedplaneError):
            stats = await client.job_stats(BACKLOG_QUEUE)
            waiting = stats.by_state.get("PENDING", 0) + stats.by_state.get("DISPATCHED", 0)
            dispatched = stats.total - waiting
            if dispatched and first is None:
                first = time.time()
            if dispatched >= params.queued:
                break  # drained before the window ended: the rate is over the drain
        rss = memory(sampler.pids["hub"]).get("VmRSS") if "hub" in sampler.pids else None
        if rss and (peak_rss is None or rss > peak_rss):
            peak_rss = rss
        await asyncio.sleep(loadgen.POLL_INTERVAL)
    elapsed = time.time() - uncordoned
    say(f"{dispatched:,} of {params.queued:,} queued jobs dispatched in {elapsed:.1f}s")
    window = sampler.window(uncordoned, time.time())
    return {
        **_queued_figures(params, submitted, rss_before, rss_queued),
        "hub_rss_peak_draining_bytes": peak_rss,
        "dispatched": dispatched,
        "timed_out": False,
        "first_dispatch_ms": round((first - uncordoned) * 1000, 1) if first else None,
        "drain_seconds": round(elapsed, 3),
        "dispatch_per_s": round(dispatched / elapsed, 1) if elapsed > 0 else None,
        "hub_cpu_seconds": window.get("hub", {}).get("cpu_seconds"),
        "hub_cores": window.get("hub", {}).get("cores"),
    }


# -- provenance -----------------------------------------------------------------------------------


def _binary_version(name: str) -> str:
    try:
        found = subprocess.run(
            [embedded.find_binary(name), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError, embedded.EmbeddedError):
        return "unknown"
    first = (found.stdout or found.stderr).strip().splitlines()
    return first[0].split()[-1] if first else "unknown"


def versions() -> dict[str, str]:
    """What was measured: this package, the interpreter, the libraries on the hot paths, the servers."""
    out = {"fedplane": __version__, "python": platform.python_version()}
    for dist in ("grpcio", "protobuf", "nats-py"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    out["etcd"] = _binary_version("etcd")
    out["nats-server"] = _binary_version("nats-server")
    return out


def machine() -> dict[str, Any]:
    """Where it was measured: every process of the benchmark shares these cores."""
    total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    return {"cpus": os.cpu_count(), "memory_bytes": total, "platform": platform.platform()}
