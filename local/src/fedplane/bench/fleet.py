"""K simulated member clusters in one process: the benchmark's fleet of agents.

Each cluster is a complete `Agent` (its own NATS connection, durable command consumer,
heartbeats, inventory and outbox) over a `SimulatedBackend`, so the hub sees exactly the
traffic of K real agents. Only the process is shared: a 100-cluster benchmark does not need
100 Python interpreters. Clusters are named sim-000, sim-001, ...

    python -m fedplane.benchmark.fleet --nats nats://127.0.0.1:4222 --clusters 10 --nodes 100
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

from fedplane.agent.daemon import Agent
from fedplane.agent.simulated import SimulatedBackend
from fedplane.core import quantity
from fedplane.runtime import gcpolicy, logs, tasks
from fedplane.runtime.config import AgentConfig, NodeShape, SimulatedBackendConfig

# How many agents connect to NATS at the same time while the fleet starts.
START_CONCURRENCY = 16


def cluster_name(index: int) -> str:
    return f"sim-{index:03d}"


def agent_configs(
    nats_url: str,
    clusters: int,
    nodes: int,
    *,
    node_cpu: int = 64,
    node_memory: str = "256Gi",
    gpus_per_node: int = 0,
    heartbeat: float = 2.0,
    start_delay: float = 0.0,
) -> list[AgentConfig]:
    """One config per simulated cluster: `nodes` identical nodes, no state_dir (in-memory outbox).

    The simulated start delay defaults to 0, so submit->running measures the control plane
    rather than an invented container start time.
    """
    resources: dict[str, object] = {"cpu": node_cpu, "memory": node_memory}
    if gpus_per_node > 0:
        resources[quantity.GPU] = gpus_per_node
    shape = NodeShape(
        name="n",
        count=nodes,
        resources=resources,
        gpu_type="A100" if gpus_per_node > 0 else "",
    )
    return [
        AgentConfig(
            cluster=cluster_name(i),
            nats_url=nats_url,
            labels={"fedplane.io/benchmark": "true"},
            heartbeat_interval_seconds=heartbeat,
            backend={
                "type": "simulated",
                "nodes": [vars(shape)],
                "start_delay_seconds": start_delay,
                "seed": i,
            },
        )
        for i in range(clusters)
    ]


def _backend(config: AgentConfig) -> SimulatedBackend:
    settings: SimulatedBackendConfig = config.simulated()
    return SimulatedBackend(settings)


async def run(configs: Sequence[AgentConfig], stop: asyncio.Event) -> None:
    """Start every agent, run until `stop` is set, then stop them all (concurrently, bounded)."""
    agents = [Agent(config, _backend(config)) for config in configs]
    started: list[Agent] = []
    limit = asyncio.Semaphore(START_CONCURRENCY)

    async def start(agent: Agent) -> None:
        async with limit:
            await agent.start()
            started.append(agent)

    try:
        starting: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(start(a) for a in agents)))
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # an agent that cannot start ends the fleet with its error
            print(f"fleet ready: {len(started)} clusters", flush=True)
            await stopped
        else:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        stopped.cancel()
    finally:
        await asyncio.gather(
            *(tasks.bounded(a.stop(), 20, f"stop {a.cluster}") for a in started), return_exceptions=True
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fedplane.benchmark.fleet", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS URL")
    parser.add_argument("--clusters", type=int, default=10, help="number of simulated clusters")
    parser.add_argument("--nodes", type=int, default=100, help="nodes per cluster")
    parser.add_argument("--node-cpu", type=int, default=64, help="cpus per node")
    parser.add_argument("--node-memory", default="256Gi", help="memory per node")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="A100 GPUs per node")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="heartbeat interval, seconds")
    parser.add_argument("--start-delay", type=float, default=0.0, help="admitted -> running, seconds")
    parser.add_argument(
        "--bootstrap-token-file", default="", help="present this bootstrap token (NATS with auth callout)"
    )
    parser.add_argument("--nats-ca-file", default="", help="NATS over TLS, trusting this CA")
    args = parser.parse_args(argv)
    if args.clusters < 1 or args.nodes < 1 or args.node_cpu < 1 or args.gpus_per_node < 0:
        parser.error("--clusters, --nodes and --node-cpu must be at least 1, --gpus-per-node at least 0")
    return args


async def _main(args: argparse.Namespace) -> None:
    configs = agent_configs(
        args.nats,
        args.clusters,
        args.nodes,
        node_cpu=args.node_cpu,
        node_memory=args.node_memory,
        gpus_per_node=args.gpus_per_node,
        heartbeat=args.heartbeat,
        start_delay=args.start_delay,
    )
    for config in configs:
        config.bootstrap_token_file = args.bootstrap_token_file
        config.nats_tls.ca_file = args.nats_ca_file
    await run(configs, tasks.stop_event())


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure("warning", "json")
    gcpolicy.for_daemon()
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
