"""The hub's durable state in etcd.

Keyspace (under the configured prefix, default /fedplane):
  /jobs/spec/<id>      Job without status, written once at submit (its create revision orders jobs)
  /jobs/status/<id>    JobStatus: the dispatch record (state, cluster, generation), changed by CAS only
  /idem/<sha256(key)>  job id, created in the same transaction as the job (idempotent submit)
  /clusters/<name>     Cluster administrative record (cordon state), created on first contact

Every status write compares the key's mod revision with the one the writer read, so two
writers (a restarted hub racing its old self, a cancel racing a dispatch) cannot both win.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd.exceptions import ClientError, RevisionCompactedError

from fedplane.config import StartupError
from fedplane.v1 import types_pb2 as pb

# etcd's default limit is 128 operations per transaction.
_MAX_TXN_OPS = 120


class RevisionCompacted(Exception):
    def __init__(self, compacted: int) -> None:
        super().__init__(f"revision compacted (oldest available is {compacted})")
        self.compacted = compacted


@dataclass
class JobRecord:
    """A job as stored: the spec record plus its status, with the etcd revisions the hub needs."""

    job: pb.Job
    # Create revision of the spec key: a total order of submission.
    seq: int
    # Mod revision of the status key: the CAS token for the next status write.
    revision: int


@dataclass(frozen=True)
class StatusWrite:
    job_id: str
    status: pb.JobStatus
    expected_revision: int


class Store:
    def __init__(self, client: aetcd.Client, prefix: str = "/fedplane") -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")

    @classmethod
    async def connect(cls, endpoint: str, prefix: str = "/fedplane", rpc_timeout: int = 10) -> Store:
        host, _, port = endpoint.removeprefix("http://").rpartition(":")
        client = aetcd.Client(host=host or "127.0.0.1", port=int(port), timeout=rpc_timeout)
        try:
            await client.connect()
            store = cls(client, prefix)
            await store.revision()  # fail fast when etcd is unreachable
        except ClientError as exc:
            await client.close()
            raise StartupError(f"cannot reach etcd at {endpoint}: {' '.join(str(exc).split())}") from exc
        return store

    async def close(self) -> None:
        await self.client.close()

    # keys
    def spec_key(self, job_id: str) -> bytes:
        return f"{self.prefix}/jobs/spec/{job_id}".encode()

    def status_key(self, job_id: str) -> bytes:
        return f"{self.prefix}/jobs/status/{job_id}".encode()

    @property
    def status_prefix(self) -> bytes:
        return f"{self.prefix}/jobs/status/".encode()

    def idem_key(self, key: str) -> bytes:
        return f"{self.prefix}/idem/{hashlib.sha256(key.encode()).hexdigest()}".encode()

    def cluster_key(self, name: str) -> bytes:
        return f"{self.prefix}/clusters/{name}".encode()

    async def revision(self) -> int:
        result = await self.client.get_prefix(f"{self.prefix}/none/".encode(), keys_only=True)
        return int(result.header.revision) if hasattr(result, "header") else 0

    # jobs
    def _create_ops(self, job: pb.Job) -> tuple[list[Any], list[Any]]:
        t = self.client.transactions
        spec_record = pb.Job()
        spec_record.CopyFrom(job)
        spec_record.ClearField("status")
        compares = [t.create(self.spec_key(job.id)) == 0]
        ops = [
            t.put(self.spec_key(job.id), spec_record.SerializeToString()),
            t.put(self.status_key(job.id), job.status.SerializeToString()),
        ]
        if job.idempotency_key:
            compares.append(t.create(self.idem_key(job.idempotency_key)) == 0)
            ops.append(t.put(self.idem_key(job.idempotency_key), job.id.encode()))
        return compares, ops

    async def create_jobs(self, jobs: Sequence[pb.Job]) -> list[tuple[JobRecord, bool]]:
        """Store new jobs durably; a job whose idempotency key exists returns the earlier job instead.

        Jobs are written in as few transactions as etcd allows; when one of a batch's keys
        already exists the batch falls back to one transaction per job.
        """
        results: list[tuple[JobRecord, bool]] = []
        chunk: list[pb.Job] = []
        per_job = 3
        for job in jobs:
            chunk.append(job)
            if (len(chunk) + 1) * per_job > _MAX_TXN_OPS:
                results.extend(await self._create_chunk(chunk))
                chunk = []
        if chunk:
            results.extend(await self._create_chunk(chunk))
        return results

    async def _create_chunk(self, jobs: list[pb.Job]) -> list[tuple[JobRecord, bool]]:
        if len(jobs) > 1 and len({j.idempotency_key for j in jobs if j.idempotency_key}) == sum(
            1 for j in jobs if j.idempotency_key
        ):
            compares: list[Any] = []
            ops: list[Any] = []
            for job in jobs:
                c, o = self._create_ops(job)
                compares += c
                ops += o
            ok, responses = await self.client.transaction(compare=compares, success=ops, failure=[])
            if ok:
                revision = int(responses[0].response_put.header.revision)
                return [(JobRecord(job, revision, revision), True) for job in jobs]
        return [await self._create_one(job) for job in jobs]

    async def _create_one(self, job: pb.Job) -> tuple[JobRecord, bool]:
        t = self.client.transactions
        compares, ops = self._create_ops(job)
        failure = [t.get(self.idem_key(job.idempotency_key))] if job.idempotency_key else []
        ok, responses = await self.client.transaction(compare=compares, success=ops, failure=failure)
        if ok:
            revision = int(responses[0].response_put.header.revision)
            return JobRecord(job, revision, revision), True
        if job.idempotency_key and responses and responses[0]:
            existing_id = responses[0][0][0].decode()
            record = await self.read_job(existing_id)
            if record is not None:
                return record, False
        raise RuntimeError(f"job {job.id} could not be created and no earlier job holds its key")

    async def read_job(self, job_id: str) -> JobRecord | None:
        t = self.client.transactions
        _, responses = await self.client.transaction(
            compare=[],
            success=[t.get(self.spec_key(job_id)), t.get(self.status_key(job_id))],
            failure=[],
        )
        if not responses[0] or not responses[1]:
            return None
        spec_value, spec_kv = responses[0][0]
        status_value, status_kv = responses[1][0]
        job = pb.Job.FromString(spec_value)
        job.status.ParseFromString(status_value)
        return JobRecord(job, int(spec_kv.create_revision), int(status_kv.mod_revision))

    async def load_jobs(self) -> tuple[list[JobRecord], int]:
        """Every job, and the revision the load reflects (to watch from)."""
        specs = await self.client.get_prefix(f"{self.prefix}/jobs/spec/".encode())
        revision = int(specs.header.revision)
        statuses = await self.client.get_prefix(self.status_prefix)
        by_id = {kv.key.decode().rsplit("/", 1)[1]: kv for kv in statuses}
        records = []
        for kv in specs:
            job = pb.Job.FromString(kv.value)
            status_kv = by_id.get(job.id)
            if status_kv is None:
                continue
            job.status.ParseFromString(status_kv.value)
            records.append(JobRecord(job, int(kv.create_revision), int(status_kv.mod_revision)))
        return records, max(revision, int(statuses.header.revision))

    async def write_statuses(self, writes: Sequence[StatusWrite]) -> list[int | None]:
        """Compare-and-swap each status; the new mod revision, or None where another writer won.

        Writes are packed into one transaction; if any compare fails the batch is retried
        one by one so that the others still land.
        """
        if not writes:
            return []
        t = self.client.transactions
        out: list[int | None] = []
        for start in range(0, len(writes), _MAX_TXN_OPS):
            batch = writes[start : start + _MAX_TXN_OPS]
            ok, responses = await self.client.transaction(
                compare=[t.mod(self.status_key(w.job_id)) == w.expected_revision for w in batch],
                success=[t.put(self.status_key(w.job_id), w.status.SerializeToString()) for w in batch],
                failure=[],
            )
            if ok:
                revision = int(responses[0].response_put.header.revision)
                out.extend([revision] * len(batch))
                continue
            for w in batch:
                ok, responses = await self.client.transaction(
                    compare=[t.mod(self.status_key(w.job_id)) == w.expected_revision],
                    success=[t.put(self.status_key(w.job_id), w.status.SerializeToString())],
                    failure=[],
                )
                out.append(int(responses[0].response_put.header.revision) if ok else None)
        return out

    async def delete_jobs(self, records: Sequence[JobRecord]) -> list[bool]:
        """Delete finished jobs with their idempotency keys, each only if its status is unchanged."""
        t = self.client.transactions
        out = []
        for record in records:
            ops = [t.delete(self.spec_key(record.job.id)), t.delete(self.status_key(record.job.id))]
            if record.job.idempotency_key:
                ops.append(t.delete(self.idem_key(record.job.idempotency_key)))
            ok, _ = await self.client.transaction(
                compare=[t.mod(self.status_key(record.job.id)) == record.revision], success=ops, failure=[]
            )
            out.append(bool(ok))
        return out

    async def watch_statuses(self, from_revision: int) -> AsyncIterator[tuple[int, str, pb.JobStatus]]:
        """Status changes after `from_revision`, in revision order; raises RevisionCompacted."""
        try:
            watch = await self.client.watch_prefix(self.status_prefix, start_revision=from_revision + 1)
        except RevisionCompactedError as exc:
            raise RevisionCompacted(exc.compacted_revision) from exc
        try:
            async for event in watch:
                if isinstance(event, Exception):
                    raise event
                if event.kind != "PUT":
                    continue
                job_id = event.kv.key.decode().rsplit("/", 1)[1]
                yield int(event.kv.mod_revision), job_id, pb.JobStatus.FromString(event.kv.value)
        except RevisionCompactedError as exc:
            raise RevisionCompacted(exc.compacted_revision) from exc
        finally:
            await watch.cancel()

    # clusters
    async def load_clusters(self) -> dict[str, pb.Cluster]:
        result = await self.client.get_prefix(f"{self.prefix}/clusters/".encode())
        clusters = [pb.Cluster.FromString(kv.value) for kv in result]
        return {c.name: c for c in clusters}

    async def put_cluster(self, cluster: pb.Cluster) -> None:
        await self.client.put(self.cluster_key(cluster.name), cluster.SerializeToString())
