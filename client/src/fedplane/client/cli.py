"""The `fedplane` command: submit and inspect jobs and clusters, and run the daemons.

Every expected failure (bad spec, hub error, unreachable hub) is one line on stderr and exit
code 2, so scripts can rely on the exit code and humans never see a traceback for a typo.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, NoReturn, TypeVar

import grpc
import typer
import yaml
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

from fedplane.client import context as context_file
from fedplane.client import display
from fedplane.client import objects as queue_objects
from fedplane.client.sdk import FedplaneClient, FedplaneError, Tls
from fedplane.client.spec import SpecError, load_file
from fedplane.runtime import entry
from fedplane.v1 import hub_pb2
from fedplane.v1 import types_pb2 as pb

__all__ = ["app", "main"]

T = TypeVar("T")

DEFAULT_HUB = "127.0.0.1:50051"
EXIT_ERROR = entry.EXIT_ERROR
EXIT_JOBS_FAILED = 1
EXIT_INTERRUPTED = entry.EXIT_INTERRUPTED
PIPE_WIDTH = 200

app = typer.Typer(
    name="fedplane",
    help="Submit batch/AI jobs to a Fedplane hub and inspect where they run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


class Output(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


@dataclass
class _Options:
    """The connection settings given as flags or environment variables; what they leave out
    comes from the context file, read only when a command talks to the hub."""

    hub: str = ""
    ca: str = ""
    cert: str = ""
    key: str = ""
    tls: bool = False
    token: str = ""
    token_file: str = ""
    context: str = ""

    def connection(self) -> tuple[str, Tls | None, str]:
        """(hub address, TLS settings or None, bearer token); a bad context or token file fails."""
        ctx = self._context()
        hub = self.hub or ctx.hub or DEFAULT_HUB
        cert, key = (self.cert, self.key) if self.cert or self.key else (ctx.cert_file, ctx.key_file)
        ca = self.ca or ctx.ca_file
        secure = self.tls or ctx.tls or bool(ca or cert)
        if self.token or self.token_file:
            token = self.token or _read_token(self.token_file, "--token-file")
        else:
            token = ctx.token or (_read_token(ctx.token_file, "token_file") if ctx.token_file else "")
        return hub, Tls(ca, cert, key) if secure else None, token

    def _context(self) -> context_file.Context:
        path = Path(self.context) if self.context else context_file.default_path()
        if not self.context and not path.exists():
            return context_file.Context()
        try:
            return context_file.load(path)
        except context_file.ContextError as exc:
            _fail(str(exc))


def _read_token(path: str, what: str) -> str:
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        _fail(f"{what} {path}: cannot read it: {exc.strerror}")
    if not token:
        _fail(f"{what} {path}: the file is empty")
    return token


OutputOption = Annotated[Output, typer.Option("--output", "-o", help="Output format.")]


@app.callback()
def _root(
    ctx: typer.Context,
    hub: Annotated[
        str,
        typer.Option(
            "--hub", envvar="FEDPLANE_HUB", help=f"Hub gRPC address (host:port; default {DEFAULT_HUB})."
        ),
    ] = "",
    ca: Annotated[
        str,
        typer.Option("--ca", envvar="FEDPLANE_CA", help="Use TLS, trusting this CA (PEM) for the hub."),
    ] = "",
    cert: Annotated[
        str, typer.Option("--cert", envvar="FEDPLANE_CERT", help="Client certificate (PEM), for mutual TLS.")
    ] = "",
    key: Annotated[str, typer.Option("--key", envvar="FEDPLANE_KEY", help="Client key (PEM).")] = "",
    tls: Annotated[
        bool, typer.Option("--tls", envvar="FEDPLANE_TLS", help="Use TLS with the system's CAs.")
    ] = False,
    token: Annotated[
        str, typer.Option("--token", envvar="FEDPLANE_TOKEN", help="Bearer token (static token or OIDC JWT).")
    ] = "",
    token_file: Annotated[
        str,
        typer.Option("--token-file", envvar="FEDPLANE_TOKEN_FILE", help="Read the bearer token from a file."),
    ] = "",
    context: Annotated[
        str,
        typer.Option(
            "--context",
            envvar="FEDPLANE_CONTEXT",
            help="Context file (hub, CA, certificate, token) used for what no flag gives;"
            " default ~/.config/fedplane/context.yaml if it exists.",
        ),
    ] = "",
) -> None:
    if bool(cert) != bool(key):
        _fail("--cert and --key go together")
    if token and token_file:
        _fail("give --token or --token-file, not both")
    ctx.obj = _Options(hub, ca, cert, key, tls, token, token_file, context)


# -- plumbing -----------------------------------------------------------------------------------


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


def _connection(ctx: typer.Context) -> tuple[str, Tls | None, str]:
    options = ctx.find_object(_Options) or _Options()
    return options.connection()


def _run(ctx: typer.Context, action: Callable[[FedplaneClient], Coroutine[Any, Any, T]]) -> T:
    """Run one async action against the hub, turning expected failures into one stderr line."""
    hub, tls, token = _connection(ctx)

    async def go() -> T:
        async with FedplaneClient(hub, tls=tls, token=token) as client:
            return await action(client)

    try:
        return asyncio.run(go())
    except FedplaneError as exc:
        if exc.unavailable:
            _fail(f"cannot reach the hub at {hub}: {exc.message}")
        if exc.code == grpc.StatusCode.UNAUTHENTICATED:
            _fail(f"{exc} (give --token, --token-file or a context file: docs/cli.md)")
        _fail(str(exc))
    except SpecError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _load_specs(files: Sequence[Path]) -> list[tuple[str, pb.JobSpec]]:
    """(label, spec) for every document of every file, label = `file[index]` for messages."""
    specs: list[tuple[str, pb.JobSpec]] = []
    for path in files:
        try:
            loaded = load_file(path)
        except SpecError as exc:
            _fail(str(exc))
        if not loaded:
            _fail(f"{path}: no job specs, only queue objects (apply them with fedplane apply -f {path})")
        specs.extend((f"{path}[{i}]", spec) for i, spec in enumerate(loaded))
    return specs


def _console() -> Console:
    """Rich console for stdout; unwrapped-ish when piped, so `| grep` sees whole rows."""
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=PIPE_WIDTH)
    return console


def _to_data(value: Message | Sequence[Message]) -> Any:
    if isinstance(value, Message):
        return MessageToDict(value)
    return [MessageToDict(m) for m in value]


def _emit(value: Message | Sequence[Message], output: Output, table: Callable[[], RenderableType]) -> None:
    if output is Output.json:
        typer.echo(json.dumps(_to_data(value), indent=2))
    elif output is Output.yaml:
        typer.echo(yaml.safe_dump(_to_data(value), sort_keys=False, allow_unicode=True), nl=False)
    else:
        _console().print(table())


def _parse_states(values: Sequence[str]) -> list[pb.JobState.ValueType]:
    names = [n for v in values for n in v.replace(",", " ").split()]
    states: list[pb.JobState.ValueType] = []
    for name in names:
        try:
            states.append(pb.JobState.Value(name.upper()))
        except ValueError:
            valid = ", ".join(n.lower() for n in pb.JobState.keys() if n != "JOB_STATE_UNSPECIFIED")
            _fail(f"--state {name!r} is not a job state (one of: {valid})")
    return states


def _parse_labels(values: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--label {item!r} must look like key=value")
        labels[key] = value
    return labels


# -- jobs ---------------------------------------------------------------------------------------


@app.command()
def submit(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="Job spec YAML files (one or more documents each).")],
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Show live progress until every job finishes.")
    ] = False,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="Idempotency key; resubmitting with the same key returns the existing job. "
            "With several specs, spec N gets KEY-N. Default: a fresh random key per spec.",
        ),
    ] = None,
) -> None:
    """Submit jobs; with --wait, follow them live and exit 1 unless all succeed."""
    specs = _load_specs(files)
    if key:
        keys = [key] if len(specs) == 1 else [f"{key}-{i}" for i in range(len(specs))]
    else:
        keys = [str(uuid.uuid4()) for _ in specs]

    async def go(client: FedplaneClient) -> int:
        results = await client.submit_many([(spec, k) for (_, spec), k in zip(specs, keys, strict=True)])
        for job, created in results:
            verb = "submitted" if created else "already exists:"
            typer.echo(f"{verb} job {job.id} ({job.spec.name}) in queue {job.spec.queue}")
        if not wait:
            return 0
        return await _follow(client, [job for job, _ in results])

    code = _run(ctx, go)
    if code:
        raise typer.Exit(code)


async def _follow(client: FedplaneClient, jobs: list[pb.Job]) -> int:
    """Live board until all jobs are terminal, then where each ran; 1 if any did not succeed."""
    console = _console()
    board = display.JobBoard(jobs, title="Jobs")
    # Refresh only from the event loop, so the board is never read while being updated.
    with Live(board, console=console, auto_refresh=False, transient=False) as live:

        def on_event(job: pb.Job) -> None:
            board.update(job)
            live.refresh()

        async def tick() -> None:
            while True:  # keeps elapsed times moving between events
                await asyncio.sleep(1.0)
                live.refresh()

        ticker = asyncio.create_task(tick())
        try:
            final = await client.wait([j.id for j in jobs], on_event=on_event)
        except asyncio.CancelledError:
            ids = " ".join(j.id for j in jobs)
            typer.echo(f"interrupted; the jobs keep running (fedplane get {ids})", err=True)
            raise
        finally:
            ticker.cancel()
    if not console.is_terminal:
        console.line()  # rich ends the final frame with a newline only on terminals
    failed = 0
    for job in final.values():
        state = job.status.state
        failed += state != pb.SUCCEEDED
        console.print(
            display.state_text(state),
            f"{job.spec.name} {job.id}:",
            display.job_summary(job) or "-",
            soft_wrap=True,
        )
    return EXIT_JOBS_FAILED if failed else 0


@app.command()
def get(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job id.")],
    output: OutputOption = Output.table,
) -> None:
    """Show one job: state, cluster, generation, timestamps and transition history."""
    result = _run(ctx, lambda c: c.get(job))
    _emit(result, output, lambda: display.job_detail(result))


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    queue: Annotated[str, typer.Option("--queue", "-q", help="Only jobs in this queue.")] = "",
    state: Annotated[
        list[str] | None, typer.Option("--state", "-s", help="Only jobs in these states (repeatable).")
    ] = None,
    cluster: Annotated[str, typer.Option("--cluster", "-c", help="Only jobs on this cluster.")] = "",
    label: Annotated[
        list[str] | None,
        typer.Option("--label", "-l", help="Only jobs with this label, key=value (repeatable)."),
    ] = None,
    output: OutputOption = Output.table,
) -> None:
    """List jobs (all pages), optionally filtered."""
    states = _parse_states(state or [])
    labels = _parse_labels(label or [])
    jobs = _run(ctx, lambda c: c.list(queue=queue, states=states, cluster=cluster, labels=labels))
    _emit(jobs, output, lambda: display.job_table(jobs))


@app.command()
def watch(
    ctx: typer.Context,
    from_revision: Annotated[
        int, typer.Option("--from-revision", help="Replay changes after this revision (0 = from now on).")
    ] = 0,
    queue: Annotated[str, typer.Option("--queue", "-q", help="Only jobs in this queue.")] = "",
    job: Annotated[
        list[str] | None, typer.Option("--job", "-j", help="Only these job ids (repeatable).")
    ] = None,
) -> None:
    """Print one line per job change until Ctrl-C; survives hub restarts."""

    async def go(client: FedplaneClient) -> None:
        events = client.watch(from_revision=from_revision, queue=queue, job_ids=job or [])
        try:
            async for event in events:
                typer.echo(display.event_line(event))
        finally:
            await events.aclose()

    try:
        _run(ctx, go)
    except typer.Exit as exc:
        if exc.exit_code != EXIT_INTERRUPTED:
            raise  # Ctrl-C is the normal way to stop watching


@app.command()
def cancel(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job id.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Recorded in the job's history.")] = "",
) -> None:
    """Cancel a job; a running job is CANCELLING until its cluster deletes the workload."""
    result = _run(ctx, lambda c: c.cancel(job, reason))
    typer.echo(f"job {result.id} ({result.spec.name}): {display.state_name(result.status.state)}")


@app.command()
def priority(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job id.")],
    to: Annotated[
        str, typer.Argument(metavar="CLASS_OR_VALUE", help="A priority class's name, or a priority value.")
    ],
) -> None:
    """Change a job's priority while it waits (its place in its queue) or runs (who may preempt it)."""
    value = int(to) if to.lstrip("-").isdigit() else None
    result = _run(
        ctx, lambda c: c.set_priority(job, priority=value, priority_class="" if value is not None else to)
    )
    status = result.status
    shown = status.priority if status.HasField("priority") else result.spec.priority
    typer.echo(f"job {result.id} ({result.spec.name}): priority {shown}, {display.state_name(status.state)}")


