"""The hub's durable state in etcd, as keys, bytes and revisions.

Keyspace (under the configured prefix, default /fedplane):
  /jobs/spec/<id>      Job without status, written once at submit (its create revision orders jobs)
  /jobs/status/<id>    JobStatus: the dispatch record (state, cluster, generation), changed by CAS only
  /idem/<sha256(key)>  job id, created in the same transaction as the job (idempotent submit)
  /clusters/<name>     Cluster administrative record (cordon state), created on first contact

Every status write compares the key's mod revision with the one the writer read, so two
writers (a restarted hub racing its old self, a cancel racing a dispatch) cannot both win.

The store knows no hub types: it takes anything shaped like the protocols below and returns
ids, blobs and revisions. The hub's table and drivers depend on `JobStore`, so that tests can
stand an in-memory store in for etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import aetcd
from aetcd import exceptions as etcd_errors
from aetcd import rpc
from aetcd.exceptions import ClientError

from fedplane.runtime import logs
from fedplane.runtime.config import StartupError

log = logs.get("fedplane.hub.store")


class RevisionCompacted(Exception):
    def __init__(self, compacted: int) -> None:
        super().__init__(f"revision compacted (oldest available is {compacted})")
        self.compacted = compacted


class StoredJob(NamedTuple):
    """A job as etcd holds it."""

    id: str
    # Create revision of the spec key: a total order of submission.
    seq: int
    # Mod revision of the status key: the CAS token for the next status write.
    revision: int
    # The spec record (a Job without status) and the status, exactly as stored.
    spec_blob: bytes
    status_blob: bytes


class JobToCreate(Protocol):
    """What creating a job needs (the hub passes its own records, not copies)."""

    @property
    def id(self) -> str: ...
    @property
    def spec_blob(self) -> bytes: ...
    @property
    def status_blob(self) -> bytes: ...
    @property
    def idempotency_key(self) -> str: ...


class StatusToWrite(Protocol):
    """One compare-and-swap of a status key."""

    @property
    def job_id(self) -> str: ...
    @property
    def expected_revision(self) -> int: ...
    @property
    def blob(self) -> bytes: ...


class JobToDelete(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def revision(self) -> int: ...
    @property
    def idempotency_key(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Fence:
    """The authority a hub writes job statuses under, checked in the same transaction.

    Today one hub writes and NO_FENCE compares nothing. Hub high availability makes it the
    leader key and the create revision this hub won it at; `_Txn.fenced` then adds that one
    compare, so that a deposed leader's writes land nowhere.
    """

    key: bytes = b""
    revision: int = 0


NO_FENCE = Fence()


class JobStore(Protocol):
    """The hub's durable state, as the job table and the drivers use it."""

    async def create_jobs(self, jobs: Sequence[JobToCreate]) -> list[int | StoredJob]:
        """Store new jobs, in order; for each, its create revision, or the earlier job that
        already holds its idempotency key."""
        ...

    async def read_job(self, job_id: str) -> StoredJob | None: ...

    async def load_jobs(self) -> tuple[list[StoredJob], int]:
        """Every job in submission order, and the revision the load reflects (to watch from)."""
        ...

    async def write_statuses(self, writes: Sequence[StatusToWrite], fence: Fence) -> list[int | None]:
        """Compare-and-swap each status under `fence`; the new mod revision, or None where
        another writer won."""
        ...

    async def delete_jobs(self, jobs: Sequence[JobToDelete], fence: Fence) -> list[bool]:
        """Delete jobs with their idempotency keys, each only if its status is unchanged."""
        ...

    def watch_statuses(self, from_revision: int) -> AsyncIterator[tuple[int, str, bytes]]:
        """(revision, job id, status blob) of every status put after `from_revision`, in
        revision order; raises RevisionCompacted when that history is gone."""
        ...

    async def load_clusters(self) -> dict[str, bytes]: ...

    async def put_cluster(self, name: str, blob: bytes) -> None: ...

    async def close(self) -> None: ...


_PAGE = 5000

# etcd releases with a known data-loss bug: (first, last) version inclusive, and why.
_UNSAFE_ETCD: list[tuple[tuple[int, int, int], tuple[int, int, int], str]] = [
    (
        (3, 5, 0),
        (3, 5, 2),
        "a member killed mid-write can come back with data the others do not have"
        " (etcd-io/etcd#13766, fixed in 3.5.3)",
    ),
]


