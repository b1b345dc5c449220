"""`fedplane up`: a whole federation on this machine, with jobs flowing through it.

Real etcd and nats-server processes (data in a temporary or given directory), one hub and
one agent per simulated cluster in this process, the example jobs submitted through the
gRPC API, a live board of their progress, and at the end where each job ran and why.
Ctrl-C stops everything; no process is left behind.

With `--edge N`, the last N clusters are an edge site: labelled as edge, their agents connect
to a leaf nats-server of their own, a leaf node of the hub's nats-server, whose link runs
through a CutLink that SIGUSR1 cuts and restores, to watch the site work on while cut off.

With `--jaeger`, Jaeger v2 runs beside it (fedplane.local.jaeger) and every span goes there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from fedplane.agent.daemon import Agent
from fedplane.agent.simulated import SimulatedBackend
from fedplane.client.display import JobBoard, cluster_table, state_text
from fedplane.client.objects import load_files as load_queue_files
from fedplane.client.sdk import FedplaneClient
from fedplane.client.spec import load_file
from fedplane.hub.server import HubServer
from fedplane.local import servers as embedded
from fedplane.local.jaeger import Jaeger, start_jaeger
from fedplane.local.link import CutLink
from fedplane.local.security import LocalSecurity
from fedplane.runtime import logs, natsjwt, tasks, telemetry
from fedplane.runtime.config import AgentConfig, HubConfig, MetricsConfig, StartupError, from_mapping
from fedplane.v1 import types_pb2 as pb

# Three clusters of different shapes: a regional GPU cluster, a regional CPU cluster and an edge site.
CLUSTERS: list[dict[str, Any]] = [
    {
        "cluster": "gpu-eu",
        "labels": {"region": "eu-west", "tier": "onprem"},
        "cost": 1.0,
        "backend": {
            "type": "simulated",
            "nodes": [
                {
                    "name": "a100",
                    "count": 4,
                    "gpu_type": "A100",
                    "resources": {"cpu": 96, "memory": "768Gi", "gpu": 8},
                    # Keeps CPU-only pods off GPU nodes; pods requesting GPUs tolerate it implicitly.
                    "taints": ["nvidia.com/gpu=present:NoSchedule"],
                }
            ],
            "datasets": {"imagenet": "150Gi"},
        },
    },
    {
        "cluster": "cpu-us",
        "labels": {"region": "us-east", "tier": "cloud"},
        "cost": 2.0,
        "backend": {
            "type": "simulated",
            "nodes": [{"name": "c64", "count": 8, "resources": {"cpu": 64, "memory": "256Gi"}}],
            "datasets": {"logs-2026": "40Gi"},
        },
    },
    {
        "cluster": "edge-lab",
        "labels": {"region": "edge", "tier": "edge"},
        "taints": ["edge=true:NoSchedule"],
        "cost": 0.5,
        "backend": {
            "type": "simulated",
            "nodes": [
                {
                    "name": "jetson",
                    "count": 2,
                    "gpu_type": "T4",
                    "resources": {"cpu": 8, "memory": "16Gi", "gpu": 1},
                }
            ],
            "datasets": {"camera-feed": "5Gi"},
        },
    },
]


def cluster_names(count: int) -> list[str]:
    """The names of the first `count` simulated clusters (as `cluster_configs` makes them)."""
    return [
        str(CLUSTERS[i]["cluster"]) if i < len(CLUSTERS) else f"cpu-extra-{i - len(CLUSTERS) + 1}"
        for i in range(count)
    ]


def cluster_configs(
    count: int,
    nats_url: str,
    state_root: Path,
    edge: int = 0,
    leaf_url: str = "",
    edge_label: str = "fedplane.io/edge",
) -> list[AgentConfig]:
    """The simulated clusters; the last `edge` of them are edge clusters, on the leaf at `leaf_url`."""
    configs = []
    for i, name in enumerate(cluster_names(count)):
        if i < len(CLUSTERS):
            raw = dict(CLUSTERS[i])
        else:
            raw = {
                "cluster": name,
                "labels": {"region": "us-west", "tier": "cloud"},
                "cost": 3.0,
                "backend": {
                    "type": "simulated",
                    "nodes": [{"name": "c32", "count": 4, "resources": {"cpu": 32, "memory": "128Gi"}}],
                },
            }
        at_edge = i >= count - edge
        if at_edge:
            raw["labels"] = {**raw["labels"], edge_label: "true"}
        raw.update(
            nats_url=leaf_url if at_edge else nats_url,
            heartbeat_interval_seconds=1.0,
            inventory_interval_seconds=10.0,
            state_dir=str(state_root / raw["cluster"]),
        )
        configs.append(from_mapping(AgentConfig, raw, f"cluster {raw['cluster']}"))
    return configs


def default_jobs_dir() -> Path | None:
    for candidate in (Path.cwd() / "examples", Path(__file__).resolve().parent.parent / "examples"):
        if candidate.is_dir():
            return candidate
    return None


def placement_table(jobs: list[pb.Job]) -> Table:
    """Where each job ran and why: the winning cluster's score, component by component."""
    table = Table(title="Where each job ran, and why", header_style="bold")
    table.add_column("JOB", overflow="fold")
    table.add_column("STATE")
    table.add_column("CLUSTER")
    table.add_column("SCORE")
    table.add_column("WHY (score parts)", overflow="fold")
    for job in sorted(jobs, key=lambda j: j.id):
        s = job.status.placement_score
        placed = bool(job.status.cluster)
        why = (
            f"data {s.data_locality:.2f} · headroom {s.headroom:.2f} · "
            f"cost {s.cost:.2f} · pref {s.preference:.2f}"
            if placed
            else job.pending_reason
        )
        table.add_row(
            job.spec.name,
            state_text(job.status.state),
            job.status.cluster or "-",
            f"{s.total:.2f}" if placed else "-",
            why,
        )
    return table