@app.command()
def explain(
    ctx: typer.Context,
    target: Annotated[
        str, typer.Argument(metavar="JOB_OR_FILE", help="A job id, or a spec file to dry-run.")
    ],
    output: OutputOption = Output.table,
) -> None:
    """Show every cluster's verdict and score for a job, or for the specs in a file (dry run)."""
    path = Path(target)
    if path.is_file():
        specs = _load_specs([path])

        async def dry_run(client: FedplaneClient) -> list[pb.Explanation]:
            return [await client.explain_spec(spec) for _, spec in specs]

        results = _run(ctx, dry_run)
        titles = [f"{label} {spec.name}" for label, spec in specs]
        if output is Output.table:
            console = _console()
            for title, result in zip(titles, results, strict=True):
                console.print(display.explanation_table(result, title=title))
                console.print()
        else:
            _emit(results, output, lambda: "")
        return
    if path.suffix in (".yaml", ".yml", ".json") or "/" in target:
        _fail(f"{target}: no such file")
    result = _run(ctx, lambda c: c.explain(target))
    _emit(result, output, lambda: display.explanation_table(result, title=f"job {target}"))


def _stats_table(stats: hub_pb2.JobStats, queue: str) -> Table:
    """Every state in lifecycle order, zeros included, so tables from two moments line up."""
    table = Table(
        title=f"Jobs in queue {queue}" if queue else "Jobs in all queues",
        caption=f"revision {stats.revision}",
        header_style="bold",
    )
    table.add_column("STATE")
    table.add_column("JOBS", justify="right")
    known = [pb.JobState.Value(n) for n in pb.JobState.keys() if n != "JOB_STATE_UNSPECIFIED"]
    names = [display.state_name(s) for s in known]
    for state, name in zip(known, names, strict=True):
        count = stats.by_state.get(name, 0)
        table.add_row(display.state_text(state), str(count), style="" if count else "dim")
    for name, count in sorted(stats.by_state.items()):
        if name not in names:  # a state this CLI does not know yet
            table.add_row(name, str(count))
    table.add_section()
    table.add_row("TOTAL", str(stats.total), style="bold")
    return table