def etcd_version_problem(version: str) -> str | None:
    """Why the hub should not run on etcd `version` (as etcd's Status reports it, e.g. "3.5.1"),
    or None. A version that does not parse is let through: there is nothing known against it."""
    found = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version.strip())
    if not found:
        return None
    parsed = (int(found[1]), int(found[2]), int(found[3]))
    for first, last, why in _UNSAFE_ETCD:
        if first <= parsed <= last:
            return f"etcd {version.strip()} has a known data-loss bug: {why}"
    return None


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

    def fenced(self, fence: Fence) -> None:
        """Make the transaction land only while `fence` holds.

        NO_FENCE, the only fence today, compares nothing. Hub HA turns this into the one
        compare of the leader key's create revision:
            self.request.compare.add(target=_CREATE, key=fence.key, create_revision=fence.revision)
        A deposed leader's transactions then fail as a lost CAS does, and the per-write
        retry of write_statuses must tell the two apart (the failure branch can read the
        leader key).
        """


class Store:
    """JobStore on etcd."""

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
        cls,
        endpoint: str,
        prefix: str = "/fedplane",
        rpc_timeout: int = 10,
        max_txn_ops: int = 128,
        allow_unsafe_version: bool = False,
    ) -> Store:
        """Connect, and refuse an etcd release with a known data-loss bug unless
        `allow_unsafe_version` (the hub's etcd_allow_unsafe_version)."""
        host, _, port = endpoint.removeprefix("http://").rpartition(":")
        client = aetcd.Client(host=host or "127.0.0.1", port=int(port), timeout=rpc_timeout)
        try:
            await client.connect()
            store = cls(client, prefix, max_txn_ops, rpc_timeout)
            await store.revision()  # fail fast when etcd is unreachable
            version = await store.server_version()
        except ClientError as exc:
            await client.close()
            raise StartupError(f"cannot reach etcd at {endpoint}: {' '.join(str(exc).split())}") from exc
        problem = etcd_version_problem(version)
        if problem and not allow_unsafe_version:
            await client.close()
            raise StartupError(
                f"{problem}; upgrade etcd at {endpoint} to 3.5.6 or newer (3.6 recommended),"
                " or set etcd_allow_unsafe_version: true to run on it anyway"
            )
        if problem:
            log.warning("running on an unsafe etcd (etcd_allow_unsafe_version)", problem=problem)
        return store

    async def server_version(self) -> str:
        """The etcd server's release, from the maintenance Status call of the member answering."""
        with _etcd_errors():
            status = await self.client.maintenancestub.Status(
                rpc.StatusRequest(), timeout=self.rpc_timeout, metadata=self.client.metadata
            )
        return str(status.version)

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
    def _create_ops(self, job: JobToCreate, txn: _Txn) -> None:
        job_id = job.id
        spec_key = self.spec_key(job_id)
        txn.created_never(spec_key)
        txn.put(spec_key, job.spec_blob)
        txn.put(self.status_key(job_id), job.status_blob)
        key = job.idempotency_key
        if key:
            idem_key = self.idem_key(key)
            txn.created_never(idem_key)
            txn.put(idem_key, job_id.encode())

    async def create_jobs(self, jobs: Sequence[JobToCreate]) -> list[int | StoredJob]:
        """Store new jobs durably; for each its create revision, or the earlier job that holds
        its idempotency key.

        Jobs are written in as few transactions as etcd allows; when one of a batch's keys
        already exists the batch falls back to one transaction per job. Creates carry no
        fence: they conflict with nothing, and whichever hub leads loads them from etcd.
        """
        results: list[int | StoredJob] = []
        per_txn = max(1, self.max_txn_ops // 3)
        # One after another, so that jobs earlier in a batch get earlier revisions (FIFO).
        for start in range(0, len(jobs), per_txn):
            results.extend(await self._create_chunk(jobs[start : start + per_txn]))
        return results

    async def _create_chunk(self, jobs: Sequence[JobToCreate]) -> list[int | StoredJob]:
        keys = [j.idempotency_key for j in jobs if j.idempotency_key]
        if len(jobs) > 1 and len(set(keys)) == len(keys):
            txn = _Txn()
            for job in jobs:
                self._create_ops(job, txn)
            response = await self._txn(txn)
            if response.succeeded:
                return [int(response.header.revision)] * len(jobs)
        return [await self._create_one(job) for job in jobs]

    async def _create_one(self, job: JobToCreate) -> int | StoredJob:
        txn = _Txn()
        self._create_ops(job, txn)
        key = job.idempotency_key
        if key:
            txn.get(self.idem_key(key), on_failure=True)
        response = await self._txn(txn)
        if response.succeeded:
            return int(response.header.revision)
        if key and response.responses and response.responses[0].response_range.kvs:
            existing_id = response.responses[0].response_range.kvs[0].value.decode()
            existing = await self.read_job(existing_id)
            if existing is not None:
                return existing
        raise RuntimeError(f"job {job.id} could not be created and no earlier job holds its key")

    async def read_job(self, job_id: str) -> StoredJob | None:
        txn = _Txn()
        txn.get(self.spec_key(job_id))
        txn.get(self.status_key(job_id))
        response = await self._txn(txn)
        spec_kvs = response.responses[0].response_range.kvs
        status_kvs = response.responses[1].response_range.kvs
        if not spec_kvs or not status_kvs:
            return None
        spec, status = spec_kvs[0], status_kvs[0]
        return StoredJob(
            job_id, int(spec.create_revision), int(status.mod_revision), spec.value, status.value
        )

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

    async def load_jobs(self) -> tuple[list[StoredJob], int]:
        """Every job in submission order, and the revision the load reflects (to watch from)."""
        revision = await self.revision()
        statuses: dict[bytes, tuple[bytes, int]] = {}
        status_prefix = self.status_prefix
        async for page in self._pages(status_prefix, revision):
            for kv in page:
                statuses[kv.key[len(status_prefix) :]] = (kv.value, kv.mod_revision)
        spec_prefix = f"{self.prefix}/jobs/spec/".encode()
        jobs = []
        async for page in self._pages(spec_prefix, revision):
            for kv in page:
                job_id = kv.key[len(spec_prefix) :]
                found = statuses.pop(job_id, None)
                if found is not None:
                    status_blob, mod_revision = found
                    jobs.append(
                        StoredJob(job_id.decode(), kv.create_revision, mod_revision, kv.value, status_blob)
                    )
        jobs.sort(key=lambda j: (j.seq, j.id))
        return jobs, revision

    async def write_statuses(self, writes: Sequence[StatusToWrite], fence: Fence) -> list[int | None]:
        """Compare-and-swap each status under `fence`; the new mod revision, or None where
        another writer won.

        Every transaction compares each key's mod revision with the one its writer read, and
        carries the fence (see _Txn.fenced: nothing today, the leader key with hub HA). Writes
        are packed into as few transactions as etcd allows, sent concurrently; if any compare
        of a transaction fails, its writes are retried one by one so that the others land.
        """
        if not writes:
            return []
        chunks = await asyncio.gather(
            *(
                self._write_chunk(writes[start : start + self.max_txn_ops], fence)
                for start in range(0, len(writes), self.max_txn_ops)
            )
        )
        return [revision for chunk in chunks for revision in chunk]

    async def _write_chunk(self, batch: Sequence[StatusToWrite], fence: Fence) -> list[int | None]:
        keys = [self.status_key(w.job_id) for w in batch]
        txn = _Txn()
        txn.fenced(fence)
        for key, w in zip(keys, batch, strict=True):
            txn.modified_at(key, w.expected_revision)
            txn.put(key, w.blob)
        response = await self._txn(txn)
        if response.succeeded:
            return [int(response.header.revision)] * len(batch)
        out: list[int | None] = []
        for key, w in zip(keys, batch, strict=True):
            txn = _Txn()
            txn.fenced(fence)
            txn.modified_at(key, w.expected_revision)
            txn.put(key, w.blob)
            response = await self._txn(txn)
            out.append(int(response.header.revision) if response.succeeded else None)
        return out

    async def delete_jobs(self, jobs: Sequence[JobToDelete], fence: Fence) -> list[bool]:
        """Delete jobs with their idempotency keys, each only if its status is unchanged (and
        under `fence`, as status writes are)."""
        out = []
        for job in jobs:
            status_key = self.status_key(job.id)
            txn = _Txn()
            txn.fenced(fence)
            txn.modified_at(status_key, job.revision)
            txn.delete(self.spec_key(job.id))
            txn.delete(status_key)
            if job.idempotency_key:
                txn.delete(self.idem_key(job.idempotency_key))
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
    async def load_clusters(self) -> dict[str, bytes]:
        """Every cluster's admin record, by name."""
        prefix = f"{self.prefix}/clusters/"
        result = await self.client.get_prefix(prefix.encode())
        return {kv.key.decode().removeprefix(prefix): kv.value for kv in result}

    async def put_cluster(self, name: str, blob: bytes) -> None:
        await self.client.put(self.cluster_key(name), blob)
