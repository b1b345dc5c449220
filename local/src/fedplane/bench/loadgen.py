"""The load generator: submits one benchmark run's jobs to a hub over gRPC and measures them.

It runs as its own process, so the client's CPU is never counted as the hub's, and talks to
the hub only through the public API (SubmitJob/SubmitJobs, GetJobStats, ListJobs).

- `--rate 0` submits as fast as the hub accepts: `--concurrency` RPCs in flight at all times.
- `--rate R` is open loop: one RPC of `--batch-size` jobs every batch/R seconds on a fixed
  timetable, never waiting for replies. Only a safety cap on RPCs in flight can hold a send
  back, and the result says how often it did and how late sends were against the timetable.

Every job's send and reply times are taken here (time.time()); its ADMITTED and RUNNING times
come from the hub's transition history. Both clocks are this machine's wall clock.

    python -m fedplane.benchmark.loadgen --hub 127.0.0.1:50051 --jobs 10000 --rate 1000 --out r.json
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedplane.agent.simulated import DURATION_ANNOTATION
from fedplane.client.sdk import FedplaneClient, FedplaneError, Tls
from fedplane.core import dispatch as sm
from fedplane.v1 import types_pb2 as pb

RUN_LABEL = "bench-run"
# (name, from state, to state): the stages of a job's path, timed by the hub's transition history.
STAGES = (
    ("pending_to_dispatched", pb.PENDING, pb.DISPATCHED),
    ("dispatched_to_admitted", pb.DISPATCHED, pb.ADMITTED),
    ("admitted_to_running", pb.ADMITTED, pb.RUNNING),
)
# A job in one of these states has not yet been started by its cluster.
UNSETTLED = ("PENDING", "DISPATCHED", "ADMITTED")
# Into real member clusters (`--backend kubernetes`) no kubelet runs, so jobs never start: a job
# is settled once ADMITTED, which the agent reports when the workload object exists.
UNSETTLED_KUBERNETES = ("PENDING", "DISPATCHED")
BACKENDS = ("simulated", "kubernetes")
POLL_INTERVAL = 0.25
PAGE_SIZE = 1000
# SubmitJobs takes at most 10,000 jobs, and a reply of more than ~5,000 jobs would pass gRPC's
# default 4 MiB message limit.
MAX_BATCH = 5000
DEFAULT_CONCURRENCY_SINGLE = 64
DEFAULT_CONCURRENCY_BATCH = 4
# How long reading the finished run back may take, after the --timeout of the run itself.
READ_TIMEOUT = 300.0


@dataclass(frozen=True)
class LoadParams:
    hub: str
    jobs: int
    rate: float = 0.0
    batch_size: int = 1
    gangs: tuple[int, ...] = (1,)
    duration: float = 30.0
    run_id: str = "bench"
    queue: str = "bench"
    # 0: every job in `queue`; N: job i in the (i mod N)-th of `queue_names(queue, N)`.
    queues: int = 0
    # RPCs in flight with --rate 0; 0 picks 64 for single submits, 4 for batches.
    concurrency: int = 0
    # Open loop only: the most RPCs in flight before a send must wait (reported when hit).
    max_in_flight: int = 5000
    timeout: float = 600.0
    # A hub with TLS and token authentication (bench --secure): its CA and the token.
    ca_file: str = ""
    token: str = ""
    # simulated: jobs run (a Job manifest without a pod template is enough); kubernetes: a
    # complete batch/v1 Job, settled when ADMITTED (the workload exists).
    backend: str = "simulated"
    # If set: write {job id: send time} here, to time the workloads' creation against.
    sends_out: str = ""

    @property
    def unsettled(self) -> tuple[str, ...]:
        return UNSETTLED_KUBERNETES if self.backend == "kubernetes" else UNSETTLED

    def client(self) -> FedplaneClient:
        tls = Tls(ca_file=self.ca_file) if self.ca_file else None
        return FedplaneClient(self.hub, interceptors=[], timeout=60.0, tls=tls, token=self.token)

    @property
    def effective_concurrency(self) -> int:
        if self.concurrency > 0:
            return self.concurrency
        return DEFAULT_CONCURRENCY_SINGLE if self.batch_size == 1 else DEFAULT_CONCURRENCY_BATCH

    def problems(self) -> list[str]:
        """Every invalid setting, as `--option: problem`."""
        out: list[str] = []
        if self.jobs < 1:
            out.append(f"--jobs: must be at least 1 (got {self.jobs})")
        if self.queues < 0:
            out.append(f"--queues: must be 0 (one queue) or more (got {self.queues})")
        if not math.isfinite(self.rate) or self.rate < 0:
            out.append(f"--rate: must be 0 (as fast as the hub accepts) or a positive rate (got {self.rate})")
        if not 1 <= self.batch_size <= MAX_BATCH:
            out.append(f"--batch-size: must be between 1 and {MAX_BATCH} (got {self.batch_size})")
        if not self.gangs or any(g < 1 for g in self.gangs):
            out.append(f"--gangs: gang sizes must be at least 1 (got {list(self.gangs)})")
        if not math.isfinite(self.duration) or self.duration < 0:
            out.append(f"--duration: must be 0 or more seconds (got {self.duration})")
        if self.concurrency < 0:
            out.append(f"--concurrency: must be at least 1, or 0 for the default (got {self.concurrency})")
        if self.max_in_flight < 1:
            out.append(f"--max-in-flight: must be at least 1 (got {self.max_in_flight})")
        if not math.isfinite(self.timeout) or self.timeout <= 0:
            out.append(f"--timeout: must be a positive number of seconds (got {self.timeout})")
        if self.backend not in BACKENDS:
            out.append(f"--backend: one of {', '.join(BACKENDS)} (got {self.backend!r})")
        return out

    def gang(self, index: int) -> int:
        """Job `index`'s gang size: the --gangs list, cycled."""
        return self.gangs[index % len(self.gangs)]

    @property
    def polled_queue(self) -> str:
        """The queue GetJobStats is asked about: the run's one queue, or "" (every queue) when
        the jobs are spread over several."""
        return self.queue if self.queues < 1 else ""


