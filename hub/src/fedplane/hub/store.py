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

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd import exceptions as etcd_errors
from aetcd import rpc
from aetcd.exceptions import ClientError

from fedplane.core.model import JobRequest
from fedplane.hub import convert
from fedplane.runtime.config import StartupError
from fedplane.v1 import types_pb2 as pb


class RevisionCompacted(Exception):
    def __init__(self, compacted: int) -> None:
        super().__init__(f"revision compacted (oldest available is {compacted})")
        self.compacted = compacted


@dataclass(slots=True)
class JobRecord:
    """A job as the hub holds it: serialized, with the few fields it reads often kept parsed.

    A parsed protobuf Job costs about 3 KB of memory and its bytes about 250, which is the
    difference between a million queued jobs fitting in the hub or not. `job` parses on demand.
    """

    id: str
    # Create revision of the spec key: a total order of submission.
    seq: int
    # Mod revision of the status key: the CAS token for the next status write.
    revision: int
    # The stored spec record (a Job without status), exactly as in etcd.
    spec_blob: bytes
    status_blob: bytes
    state: int
    cluster: str
    generation: int
    queue: str
    idempotency_key: str

    @classmethod
    def of(cls, job: pb.Job, seq: int, revision: int, spec_blob: bytes, status_blob: bytes) -> JobRecord:
        status = job.status
        return cls(
            job.id,
            seq,
            revision,
            spec_blob,
            status_blob,
            status.state,
            status.cluster,
            status.generation,
            job.spec.queue,
            job.idempotency_key,
        )

    @property
    def job(self) -> pb.Job:
        """A fresh parsed copy: changes to it do not change the record."""
        job = pb.Job.FromString(self.spec_blob)
        job.status.ParseFromString(self.status_blob)
        return job

    @property
    def spec_record(self) -> pb.Job:
        """The job without its status (spec, trace context, create time)."""
        return pb.Job.FromString(self.spec_blob)

    @property
    def status(self) -> pb.JobStatus:
        return pb.JobStatus.FromString(self.status_blob)

    def set_status(self, status: pb.JobStatus, revision: int, blob: bytes | None = None) -> None:
        self.status_blob = blob if blob is not None else status.SerializeToString()
        self.revision = revision
        self.state = status.state
        self.cluster = status.cluster
        self.generation = status.generation


@dataclass(slots=True)
class NewJob:
    """A job about to be stored; `record` is what the hub will hold once etcd has it."""

    record: JobRecord
    # The job as submitted (without status): what placement needs is built from it once the
    # job's revision, which orders it, is known.
    job: pb.Job
    request: JobRequest | None = None

    @classmethod
    def of(cls, job: pb.Job, status: pb.JobStatus, status_blob: bytes | None = None) -> NewJob:
        """From a job without status and its initial status (stored under a key of its own);
        `status_blob` is the status serialized, when the caller has it (a batch shares one)."""
        record = JobRecord(
            job.id,
            0,
            0,
            job.SerializeToString(),
            status_blob if status_blob is not None else status.SerializeToString(),
            status.state,
            status.cluster,
            status.generation,
            job.spec.queue,
            job.idempotency_key,
        )
        return cls(record, job)

    @property
    def spec_blob(self) -> bytes:
        return self.record.spec_blob

    @property
    def status_blob(self) -> bytes:
        return self.record.status_blob

    def stored_at(self, revision: int) -> JobRecord:
        if self.request is None or self.record.revision != revision:
            self.record.seq = self.record.revision = revision
            self.request = convert.job_request(self.job, revision)
        return self.record


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """A compare-and-swap of one status; `blob` is `status` serialized once, for etcd and the table."""

    job_id: str
    status: pb.JobStatus
    expected_revision: int
    blob: bytes

    @classmethod
    def of(cls, job_id: str, status: pb.JobStatus, expected_revision: int) -> StatusWrite:
        return cls(job_id, status, expected_revision, status.SerializeToString())


def _record(spec_blob: bytes, seq: int, status_blob: bytes, revision: int) -> JobRecord:
    job = pb.Job.FromString(spec_blob)
    job.status.ParseFromString(status_blob)
    return JobRecord.of(job, seq, revision, spec_blob, status_blob)


_PAGE = 5000


@contextlib.contextmanager
def _etcd_errors() -> Iterator[None]:
    """gRPC failures of a call made on aetcd's channel, raised as aetcd's exceptions (as its own
    calls raise them, and as the hub's callers expect)."""
    try:
        yield
    except rpc.AioRpcError as exc:
        etcd_errors._handle_exception(exc)
        raise


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that makes a range or watch cover every key starting with `prefix`."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


_CREATE = rpc.Compare.CREATE
_MOD = rpc.Compare.MOD


