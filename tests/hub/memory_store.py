"""An in-memory JobStore, standing in for etcd in the drivers' unit tests.

It models what the drivers rely on: one revision counter that every write bumps (a
transaction's writes share one), create-if-absent for spec and idempotency keys with the same
batch-then-one-by-one fallback as the etcd store, compare-and-swap on a status key's mod
revision, deletes compared the same way, and a status watch that replays history after a
revision and then follows new puts. `put_status` is another writer racing the hub.
Cluster leases (hub/liveness.py's ClusterLeaseStore) expire by `clock`, the test's clock when
the tests' Parts made the store: an expired lease's alive key is deleted, as etcd does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from fedplane.hub.clock import Clock
from fedplane.hub.store import (
    AliveKey,
    Fence,
    FenceLost,
    JobToCreate,
    JobToDelete,
    LeaseGrant,
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
    # Every admin record put, as the cluster watch reports it: (revision, name, blob).
    cluster_history: list[tuple[int, str, bytes]] = field(default_factory=list)
    # Every status put, as the watch reports it: (revision, job id, blob).
    history: list[tuple[int, str, bytes]] = field(default_factory=list)
    compacted: int = 0
    # The sizes of the create transactions sent, and the fences every status write came with.
    create_txns: list[int] = field(default_factory=list)
    fences: list[Fence] = field(default_factory=list)
    # The fence etcd would hold (None: leadership is not in play): a fenced write under any
    # other fence raises FenceLost, as the etcd store's does.
    leader: Fence | None = None
    # While not set, create transactions wait (a transaction held in flight).
    gate: asyncio.Event | None = None
    closed: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Cluster leases: expiring by `clock` (the system's if None), the alive keys and their
    # puts and deletes, the leases' (TTL, expiry), and the keepalive streams opened and the
    # sizes of their rounds.
    clock: Clock | None = None
    alive: dict[str, AliveKey] = field(default_factory=dict)
    alive_history: list[AliveKey] = field(default_factory=list)
    leases: dict[int, tuple[int, float]] = field(default_factory=dict)
    next_lease: int = 0x7000
    renewal_streams: int = 0
    renewal_rounds: list[int] = field(default_factory=list)
    _alive_changed: asyncio.Event = field(default_factory=asyncio.Event)

    # ------------------------------------------------------------------ helpers for tests
    def _next(self) -> int:
        self.revision += 1
        return self.revision

    def _put_status(self, job_id: str, blob: bytes, revision: int) -> None:
        self.statuses[job_id] = (blob, revision)
        self._record(self.history, (revision, job_id, blob))

    def _record(self, history: list[tuple[int, str, bytes]], change: tuple[int, str, bytes]) -> None:
        """Append a change to a watched history and wake its watchers."""
        history.append(change)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _follow(
        self, history: list[tuple[int, str, bytes]], from_revision: int
    ) -> AsyncIterator[tuple[int, str, bytes]]:
        """A history's changes after `from_revision`, then each as it comes, as a watch gives them."""
        seen = 0
        while True:
            while seen < len(history):
                change = history[seen]
                seen += 1
                if change[0] > from_revision:
                    yield change
            await self._changed.wait()

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

    def _check(self, fence: Fence) -> None:
        self.fences.append(fence)
        self._require_fence(fence)

    async def write_statuses(self, writes: Sequence[StatusToWrite], fence: Fence) -> list[int | None]:
        self._check(fence)
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
        self._check(fence)
        out = []
        for job in jobs:
            if self.status_revision(job.id) != job.revision:
                out.append(False)
                continue
            revision = self._next()
            self.specs.pop(job.id, None)
            self.statuses.pop(job.id, None)
            self._record(self.history, (revision, job.id, b""))
            if job.idempotency_key:
                self.idem.pop(job.idempotency_key, None)
            out.append(True)
        return out

    async def watch_statuses(
        self, from_revision: int, deletes: bool = False
    ) -> AsyncIterator[tuple[int, str, bytes]]:
        if self.compacted and from_revision + 1 < self.compacted:
            raise RevisionCompacted(self.compacted)
        async for revision, job_id, blob in self._follow(self.history, from_revision):
            if blob or deletes:
                yield revision, job_id, blob

    async def load_clusters(self) -> dict[str, bytes]:
        return dict(self.clusters)

    async def put_cluster(self, name: str, blob: bytes) -> None:
        self.clusters[name] = blob
        self._record(self.cluster_history, (self._next(), name, blob))

    async def create_cluster(self, name: str, blob: bytes) -> bool:
        if name in self.clusters:
            return False
        await self.put_cluster(name, blob)
        return True

    async def load_clusters_at(self) -> tuple[dict[str, bytes], int]:
        return dict(self.clusters), self.revision

    async def watch_clusters(self, from_revision: int) -> AsyncIterator[tuple[int, str, bytes]]:
        async for change in self._follow(self.cluster_history, from_revision):
            yield change

    async def close(self) -> None:
        self.closed = True

    # ------------------------------------------------------------------ cluster leases
    # hub/liveness.py's ClusterLeaseStore: alive keys bound to leases that expire by `clock`.
    def _lease_now(self) -> float:
        return self.clock.time() if self.clock is not None else time.time()

    def _require_fence(self, fence: Fence) -> None:
        if fence.key and self.leader is not None and fence != self.leader:
            raise FenceLost(fence)

    def _alive_event(self, key: AliveKey) -> None:
        if key.lease:
            self.alive[key.name] = key
        else:
            self.alive.pop(key.name, None)
        self.alive_history.append(key)
        changed, self._alive_changed = self._alive_changed, asyncio.Event()
        changed.set()

    def expire_leases(self) -> None:
        """Expire the leases whose time is up, deleting their keys (as etcd does on its own)."""
        now = self._lease_now()
        for lease in [lease for lease, (_, until) in self.leases.items() if until <= now]:
            del self.leases[lease]
            for key in [k for k in self.alive.values() if k.lease == lease]:
                self._alive_event(AliveKey(key.name, 0, self._next(), b""))

    def lease_ttl_left(self, lease: int) -> float:
        """Seconds the lease has left (0 if it is gone), as etcd's LeaseTimeToLive says."""
        self.expire_leases()
        found = self.leases.get(lease)
        return max(0.0, found[1] - self._lease_now()) if found else 0.0

    async def load_alive(self) -> tuple[list[AliveKey], int]:
        self.expire_leases()
        return list(self.alive.values()), self.revision

    async def watch_alive(self, from_revision: int) -> AsyncIterator[AliveKey]:
        seen = 0
        while True:
            self.expire_leases()
            while seen < len(self.alive_history):
                key = self.alive_history[seen]
                seen += 1
                if key.revision > from_revision:
                    yield key
            changed: asyncio.Future[object] = asyncio.ensure_future(self._alive_changed.wait())
            waits = {changed}
            if self.leases and self.clock is not None:
                soonest = min(until for _, until in self.leases.values())
                waits.add(asyncio.ensure_future(self.clock.sleep(max(0.0, soonest - self._lease_now()))))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()

    async def grant_cluster_leases(self, grants: Sequence[LeaseGrant], fence: Fence) -> list[AliveKey | None]:
        self._require_fence(fence)
        self.expire_leases()
        out: list[AliveKey | None] = []
        for grant in grants:
            current = self.alive.get(grant.name)
            if (current.lease if current is not None else 0) != grant.replace:
                out.append(None)
                continue
            self.next_lease += 1
            self.leases[self.next_lease] = (grant.ttl, self._lease_now() + grant.ttl)
            self.leases.pop(grant.replace, None)
            key = AliveKey(grant.name, self.next_lease, self._next(), grant.value)
            self._alive_event(key)
            out.append(key)
        return out

    async def rewrite_alive(self, keys: Sequence[AliveKey], fence: Fence) -> list[AliveKey | None]:
        self._require_fence(fence)
        self.expire_leases()
        out: list[AliveKey | None] = []
        for key in keys:
            current = self.alive.get(key.name)
            if current is None or current.lease != key.lease:
                out.append(None)
                continue
            written = key._replace(revision=self._next())
            self._alive_event(written)
            out.append(written)
        return out

    @contextlib.asynccontextmanager
    async def cluster_lease_renewals(self) -> AsyncIterator[MemoryRenewals]:
        self.renewal_streams += 1
        yield MemoryRenewals(self)

    async def update_cluster(self, name: str, change: Callable[[bytes | None], bytes], fence: Fence) -> bytes:
        self._require_fence(fence)
        blob = change(self.clusters.get(name))
        self._next()
        self.clusters[name] = blob
        return blob


@dataclass
class MemoryRenewals:
    """The memory store's keepalive stream: renews by the store's clock, and counts its rounds."""

    store: MemoryStore

    async def renew(self, leases: Sequence[int]) -> dict[int, int]:
        store = self.store
        store.expire_leases()
        store.renewal_rounds.append(len(leases))
        now = store._lease_now()
        out = {}
        for lease in leases:
            found = store.leases.get(lease)
            if found is None:
                out[lease] = 0
                continue
            store.leases[lease] = (found[0], now + found[0])
            out[lease] = found[0]
        return out