async def run(
    specs: list[tuple[pb.JobSpec, str]],
    jobs_dir: Path | None,
    data_dir: Path,
    keep_running: bool,
    clusters: int,
    console: Console,
    stop: asyncio.Event,
    edge: int = 0,
) -> int:
    # Secure by default: TLS and a token on gRPC, etcd over TLS with its own RBAC, agents
    # admitted by key through the hub's NATS auth callout (security.py). An edge site's leaf
    # node links as the site, held to its own clusters' subjects.
    security = LocalSecurity.create(data_dir / "security")
    etcd, secured_etcd = security.start_etcd(data_dir / "etcd")
    nats = security.start_nats(
        data_dir / "nats",
        leafnode_port=0 if edge else None,
        edge_clusters=cluster_names(clusters)[clusters - edge :] if edge else (),
    )
    link: CutLink | None = None
    leaf: embedded.ServerProcess | None = None
    hub_server: HubServer | None = None
    agents: list[Agent] = []
    try:
        listen_port = embedded.free_port() if not _port_free(50051) else 50051
        config = HubConfig(
            listen=f"127.0.0.1:{listen_port}",
            implicit_queues=True,
            nats_url=f"nats://{nats.address}",
            cluster_unknown_after_seconds=5.0,
            # Prometheus metrics on a free loopback port, printed below (as each agent's).
            metrics=MetricsConfig(listen="127.0.0.1:0"),
            edge_cluster_unknown_after_seconds=10.0,
            edge_cluster_lost_after_seconds=60.0,
        )
        config = security.hub_config(config, secured_etcd)
        hub_server = await HubServer.start(config)
        target = f"127.0.0.1:{hub_server.port}"
        contexts = security.write_context(target)
        console.print(
            f"[bold]fedplane up[/]: etcd {etcd.address} (TLS, RBAC), NATS {nats.address} (TLS, agents"
            f" admitted by key), hub {target} (TLS, token)"
        )
        console.print(
            f"  data and logs in {data_dir}; credentials in {security.directory};"
            f" the CLI's context: {', '.join(str(p) for p in contexts)}"
        )
        hint = (
            "fedplane clusters" if len(contexts) > 1 else f"FEDPLANE_CONTEXT={contexts[0]} fedplane clusters"
        )
        console.print(f"  try [cyan]{hint}[/] in another shell")
        leaf_port = embedded.free_port() if edge else 0
        leaf_url = f"nats://127.0.0.1:{leaf_port}" if edge else ""
        configs = cluster_configs(
            clusters, config.nats_url, data_dir / "agents", edge, leaf_url, config.edge_label
        )
        at_edge = configs[len(configs) - edge :] if edge else []
        if edge:
            # The edge site's leaf node admits its own agents, each with its cluster's permissions;
            # the hub approves their keys beforehand, as an administrator would (docs/security.md).
            keys = {
                c.cluster: natsjwt.public_key(natsjwt.load_or_create_seed(Path(c.state_dir) / "nats.nk"))
                for c in at_edge
            }
            for name, key in keys.items():
                await hub_server.hub.admission.approve(name, key, by="fedplane up")
            link = await CutLink("127.0.0.1", nats.leafnode_port).start()
            leaf = embedded.start_nats_leaf(
                data_dir / "leaf",
                link.address,
                port=leaf_port,
                name="fedplane-edge",
                password=security.nats.leaf_password,
                agents=keys,
                ca_file=str(security.ca.cert_file),
            )
            _toggle_on_sigusr1(link, console)
        if leaf is not None and link is not None:
            names = ", ".join(c.cluster for c in at_edge)
            console.print(
                f"  edge site ({names}): leaf NATS {leaf.address}, a leaf node of {nats.leafnode_address}"
                f" through the link {link.address}; [cyan]kill -USR1 {os.getpid()}[/] cuts the link,"
                " again restores it"
            )
        for agent_config in configs:
            if agent_config not in at_edge:
                security.agent_config(agent_config)
            agent_config.metrics.listen = "127.0.0.1:0"
            agent = Agent(agent_config, SimulatedBackend(agent_config.simulated()))
            await agent.start()
            agents.append(agent)
        console.print(f"  metrics: {_metrics_addresses(hub_server, agents)}")
        async with FedplaneClient(target, tls=security.client_tls, token=security.admin_token) as client:
            queue_file = jobs_dir / "queues.yaml" if jobs_dir is not None else None
            if queue_file is not None and queue_file.exists():
                # The jobs' queues, cohorts and priority classes, as an administrator applies them;
                # jobs naming other queues still run, in queues without quota (implicit_queues).
                applied = await client.apply_queue_objects(load_queue_files([queue_file]))
                console.print(
                    f"  {len(applied.queues)} queues in {len(applied.cohorts)} cohorts from {queue_file};"
                    " [cyan]fedplane queues[/] shows their usage"
                )
            await _wait_ready(client, [a.cluster for a in agents], stop)
            submitted = [job for job, _ in await client.submit_many(specs)] if specs else []
            console.print(f"submitted {len(submitted)} jobs from {jobs_dir or 'nowhere'}")
            board = JobBoard(submitted, title="Jobs")
            status = await _follow(client, board, stop, console)
            final = [await client.get(j.id) for j in submitted]
            console.print(placement_table(final))
            if keep_running and not stop.is_set():
                console.print(f"federation still running at {target}; Ctrl-C to stop")
                await stop.wait()
            return status
    finally:
        security.remove_context()
        if link is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        await asyncio.gather(*(agent.stop() for agent in agents), return_exceptions=True)
        if hub_server is not None:
            with contextlib.suppress(Exception):
                await hub_server.stop(grace=0.5)
        if leaf is not None:
            leaf.stop()
        if link is not None:
            await link.close()
        nats.stop()
        etcd.stop()