class _Txn:
    """An etcd transaction, built as protobuf in place.

    Adding to the request's repeated fields costs a third of building each compare and
    operation as a message of its own and copying it in, and the hub writes thousands of keys
    a second. Compares are all EQUAL (etcd's zero value).
    """

    __slots__ = ("request",)

    def __init__(self) -> None:
        self.request = rpc.TxnRequest()

    def created_never(self, key: bytes) -> None:
        self.request.compare.add(target=_CREATE, key=key)

    def modified_at(self, key: bytes, revision: int) -> None:
        self.request.compare.add(target=_MOD, key=key, mod_revision=revision)

    def put(self, key: bytes, value: bytes) -> None:
        put = self.request.success.add().request_put
        put.key = key
        put.value = value

    def get(self, key: bytes, *, on_failure: bool = False) -> None:
        ops = self.request.failure if on_failure else self.request.success
        ops.add().request_range.key = key

    def delete(self, key: bytes) -> None:
        self.request.success.add().request_delete_range.key = key


class Store:
    def __init__(
        self, client: aetcd.Client, prefix: str = "/fedplane", max_txn_ops: int = 128, rpc_timeout: float = 10
    ) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        # etcd's --max-txn-ops (128 unless the server says otherwise): writes are batched up to it.
        self.max_txn_ops = max_txn_ops
        self.rpc_timeout = rpc_timeout

    @classmethod
    async def connect(
        cls, endpoint: str, prefix: str = "/fedplane", rpc_timeout: int = 10, max_txn_ops: int = 128
    ) -> Store:
        host, _, port = endpoint.removeprefix("http://").rpartition(":")
        client = aetcd.Client(host=host or "127.0.0.1", port=int(port), timeout=rpc_timeout)
        try:
            await client.connect()
            store = cls(client, prefix, max_txn_ops, rpc_timeout)
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

    async def _txn(self, txn: _Txn) -> Any:
        """Send one transaction on aetcd's channel (see _Txn); errors are raised as aetcd's
        exceptions, as its own calls raise them."""
        with _etcd_errors():
            return await self.client.kvstub.Txn(
                txn.request, timeout=self.rpc_timeout, metadata=self.client.metadata
            )

    # jobs
    def _create_ops(self, job: NewJob, txn: _Txn) -> None:
        record = job.record
        spec_key = self.spec_key(record.id)
        txn.created_never(spec_key)
        txn.put(spec_key, record.spec_blob)
        txn.put(self.status_key(record.id), record.status_blob)
        if record.idempotency_key:
            idem_key = self.idem_key(record.idempotency_key)
            txn.created_never(idem_key)
            txn.put(idem_key, record.id.encode())

    async def create_jobs(self, jobs: Sequence[NewJob]) -> list[tuple[JobRecord, bool]]:
        """Store new jobs durably; a job whose idempotency key exists returns the earlier job instead.

        Jobs are written in as few transactions as etcd allows; when one of a batch's keys
        already exists the batch falls back to one transaction per job.
        """
        results: list[tuple[JobRecord, bool]] = []
        per_txn = max(1, self.max_txn_ops // 3)
        # One after another, so that jobs earlier in a batch get earlier revisions (FIFO).
        for start in range(0, len(jobs), per_txn):
            results.extend(await self._create_chunk(jobs[start : start + per_txn]))
        return results

    async def _create_chunk(self, jobs: Sequence[NewJob]) -> list[tuple[JobRecord, bool]]:
        keys = [j.record.idempotency_key for j in jobs if j.record.idempotency_key]
        if len(jobs) > 1 and len(set(keys)) == len(keys):
            txn = _Txn()
            for job in jobs:
                self._create_ops(job, txn)
            response = await self._txn(txn)
            if response.succeeded:
                revision = int(response.header.revision)
                return [(job.stored_at(revision), True) for job in jobs]
        return [await self._create_one(job) for job in jobs]

    async def _create_one(self, job: NewJob) -> tuple[JobRecord, bool]:
        txn = _Txn()
        self._create_ops(job, txn)
        key = job.record.idempotency_key
        if key:
            txn.get(self.idem_key(key), on_failure=True)
        response = await self._txn(txn)
        if response.succeeded:
            return job.stored_at(int(response.header.revision)), True
        if key and response.responses and response.responses[0].response_range.kvs:
            existing_id = response.responses[0].response_range.kvs[0].value.decode()
            record = await self.read_job(existing_id)
            if record is not None:
                return record, False
        raise RuntimeError(f"job {job.record.id} could not be created and no earlier job holds its key")

    async def read_job(self, job_id: str) -> JobRecord | None:
        txn = _Txn()
        txn.get(self.spec_key(job_id))
        txn.get(self.status_key(job_id))
        response = await self._txn(txn)
        spec_kvs = response.responses[0].response_range.kvs
        status_kvs = response.responses[1].response_range.kvs
        if not spec_kvs or not status_kvs:
            return None
        spec, status = spec_kvs[0], status_kvs[0]
        return _record(spec.value, int(spec.create_revision), status.value, int(status.mod_revision))

    async def _pages(self, prefix: bytes, revision: int) -> AsyncIterator[list[Any]]:
        """Every key under `prefix` at `revision`, a page at a time (a million jobs do not fit one reply)."""
        end = _prefix_end(prefix)
        start = prefix
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=_PAGE, revision=revision)
            response = await self.client.kvstub.Range(request, timeout=60, metadata=self.client.metadata)
            if response.kvs:
                yield list(response.kvs)
            if not response.more or not response.kvs:
                return
            start = response.kvs[-1].key + b"\0"

    async def load_jobs(self) -> tuple[list[JobRecord], int]:
        """Every job in submission order, and the revision the load reflects (to watch from)."""
        revision = await self.revision()
        statuses: dict[bytes, tuple[bytes, int]] = {}
        status_prefix = self.status_prefix
        async for page in self._pages(status_prefix, revision):
            for kv in page:
                statuses[kv.key[len(status_prefix) :]] = (kv.value, kv.mod_revision)
        spec_prefix = f"{self.prefix}/jobs/spec/".encode()
        records = []
        async for page in self._pages(spec_prefix, revision):
            for kv in page:
                found = statuses.pop(kv.key[len(spec_prefix) :], None)
                if found is not None:
                    records.append(_record(kv.value, kv.create_revision, *found))
        records.sort(key=lambda r: (r.seq, r.id))
        return records, revision

    async def write_statuses(self, writes: Sequence[StatusWrite]) -> list[int | None]:
        """Compare-and-swap each status; the new mod revision, or None where another writer won.

        Writes are packed into as few transactions as etcd allows, sent concurrently; if any
        compare of a transaction fails, its writes are retried one by one so that the others land.
        """
        if not writes:
            return []
        chunks = await asyncio.gather(
            *(
                self._write_chunk(writes[start : start + self.max_txn_ops])
                for start in range(0, len(writes), self.max_txn_ops)
            )
        )
        return [revision for chunk in chunks for revision in chunk]

    async def _write_chunk(self, batch: Sequence[StatusWrite]) -> list[int | None]:
        keys = [self.status_key(w.job_id) for w in batch]
        txn = _Txn()
        for key, w in zip(keys, batch, strict=True):
            txn.modified_at(key, w.expected_revision)
            txn.put(key, w.blob)
        response = await self._txn(txn)
        if response.succeeded:
            return [int(response.header.revision)] * len(batch)
        out: list[int | None] = []
        for key, w in zip(keys, batch, strict=True):
            txn = _Txn()
            txn.modified_at(key, w.expected_revision)
            txn.put(key, w.blob)
            response = await self._txn(txn)
            out.append(int(response.header.revision) if response.succeeded else None)
        return out

    async def delete_jobs(self, records: Sequence[JobRecord]) -> list[bool]:
        """Delete finished jobs with their idempotency keys, each only if its status is unchanged."""
        out = []
        for record in records:
            status_key = self.status_key(record.id)
            txn = _Txn()
            txn.modified_at(status_key, record.revision)
            txn.delete(self.spec_key(record.id))
            txn.delete(status_key)
            if record.idempotency_key:
                txn.delete(self.idem_key(record.idempotency_key))
            response = await self._txn(txn)
            out.append(bool(response.succeeded))
        return out

    async def watch_statuses(self, from_revision: int) -> AsyncIterator[tuple[int, str, bytes]]:
        """Status changes after `from_revision`, in revision order; raises RevisionCompacted.

        A watch stream of its own, read as protobuf: every status write of the hub comes back
        here, and aetcd's watcher builds several Python objects per event on top.
        """
        prefix = self.status_prefix
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=prefix,
                range_end=_prefix_end(prefix),
                start_revision=from_revision + 1,
                filters=[rpc.WatchCreateRequest.NODELETE],
            )
        )

        async def requests() -> AsyncIterator[Any]:
            yield create
            await asyncio.Event().wait()  # keep the stream open until the call is cancelled

        call = rpc.WatchStub(self.client.channel).Watch(requests(), metadata=self.client.metadata)
        cut = len(prefix)
        try:
            with _etcd_errors():
                async for response in call:
                    if response.compact_revision:
                        raise RevisionCompacted(int(response.compact_revision))
                    if response.canceled:
                        raise ClientError(
                            f"etcd cancelled the watch: {response.cancel_reason or 'no reason given'}"
                        )
                    for event in response.events:
                        kv = event.kv
                        yield int(kv.mod_revision), kv.key[cut:].decode(), kv.value
        finally:
            call.cancel()

    # clusters
    async def load_clusters(self) -> dict[str, pb.Cluster]:
        result = await self.client.get_prefix(f"{self.prefix}/clusters/".encode())
        clusters = [pb.Cluster.FromString(kv.value) for kv in result]
        return {c.name: c for c in clusters}

    async def put_cluster(self, cluster: pb.Cluster) -> None:
        await self.client.put(self.cluster_key(cluster.name), cluster.SerializeToString())