@app.command()
def stats(
    ctx: typer.Context,
    queue: Annotated[str, typer.Option("--queue", "-q", help="Only jobs in this queue.")] = "",
    output: OutputOption = Output.table,
) -> None:
    """Count jobs per state, from the hub's memory (cheap: fine to poll)."""
    result = _run(ctx, lambda c: c.job_stats(queue))
    _emit(result, output, lambda: _stats_table(result, queue))


# -- clusters -----------------------------------------------------------------------------------


clusters_app = typer.Typer(
    help="Member clusters: list them (no subcommand), approve one that asks to join, remove one.",
    no_args_is_help=False,
)
app.add_typer(clusters_app, name="clusters")


@clusters_app.callback(invoke_without_command=True)
def clusters(ctx: typer.Context, output: OutputOption = Output.table) -> None:
    """List member clusters with admission, health, free capacity, datasets and active jobs."""
    if ctx.invoked_subcommand is not None:
        return
    result = _run(ctx, lambda c: c.clusters())
    _emit(result, output, lambda: display.cluster_table(result))


@clusters_app.command("approve")
def approve_cluster(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Cluster name.")],
    key: Annotated[
        str,
        typer.Option(
            "--key",
            help="Approve only this public key (U...): the one the site's operator read from its agent's log."
            " For a cluster that has not asked yet, pre-approve this key.",
        ),
    ] = "",
) -> None:
    """Admit a cluster whose agent asked to join: its key becomes its credential."""
    result = _run(ctx, lambda c: c.approve_cluster(name, key))
    typer.echo(f"cluster {result.name} approved (key {result.public_key})")


