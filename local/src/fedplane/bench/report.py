"""Rich tables for a `fedplane bench` result (the JSON from `federation.run`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

_LATENCIES = (
    ("submit_to_accepted", "submit → accepted"),
    ("submit_to_dispatched", "submit → dispatched (ADMITTED)"),
    ("submit_to_running", "submit → running"),
    # --backend kubernetes: when the bench's watch saw the Job in the member cluster.
    ("submit_to_workload_created", "submit → workload created (Job seen)"),
    ("accepted_to_dispatched", "accepted → dispatched"),
)
# Stage by stage, from the hub's transition times.
_STAGES = (
    ("pending_to_dispatched", "  pending → dispatched (hub placed it)"),
    ("dispatched_to_admitted", "  dispatched → admitted (agent round trip)"),
    ("admitted_to_running", "  admitted → running"),
)
_PROCESSES = ("hub", "fleet", "loadgen", "etcd", "nats")


def _number(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def _ms(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _bytes(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:,.0f} MiB"


def title(result: Mapping[str, Any]) -> str:
    p = result["params"]
    rate = f"{p['rate']:g} jobs/s offered" if p["rate"] else "as fast as accepted"
    submit = "SubmitJob per job" if p["batch_size"] == 1 else f"SubmitJobs of {p['batch_size']:,}"
    gangs = ",".join(str(g) for g in p["gangs"])
    return (
        f"fedplane bench: {p['clusters']} clusters x {p['nodes']} nodes x {p['node_cpu']} cpus, "
        f"{p['jobs']:,} jobs ({submit}, {rate}), gangs {gangs}, jobs run {p['duration']:g}s"
    )


def throughput_table(result: Mapping[str, Any]) -> Table:
    r = result["results"]
    table = Table(title="Throughput", header_style="bold", title_justify="left")
    table.add_column("FIGURE")
    table.add_column("VALUE", justify="right")
    table.add_column("HOW", style="dim")
    table.add_row(
        "submissions accepted/s",
        _number(r["accepted_per_s"]),
        f"{r['jobs_accepted']:,} jobs / (last reply - first send) = {_number(r['submit_seconds'], 2)}s",
    )
    table.add_row(
        "dispatches/s, sustained",
        _number(r["dispatch_per_s_sustained"]),
        f"ADMITTED between its 10th and 90th percentile: {_number(r['dispatch_sustained_window_s'], 2)}s",
    )
    table.add_row(
        "dispatches/s, overall",
        _number(r["dispatch_per_s_overall"]),
        f"{r['dispatched']:,} jobs / (last ADMITTED - first send)",
    )
    lag = r.get("schedule_lag_ms")
    if lag:
        table.add_row(
            "load generator lag p99 / max",
            f"{_ms(lag['p99'])} / {_ms(lag['max'])} ms",
            "how late sends were against the open-loop timetable",
        )
    flight = r["in_flight"]
    if flight.get("cap_hits"):
        table.add_row(
            "in-flight cap hit",
            f"{flight['cap_hits']:,} times",
            f"sends held back at {flight['cap']:,} RPCs in flight: not open loop then",
        )
    return table


def latency_table(result: Mapping[str, Any]) -> Table:
    latencies = result["results"]["latency_ms"]
    table = Table(title="Latency (ms)", header_style="bold", title_justify="left")
    table.add_column("FROM - TO")
    for name in ("p50", "p90", "p99", "max"):
        table.add_column(name.upper(), justify="right")
    table.add_column("JOBS", justify="right")
    for key, label in _LATENCIES:
        row = latencies.get(key)
        if row is None:
            continue
        table.add_row(label, *(_ms(row[n]) for n in ("p50", "p90", "p99", "max")), f"{row['count']:,}")
    stages = result["results"].get("stages_ms")
    if stages:
        table.add_section()
        for key, label in _STAGES:
            row = stages[key]
            cells = (_ms(row[n]) for n in ("p50", "p90", "p99", "max"))
            table.add_row(Text(label, style="dim"), *cells, f"{row['count']:,}")
    return table


def resource_table(result: Mapping[str, Any]) -> Table:
    resources = result["resources"]
    hub = result["hub"]
    last = "last workload created" if result.get("workloads") else "last job running"
    table = Table(
        title=f"Processes, first send to {last} ({resources['window_s']:.1f}s)",
        header_style="bold",
        title_justify="left",
    )
    table.add_column("PROCESS")
    table.add_column("CPU s", justify="right")
    table.add_column("CORES", justify="right")
    table.add_column("MAX RSS (sampled)", justify="right")
    table.add_column("PEAK RSS", justify="right")
    # Then the member clusters' processes (agent-0, kube-apiserver-0, kube-etcd-0, ...).
    others = sorted(k for k in resources if k != "window_s" and k not in _PROCESSES)
    peaks = (result.get("memory") or {}).get("peak_rss_bytes") or {}
    for name in (*_PROCESSES, *others):
        row = resources.get(name)
        if row is None:
            continue
        table.add_row(
            name,
            _number(row["cpu_seconds"], 1),
            _number(row["cores"], 2),
            _bytes(row["rss_max_sampled_bytes"]),
            _bytes(hub["peak_rss_bytes"])
            if name == "hub"
            else _bytes(peaks.get(name))
            if name in peaks
            else "",
        )
    total = (result.get("memory") or {}).get("peak_rss_sum_bytes")
    if total:
        table.caption = f"memory need: {_bytes(total)}, the sum of every process's peak RSS"
    return table


def workloads_text(workloads: Mapping[str, Any]) -> Text:
    """--backend kubernetes: the Jobs the bench saw created, and whether each job got exactly one."""
    clusters = ", ".join(f"{name} {n:,}" for name, n in workloads["created_per_cluster"].items())
    text = Text(
        f"{workloads['created']:,} Jobs created in the member clusters ({clusters}), "
        f"{_number(workloads['created_per_s_sustained'])}/s sustained; no kubelet runs, so none ran"
    )
    problems = [
        f"{workloads[key]:,} {key}" for key in ("duplicated", "missing", "unexpected") if workloads[key]
    ]
    problems += [f"watch on {name} failed: {error}" for name, error in workloads["watch_errors"].items()]
    if problems:
        text.append("\n" + "; ".join(problems), style="bold red")
    return text


def outcome_text(result: Mapping[str, Any]) -> Text:
    r = result["results"]
    states = ", ".join(f"{name} {count:,}" for name, count in r["final_states"].items()) or "none"
    text = Text(
        f"{r['jobs_accepted']:,}/{r['jobs_requested']:,} accepted, {r['dispatched']:,} dispatched, "
        f"{r['ran']:,} ran; states when read: {states}"
    )
    problems = []
    if r["timed_out"]:
        problems.append(f"TIMED OUT after {r['timeout_s']:g}s")
    if r["submit_errors"]:
        errors = ", ".join(f"{code} {n:,}" for code, n in r["submit_errors"].items())
        span = r.get("submit_errors_at_s")
        when = f" ({span['first']:.1f}s to {span['last']:.1f}s after the first send)" if span else ""
        problems.append(f"submit errors: {errors}{when}")
    if r["jobs_unsent"]:
        problems.append(f"{r['jobs_unsent']:,} jobs never sent")
    if r["missing"]:
        problems.append(f"{r['missing']:,} accepted jobs missing from ListJobs")
    if problems:
        text.append("\n" + "; ".join(problems), style="bold red")
    return text


def backlog_table(backlog: Mapping[str, Any]) -> Table:
    table = Table(
        title=f"Deep queue of {backlog['jobs']:,} jobs",
        caption="queued behind cordoned clusters, then drained",
        header_style="bold",
        title_justify="left",
    )
    table.add_column("FIGURE")
    table.add_column("VALUE", justify="right")
    table.add_row("queued at (jobs/s)", _number(backlog["submitted_per_s"]))
    table.add_row(
        "hub RSS before / queued",
        f"{_bytes(backlog['hub_rss_before_bytes'])} / {_bytes(backlog['hub_rss_queued_bytes'])}",
    )
    table.add_row("hub memory per queued job", _number(backlog["hub_bytes_per_queued_job"], 0, " B"))
    table.add_row("first dispatch after uncordon (ms)", _ms(backlog["first_dispatch_ms"]))
    table.add_row("drained in (s)", _number(backlog["drain_seconds"], 2))
    table.add_row("dispatches/s draining", _number(backlog["dispatch_per_s"]))
    table.add_row("hub cores while draining", _number(backlog["hub_cores"], 2))
    if backlog["timed_out"]:
        table.add_row("[bold red]timed out[/]", f"{backlog['dispatched']:,} dispatched")
    return table


def render(result: Mapping[str, Any]) -> RenderableType:
    """Every table of a result, titled with its parameters and closed with the versions."""
    parts: list[RenderableType] = [Text(title(result), style="bold")]
    if result.get("backlog"):
        parts.append(backlog_table(result["backlog"]))
    parts += [throughput_table(result), latency_table(result), resource_table(result), outcome_text(result)]
    if result.get("workloads"):
        parts.append(workloads_text(result["workloads"]))
    v = result["versions"]
    m = result["machine"]
    parts.append(
        Text(
            f"fedplane {v['fedplane']}, Python {v['python']}, grpcio {v['grpcio']}, etcd {v['etcd']}, "
            f"nats-server {v['nats-server']}; {m['cpus']} cpus shared by every process; "
            f"{result.get('wall_seconds', 0):.0f}s in all",
            style="dim",
        )
    )
    return Group(*parts)
