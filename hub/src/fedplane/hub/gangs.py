"""Gang timeouts, on the leading replica: a job whose gang is not running in time is requeued with
backoff, or failed once it has had its attempts (Kueue's waitForPodsReady).

A job dispatched to a cluster must reach RUNNING (every required pod of its gang running: the
agents' backends report it so) within `gang_timeout_seconds` of its dispatch. One that does not,
still DISPATCHED or ADMITTED, holds capacity it cannot use, typically because the cluster's
nodes cannot take the gang after all (a placement on stale capacity, a node gone bad, an image
that never pulls). It is taken off the cluster as a lost cluster's job is (hub/lost.py): a
fenced compare-and-swap back to PENDING with reason GangTimeout, its reservation released, and a
DeleteWorkload for the old generation queued to the old cluster. Its status carries
`not_before`: now + `backoff_seconds(attempts)`, which doubles with every dispatch, so a job
that cannot start anywhere does not churn the federation; the table keeps it out of the pending
queue until then (JobTable.due). A job that times out on its `max_attempts`-th dispatch FAILS
instead. The generation counts the dispatches (`dispatch.attempts`), whatever ended the earlier
ones.

Only clusters the hub hears from are judged: a job on a cluster that is not READY is left to
its disconnect policy (lost.py) and judged again once the cluster is back.

Deadlines are kept in a heap fed by the table (`JobTable.on_dispatch`, each new generation on a
cluster) and, when this replica starts leading, by one pass over the jobs on clusters; an entry
whose job has moved on (running, finished, dispatched again) is dropped when it comes due, so no
job is parsed or looked at between its dispatch and its deadline.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from datetime import UTC, datetime
from typing import NamedTuple

from fedplane.core import dispatch as sm
from fedplane.hub import records
from fedplane.hub.clock import Clock
from fedplane.hub.clusters import ClusterRegistry
from fedplane.hub.commands import CommandQueue, delete_command
from fedplane.hub.store import FenceLost
from fedplane.hub.table import JobRecord, JobTable, StatusWrite
from fedplane.runtime import logs, telemetry, timestamps
from fedplane.runtime.config import HubConfig
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
S = sm.S
GANG_TIMEOUT = "GangTimeout"
# The states in which a job waits for its gang to run.
WAITING = frozenset({S.DISPATCHED, S.ADMITTED})


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """How long a job whose gang timed out on its `attempts`-th dispatch waits before it may be
    placed again: base x 2^(attempts - 1), at most `cap` (Kueue: 60 s x 2^n, capped at 3600 s)."""
    if attempts <= 0 or base <= 0:
        return 0.0
    # Past 2^64 every base is beyond any cap the configuration allows.
    return min(cap, math.ldexp(base, min(attempts - 1, 64)))


def dispatched_at(status: pb.JobStatus) -> float:
    """When the job's current generation was dispatched: its history's move into DISPATCHED at
    that generation, else (history trimmed) its last update."""
    for move in reversed(status.history):
        if move.state == S.DISPATCHED and move.generation == status.generation:
            return move.time.seconds + move.time.nanos / 1e9
    return status.update_time.seconds + status.update_time.nanos / 1e9


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


class _Deadline(NamedTuple):
    at: float
    job_id: str
    generation: int


class _Move(NamedTuple):
    """A decided move, to act on once written: `job` as it was on its cluster."""

    job: pb.Job
    attempts: int
    not_before: float | None  # None: failed
    message: str


class GangTimeouts:
    """Requeues (or fails) the jobs whose gang is not running in time (leading replica only)."""

    def __init__(
        self,
        table: JobTable,
        registry: ClusterRegistry,
        commands: CommandQueue,
        clock: Clock,
        config: HubConfig,
        *,
        recheck_seconds: float = 1.0,
    ) -> None:
        self.table = table
        self.registry = registry
        self.commands = commands
        self.clock = clock
        self.timeout = config.gang_timeout_seconds
        self.backoff = config.requeue_backoff_seconds
        self.backoff_max = config.requeue_backoff_max_seconds
        self.max_attempts = config.max_attempts
        self.recheck = recheck_seconds
        self._deadlines: list[_Deadline] = []
        self._wake = asyncio.Event()
        self._sleeping_until = math.inf

    async def run(self) -> None:
        """Judge each job when its deadline comes, until cancelled (when this replica stops leading)."""
        self._deadlines.clear()
        self.table.on_dispatch = self._dispatched
        try:
            for record in list(self.table.jobs.values()):
                if record.state in WAITING:
                    self._push(record.id, record.generation, dispatched_at(record.status) + self.timeout)
            while True:
                self._wake.clear()
                try:
                    until = await self.check()
                except asyncio.CancelledError:
                    raise
                except FenceLost as exc:
                    log.warning("gang timeouts not written: not leading", error=str(exc))
                    until = math.inf
                except Exception:
                    log.exception("gang timeouts failed; retrying")
                    until = self.clock.time() + self.recheck
                await self._sleep_until(until)
        finally:
            if self.table.on_dispatch == self._dispatched:
                self.table.on_dispatch = None
            self._deadlines.clear()

    def _dispatched(self, job_id: str, generation: int, at: float) -> None:
        self._push(job_id, generation, at + self.timeout)

    def _push(self, job_id: str, generation: int, at: float) -> None:
        heapq.heappush(self._deadlines, _Deadline(at, job_id, generation))
        if at < self._sleeping_until:
            self._wake.set()

    async def _sleep_until(self, until: float) -> None:
        self._sleeping_until = until
        try:
            delay = until - self.clock.time()
            if delay <= 0 or self._wake.is_set():
                await asyncio.sleep(0)
                return
            woken = asyncio.ensure_future(self._wake.wait())
            if math.isinf(delay):
                try:
                    await woken
                finally:
                    woken.cancel()
                return
            sleeper = asyncio.ensure_future(self.clock.sleep(delay))
            try:
                await asyncio.wait({sleeper, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                woken.cancel()
        finally:
            self._sleeping_until = math.inf

    async def check(self) -> float:
        """Requeue or fail the jobs whose deadline has passed; when the next deadline is (inf: none)."""
        now = self.clock.time()
        jobs, deadlines = self.table.jobs, self._deadlines
        later: list[_Deadline] = []
        writes: list[StatusWrite] = []
        moves: list[_Move] = []
        while deadlines and deadlines[0].at <= now:
            due = heapq.heappop(deadlines)
            record = jobs.get(due.job_id)
            if record is None or record.generation != due.generation or record.state not in WAITING:
                continue  # running, finished or moved on since
            if not self._cluster_ready(record, now):
                later.append(due._replace(at=now + self.recheck))
                continue
            write, move = self._decide(record, now)
            writes.append(write)
            moves.append(move)
        for deadline in later:
            heapq.heappush(deadlines, deadline)
        if writes:
            self._apply(moves, await self.table.write(writes), now)
        return deadlines[0].at if deadlines else math.inf

    def _cluster_ready(self, record: JobRecord, now: float) -> bool:
        """Whether the hub hears from the job's cluster: else its disconnect policy decides."""
        cluster = self.registry.clusters.get(record.cluster)
        return cluster is not None and cluster.ready(now, self.registry.thresholds)[0]

    def _decide(self, record: JobRecord, now: float) -> tuple[StatusWrite, _Move]:
        current = record.dispatch_state
        attempts = sm.attempts(current)
        late = f"gang not running on {current.cluster} {self.timeout:g}s after dispatch {attempts}"
        not_before: float | None = None
        if self.max_attempts and attempts >= self.max_attempts:
            message = f"{late}; failed after {attempts} attempts"
            transition = sm.give_up(current, GANG_TIMEOUT, message)
        else:
            wait = backoff_seconds(attempts, self.backoff, self.backoff_max)
            not_before = now + wait
            message = f"{late}; requeued, not placed for {wait:g}s"
            transition = sm.requeue(current, GANG_TIMEOUT, message=message)
        job = record.job  # as it is on its cluster: the delete goes there, for that copy
        status = records.record(job.status, transition, now)
        if not_before is not None:
            status.not_before.CopyFrom(timestamps.at(not_before))
        return StatusWrite.of(record.id, status, record.revision), _Move(job, attempts, not_before, message)

    def _apply(self, moves: list[_Move], written: list[JobRecord | None], now: float) -> None:
        """Act on what landed: release the capacity, delete the old copy, log. A lost race is
        judged again after `recheck_seconds` if the job still waits for its gang."""
        landed = False
        for move, record in zip(moves, written, strict=True):
            job = move.job
            cluster, generation = job.status.cluster, job.status.generation
            if record is None:
                current = self.table.jobs.get(job.id)
                if current is not None and current.generation == generation and current.state in WAITING:
                    self._push(job.id, generation, now + self.recheck)
                continue
            landed = True
            state = self.registry.clusters.get(cluster)
            if state is not None:
                state.release(job.id, generation)
            self.commands.queue(job, delete_command(job, f"{GANG_TIMEOUT}: {move.message}"))
            if move.not_before is None:
                log.warning(
                    "gang timed out; failed",
                    job_id=job.id,
                    cluster=cluster,
                    generation=generation,
                    attempts=move.attempts,
                    max_attempts=self.max_attempts,
                    **telemetry.log_ids(job.trace_context),
                )
            else:
                log.info(
                    "gang timed out; requeued",
                    job_id=job.id,
                    cluster=cluster,
                    generation=generation,
                    attempts=move.attempts,
                    not_before=_iso(move.not_before),
                    **telemetry.log_ids(job.trace_context),
                )
        if landed:
            self.table.capacity_changed()  # the freed room may take shapes that fit nowhere