@clusters_app.command("remove")
def remove_cluster(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Cluster name.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Recorded in the audit log.")] = "",
) -> None:
    """Remove a cluster: revoke its credential and handle its jobs as a lost cluster's."""
    removed, affected = _run(ctx, lambda c: c.remove_cluster(name, reason))
    typer.echo(f"cluster {removed.name} removed; {affected} job(s) on it follow their disconnect policy")


@app.command()
def cluster(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Cluster name.")],
    output: OutputOption = Output.table,
) -> None:
    """Show one cluster: labels, taints, nodes and datasets."""
    result = _run(ctx, lambda c: c.cluster(name))
    _emit(result, output, lambda: display.cluster_detail(result))


@app.command()
def cordon(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Cluster name.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Shown in `fedplane cluster`.")] = "",
) -> None:
    """Stop placing new jobs on a cluster; its running jobs stay."""
    result = _run(ctx, lambda c: c.cordon(name, reason))
    suffix = f" ({result.cordon_reason})" if result.cordon_reason else ""
    typer.echo(f"cluster {result.name} cordoned{suffix}")


@app.command()
def uncordon(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Cluster name.")]) -> None:
    """Allow new placements on a cluster again."""
    result = _run(ctx, lambda c: c.uncordon(name))
    typer.echo(f"cluster {result.name} uncordoned")


# -- queues -------------------------------------------------------------------------------------


def _apply_outcome(kind: str, item: Any, before: pb.QueueObjects) -> str:
    """created, configured or unchanged: `item` against the object of its kind and name before."""
    old = next((o for o in getattr(before, queue_objects.KINDS[kind]) if o.name == item.name), None)
    if old is None:
        return "created"
    return "unchanged" if old == item else "configured"


@app.command()
def apply(
    ctx: typer.Context,
    files: Annotated[
        list[Path],
        typer.Option(
            "--filename",
            "-f",
            help="YAML file of queues, cohorts, flavors and priority classes (repeatable).",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check everything and show the outcome; change nothing.")
    ] = False,
) -> None:
    """Create or replace queues, cohorts, resource flavors and priority classes from YAML: all of
    them or, if anything is wrong, none."""
    try:
        objects = queue_objects.load_files(files)
    except queue_objects.ObjectsError as exc:
        _fail(str(exc))

    async def go(client: FedplaneClient) -> tuple[pb.QueueObjects, pb.QueueObjects]:
        for attempt in range(3):
            # The revision listed is the one applied to, so "created" and "configured" are exact.
            before = await client.queue_objects()
            try:
                after = await client.apply_queue_objects(
                    objects, dry_run=dry_run, expected_revision=before.revision
                )
            except FedplaneError as exc:
                if exc.code != grpc.StatusCode.ABORTED or attempt == 2:
                    raise
                continue
            return before, after
        raise AssertionError("unreachable")  # pragma: no cover

    before, _ = _run(ctx, go)
    suffix = " (dry run)" if dry_run else ""
    for kind, field in queue_objects.KINDS.items():
        for item in getattr(objects, field):
            typer.echo(f"{kind} {item.name} {_apply_outcome(kind, item, before)}{suffix}")


@app.command()
def delete(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="Queue, Cohort, ResourceFlavor or PriorityClass.")],
    name: Annotated[str, typer.Argument(help="The object's name.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check only; delete nothing.")] = False,
) -> None:
    """Delete a queue (only once it holds no unfinished jobs), cohort, flavor or priority class."""
    try:
        canonical = queue_objects.kind_of(kind)
    except ValueError as exc:
        _fail(str(exc))
    _run(ctx, lambda c: c.delete_queue_objects([(canonical, name)], dry_run=dry_run))
    typer.echo(f"{canonical} {name} deleted{' (dry run)' if dry_run else ''}")


