"""Submits: validated, then stored together with those of concurrent submits (group commit).

While one etcd transaction is in flight the next submits queue up and go in the following
one, so many single SubmitJob calls cost a few transactions, not one each; an idle hub writes
at once.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence

from fedplane.core.queues import QueueConfig
from fedplane.hub import records
from fedplane.hub.clock import Clock
from fedplane.hub.metrics import UNWIRED, HubMetrics
from fedplane.hub.table import JobRecord, JobTable, NewJob
from fedplane.hub.validation import queue_problems, refusal, validate_spec
from fedplane.runtime import logs, telemetry, timestamps
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
MAX_IDEMPOTENCY_KEY = 256

_Stored = list[tuple[JobRecord, bool]]


def new_job_id(now: float) -> str:
    """Time-ordered, DNS-label-safe job id."""
    return f"j{int(now * 1000):011x}{secrets.token_hex(5)}"


class Intake:
    metrics: HubMetrics = UNWIRED

    def __init__(
        self,
        table: JobTable,
        clock: Clock,
        queues: Callable[[], QueueConfig] | None = None,
        implicit_queues: bool = False,
    ) -> None:
        """`queues` gives the queue configuration jobs are checked against (their queue and
        priority class must exist; unknown queues are let in with `implicit_queues`); None:
        no such checks."""
        self.table = table
        self.clock = clock
        self.queues = queues
        self.implicit_queues = implicit_queues
        # Submits waiting for the next transaction, each with the future its caller awaits.
        self._waiting: list[tuple[list[NewJob], asyncio.Future[_Stored]]] = []
        self._ready = asyncio.Event()

    async def submit(
        self, items: Sequence[tuple[pb.JobSpec, str]], batch: bool, submitted_by: str = ""
    ) -> list[tuple[pb.Job, bool]]:
        """Store jobs (all of them or, on an invalid spec, none); each answered by its job and
        whether this call created it (not when its idempotency key was already taken).

        `submitted_by` is the caller's name ("" without authentication); idempotency keys are
        scoped to it, so another caller's key never finds (nor reveals) this caller's job."""
        problems: list[str] = []
        config = self.queues() if self.queues is not None else None
        for i, (spec, key) in enumerate(items):
            where = f"jobs[{i}]." if batch else ""
            spec_problems = validate_spec(spec, f"{where}spec")
            if config is not None and not spec_problems:
                spec_problems = queue_problems(spec, config, self.implicit_queues, f"{where}spec")
            problems += spec_problems
            if len(key) > MAX_IDEMPOTENCY_KEY:
                problems.append(f"{where}idempotency_key: longer than {MAX_IDEMPOTENCY_KEY} characters")
            if "\x00" in key:
                problems.append(f"{where}idempotency_key: must not contain a NUL character")
        if problems:
            raise refusal(problems)
        table = self.table
        now = self.clock.time()
        trace_context = telemetry.inject()
        created_at = timestamps.at(now)
        # One status for the whole call, serialized once: every job of it starts the same.
        pending = records.submitted(now)
        pending_blob = pending.SerializeToString()
        new_jobs: list[NewJob] = []
        # For each item, the index of the job that answers it; a key repeated in the batch
        # answers with the first occurrence's job, as a retry would.
        answer: list[int] = []
        first_by_key: dict[str, int] = {}
        for spec, key in items:
            if key and key in first_by_key:
                answer.append(first_by_key[key])
                continue
            job = pb.Job(
                id=new_job_id(now),
                spec=spec,
                idempotency_key=key,
                trace_context=trace_context,
                create_time=created_at,
                submitted_by=submitted_by,
            )
            job.spec.queue = job.spec.queue or "default"
            if config is not None and spec.priority_class:
                # The class's value is the job's priority from now on, even if the class goes.
                job.spec.priority = config.priority_classes[spec.priority_class].value
            if key:
                first_by_key[key] = len(new_jobs)
            answer.append(len(new_jobs))
            new_jobs.append(NewJob.of(job, pending, pending_blob))
        with telemetry.tracer().start_as_current_span("hub.store_jobs", attributes={"jobs": len(new_jobs)}):
            stored = await self._store(new_jobs)
        outs: list[tuple[pb.Job, bool]] = []
        for new, (record, created) in zip(new_jobs, stored, strict=True):
            held = table.add(record, new.request if created else None)
            if created and held.revision == record.seq:
                # Unchanged since it was stored: answer with the job at hand, not a parsed copy.
                new.job.status.CopyFrom(pending)
                outs.append((table.job_out(held, new.job), created))
            else:
                outs.append((table.job_out(held), created))
        results: list[tuple[pb.Job, bool]] = []
        answered: set[int] = set()
        for index in answer:
            out, created = outs[index]
            results.append((out, created and index not in answered))
            answered.add(index)
        if any(created for _, created in stored):
            table.wake.set()
        log.debug("jobs submitted", count=len(new_jobs), created=sum(1 for _, c in stored if c))
        return results

    async def _store(self, jobs: list[NewJob]) -> _Stored:
        future: asyncio.Future[_Stored] = asyncio.get_running_loop().create_future()
        self._waiting.append((jobs, future))
        self._ready.set()
        return await future

    async def run(self) -> None:
        """Write what has queued since the last transaction, one transaction (or chunk) after another."""
        table = self.table
        while True:
            await self._ready.wait()
            self._ready.clear()
            groups, self._waiting = self._waiting, []
            if not groups:
                continue
            writing = [job for jobs, _ in groups for job in jobs]
            table.creating.update((job.record.id, job) for job in writing)
            try:
                created = await table.store.create_jobs([job.record for job in writing])
            except Exception as exc:
                for _, future in groups:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                for job in writing:
                    table.creating.pop(job.record.id, None)
            stored: _Stored = [
                (job.stored_at(outcome), True)
                if isinstance(outcome, int)
                else (JobRecord.stored(outcome), False)
                for job, outcome in zip(writing, created, strict=True)
            ]
            self.metrics.submitted.inc(sum(1 for _, new in stored if new))
            start = 0
            for jobs, future in groups:
                if not future.done():
                    future.set_result(stored[start : start + len(jobs)])
                start += len(jobs)

    def close(self, error: Exception) -> None:
        """Fail the submits still waiting for a transaction (the hub is stopping)."""
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(error)
