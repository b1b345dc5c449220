"""What cluster heartbeats cost the hub and etcd, with and without the clusters' leases.

    python -m fedplane.bench.leases [--clusters 1000 --seconds 30 --interval 5]

Starts an etcd of its own (the one `fedplane up` runs) and, in this process, the hub's cluster
reports driver and its liveness driver (hub/liveness.py) as the leader runs them. Every cluster
heartbeats every `--interval` seconds, at its own phase; each heartbeat goes through the reports
driver as a parsed message would (no NATS: its client's cost is not counted). The run has two
phases of `--seconds` each: heartbeats alone, then heartbeats with the leader granting and
renewing the leases. Figures are CPU seconds per minute of the hub process and of etcd, read
from the kernel (so they include everything each process did, garbage collection and gRPC
threads too), and the keepalives sent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from fedplane.bench.procstat import cpu_seconds
from fedplane.hub.clock import SYSTEM
from fedplane.hub.clusters import ClusterRegistry, health_thresholds
from fedplane.hub.liveness import Liveness
from fedplane.hub.reports import ClusterReports
from fedplane.hub.store import Store
from fedplane.hub.table import JobTable
from fedplane.local import servers
from fedplane.runtime import bus, logs
from fedplane.runtime.config import HubConfig
from fedplane.v1 import agent_pb2 as agent_pb


def heartbeat_message(cluster: str) -> bus.Message:
    """A heartbeat as the hub's consumer hands it over, stored now by the (absent) server."""
    reply = f"$JS.ACK.{bus.REPORTS_STREAM}.ordered.1.1.1.{time.time_ns()}.0"
    payload = agent_pb.Heartbeat(cluster=cluster, agent_id=f"{cluster}-agent").SerializeToString()
    subject = bus.subject("heartbeat", cluster)
    return bus.Message(_client=cast(Any, None), subject=subject, reply=reply, data=payload)


async def heartbeats(reports: ClusterReports, names: list[str], interval: float, stop: asyncio.Event) -> int:
    """Each cluster heartbeats every `interval` seconds, the clusters spread over it; how many."""
    sent = 0
    began = time.monotonic()
    slots = 50
    while not stop.is_set():
        for slot in range(slots):
            due = began + (sent // len(names)) * interval + slot * interval / slots
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if stop.is_set():
                return sent
            for name in names[slot::slots]:
                await reports.on_report(heartbeat_message(name))
            sent += len(names[slot::slots])
    return sent


async def phase(
    reports: ClusterReports, names: list[str], seconds: float, interval: float, etcd_pid: int
) -> dict[str, float]:
    stop = asyncio.Event()
    hub_before, etcd_before, began = cpu_seconds(os.getpid()), cpu_seconds(etcd_pid), time.monotonic()
    beats = asyncio.create_task(heartbeats(reports, names, interval, stop))
    await asyncio.sleep(seconds)
    stop.set()
    sent = await beats
    took = time.monotonic() - began
    per_minute = 60 / took
    return {
        "heartbeats_per_s": sent / took,
        "hub_cpu_s_per_min": (cpu_seconds(os.getpid()) - hub_before) * per_minute,
        "etcd_cpu_s_per_min": (cpu_seconds(etcd_pid) - etcd_before) * per_minute,
    }


async def bench(args: argparse.Namespace) -> None:
    logs.configure("warning", "console")
    work = Path(tempfile.mkdtemp(prefix="fedplane-leases-"))
    etcd = servers.start_etcd(work / "etcd")
    try:
        store = await Store.connect(etcd.address)
        config = HubConfig()
        registry = ClusterRegistry(health_thresholds(config))
        reports = ClusterReports(JobTable(store), registry, store, SYSTEM)
        names = [f"cluster-{i:04d}" for i in range(args.clusters)]
        for name in names:  # registered, as a running hub has them
            await reports.on_report(heartbeat_message(name))
        liveness = Liveness(registry, store, SYSTEM, "bench")
        watcher = asyncio.create_task(liveness.run())
        await liveness.loaded.wait()

        print(f"{args.clusters} clusters, a heartbeat every {args.interval:g}s, {args.seconds:g}s per phase")
        alone = await phase(reports, names, args.seconds, args.interval, etcd.process.pid)

        began = time.perf_counter()
        leader = asyncio.create_task(liveness.lead())
        await liveness.settled.wait()  # its first round granted every cluster its lease
        assert len(liveness.alive) == len(names), len(liveness.alive)
        granted = time.perf_counter() - began
        rounds, keepalives = liveness.rounds, liveness.keepalives
        leased = await phase(reports, names, args.seconds, args.interval, etcd.process.pid)
        rounds, keepalives = liveness.rounds - rounds, liveness.keepalives - keepalives
        leader.cancel()
        watcher.cancel()
        await asyncio.gather(leader, watcher, return_exceptions=True)
        await store.close()

        print(f"  leases for all {len(names)} clusters granted in {granted:.2f}s (a leader's first round)")
        print(f"  a round every {liveness.round_seconds:g}s: {rounds} rounds, {keepalives} keepalives")
        print(f"  {'':28} {'hub CPU s/min':>14} {'etcd CPU s/min':>15} {'heartbeats/s':>13}")
        for label, figures in (("heartbeats alone", alone), ("heartbeats + leases", leased)):
            print(
                f"  {label:28} {figures['hub_cpu_s_per_min']:14.2f} {figures['etcd_cpu_s_per_min']:15.2f}"
                f" {figures['heartbeats_per_s']:13.0f}"
            )
        hub_cost = leased["hub_cpu_s_per_min"] - alone["hub_cpu_s_per_min"]
        etcd_cost = leased["etcd_cpu_s_per_min"] - alone["etcd_cpu_s_per_min"]
        print(f"  the leases cost: hub {hub_cost:.2f} CPU s/min, etcd {etcd_cost:.2f} CPU s/min")
    finally:
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--interval", type=float, default=5.0, help="each cluster's heartbeat interval")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
