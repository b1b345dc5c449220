"""Scaling curves for docs/performance.md: figures as clusters and queue depth grow.

    python -m fedplane.bench.scaling clusters [--sizes 10,100,1000]     # placement latency + dispatch/s
    python -m fedplane.bench.scaling queue    [--depths 1000,100000,1000000]
    python -m fedplane.bench.scaling plot                               # docs/performance.png from the JSON

Each run appends its figures to docs/scaling.json (one entry per point, newest wins)
and prints a Markdown table. Every point is a real run: `fedplane.bench.placement.run` for
placement latency, and `fedplane bench` (etcd, NATS, hub, fleet and load generator as separate
processes) for dispatch throughput and memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedplane.bench import federation, placement

# Run from the repository's root: the figures and the plot live beside docs/performance.md.
RESULTS = Path("docs") / "scaling.json"
PLOT = Path("docs") / "performance.png"
# Total capacity stays about the same as clusters grow, so that the curve shows the cost of
# more clusters, not of more nodes.
NODES_TOTAL = 2000


def _load() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"clusters": {}, "queue": {}}


def _save(data: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def clusters(sizes: list[int], jobs: int) -> None:
    data = _load()
    for size in sizes:
        nodes = max(2, NODES_TOTAL // size)
        single = placement.run(clusters=size, nodes=nodes, jobs=300, batch=1000)
        params = federation.BenchParams(
            clusters=size, nodes=nodes, node_cpu=64, jobs=jobs, batch_size=500, duration=60, timeout=300
        )
        result = federation.run(params, progress=lambda line: print(f"  {line}", file=sys.stderr))
        data["clusters"][str(size)] = {
            "nodes_per_cluster": nodes,
            "placement": single,
            "federation": {
                "jobs": jobs,
                "dispatch_per_s": result["results"]["dispatch_per_s_sustained"],
                "accepted_per_s": result["results"]["accepted_per_s"],
                "p99_submit_to_dispatched_ms": result["results"]["latency_ms"]["submit_to_dispatched"]["p99"],
                "hub_cores": result["hub"]["cores"],
                "hub_peak_rss_bytes": result["hub"]["peak_rss_bytes"],
            },
        }
        _save(data)
    columns = ["clusters", "nodes each", "placement p50 / p99 (ms)", "batch placement (jobs/s)"]
    print("| " + " | ".join([*columns, "dispatch/s", "hub cores"]) + " |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size, point in sorted(data["clusters"].items(), key=lambda kv: int(kv[0])):
        p, f = point["placement"], point["federation"]
        print(
            f"| {int(size):,} | {point['nodes_per_cluster']} | {p['single']['p50_ms']:.2f} / "
            f"{p['single']['p99_ms']:.2f} | {p['batch']['jobs_per_s']:,.0f} | {f['dispatch_per_s']:,.0f} | "
            f"{f['hub_cores']:.2f} |"
        )


def queue(depths: list[int], drain_seconds: float) -> None:
    data = _load()
    for depth in depths:
        params = federation.BenchParams(
            clusters=10,
            nodes=100,
            node_cpu=64,
            jobs=1000,
            batch_size=500,
            duration=60,
            queued=depth,
            drain_seconds=drain_seconds,
            timeout=1800,
        )
        result = federation.run(params, progress=lambda line: print(f"  {line}", file=sys.stderr))
        data["queue"][str(depth)] = result["backlog"]
        _save(data)
    print(
        "| queued jobs | queued at (jobs/s) | hub RSS queued | bytes per queued job | dispatch/s draining |"
    )
    print("|---:|---:|---:|---:|---:|")
    for depth, b in sorted(data["queue"].items(), key=lambda kv: int(kv[0])):
        print(
            f"| {int(depth):,} | {b['submitted_per_s']:,.0f} | "
            f"{b['hub_rss_queued_bytes'] / 2**20:,.0f} MiB | "
            f"{b['hub_bytes_per_queued_job']:,} | {b['dispatch_per_s']:,.0f} |"
        )


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _load()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    sizes = sorted(data["clusters"], key=int)
    xs = [int(s) for s in sizes]
    if xs:
        ax = axes[0]
        ax.plot(xs, [data["clusters"][s]["placement"]["single"]["p99_ms"] for s in sizes], "o-", label="p99")
        ax.plot(xs, [data["clusters"][s]["placement"]["single"]["p50_ms"] for s in sizes], "s--", label="p50")
        ax.axhline(5, color="grey", linestyle=":", label="target p99 5 ms")
        ax.set(xscale="log", xlabel="clusters", ylabel="ms", title="Placing one job")
        ax.legend()
        ax = axes[1]
        ax.plot(xs, [data["clusters"][s]["federation"]["dispatch_per_s"] for s in sizes], "o-")
        ax.set(
            xscale="log", xlabel="clusters", ylabel="jobs/s", title="Sustained dispatch (SubmitJobs of 500)"
        )
        ax.set_ylim(bottom=0)
    depths = sorted(data["queue"], key=int)
    ds = [int(d) for d in depths]
    if ds:
        ax = axes[2]
        ax.plot(ds, [data["queue"][d]["dispatch_per_s"] for d in depths], "o-", label="dispatch/s draining")
        ax.set(xscale="log", xlabel="jobs queued", ylabel="jobs/s", title="Deep queue")
        ax.set_ylim(bottom=0)
        twin = ax.twinx()
        twin.plot(ds, [data["queue"][d]["hub_rss_queued_bytes"] / 2**30 for d in depths], "s--", color="C1")
        twin.set_ylabel("hub RSS (GiB)", color="C1")
    fig.suptitle("Fedplane on 2 shared cores (etcd, NATS, hub, agents and load generator on one machine)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    print(f"wrote {PLOT}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="which", required=True)
    c = sub.add_parser("clusters")
    c.add_argument("--sizes", default="10,100,1000")
    c.add_argument("--jobs", type=int, default=10_000)
    q = sub.add_parser("queue")
    q.add_argument("--depths", default="1000,100000,1000000")
    q.add_argument("--drain-seconds", type=float, default=20.0)
    sub.add_parser("plot")
    args = parser.parse_args()
    if args.which == "clusters":
        clusters([int(s) for s in args.sizes.split(",")], args.jobs)
    elif args.which == "queue":
        queue([int(d) for d in args.depths.split(",")], args.drain_seconds)
    else:
        plot()


if __name__ == "__main__":
    main()