def queue_names(base: str, queues: int) -> list[str]:
    """The queues a run's jobs go to, round-robin: `base` alone (0), or `base-0` ... (`queues`
    of them, numbered to a common width so that they sort in order)."""
    if queues < 1:
        return [base]
    width = len(str(queues - 1))
    return [f"{base}-{k:0{width}d}" for k in range(queues)]


def parse_gangs(text: str) -> tuple[int, ...]:
    """ "1,4" -> (1, 4); ValueError naming the bad part otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        gangs = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--gangs: {text!r} must be comma-separated gang sizes, e.g. 1,4") from None
    if not gangs or any(g < 1 for g in gangs):
        raise ValueError(f"--gangs: {text!r}: every gang size must be at least 1")
    return gangs


def job_spec(
    run_id: str, gang: int, duration: float, queue: str, priority: int = 0, *, kubernetes: bool = False
) -> pb.JobSpec:
    """A gang of `gang` pods of 1 cpu each that all start together and run `duration` seconds;
    `kubernetes`: with the pod template a real kube-apiserver requires of a Job."""
    pod_set = pb.PodSet(name="w", count=gang, min_count=gang)
    pod_set.requests.quantities["cpu"] = 1000
    manifest: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "bench", "annotations": {DURATION_ANNOTATION: str(float(duration))}},
    }
    if kubernetes:
        container = {
            "name": "w",
            "image": "busybox",
            "command": ["sleep", str(max(1, round(duration)))],
            "resources": {"requests": {"cpu": "1"}},
        }
        manifest["spec"] = {
            "parallelism": gang,
            "completions": gang,
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
        }
    return pb.JobSpec(
        name="bench",
        queue=queue,
        priority=priority,
        labels={RUN_LABEL: run_id},
        pod_sets=[pod_set],
        workload=pb.Workload(manifest_json=json.dumps(manifest, separators=(",", ":"))),
    )


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (p in 0..100)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """count, p50, p90, p99 and max of latencies given in seconds, in milliseconds."""
    ordered = sorted(seconds)
    if not ordered:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    out: dict[str, Any] = {"count": len(ordered)}
    for name, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)):
        out[name] = round(percentile(ordered, p) * 1000, 1)
    return out


def sustained_rate(times: Sequence[float]) -> tuple[float | None, float | None]:
    """(events/s, window s) between the 10th and 90th percentile times: the steady middle of a run,
    without the ramp-up of the first events and the tail of the last ones."""
    ordered = sorted(times)
    if len(ordered) < 10:
        return None, None
    lo, hi = percentile(ordered, 10), percentile(ordered, 90)
    if hi <= lo:
        return None, None
    count = bisect.bisect_right(ordered, hi) - bisect.bisect_left(ordered, lo)
    return count / (hi - lo), hi - lo


def first_marks(job: pb.Job) -> dict[int, float]:
    """The first time (seconds since the epoch) the job entered each state, from its history."""
    marks: dict[int, float] = {}
    for transition in job.status.history:
        marks.setdefault(transition.state, transition.time.ToNanoseconds() / 1e9)
    return marks


@dataclass
class Submissions:
    """Per job: wall-clock send and reply times and the id the hub gave it."""

    size: int
    send: list[float] = field(default_factory=list)
    accept: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    created: int = 0
    existing: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    # Wall-clock times of the first and the last failed RPC.
    first_error: float | None = None
    last_error: float | None = None
    lags: list[float] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    cap_hits: int = 0
    unsent: int = 0

    def __post_init__(self) -> None:
        self.send = [math.nan] * self.size
        self.accept = [math.nan] * self.size
        self.ids = [""] * self.size

    @property
    def accepted(self) -> list[int]:
        return [i for i, job_id in enumerate(self.ids) if job_id]


class LoadGenerator:
    def __init__(self, client: FedplaneClient, params: LoadParams) -> None:
        self.client = client
        self.params = params
        self.subs = Submissions(params.jobs)
        self.queue_names = queue_names(params.queue, params.queues)
        kubernetes = params.backend == "kubernetes"
        self.specs = {
            (g, queue): job_spec(params.run_id, g, params.duration, queue, kubernetes=kubernetes)
            for g in set(params.gangs)
            for queue in self.queue_names
        }
        self.batches = math.ceil(params.jobs / params.batch_size)

    def _items(self, batch: int) -> list[tuple[pb.JobSpec, str]]:
        p = self.params
        start = batch * p.batch_size
        end = min(start + p.batch_size, p.jobs)
        names = self.queue_names
        return [(self.specs[p.gang(i), names[i % len(names)]], f"{p.run_id}-{i}") for i in range(start, end)]

    async def send(self, batch: int) -> None:
        """One RPC: SubmitJob with --batch-size 1, SubmitJobs otherwise. Failures are counted."""
        subs = self.subs
        items = self._items(batch)
        start = batch * self.params.batch_size
        subs.in_flight += 1
        subs.max_in_flight = max(subs.max_in_flight, subs.in_flight)
        sent = time.time()
        try:
            if self.params.batch_size == 1:
                results = [await self.client.submit(*items[0])]
            else:
                results = await self.client.submit_many(items)
        except asyncio.CancelledError:
            self._failed("ABANDONED", "no reply before --timeout", len(items))
            raise
        except Exception as exc:  # counted and reported: a benchmark reports failures, it does not stop
            name = exc.code.name if isinstance(exc, FedplaneError) else type(exc).__name__
            self._failed(name, str(exc), len(items))
            return
        finally:
            subs.in_flight -= 1
        accepted = time.time()
        for offset, (job, created) in enumerate(results):
            i = start + offset
            subs.send[i], subs.accept[i], subs.ids[i] = sent, accepted, job.id
            if created:
                subs.created += 1
            else:
                subs.existing += 1

    def _failed(self, name: str, message: str, jobs: int) -> None:
        subs = self.subs
        subs.errors[name] += jobs
        subs.last_error = time.time()
        subs.first_error = subs.first_error or subs.last_error
        if len(subs.error_samples) < 5:
            subs.error_samples.append(f"{name}: {message}"[:300])

    async def closed_loop(self, deadline: float) -> None:
        """As fast as the hub accepts: each worker sends its next RPC when its last one returns."""
        loop = asyncio.get_running_loop()
        next_batch = 0

        async def worker() -> None:
            nonlocal next_batch
            while next_batch < self.batches and loop.time() < deadline:
                batch, next_batch = next_batch, next_batch + 1
                await self.send(batch)

        workers = min(self.params.effective_concurrency, self.batches)
        await asyncio.gather(*(worker() for _ in range(workers)))
        self.subs.unsent = sum(len(self._items(b)) for b in range(next_batch, self.batches))

    async def open_loop(self, deadline: float) -> None:
        """A batch every batch/rate seconds on a fixed timetable; replies are never waited for."""
        loop = asyncio.get_running_loop()
        interval = self.params.batch_size / self.params.rate
        pending: set[asyncio.Task[None]] = set()
        begin = loop.time()
        sent_batches = 0
        for batch in range(self.batches):
            due = begin + batch * interval
            delay = due - loop.time()
            await asyncio.sleep(max(delay, 0.0))  # sleep(0) still lets started sends run
            if loop.time() >= deadline:
                break
            if len(pending) >= self.params.max_in_flight:
                self.subs.cap_hits += 1
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            self.subs.lags.append(max(0.0, loop.time() - due))
            task = asyncio.create_task(self.send(batch))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent_batches += 1
        self.subs.unsent = sum(len(self._items(b)) for b in range(sent_batches, self.batches))
        if pending:
            _, late = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def settle(self, expected: int, deadline: float) -> tuple[bool, float]:
        """Poll GetJobStats until the queue (every queue, with --queues) holds `expected` jobs
        and none waits to start.

        Returns (settled, wall time of the poll that saw it).
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                stats = await self.client.job_stats(self.params.polled_queue)
            except FedplaneError:
                stats = None  # a busy hub may time a poll out; the deadline bounds the wait
            if stats is not None:
                unsettled = sum(stats.by_state.get(name, 0) for name in self.params.unsettled)
                if stats.total >= expected and unsettled == 0:
                    return True, time.time()
            if loop.time() >= deadline:
                return False, time.time()
            await asyncio.sleep(POLL_INTERVAL)

    async def read(self) -> dict[str, pb.Job]:
        """Every job of this run, by id (ListJobs with the run's label, 1,000 per page)."""
        jobs: dict[str, pb.Job] = {}
        async for page in self.client.pages(labels={RUN_LABEL: self.params.run_id}, page_size=PAGE_SIZE):
            for job in page.jobs:
                jobs[job.id] = job
        return jobs

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.params.timeout
        if self.params.rate > 0:
            await self.open_loop(deadline)
        else:
            await self.closed_loop(deadline)
        accepted = len(self.subs.accepted)
        if self.params.sends_out:
            sends = {self.subs.ids[i]: self.subs.send[i] for i in self.subs.accepted}
            await asyncio.to_thread(Path(self.params.sends_out).write_text, json.dumps(sends))
        settled, settled_at = await self.settle(accepted, deadline)
        async with asyncio.timeout(READ_TIMEOUT):
            jobs = await self.read()
        result = analyse(self.params, self.subs, jobs)
        result["timed_out"] = not settled or self.subs.unsent > 0
        result["window"]["settled"] = settled_at
        return result


