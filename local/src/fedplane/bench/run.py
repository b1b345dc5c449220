"""Benchmarks that print figures (not tests): the placement core, and dispatch end to end.

    python -m fedplane.bench.run core  [--clusters 100 --nodes 50 --jobs 1000]
    python -m fedplane.bench.run e2e   [--jobs 2000 --clusters 3]

`core` times one placement batch over a large synthetic federation (the hub's inner loop);
`fedplane bench placement` (fedplane.bench.placement) measures single-job latency too.
`e2e` runs a real federation (etcd, NATS, hub, simulated agents) in this process, submits
jobs in batches through gRPC, and reports submit throughput, dispatch throughput and the
submit-to-running latency read from each job's transition history.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

# The synthetic federation lives with `fedplane bench placement`, which measures the same path
# through the hub's cluster registry.
from fedplane.bench.placement import synthetic
from fedplane.core.placement import place_batch


def bench_core(args: argparse.Namespace) -> None:
    views, jobs = synthetic(args.clusters, args.nodes, args.jobs)
    place_batch(jobs[:10], views)  # warm up
    timings = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        decisions = place_batch(jobs, views)
        timings.append(time.perf_counter() - start)
    placed = sum(1 for d in decisions if d.cluster)
    best = min(timings)
    print(
        f"core: {args.jobs} jobs x {args.clusters} clusters x {args.nodes} nodes "
        f"({args.clusters * args.nodes} nodes): best {best:.3f}s, median {statistics.median(timings):.3f}s "
        f"per batch = {args.jobs / best:,.0f} jobs/s evaluated, {placed} placed"
    )


async def bench_e2e(args: argparse.Namespace) -> None:
    from fedplane.agent.daemon import Agent
    from fedplane.agent.simulated import SimulatedBackend
    from fedplane.client.sdk import FedplaneClient
    from fedplane.hub.server import HubServer
    from fedplane.local import servers as embedded
    from fedplane.runtime import logs
    from fedplane.runtime.config import AgentConfig, HubConfig, from_mapping
    from fedplane.v1 import types_pb2 as pb

    logs.configure("error", "console")
    root = Path(tempfile.mkdtemp(prefix="fedplane-bench-"))
    etcd = embedded.start_etcd(root / "etcd")
    nats = embedded.start_nats(root / "nats")
    hub = await HubServer.start(
        HubConfig(
            listen="127.0.0.1:0",
            etcd_endpoint=etcd.address,
            nats_url=f"nats://{nats.address}",
            implicit_queues=True,
        )
    )
    agents = []
    try:
        for c in range(args.clusters):
            config = from_mapping(
                AgentConfig,
                {
                    "cluster": f"sim-{c}",
                    "nats_url": f"nats://{nats.address}",
                    "heartbeat_interval_seconds": 1,
                    "backend": {
                        "type": "simulated",
                        "nodes": [{"name": "n", "count": 200, "resources": {"cpu": 64, "memory": "256Gi"}}],
                        "default_duration_seconds": args.duration,
                        "start_delay_seconds": 0,
                    },
                },
            )
            agent = Agent(config, SimulatedBackend(config.simulated()))
            await agent.start()
            agents.append(agent)
        async with FedplaneClient(f"127.0.0.1:{hub.port}") as client:
            for _ in range(300):
                ready = [c for c in await client.clusters() if c.health == pb.READY and c.nodes]
                if len(ready) >= args.clusters:
                    break
                await asyncio.sleep(0.1)
            spec = pb.JobSpec(name="bench", queue="default", pod_sets=[pb.PodSet(name="main", count=1)])
            spec.pod_sets[0].requests.quantities["cpu"] = 1000
            start = time.perf_counter()
            ids: list[str] = []
            for offset in range(0, args.jobs, args.batch):
                n = min(args.batch, args.jobs - offset)
                results = await client.submit_many([(spec, f"b-{offset + i}") for i in range(n)])
                ids += [job.id for job, _ in results]
            submitted = time.perf_counter() - start
            final = await client.wait(ids, resync_interval=5)
            done = time.perf_counter() - start
        states = [j.status.state for j in final.values()]
        outcomes = Counter(f"{pb.JobState.Name(j.status.state)} {j.status.reason}" for j in final.values())
        if states.count(pb.SUCCEEDED) != len(states):
            print(f"  NOT ALL SUCCEEDED: {dict(outcomes)}")
        latencies = []
        for job in final.values():
            marks = {t.state: t.time.ToNanoseconds() / 1e9 for t in job.status.history}
            if pb.RUNNING in marks:
                latencies.append(marks[pb.RUNNING] - marks[pb.PENDING])
        latencies.sort()
        stages: dict[str, list[float]] = {"queued": [], "to cluster": [], "to running": []}
        for job in final.values():
            marks = {t.state: t.time.ToNanoseconds() / 1e9 for t in job.status.history}
            if {pb.PENDING, pb.DISPATCHED, pb.ADMITTED, pb.RUNNING} <= set(marks):
                stages["queued"].append(marks[pb.DISPATCHED] - marks[pb.PENDING])
                stages["to cluster"].append(marks[pb.ADMITTED] - marks[pb.DISPATCHED])
                stages["to running"].append(marks[pb.RUNNING] - marks[pb.ADMITTED])
        dispatched = [
            t.time.ToNanoseconds() / 1e9
            for j in final.values()
            for t in j.status.history
            if t.state == pb.DISPATCHED
        ]
        dispatch_span = max(dispatched) - min(dispatched) if len(dispatched) > 1 else 0.0
        print(
            f"e2e: {args.jobs} jobs over {args.clusters} simulated clusters "
            "(real etcd + NATS, hub and agents in one process)\n"
            f"  submit: {args.jobs / submitted:,.0f} jobs/s ({submitted:.2f}s, batches of {args.batch})\n"
            f"  dispatch: {len(dispatched) / dispatch_span if dispatch_span else float('nan'):,.0f} jobs/s "
            f"(first to last DISPATCHED {dispatch_span:.2f}s)\n"
            f"  all {states.count(pb.SUCCEEDED)} succeeded after {done:.2f}s "
            f"(each job runs {args.duration}s): {args.jobs / done:,.0f} jobs/s end to end\n"
            f"  submit->running latency p50 {latencies[len(latencies) // 2]:.3f}s "
            f"p95 {latencies[int(len(latencies) * 0.95)]:.3f}s max {latencies[-1]:.3f}s\n"
            "  p50 by stage (hub clock): "
            + ", ".join(f"{k} {statistics.median(v):.3f}s" for k, v in stages.items() if v)
        )
    finally:
        for agent in agents:
            await agent.stop()
        await hub.stop(grace=0.1)
        nats.stop()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="which", required=True)
    core = sub.add_parser("core")
    core.add_argument("--clusters", type=int, default=100)
    core.add_argument("--nodes", type=int, default=50)
    core.add_argument("--jobs", type=int, default=1000)
    core.add_argument("--repeat", type=int, default=3)
    e2e = sub.add_parser("e2e")
    e2e.add_argument("--jobs", type=int, default=2000)
    e2e.add_argument("--clusters", type=int, default=3)
    e2e.add_argument("--batch", type=int, default=500)
    e2e.add_argument("--duration", type=float, default=0.5)
    args = parser.parse_args()
    if args.which == "core":
        bench_core(args)
    else:
        asyncio.run(bench_e2e(args))


if __name__ == "__main__":
    main()