@app.command()
def queues(ctx: typer.Context, output: OutputOption = Output.table) -> None:
    """The cohort tree and its queues: weight, share, usage against quota, jobs; with -o yaml,
    every queue object as YAML that `fedplane apply -f` takes back."""
    if output is Output.yaml:
        objects = _run(ctx, lambda c: c.queue_objects())
        typer.echo(queue_objects.dump_yaml(objects), nl=False)
        return
    view = _run(ctx, lambda c: c.queue_view())
    _emit(view, output, lambda: display.queue_view_table(view))


queue_app = typer.Typer(help="One queue: hold or release it.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")


@queue_app.command("hold")
def hold_queue(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Queue name.")]) -> None:
    """Admit no new jobs from a queue (it still takes submits; its running jobs stay)."""
    _run(ctx, lambda c: c.set_queue_held(name, True))
    typer.echo(f"queue {name} held")


@queue_app.command("release")
def release_queue(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Queue name.")]) -> None:
    """Admit jobs from a held queue again."""
    _run(ctx, lambda c: c.set_queue_held(name, False))
    typer.echo(f"queue {name} released")


# -- daemons ------------------------------------------------------------------------------------


def _daemon(module_name: str, start: Callable[[ModuleType], object]) -> None:
    """Import a daemon lazily (the CLI must work without its dependencies) and run it."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        _fail(f"cannot start {module_name}: {exc}")
    try:
        start(module)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (*entry.EXPECTED, SpecError) as exc:
        _fail(str(exc))


def _config(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        _fail(f"{path}: no such file")
    return str(path)


ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]


hub_app = typer.Typer(no_args_is_help=False)
app.add_typer(hub_app, name="hub")


@hub_app.callback(invoke_without_command=True)
def hub(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Run a hub replica (gRPC API, scheduler, NATS consumers) until Ctrl-C; `hub status` shows
    which replica leads."""
    if ctx.invoked_subcommand is not None:
        return
    config_path = _config(config)
    _daemon("fedplane.hub.server", lambda m: m.main(config_path))


@hub_app.command("status")
def hub_status(ctx: typer.Context, output: OutputOption = Output.table) -> None:
    """Which hub replica leads, since when, and each replica's role."""
    result = _run(ctx, lambda c: c.hub_status())
    _emit(result, output, lambda: display.hub_status_table(result))


@app.command()
def agent(config: Annotated[Path, typer.Option("--config", "-c", help="Agent YAML config file.")]) -> None:
    """Run a member-cluster agent until Ctrl-C."""
    config_path = _config(config)
    _daemon("fedplane.agent.daemon", lambda m: m.main(config_path))


@app.command()
def up(
    clusters: Annotated[
        int | None, typer.Option("--clusters", "-n", help="Number of simulated clusters.", min=1)
    ] = None,
    jobs: Annotated[Path | None, typer.Option("--jobs", help="Submit every spec in this directory.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Where etcd/NATS keep state (default: a temp dir).")
    ] = None,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="Keep the federation up after the jobs finish.")
    ] = False,
    edge: Annotated[
        int,
        typer.Option(
            "--edge",
            help="Run the last N clusters as an edge site, behind a NATS leaf node (SIGUSR1 cuts its link).",
            min=0,
        ),
    ] = 0,
    jaeger: Annotated[
        bool,
        typer.Option(
            "--jaeger", help="Also run Jaeger (built by tools/build_go_tool.sh) and send it every trace."
        ),
    ] = False,
) -> None:
    """Start a local federation (etcd, NATS, hub, simulated clusters) and run jobs on it."""
    if jobs is not None and not jobs.is_dir():
        _fail(f"{jobs}: no such directory")
    if edge > (clusters if clusters is not None else 3):
        _fail(f"--edge {edge}: more edge clusters than clusters ({clusters or 3}); raise --clusters")

    def start(module: ModuleType) -> None:
        kwargs: dict[str, Any] = {"jobs_dir": jobs, "data_dir": data_dir, "keep_running": keep_running}
        for name, value, default in (
            ("clusters", clusters, None),
            ("edge", edge, 0),
            ("jaeger", jaeger, False),
        ):
            if value != default:
                if name not in inspect.signature(module.main).parameters:
                    _fail(f"--{name} is not supported by this version of fedplane.local")
                kwargs[name] = value
        module.main(**kwargs)

    _daemon("fedplane.local.federation", start)