def _metrics_addresses(hub: HubServer, agents: list[Agent]) -> str:
    """Where Prometheus can scrape the hub and each agent."""
    served = [("hub", hub.metrics), *((agent.cluster, agent.metrics_server) for agent in agents)]
    return ", ".join(f"{name} {server.url}" for name, server in served if server is not None)


def _toggle_on_sigusr1(link: CutLink, console: Console) -> None:
    """SIGUSR1 cuts the edge link, and the next one restores it."""
    loop = asyncio.get_running_loop()
    busy: set[asyncio.Task[None]] = set()

    async def toggle() -> None:
        if link.is_up:
            await link.cut()
            console.print("[yellow]edge link cut[/]: the edge agents work on offline")
        else:
            await link.restore()
            console.print("[green]edge link restored[/]: the edge agents replay what they queued")

    def on_signal() -> None:
        task = loop.create_task(toggle())
        busy.add(task)
        task.add_done_callback(busy.discard)

    loop.add_signal_handler(signal.SIGUSR1, on_signal)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _wait_ready(client: FedplaneClient, names: list[str], stop: asyncio.Event) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not stop.is_set():
        ready = {c.name for c in await client.clusters() if c.health == pb.READY and c.nodes}
        if set(names) <= ready:
            return
        await asyncio.sleep(0.2)
    if not stop.is_set():
        raise RuntimeError(f"clusters did not become ready: {sorted(set(names))}")


