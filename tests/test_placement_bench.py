"""A seconds-long run of the placement benchmark: catches gross regressions of the hub's hot path.

The target is p99 <= 5 ms for one job over 1,000 clusters (views + place_batch + reserve); the
bound asserted here is ten times that, so a busy machine does not fail it, a slow path does.
"""

from __future__ import annotations

from rich.console import Console

from fedplane.bench.placement import format_table, run


def test_single_job_placement_over_a_thousand_clusters_stays_fast() -> None:
    result = run(clusters=1000, nodes=20, jobs=200, batch=100, seed=3, repeat=1)
    single = result["single"]
    assert single["jobs"] == 200 and single["placed"] == 200
    assert single["inventories_applied"] > 0
    assert single["p99_ms"] <= 50, single
    assert result["batch"]["placed"] == 100
    # The table renders every figure.
    console = Console(width=200, record=True)
    console.print(format_table(result))
    text = console.export_text()
    assert "single-job latency p99" in text and "batch throughput" in text