class BenchOutput(StrEnum):
    table = "table"
    json = "json"


@app.command()
def bench(
    clusters: Annotated[
        int, typer.Option("--clusters", help="Member clusters (simulated: agents sharing one fleet process).")
    ] = 10,
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes per cluster.")] = 100,
    node_cpu: Annotated[int, typer.Option("--node-cpu", help="CPUs per node.")] = 64,
    jobs: Annotated[int, typer.Option("--jobs", help="Jobs to submit in the measured load.")] = 20_000,
    rate: Annotated[
        float, typer.Option("--rate", help="Offered jobs/s, open loop; 0 = as fast as the hub accepts.")
    ] = 0.0,
    duration: Annotated[float, typer.Option("--duration", help="How long each job runs, seconds.")] = 30.0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Jobs per RPC: 1 = SubmitJob each, more = SubmitJobs.")
    ] = 1,
    gangs: Annotated[
        str, typer.Option("--gangs", help="Gang sizes (pods of 1 cpu, all-or-nothing), cycled: e.g. 1,4.")
    ] = "1",
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", help="RPCs in flight with --rate 0 (default 64 single, 4 batched)."),
    ] = 0,
    queued: Annotated[
        int, typer.Option("--queued", help="First queue this many jobs behind cordoned clusters, then drain.")
    ] = 0,
    drain_seconds: Annotated[
        float,
        typer.Option(
            "--drain-seconds",
            help="With --queued: measure the drain for this long instead of until empty (0).",
        ),
    ] = 0.0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Bound on the measured load, seconds; a timeout is reported.")
    ] = 600.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the result JSON here.")] = None,
    output: Annotated[BenchOutput, typer.Option("--output", "-o", help="Output format.")] = BenchOutput.table,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="Run as production must: gRPC TLS and a token, etcd TLS and RBAC, NATS admission by key.",
        ),
    ] = False,
    queues: Annotated[
        int,
        typer.Option(
            "--queues",
            help="Spread the jobs round-robin over this many queues of a cohort tree applied first "
            "(0: one implicit queue).",
        ),
    ] = 0,
    queue_quota: Annotated[
        str,
        typer.Option(
            "--queue-quota",
            help="With --queues: generous (quota never blocks) or tight (jobs wait for quota).",
        ),
    ] = "generous",
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="simulated (one fleet process), or kubernetes: each cluster a real kube-apiserver and "
            "etcd with its own agent; a job counts as dispatched when its Job exists (no kubelet runs).",
        ),
    ] = "simulated",
) -> None:
    """Benchmark a local federation on real etcd and NATS: throughput, latency, hub CPU and memory."""
    # Imported here: the benchmark pulls in the agent and the servers, which other commands never need.
    from fedplane.bench import federation, loadgen, report

    try:
        gang_sizes = loadgen.parse_gangs(gangs)
    except ValueError as exc:
        _fail(str(exc))
    params = federation.BenchParams(
        clusters=clusters,
        nodes=nodes,
        node_cpu=node_cpu,
        jobs=jobs,
        rate=rate,
        duration=duration,
        batch_size=batch_size,
        gangs=gang_sizes,
        concurrency=concurrency,
        queued=queued,
        drain_seconds=drain_seconds,
        timeout=timeout,
        secure=secure,
        queues=queues,
        queue_quota=queue_quota,
        backend=backend,
    )
    problems = params.problems()
    if problems:
        _fail("; ".join(problems))
    if json_path is not None and not json_path.parent.is_dir():
        _fail(f"--json: {json_path.parent} is not a directory")
    try:
        result = federation.run(params, progress=lambda line: typer.echo(f"bench: {line}", err=True))
    except federation.BenchError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    text = json.dumps(result, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n")
    if output is BenchOutput.json:
        typer.echo(text)
    else:
        _console().print(report.render(result))
    figures = result["results"]
    if figures["timed_out"] or figures["submit_errors"]:
        raise typer.Exit(EXIT_JOBS_FAILED)


@app.command()
def chaos(
    duration: Annotated[
        float, typer.Option("--duration", help="Seconds of faults under load (the run then settles).")
    ] = 60.0,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the faults, targets and timings.")] = 0,
    hubs: Annotated[int, typer.Option("--hubs", help="Hub replicas (one without leader election).")] = 2,
    agents: Annotated[int, typer.Option("--agents", help="Simulated clusters.")] = 3,
    edge_agents: Annotated[
        int,
        typer.Option("--edge-agents", help="Extra edge sites, each behind a leaf node with a cuttable link."),
    ] = 1,
    rate: Annotated[float, typer.Option("--rate", help="Jobs submitted per second.")] = 8.0,
    settle: Annotated[
        float, typer.Option("--settle", help="Seconds allowed for every accepted job to finish afterwards.")
    ] = 60.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    keep: Annotated[
        bool,
        typer.Option("--keep", help="Keep the work directory (logs, ledgers, etcd data) even if all holds."),
    ] = False,
) -> None:
    """Run a local federation under random faults, then check its invariants; exit 1 if one broke."""
    # Imported here: the chaos harness pulls in the agent, the servers and rich tables.
    from fedplane.chaos import runner

    params = runner.ChaosParams(
        duration=duration,
        seed=seed,
        hubs=hubs,
        agents=agents,
        edge_agents=edge_agents,
        rate=rate,
        settle=settle,
    )
    problems = params.problems()
    if problems:
        _fail("; ".join(problems))

    def progress(event: Any) -> None:
        typer.echo(f"chaos: {event.at:6.1f}s {event.action} {event.target} {event.detail}".rstrip(), err=True)

    try:
        outcome = runner.run(params, on_event=progress, keep=keep)
    except runner.HarnessError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if json_output:
        typer.echo(json.dumps(outcome.as_dict(), indent=2))
    else:
        _console().print(runner.render(outcome))
    if not outcome.ok:
        raise typer.Exit(EXIT_JOBS_FAILED)


def main() -> None:
    app(prog_name="fedplane")
