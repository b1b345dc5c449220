"""An in-memory JobStore, standing in for etcd in the drivers' unit tests.

It models what the drivers rely on: one revision counter that every write bumps (a
transaction's writes share one), create-if-absent for spec and idempotency keys with the same
batch-then-one-by-one fallback as the etcd store, compare-and-swap on a status key's mod
revision, deletes compared the same way, and a status watch that replays history after a
revision and then follows new puts. `put_status` is another writer racing the hub.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fedplane.hub.store import (
    Fence,
    JobToCreate,
    JobToDelete,
    RevisionCompacted,
    StatusToWrite,
    StoredJob,
)


@dataclass
class MemoryStore:
    max_txn_ops: int = 128
    revision: int = 1
    specs: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # id -> (blob, create revision)
    statuses: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # id -> (blob, mod revision)
    idem: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    clusters: dict[str, bytes] = field(default_factory=dict)
    # Every status put, as the watch reports it: (revision, job id, blob).
    history: list[tuple[int, str, bytes]] = field(default_factory=list)
    compacted: int = 0
    # The sizes of the create transactions sent, and the fences every status write came with.
    create_txns: list[int] = field(default_factory=list)
    fences: list[Fence] = field(default_factory=list)
    # While not set, create transactions wait (a transaction held in flight).
    gate: asyncio.Event | None = None
    closed: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    # ------------------------------------------------------------------ helpers for tests
    def _next(self) -> int:
        self.revision += 1
        return self.revision

    def _put_status(self, job_id: str, blob: bytes, revision: int) -> None:
        self.statuses[job_id] = (blob, revision)
        self.history.append((revision, job_id, blob))
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def put_status(self, job_id: str, blob: bytes) -> int:
        """Another writer's status put, behind the hub's back; its revision."""
        revision = self._next()
        self._put_status(job_id, blob, revision)
        return revision

    def status_revision(self, job_id: str) -> int:
        return self.statuses[job_id][1] if job_id in self.statuses else 0

    def compact(self, revision: int) -> None:
        self.compacted = revision

    # ------------------------------------------------------------------ JobStore
    def _can_create(self, job: JobToCreate) -> bool:
        return job.id not in self.specs and not (job.idempotency_key and job.idempotency_key in self.idem)

    def _create(self, job: JobToCreate, revision: int) -> None:
        self.specs[job.id] = (job.spec_blob, revision)
        if job.idempotency_key:
            self.idem[job.idempotency_key] = job.id
        self._put_status(job.id, job.status_blob, revision)

    async def create_jobs(self, jobs: Sequence[JobToCreate]) -> list[int | StoredJob]:
        results: list[int | StoredJob] = []
        per_txn = max(1, self.max_txn_ops // 3)
        for start in range(0, len(jobs), per_txn):
            results.extend(await self._create_chunk(jobs[start : start + per_txn]))
        return results

    async def _create_chunk(self, jobs: Sequence[JobToCreate]) -> list[int | StoredJob]:
        if self.gate is not None:
            await self.gate.wait()
        keys = [j.idempotency_key for j in jobs if j.idempotency_key]
        if len(jobs) > 1 and len(set(keys)) == len(keys):
            self.create_txns.append(len(jobs))
            if all(self._can_create(job) for job in jobs):
                revision = self._next()
                for job in jobs:
                    self._create(job, revision)
                return [revision] * len(jobs)
        out: list[int | StoredJob] = []
        for job in jobs:
            self.create_txns.append(1)
            if self._can_create(job):
                revision = self._next()
                self._create(job, revision)
                out.append(revision)
                continue
            existing = self.idem.get(job.idempotency_key) if job.idempotency_key else None
            stored = await self.read_job(existing) if existing else None
            if stored is None:
                raise RuntimeError(f"job {job.id} could not be created and no earlier job holds its key")
            out.append(stored)
        return out

    async def read_job(self, job_id: str) -> StoredJob | None:
        if job_id not in self.specs or job_id not in self.statuses:
            return None
        spec_blob, seq = self.specs[job_id]
        status_blob, revision = self.statuses[job_id]
        return StoredJob(job_id, seq, revision, spec_blob, status_blob)

    async def load_jobs(self) -> tuple[list[StoredJob], int]:
        jobs = [job for job_id in self.specs if (job := await self.read_job(job_id)) is not None]
        jobs.sort(key=lambda j: (j.seq, j.id))
        return jobs, self.revision

    async def write_statuses(self, writes: Sequence[StatusToWrite], fence: Fence) -> list[int | None]:
        self.fences.append(fence)
        out: list[int | None] = []
        for start in range(0, len(writes), self.max_txn_ops):
            chunk = writes[start : start + self.max_txn_ops]
            if all(self.status_revision(w.job_id) == w.expected_revision for w in chunk):
                revision = self._next()
                for w in chunk:
                    self._put_status(w.job_id, w.blob, revision)
                out += [revision] * len(chunk)
                continue
            for w in chunk:
                if self.status_revision(w.job_id) == w.expected_revision:
                    revision = self._next()
                    self._put_status(w.job_id, w.blob, revision)
                    out.append(revision)
                else:
                    out.append(None)
        return out

    async def delete_jobs(self, jobs: Sequence[JobToDelete], fence: Fence) -> list[bool]:
        self.fences.append(fence)
        out = []
        for job in jobs:
            if self.status_revision(job.id) != job.revision:
                out.append(False)
                continue
            self._next()
            self.specs.pop(job.id, None)
            self.statuses.pop(job.id, None)
            if job.idempotency_key:
                self.idem.pop(job.idempotency_key, None)
            out.append(True)
        return out

    async def watch_statuses(self, from_revision: int) -> AsyncIterator[tuple[int, str, bytes]]:
        if self.compacted and from_revision + 1 < self.compacted:
            raise RevisionCompacted(self.compacted)
        seen = 0
        while True:
            while seen < len(self.history):
                revision, job_id, blob = self.history[seen]
                seen += 1
                if revision > from_revision:
                    yield revision, job_id, blob
            await self._changed.wait()

    async def load_clusters(self) -> dict[str, bytes]:
        return dict(self.clusters)

    async def put_cluster(self, name: str, blob: bytes) -> None:
        self._next()
        self.clusters[name] = blob

    async def close(self) -> None:
        self.closed = True
