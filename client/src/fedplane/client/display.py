"""Rich renderings of jobs, clusters and placement explanations.

Shared by the CLI and `fedplane up`, so every view colours states and explains placements the
same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from fedplane.core import quantity
from fedplane.v1 import hub_pb2
from fedplane.v1 import types_pb2 as pb

__all__ = [
    "STATE_STYLES",
    "JobBoard",
    "cluster_detail",
    "cluster_table",
    "event_line",
    "explanation_table",
    "format_age",
    "format_resources",
    "format_time",
    "job_detail",
    "job_table",
    "queue_view_table",
    "score_text",
    "state_name",
    "state_text",
]

STATE_STYLES: dict[int, str] = {
    pb.PENDING: "yellow",
    pb.DISPATCHED: "cyan",
    pb.ADMITTED: "cyan",
    pb.RUNNING: "bold blue",
    pb.SUCCEEDED: "bold green",
    pb.FAILED: "bold red",
    pb.CANCELLING: "magenta",
    pb.CANCELLED: "magenta",
}
TERMINAL = frozenset({pb.SUCCEEDED, pb.FAILED, pb.CANCELLED})
_SHORT_RESOURCES = {quantity.GPU: "gpu"}
_NUMERIC_COLUMNS = ("TOTAL", "DATA", "HEADROOM", "COST", "PREF", "GROUP")


def state_name(state: int) -> str:
    try:
        return pb.JobState.Name(pb.JobState.ValueType(state))
    except ValueError:
        return f"STATE_{state}"


def state_text(state: int) -> Text:
    return Text(state_name(state), style=STATE_STYLES.get(state, ""))


def _is_set(ts: Timestamp) -> bool:
    return bool(ts.seconds or ts.nanos)


def format_time(ts: Timestamp) -> str:
    """Local wall-clock time, or "-" for an unset timestamp."""
    if not _is_set(ts):
        return "-"
    return ts.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _clock(ts: Timestamp) -> str:
    if not _is_set(ts):
        return "-"
    return ts.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M:%S")


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _elapsed(start: Timestamp, end: Timestamp | None = None) -> str:
    if not _is_set(start):
        return ""
    stop = end.ToDatetime(tzinfo=UTC) if end is not None and _is_set(end) else datetime.now(UTC)
    return format_seconds((stop - start.ToDatetime(tzinfo=UTC)).total_seconds())


def format_quantity(resource: str, amount: int) -> str:
    return quantity.format_quantity(resource, amount)


def format_resources(resources: pb.Resources) -> str:
    """ "cpu=8 memory=64Gi gpu=1", canonical resources first."""
    order = {quantity.CPU: 0, quantity.MEMORY: 1, quantity.GPU: 2}
    items = sorted(resources.quantities.items(), key=lambda kv: (order.get(kv[0], 3), kv[0]))
    return " ".join(f"{_SHORT_RESOURCES.get(k, k)}={quantity.format_quantity(k, v)}" for k, v in items) or "-"


def _free_of(free: pb.Resources, total: pb.Resources, resource: str) -> str:
    have = total.quantities.get(resource, 0)
    if not have:
        return "-"
    left = free.quantities.get(resource, 0)
    return f"{quantity.format_quantity(resource, left)}/{quantity.format_quantity(resource, have)}"


def score_text(score: pb.ScoreBreakdown) -> str:
    """The total and the components that produced it, e.g. why a cluster won."""
    return (
        f"score {score.total:.2f} (data {score.data_locality:.2f}, headroom {score.headroom:.2f}, "
        f"cost {score.cost:.2f}, pref {score.preference:.2f})"
    )


def ran_on(job: pb.Job) -> str:
    """The cluster that holds or held the job, even after the status moved on."""
    if job.status.cluster:
        return job.status.cluster
    for transition in reversed(job.status.history):
        if transition.cluster:
            return transition.cluster
    return ""


def _reason(job: pb.Job) -> str:
    parts = [p for p in (job.status.reason, job.status.message) if p]
    return ": ".join(parts)


def job_summary(job: pb.Job) -> str:
    """One line for a job's current situation: why it waits, where and why it ran."""
    state = job.status.state
    cluster = ran_on(job)
    if state == pb.PENDING:
        return job.pending_reason or _reason(job) or "waiting for a placement cycle"
    if state in (pb.DISPATCHED, pb.ADMITTED):
        return f"placed on {cluster} (generation {job.status.generation})"
    if state == pb.RUNNING:
        return f"running on {cluster} for {_elapsed(job.status.start_time)}"
    if state in TERMINAL:
        text = ""
        if cluster:
            took = _elapsed(job.status.start_time, job.status.finish_time)
            text = f"ran on {cluster}" + (f" for {took}" if took else "")
            if job.status.HasField("placement_score"):
                text += f"; {score_text(job.status.placement_score)}"
        elif state == pb.CANCELLED:
            text = "cancelled before placement"
        reason = _reason(job)
        if reason and state != pb.SUCCEEDED:
            text = f"{text} — {reason}" if text else reason
        return text
    return _reason(job)