async def _follow(client: FedplaneClient, board: JobBoard, stop: asyncio.Event, console: Console) -> int:
    """Show the board live until every job is finished (or Ctrl-C); 1 if any job failed."""
    if not len(board):
        return 0
    waiter = asyncio.create_task(client.wait([j.id for j in board.jobs], on_event=board.update))
    stopper = asyncio.create_task(stop.wait())
    with Live(
        Group(board, cluster_table(await client.clusters())), console=console, refresh_per_second=4
    ) as live:
        while not waiter.done() and not stop.is_set():
            await asyncio.wait({waiter, stopper}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            live.update(Group(board, cluster_table(await client.clusters())))
        if not stop.is_set():
            await asyncio.sleep(0.3)  # let the clusters report the capacity the last jobs freed
            live.update(Group(board, cluster_table(await client.clusters())))
    stopper.cancel()
    if not waiter.done():
        waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    return 1 if any(j.status.state == pb.FAILED for j in board.jobs) else 0


def _start_jaeger(data_dir: Path, console: Console) -> Jaeger:
    """`--jaeger`: Jaeger beside the federation, every span exported to it (in memory: the traces
    go when the federation stops)."""
    try:
        traces = start_jaeger(data_dir)
    except embedded.EmbeddedError as exc:
        raise StartupError(f"--jaeger: {exc}") from None
    console.print(
        f"  traces: Jaeger {traces.ui_url}, a job's trace at {traces.api_url('TRACE_ID')} (its id:"
        f" [cyan]fedplane get JOB[/], Trace); spans go in by OTLP gRPC at {traces.otlp_endpoint}"
    )
    return traces


def main(
    jobs_dir: Path | None = None,
    data_dir: Path | None = None,
    keep_running: bool = False,
    clusters: int = 3,
    edge: int = 0,
    jaeger: bool = False,
) -> None:
    if not 0 <= edge <= clusters:
        raise SystemExit(f"--edge {edge}: must be between 0 and the number of clusters ({clusters})")
    console = Console()
    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="fedplane-up-")) if data_dir is None else data_dir
    root.mkdir(parents=True, exist_ok=True)
    log_file = (root / "fedplane.log").open("a")
    logs.configure("info", "json", file=log_file)
    jobs_dir = jobs_dir or default_jobs_dir()
    # Parse every spec before starting anything, so a bad file costs nothing.
    specs: list[tuple[pb.JobSpec, str]] = []
    for path in sorted(jobs_dir.glob("*.y*ml")) if jobs_dir else []:
        specs += [(spec, f"up-{path.stem}-{i}-{time.time_ns()}") for i, spec in enumerate(load_file(path))]

    async def main_async() -> int:
        return await run(specs, jobs_dir, root, keep_running, clusters, console, tasks.stop_event(), edge)

    traces: Jaeger | None = None
    try:
        if jaeger:
            traces = _start_jaeger(root / "jaeger", console)
        telemetry.configure(
            "fedplane-local", "otlp" if traces else None, traces.otlp_endpoint if traces else None
        )
        code = asyncio.run(main_async())
    finally:
        telemetry.shutdown()  # the last spans reach Jaeger before it stops
        if traces is not None:
            traces.stop()
        log_file.close()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
        console.print("federation stopped; no process left running")
    raise SystemExit(code)