def analyse(params: LoadParams, subs: Submissions, jobs: dict[str, pb.Job]) -> dict[str, Any]:
    """The run's figures from the recorded send/reply times and the jobs' transition histories."""
    accepted = subs.accepted
    to_accepted: list[float] = []
    to_dispatched: list[float] = []
    accepted_to_dispatched: list[float] = []
    to_running: list[float] = []
    admitted_at: list[float] = []
    running_at: list[float] = []
    # Between the hub's own transition times: where the time goes.
    stages: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    missing = 0
    for i in accepted:
        to_accepted.append(subs.accept[i] - subs.send[i])
        job = jobs.get(subs.ids[i])
        if job is None:
            missing += 1
            continue
        marks = first_marks(job)
        for name, start, end in STAGES:
            if start in marks and end in marks:
                stages[name].append(marks[end] - marks[start])
        if pb.ADMITTED in marks:
            admitted_at.append(marks[pb.ADMITTED])
            to_dispatched.append(marks[pb.ADMITTED] - subs.send[i])
            accepted_to_dispatched.append(marks[pb.ADMITTED] - subs.accept[i])
        if pb.RUNNING in marks:
            running_at.append(marks[pb.RUNNING])
            to_running.append(marks[pb.RUNNING] - subs.send[i])
    first_send = min((subs.send[i] for i in accepted), default=math.nan)
    last_accept = max((subs.accept[i] for i in accepted), default=math.nan)
    last_admitted = max(admitted_at, default=math.nan)
    sustained, window = sustained_rate(admitted_at)

    def per_second(count: int, span: float) -> float | None:
        return round(count / span, 1) if count and span > 0 else None

    return {
        "run_id": params.run_id,
        "hub": params.hub,
        "queue": params.queue,
        "mode": "single" if params.batch_size == 1 else "batch",
        "rate": params.rate,
        "batch_size": params.batch_size,
        "gangs": list(params.gangs),
        "duration_s": params.duration,
        "concurrency": params.effective_concurrency if params.rate == 0 else None,
        "jobs_requested": params.jobs,
        "jobs_accepted": len(accepted),
        "jobs_created": subs.created,
        "jobs_existing": subs.existing,
        "jobs_unsent": subs.unsent,
        "submit_errors": dict(subs.errors),
        "error_samples": subs.error_samples,
        # Seconds after the first send: e.g. load shed by an overloaded hub shows when it began.
        "submit_errors_at_s": (
            {"first": round(subs.first_error - first_send, 3), "last": round(subs.last_error - first_send, 3)}
            if subs.first_error is not None and subs.last_error is not None and accepted
            else None
        ),
        "timeout_s": params.timeout,
        "submit_seconds": round(last_accept - first_send, 3) if accepted else None,
        "accepted_per_s": per_second(len(accepted), last_accept - first_send),
        "dispatched": len(admitted_at),
        "ran": len(running_at),
        "dispatch_per_s_sustained": round(sustained, 1) if sustained is not None else None,
        "dispatch_sustained_window_s": round(window, 3) if window is not None else None,
        "dispatch_per_s_overall": per_second(len(admitted_at), last_admitted - first_send),
        "latency_ms": {
            "submit_to_accepted": summary_ms(to_accepted),
            "submit_to_dispatched": summary_ms(to_dispatched),
            "submit_to_running": summary_ms(to_running),
            # Without the wait for the hub to accept: the dispatch path alone. May be slightly
            # negative for a big batch, whose reply can reach the client after its first dispatches.
            "accepted_to_dispatched": summary_ms(accepted_to_dispatched),
        },
        "stages_ms": {name: summary_ms(values) for name, values in stages.items()},
        "final_states": dict(sorted(Counter(sm.state_name(j.status.state) for j in jobs.values()).items())),
        "missing": missing,
        "in_flight": {
            "max": subs.max_in_flight,
            "cap": params.max_in_flight if params.rate > 0 else None,
            "cap_hits": subs.cap_hits,
        },
        "schedule_lag_ms": summary_ms(subs.lags) if params.rate > 0 else None,
        "window": {
            "first_send": first_send if accepted else None,
            "last_accept": last_accept if accepted else None,
            "last_dispatched": last_admitted if admitted_at else None,
            "last_running": max(running_at) if running_at else None,
            "settled": None,
        },
    }