def event_line(event: hub_pb2.JobEvent) -> str:
    """A plain, grep-friendly line per watch event."""
    job = event.job
    fields = [
        str(event.revision),
        _clock(job.status.update_time),
        job.id,
        job.spec.name,
        state_name(job.status.state),
        ran_on(job) or "-",
    ]
    summary = job_summary(job)
    if summary:
        fields.append(summary)
    return "  ".join(fields)


def job_table(jobs: Iterable[pb.Job], title: str | None = None) -> Table:
    table = Table(title=title, header_style="bold")
    for column in ("ID", "NAME", "QUEUE", "STATE", "CLUSTER", "CREATED", "DETAILS"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        table.add_row(
            job.id,
            job.spec.name,
            job.spec.queue,
            state_text(job.status.state),
            ran_on(job) or "-",
            format_time(job.create_time),
            job_summary(job),
        )
    return table


def _kv_table() -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    return table


def job_detail(job: pb.Job) -> RenderableType:
    """Everything `fedplane get` shows: spec summary, status, timestamps and the history."""
    status = job.status
    info = _kv_table()
    info.add_row("ID", job.id)
    info.add_row("Name", job.spec.name)
    info.add_row("Queue", job.spec.queue)
    if job.spec.priority:
        info.add_row("Priority", str(job.spec.priority))
    if job.spec.labels:
        info.add_row("Labels", ", ".join(f"{k}={v}" for k, v in sorted(job.spec.labels.items())))
    info.add_row("State", state_text(status.state))
    if _reason(job):
        info.add_row("Reason", _reason(job))
    if status.state == pb.PENDING and job.pending_reason:
        info.add_row("Pending", job.pending_reason)
    info.add_row("Cluster", status.cluster or "-")
    info.add_row("Generation", str(status.generation))
    info.add_row("Created", format_time(job.create_time))
    info.add_row("Started", format_time(status.start_time))
    info.add_row("Finished", format_time(status.finish_time))
    info.add_row("Updated", format_time(status.update_time))
    info.add_row("Revision", str(job.revision))
    if job.idempotency_key:
        info.add_row("Idempotency key", job.idempotency_key)
    if job.trace_id:
        info.add_row("Trace", job.trace_id)
    if status.HasField("placement_score"):
        info.add_row("Placement", score_text(status.placement_score))
    for ps in job.spec.pod_sets:
        gang = f", gang min {ps.min_count}" if ps.min_count else ""
        gpu = f", gpu type {ps.gpu_type}" if ps.gpu_type else ""
        info.add_row(f"Pod set {ps.name}", f"{ps.count} x {format_resources(ps.requests)}{gang}{gpu}")
    for a in status.assignments:
        info.add_row("Assignment", f"{a.pod_set}: {a.count} on {a.node}")
    history = Table(title="History", title_justify="left", header_style="bold")
    for column in ("TIME", "STATE", "CLUSTER", "GEN", "REASON", "MESSAGE"):
        history.add_column(column, overflow="fold")
    for t in status.history:
        history.add_row(
            format_time(t.time), state_text(t.state), t.cluster or "-", str(t.generation), t.reason, t.message
        )
    return Group(info, Text(""), history)


def cluster_table(clusters: Iterable[pb.Cluster]) -> Table:
    table = Table(header_style="bold")
    for column in (
        "NAME",
        "HEALTH",
        "HEARTBEAT",
        "CORDONED",
        "NODES",
        "CPU FREE",
        "MEM FREE",
        "GPU FREE",
        "DATASETS",
        "ACTIVE JOBS",
    ):
        table.add_column(column, overflow="fold")
    for c in clusters:
        ready = sum(1 for n in c.nodes if n.ready and not n.unschedulable)
        table.add_row(
            c.name + (" (edge)" if c.edge else ""),
            _admission_text(c) or _health_text(c.health),
            heartbeat_age(c),
            Text("yes", style="yellow") if c.cordoned else "no",
            f"{ready}/{len(c.nodes)}",
            _free_of(c.free, c.allocatable, quantity.CPU),
            _free_of(c.free, c.allocatable, quantity.MEMORY),
            _free_of(c.free, c.allocatable, quantity.GPU),
            ", ".join(d.id for d in c.datasets) or "-",
            str(c.active_jobs),
        )
    return table


_HEALTH_STYLES: dict[int, str] = {
    pb.READY: "green",
    pb.NOT_READY: "red",
    pb.UNKNOWN: "bold yellow",
    pb.LOST: "bold red",
}


def _admission_text(cluster: pb.Cluster) -> Text | None:
    """A cluster that is not admitted shows that instead of its health (it has none)."""
    if cluster.admission == pb.ADMISSION_PENDING:
        return Text("PENDING APPROVAL", style="bold yellow")
    if cluster.admission == pb.ADMISSION_REMOVED:
        return Text("REMOVED", style="dim")
    return None


def _health_text(health: int) -> Text:
    try:
        name = pb.ClusterHealth.Name(pb.ClusterHealth.ValueType(health))
    except ValueError:
        name = f"HEALTH_{health}"
    return Text(name, style=_HEALTH_STYLES.get(health, "dim"))


def format_age(seconds: float) -> str:
    """A short age: "12s", "3m", "5h", "2d" (whole units, rounded down)."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def heartbeat_age(cluster: pb.Cluster) -> str:
    """Time since the cluster's last heartbeat, as the hub that answered measured it (so the
    client's own clock does not matter), or "-" if it never sent one."""
    if not _is_set(cluster.last_heartbeat):
        return "-"
    return format_age(cluster.heartbeat_age_seconds)


def cluster_detail(cluster: pb.Cluster) -> RenderableType:
    """`fedplane cluster NAME`: the summary, every node and every dataset."""
    info = _kv_table()
    info.add_row("Name", cluster.name)
    health = _health_text(cluster.health)
    if cluster.health_reason:
        health.append(f" ({cluster.health_reason})")
    info.add_row("Health", health)
    admission = {pb.ADMISSION_PENDING: "waiting for approval", pb.ADMISSION_REMOVED: "removed"}.get(
        cluster.admission, "approved" + (f" by {cluster.approved_by}" if cluster.approved_by else "")
    )
    info.add_row("Admission", admission)
    if cluster.public_key:
        info.add_row("Key", cluster.public_key)
    if cluster.requested_key:
        asked = format_time(cluster.requested_time)
        info.add_row("Requested key", f"{cluster.requested_key} (asked {asked}; fedplane clusters approve)")
    last = format_time(cluster.last_heartbeat)
    info.add_row("Last heartbeat", last if last == "-" else f"{last} ({heartbeat_age(cluster)} ago)")
    if _is_set(cluster.lost_time):
        info.add_row("Lost since", format_time(cluster.lost_time))
    info.add_row("Edge", "yes (longer unknown and lost thresholds)" if cluster.edge else "no")
    cordon = (
        "yes" + (f" ({cluster.cordon_reason})" if cluster.cordon_reason else "") if cluster.cordoned else "no"
    )
    info.add_row("Cordoned", cordon)
    info.add_row("Labels", ", ".join(f"{k}={v}" for k, v in sorted(cluster.labels.items())) or "-")
    info.add_row("Taints", ", ".join(f"{t.key}={t.value}:{t.effect}" for t in cluster.taints) or "-")
    info.add_row("Cost", f"{cluster.cost:g}")
    info.add_row("Agent version", cluster.agent_version or "-")
    info.add_row("Active jobs", str(cluster.active_jobs))
    info.add_row("Allocatable", format_resources(cluster.allocatable))
    info.add_row("Free", format_resources(cluster.free))

    nodes = Table(title="Nodes", title_justify="left", header_style="bold")
    for column in ("NODE", "READY", "CPU FREE", "MEM FREE", "GPU FREE", "GPU TYPE", "TAINTS"):
        nodes.add_column(column, overflow="fold")
    for n in cluster.nodes:
        ready = Text("yes", style="green") if n.ready else Text("no", style="red")
        if n.unschedulable:
            ready = Text("cordoned", style="yellow")
        nodes.add_row(
            n.name,
            ready,
            _free_of(n.free, n.allocatable, quantity.CPU),
            _free_of(n.free, n.allocatable, quantity.MEMORY),
            _free_of(n.free, n.allocatable, quantity.GPU),
            n.labels.get(quantity.GPU_PRODUCT_LABEL, "-"),
            ", ".join(f"{t.key}={t.value}:{t.effect}" for t in n.taints) or "-",
        )
    datasets = Table(title="Datasets", title_justify="left", header_style="bold")
    datasets.add_column("DATASET")
    datasets.add_column("SIZE", justify="right")
    for d in cluster.datasets:
        datasets.add_row(d.id, quantity.format_quantity(quantity.MEMORY, d.bytes))
    return Group(info, Text(""), nodes, Text(""), datasets)


def explanation_table(explanation: pb.Explanation, title: str | None = None) -> RenderableType:
    """Every cluster's verdict, best first, with the chosen cluster highlighted."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in ("CLUSTER", "FEASIBLE", "TOTAL", "DATA", "HEADROOM", "COST", "PREF", "GROUP", "REASONS"):
        justify: JustifyMethod = "right" if column in _NUMERIC_COLUMNS else "left"
        table.add_column(column, justify=justify, overflow="fold")
    verdicts = sorted(explanation.verdicts, key=lambda v: (not v.feasible, -v.score.total, v.cluster))
    for v in verdicts:
        chosen = v.cluster == explanation.chosen_cluster
        name = Text(f"{v.cluster} *" if chosen else v.cluster, style="bold green" if chosen else "")
        feasible = Text("yes", style="green") if v.feasible else Text("no", style="red")
        score = [f"{x:.2f}" for x in (v.score.total, v.score.data_locality, v.score.headroom, v.score.cost)]
        table.add_row(
            name,
            feasible,
            *score,
            f"{v.score.preference:.2f}",
            str(v.group_rank),
            "; ".join(v.reasons),
        )
    if explanation.chosen_cluster:
        verdict = Text.assemble("chosen: ", (explanation.chosen_cluster, "bold green"))
    else:
        verdict = Text("chosen: none (no feasible cluster)", style="bold red")
    parts: list[RenderableType] = [table, verdict]
    if explanation.summary:
        parts.append(Text(explanation.summary))
    if explanation.queue:
        ahead = explanation.queue_position
        parts.append(
            Text(f"waiting in queue {explanation.queue}: {ahead} job{'s' if ahead != 1 else ''} ahead of it")
        )
    return Group(*parts)


class JobBoard:
    """A live table of a set of jobs, fed from a watch stream; render it with rich.live.Live.

    It keeps the newest state of each job (by revision), so replayed events are harmless.
    """

    def __init__(self, jobs: Iterable[pb.Job] = (), title: str = "Jobs") -> None:
        self.title = title
        self._jobs: dict[str, pb.Job] = {}
        for job in jobs:
            self.update(job)

    def update(self, item: pb.Job | hub_pb2.JobEvent) -> None:
        job = item.job if isinstance(item, hub_pb2.JobEvent) else item
        known = self._jobs.get(job.id)
        if known is not None and job.revision and job.revision < known.revision:
            return
        self._jobs[job.id] = job

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def jobs(self) -> list[pb.Job]:
        return list(self._jobs.values())

    @property
    def done(self) -> bool:
        """True once every job on the board is SUCCEEDED, FAILED or CANCELLED."""
        return bool(self._jobs) and all(j.status.state in TERMINAL for j in self._jobs.values())

    def counts(self) -> Counter[str]:
        return Counter(state_name(j.status.state) for j in self._jobs.values())

    def caption(self) -> str:
        counts = self.counts()
        order = [pb.JobState.Name(s) for s in pb.JobState.values() if s]
        return " · ".join(f"{counts[name]} {name.lower()}" for name in order if counts[name]) or "no jobs"

    def __rich__(self) -> Table:
        table = Table(title=self.title, caption=self.caption(), header_style="bold", expand=False)
        table.add_column("JOB", overflow="fold")
        table.add_column("QUEUE")
        table.add_column("STATE")
        table.add_column("CLUSTER")
        table.add_column("DETAILS", overflow="fold")
        for job in self._jobs.values():
            name = Text(job.spec.name or job.id)
            if job.spec.name:
                name.append(f" {job.id}", style="dim")
            table.add_row(
                name,
                job.spec.queue,
                state_text(job.status.state),
                ran_on(job) or "-",
                job_summary(job),
            )
        return table


def hub_status_table(status: hub_pb2.HubStatus) -> Table:
    """The replicas, the leader first; the title says who leads and under which fence."""
    if status.leader:
        title = (
            f"leader {status.leader} since {format_time(status.leader_since)}"
            f" (fencing revision {status.fencing_revision}, lease {status.lease_seconds:g}s)"
        )
    else:
        title = "no replica leads right now"
    table = Table(title=title, title_justify="left")
    for column in ("REPLICA", "ROLE", "ADDRESS", "SINCE", "STARTED", "VERSION"):
        table.add_column(column)
    replicas = sorted(status.replicas, key=lambda r: (r.role != "leader", r.id))
    for replica in replicas:
        role = Text(replica.role, style="bold green" if replica.role == "leader" else "")
        answered = " *" if replica.id == status.answered_by else ""
        table.add_row(
            replica.id + answered,
            role,
            replica.address,
            format_time(replica.role_since),
            format_time(replica.started),
            replica.version,
        )
    return table


def _tree_order(rows: Iterable[pb.QueueViewRow]) -> list[tuple[int, pb.QueueViewRow]]:
    """(depth, row) with each row under its parent: cohorts before queues, then by name. A
    row whose parent is not shown (a viewer sees only its queues) is a root."""
    rows = list(rows)
    cohorts = {r.name for r in rows if r.kind == "cohort"}
    children: dict[str, list[pb.QueueViewRow]] = {}
    for row in rows:
        children.setdefault(row.parent if row.parent in cohorts else "", []).append(row)
    out: list[tuple[int, pb.QueueViewRow]] = []
    seen: set[tuple[str, str]] = set()
    stack = [(0, r) for r in sorted(children.get("", []), key=_tree_key, reverse=True)]
    while stack:
        depth, row = stack.pop()
        if (row.kind, row.name) in seen:
            continue  # a cycle cannot be stored, but a table must never loop
        seen.add((row.kind, row.name))
        out.append((depth, row))
        if row.kind == "cohort":
            below = sorted(children.get(row.name, []), key=_tree_key, reverse=True)
            stack.extend((depth + 1, child) for child in below)
    return out


def _tree_key(row: pb.QueueViewRow) -> tuple[bool, str]:
    return row.kind != "cohort", row.name


def _usage_line(usage: pb.QueueResourceUsage) -> str:
    """ "gpu-h100 gpu 12/16 +4 borrowed" : usage over nominal, and what is borrowed and lent."""
    resource = usage.resource

    def amount(value: int) -> str:
        return quantity.format_quantity(resource, value)

    name = _SHORT_RESOURCES.get(resource, resource)
    line = f"{usage.flavor} {name} {amount(usage.usage)}/{amount(usage.nominal)}"
    if usage.borrowed:
        line += f" +{amount(usage.borrowed)} borrowed"
    if usage.lent:
        line += f" {amount(usage.lent)} lent"
    return line


def queue_view_table(view: pb.QueueView) -> Table:
    """`fedplane queues`: the cohort tree with its queues, each with its weight and share, its
    usage of every flavor and resource against its nominal quota, and its jobs."""
    table = Table(header_style="bold")
    for column in ("NAME", "KIND", "WEIGHT", "SHARE", "USAGE/NOMINAL", "PENDING", "ADMITTED", "STATUS"):
        justify: JustifyMethod = "right" if column in ("WEIGHT", "SHARE", "PENDING", "ADMITTED") else "left"
        table.add_column(column, justify=justify, overflow="fold")
    for depth, row in _tree_order(view.rows):
        table.add_row(
            "  " * depth + row.name,
            row.kind,
            f"{row.weight:g}",
            f"{row.share:.2f}",
            "\n".join(_usage_line(u) for u in row.resources) or Text("no quota", style="dim"),
            str(row.pending),
            str(row.admitted),
            Text("HELD", style="bold yellow") if row.held else "",
        )
    if not view.rows:
        table.caption = "no queues: create them with fedplane apply -f FILE"
    return table