async def run(params: LoadParams) -> dict[str, Any]:
    """Submit, wait for every job to start (bounded by params.timeout), read back and analyse."""
    # No tracing interceptors: the client's own overhead should stay out of the figures.
    async with params.client() as client:
        return await LoadGenerator(client, params).run()


def parse_args(argv: Sequence[str] | None = None) -> tuple[LoadParams, str]:
    """(parameters, output path) from the command line; argparse exits 2 on nonsense."""
    parser = argparse.ArgumentParser(
        prog="python -m fedplane.benchmark.loadgen", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--hub", default="127.0.0.1:50051", help="hub gRPC address")
    parser.add_argument("--jobs", type=int, required=True, help="jobs to submit")
    parser.add_argument("--rate", type=float, default=0.0, help="offered jobs/s; 0 = as fast as accepted")
    parser.add_argument("--batch-size", type=int, default=1, help="jobs per RPC (>1: SubmitJobs)")
    parser.add_argument("--gangs", default="1", help="gang sizes, cycled over the jobs, e.g. 1,4")
    parser.add_argument("--duration", type=float, default=30.0, help="simulated run time, seconds")
    parser.add_argument("--run-id", default="bench", help="label bench-run and idempotency key prefix")
    parser.add_argument("--queue", default="bench", help="queue of the jobs (holding only this run)")
    parser.add_argument(
        "--queues", type=int, default=0, help="spread the jobs round-robin over QUEUE-0... (0: all in QUEUE)"
    )
    parser.add_argument("--concurrency", type=int, default=0, help="RPCs in flight with --rate 0")
    parser.add_argument("--max-in-flight", type=int, default=5000, help="open-loop safety cap on RPCs")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on submitting and waiting, s")
    parser.add_argument("--out", default="-", help="result JSON file ('-' = stdout)")
    parser.add_argument("--ca-file", default="", help="the hub's CA (TLS)")
    parser.add_argument("--token-file", default="", help="a file holding the bearer token")
    parser.add_argument(
        "--backend", default="simulated", help="simulated, or kubernetes (real Jobs, settled when ADMITTED)"
    )
    parser.add_argument("--sends-out", default="", help="write {job id: send time} JSON here")
    args = parser.parse_args(argv)
    try:
        gangs = parse_gangs(args.gangs)
    except ValueError as exc:
        parser.error(str(exc))
    params = LoadParams(
        hub=args.hub,
        jobs=args.jobs,
        rate=args.rate,
        batch_size=args.batch_size,
        gangs=gangs,
        duration=args.duration,
        run_id=args.run_id,
        queue=args.queue,
        queues=args.queues,
        concurrency=args.concurrency,
        max_in_flight=args.max_in_flight,
        timeout=args.timeout,
        ca_file=args.ca_file,
        token=Path(args.token_file).read_text().strip() if args.token_file else "",
        backend=args.backend,
        sends_out=args.sends_out,
    )
    problems = params.problems()
    if problems:
        parser.error("; ".join(problems))
    return params, args.out


def main(argv: Sequence[str] | None = None) -> None:
    params, out = parse_args(argv)
    result = asyncio.run(run(params))
    result["params"] = {k: v for k, v in asdict(params).items() if k != "token"}
    text = json.dumps(result, indent=2)
    if out == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
