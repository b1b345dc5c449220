"""The hub's durable state in etcd, as keys, bytes and revisions.

Keyspace (under the configured prefix, default /fedplane):
  /jobs/spec/<id>      Job without status, written once at submit (its create revision orders jobs)
  /jobs/status/<id>    JobStatus: the dispatch record (state, cluster, generation), changed by CAS only
  /idem/<sha256(key)>  job id, created in the same transaction as the job (idempotent submit)
  /clusters/<name>     Cluster administrative record (cordon, lost time), created on first contact
  /alive/<name>        JSON (liveness.AliveRecord) bound to the cluster's own lease: there while it lives
  /queues/config       QueueObjects: every queue, cohort, flavor and priority class (queuebook.py)

Every status write compares the key's mod revision with the one the writer read, so two
writers (a restarted hub racing its old self, a cancel racing a dispatch) cannot both win.

The store knows no hub types: it takes anything shaped like the protocols below and returns
ids, blobs and revisions. The hub's table and drivers depend on `JobStore`, so that tests can
stand an in-memory store in for etcd.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from grpc import aio as grpc_aio

from fedplane.hub.etcd import (
    PLAINTEXT,
    EtcdClient,
    EtcdCredentials,
    EtcdError,
    EtcdRefused,
    prefix_end,
    startup_failure,
)
from fedplane.hub.etcdpb import kv_pb2
from fedplane.hub.etcdpb import rpc_pb2 as rpc
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

    With hub HA it is the leader key and the create revision this replica won it at: every
    guarded transaction compares that create revision, so that a deposed leader (its lease
    expired while it was paused, cut off or slow) writes nothing, whatever it still believes.
    NO_FENCE compares nothing: single-hub tests and writes that are safe from any replica.
    """

    key: bytes = b""
    revision: int = 0


class FenceLost(Exception):
    """The fence no longer holds: another replica leads now, or none does."""

    def __init__(self, fence: Fence) -> None:
        super().__init__(f"this hub no longer leads (fence {fence.key.decode()}@{fence.revision} is gone)")
        self.fence = fence


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

    def watch_statuses(
        self, from_revision: int, deletes: bool = False
    ) -> AsyncIterator[tuple[int, str, bytes]]:
        """(revision, job id, status blob) of every status put after `from_revision`, in
        revision order, and with `deletes` every deletion as an empty blob (a stored status is
        never empty); raises RevisionCompacted when that history is gone."""
        ...

    async def load_clusters(self) -> dict[str, bytes]: ...

    async def put_cluster(self, name: str, blob: bytes) -> None: ...

    async def create_cluster(self, name: str, blob: bytes) -> bool:
        """Store a first admin record unless one exists; whether it was created."""
        ...

    async def load_clusters_at(self) -> tuple[dict[str, bytes], int]: ...

    def watch_clusters(self, from_revision: int) -> AsyncIterator[tuple[int, str, bytes]]:
        """(revision, name, admin record) of every admin record written after `from_revision`."""
        ...

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
        """Make the transaction land only while `fence` holds (NO_FENCE: always).

        The failure branch reads the fence's key, so that a failed transaction tells a lost
        fence (raise FenceLost: see `check_fence`) from a lost compare-and-swap (retry).
        Call it first: the fence's read is then the failure branch's first response.
        """
        if fence.key:
            self.request.compare.add(target=_CREATE, key=fence.key, create_revision=fence.revision)
            self.get(fence.key, on_failure=True)


def check_fence(response: Any, fence: Fence) -> None:
    """Raise FenceLost if a failed transaction built with `_Txn.fenced(fence)` failed on its fence."""
    if not fence.key or response.succeeded:
        return
    kvs = response.responses[0].response_range.kvs
    if not kvs or int(kvs[0].create_revision) != fence.revision:
        raise FenceLost(fence)


def _no_hook(_seconds: float, _error: EtcdError | None) -> None:
    pass


class Store:
    """JobStore on etcd."""

    def __init__(
        self, client: EtcdClient, prefix: str = "/fedplane", max_txn_ops: int = 128, rpc_timeout: float = 10
    ) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        # etcd's --max-txn-ops (128 unless the server says otherwise): writes are batched up to it.
        self.max_txn_ops = max_txn_ops
        self.rpc_timeout = rpc_timeout
        # Told of every transaction: how long it took, and its error if it failed (the hub's metrics).
        self.on_txn: Callable[[float, EtcdError | None], None] = _no_hook

    @classmethod
    async def connect(
        cls,
        endpoint: str,
        prefix: str = "/fedplane",
        rpc_timeout: int = 10,
        max_txn_ops: int = 128,
        allow_unsafe_version: bool = False,
        credentials: EtcdCredentials = PLAINTEXT,
    ) -> Store:
        """Connect with `credentials` (EtcdCredentials.load: TLS, a client certificate, a
        password), check that the hub's etcd user may use `prefix`, and refuse an etcd release
        with a known data-loss bug unless `allow_unsafe_version` (etcd_allow_unsafe_version).
        Any failure is a one-line StartupError that says what to change."""
        client = EtcdClient(endpoint, credentials, rpc_timeout)
        store = cls(client, prefix, max_txn_ops, rpc_timeout)
        try:
            await client.authenticate()
            await store.revision()  # fail fast when etcd is unreachable or the prefix is not ours
            version = await store.server_version()
        except EtcdError as exc:
            await client.close()
            raise StartupError(startup_failure(endpoint, credentials, store.prefix, exc)) from exc
        problem = etcd_version_problem(version)
        if problem and not allow_unsafe_version:
            await client.close()
            raise StartupError(
                f"{problem}; upgrade etcd at {endpoint} to 3.5.6 or newer (3.6 recommended),"
                " or set etcd_allow_unsafe_version: true to run on it anyway"
            )
        if problem:
            log.warning("running on an unsafe etcd (etcd_allow_unsafe_version)", problem=problem)
        if credentials.username and not credentials.tls:
            log.warning("the etcd password crosses the network in plaintext: set etcd_tls", endpoint=endpoint)
        log.info(
            "etcd connected",
            endpoint=endpoint,
            version=version,
            tls="on" if credentials.tls else "off",
            auth="password" if credentials.username else "certificate" if credentials.cert else "none",
        )
        return store

    async def server_version(self) -> str:
        """The etcd server's release, from the maintenance Status call of the member answering."""
        return str((await self.client.status()).version)

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
        """etcd's current revision, read under the prefix (a role limited to it may read it)."""
        request = rpc.RangeRequest(key=f"{self.prefix}/none/".encode(), keys_only=True, limit=1)
        with self.client.errors():
            response = await self.client.kv.Range(
                request, timeout=self.rpc_timeout, metadata=self.client.metadata
            )
        return int(response.header.revision)

    async def _txn(self, txn: _Txn) -> Any:
        """Send one transaction (see _Txn); failures are raised as EtcdErrors."""
        client = self.client
        started = time.perf_counter()
        try:
            with client.errors():
                response = await client.kv.Txn(
                    txn.request, timeout=self.rpc_timeout, metadata=client.metadata
                )
        except EtcdError as exc:
            self.on_txn(time.perf_counter() - started, exc)
            raise
        self.on_txn(time.perf_counter() - started, None)
        return response

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
        end = prefix_end(prefix)
        start = prefix
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=_PAGE, revision=revision)
            with self.client.errors():
                response = await self.client.kv.Range(request, timeout=60, metadata=self.client.metadata)
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
        # The fence is one more compare: etcd counts compares against --max-txn-ops too.
        per_txn = max(1, self.max_txn_ops - (1 if fence.key else 0))
        chunks = await asyncio.gather(
            *(
                self._write_chunk(writes[start : start + per_txn], fence)
                for start in range(0, len(writes), per_txn)
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
        check_fence(response, fence)
        out: list[int | None] = []
        for key, w in zip(keys, batch, strict=True):
            txn = _Txn()
            txn.fenced(fence)
            txn.modified_at(key, w.expected_revision)
            txn.put(key, w.blob)
            response = await self._txn(txn)
            check_fence(response, fence)
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
            check_fence(response, fence)
            out.append(bool(response.succeeded))
        return out

    async def _watch(
        self, prefix: bytes, from_revision: int, deletes: bool = True
    ) -> AsyncIterator[tuple[bool, Any]]:
        """(deleted, key-value) of every change under `prefix` after `from_revision`, in revision
        order; raises RevisionCompacted when that history is gone.

        A watch stream of its own, read as protobuf: the hub's every status write comes back
        through one, and a client library's watcher builds several Python objects per event on top.
        """
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=prefix,
                range_end=prefix_end(prefix),
                start_revision=from_revision + 1,
                filters=[] if deletes else [rpc.WatchCreateRequest.NODELETE],
            )
        )

        async def requests() -> AsyncIterator[Any]:
            yield create
            await asyncio.Event().wait()  # keep the stream open until the call is cancelled

        call = self.client.watch.Watch(requests(), metadata=self.client.metadata)
        delete = kv_pb2.Event.DELETE
        try:
            with self.client.errors():
                async for response in call:
                    if response.compact_revision:
                        raise RevisionCompacted(int(response.compact_revision))
                    if response.canceled:
                        # A range the hub's etcd role may not read is refused this way.
                        reason = response.cancel_reason or "no reason given"
                        failure = EtcdRefused if "permission denied" in reason else EtcdError
                        raise failure(f"etcd cancelled the watch: {reason}")
                    for event in response.events:
                        yield event.type == delete, event.kv
        finally:
            call.cancel()

    async def watch_statuses(
        self, from_revision: int, deletes: bool = False
    ) -> AsyncIterator[tuple[int, str, bytes]]:
        """Status changes after `from_revision`, in revision order (deletions as empty blobs
        with `deletes`); raises RevisionCompacted."""
        cut = len(self.status_prefix)
        async for deleted, kv in self._watch(self.status_prefix, from_revision, deletes):
            yield int(kv.mod_revision), kv.key[cut:].decode(), b"" if deleted else kv.value

    # clusters
    async def load_clusters(self) -> dict[str, bytes]:
        """Every cluster's admin record, by name."""
        prefix = f"{self.prefix}/clusters/"
        result = await self.client.get_prefix(prefix.encode())
        return {kv.key.decode().removeprefix(prefix): kv.value for kv in result}

    async def put_cluster(self, name: str, blob: bytes) -> None:
        await self.client.put(self.cluster_key(name), blob)

    async def create_cluster(self, name: str, blob: bytes) -> bool:
        """Store a cluster's first admin record unless one exists (any replica may hear a new
        cluster first; none may overwrite a cordon); whether it was created."""
        txn = _Txn()
        key = self.cluster_key(name)
        txn.created_never(key)
        txn.put(key, blob)
        return bool((await self._txn(txn)).succeeded)

    async def load_clusters_at(self) -> tuple[dict[str, bytes], int]:
        """Every cluster's admin record, and the revision to watch them from."""
        revision = await self.revision()
        prefix = f"{self.prefix}/clusters/".encode()
        records: dict[str, bytes] = {}
        async for page in self._pages(prefix, revision):
            for kv in page:
                records[kv.key[len(prefix) :].decode()] = kv.value
        return records, revision

    async def watch_clusters(self, from_revision: int) -> AsyncIterator[tuple[int, str, bytes]]:
        """(revision, name, admin record) of every admin record written after `from_revision`."""
        prefix = f"{self.prefix}/clusters/".encode()
        async for _, kv in self._watch(prefix, from_revision, deletes=False):
            yield int(kv.mod_revision), kv.key[len(prefix) :].decode(), kv.value

    # documents: one key holding a whole configuration (the queues: hub/queuebook.py), changed
    # only by compare-and-swap on its mod revision, from any replica (no fence).
    def document_key(self, name: str) -> bytes:
        return f"{self.prefix}/{name}".encode()

    async def read_document(self, name: str) -> tuple[bytes | None, int, int]:
        """(the document, None if absent; its mod revision, 0 if absent; etcd's revision then, to
        watch from)."""
        read = _Txn()
        read.get(self.document_key(name))
        response = await self._txn(read)
        kvs = response.responses[0].response_range.kvs
        if not kvs:
            return None, 0, int(response.header.revision)
        return kvs[0].value, int(kvs[0].mod_revision), int(response.header.revision)

    async def swap_document(self, name: str, blob: bytes, expected_revision: int) -> int | None:
        """Write the document if its mod revision is still `expected_revision` (0: if it does not
        exist); the new mod revision, or None when another writer changed it first."""
        key = self.document_key(name)
        txn = _Txn()
        if expected_revision:
            txn.modified_at(key, expected_revision)
        else:
            txn.created_never(key)
        txn.put(key, blob)
        response = await self._txn(txn)
        return int(response.header.revision) if response.succeeded else None

    async def watch_document(self, name: str, from_revision: int) -> AsyncIterator[tuple[int, bytes | None]]:
        """(mod revision, document; None when deleted) of every change after `from_revision`;
        raises RevisionCompacted when that history is gone."""
        key = self.document_key(name)
        async for deleted, kv in self._watch(key, from_revision):
            if kv.key == key:
                yield int(kv.mod_revision), None if deleted else kv.value

    # cluster leases
    #
    # Each alive cluster has <prefix>/alive/<name> bound to a lease of its own, whose TTL is
    # the cluster's lost threshold; the leader renews the leases of the clusters that keep
    # heartbeating, in batches on one keepalive stream (LeaseKeepAlives), and etcd deletes the
    # key of a cluster that stopped. See hub/liveness.py.
    def alive_key(self, name: str) -> bytes:
        return f"{self.prefix}/alive/{name}".encode()

    @property
    def alive_prefix(self) -> bytes:
        return f"{self.prefix}/alive/".encode()

    async def load_alive(self) -> tuple[list[AliveKey], int]:
        """Every cluster's alive key with its lease, and the revision the load reflects (to watch from)."""
        revision = await self.revision()
        prefix = self.alive_prefix
        cut = len(prefix)
        keys: list[AliveKey] = []
        async for page in self._pages(prefix, revision):
            keys.extend(
                AliveKey(kv.key[cut:].decode(), int(kv.lease), int(kv.mod_revision), kv.value) for kv in page
            )
        return keys, revision

    async def watch_alive(self, from_revision: int) -> AsyncIterator[AliveKey]:
        """Every put and delete of an alive key after `from_revision`, in revision order (a
        delete has lease 0 and no value); raises RevisionCompacted when that history is gone."""
        cut = len(self.alive_prefix)
        async for deleted, kv in self._watch(self.alive_prefix, from_revision):
            name = kv.key[cut:].decode()
            if deleted:
                yield AliveKey(name, 0, int(kv.mod_revision), b"")
            else:
                yield AliveKey(name, int(kv.lease), int(kv.mod_revision), kv.value)

    async def delete_alive(self, name: str) -> None:
        """Delete a cluster's alive key (a removed cluster): every replica's watch sees it lost."""
        txn = _Txn()
        txn.delete(self.alive_key(name))
        await self._txn(txn)

    async def grant_cluster_leases(self, grants: Sequence[LeaseGrant], fence: Fence) -> list[AliveKey | None]:
        """Bind each cluster's alive key to a new lease of the grant's TTL: create the key if it
        is absent (`replace` 0), or move it from lease `replace` (a new TTL); for each, the key as
        written, or None where the key was not as expected (its new lease is revoked then).

        The grants are concurrent calls; the keys go into as few transactions as etcd allows,
        each comparing every key and the fence. A lease a key was moved from is revoked.
        """
        if not grants:
            return []
        with self.client.errors():
            granted = await asyncio.gather(
                *(
                    self.client.lease.LeaseGrant(
                        rpc.LeaseGrantRequest(TTL=g.ttl),
                        timeout=self.rpc_timeout,
                        metadata=self.client.metadata,
                    )
                    for g in grants
                )
            )
        leases = [int(r.ID) for r in granted]
        bound: list[int | None] = []
        try:
            bound = await self._put_alive(
                [
                    (self.alive_key(g.name), g.replace, g.value, lease)
                    for g, lease in zip(grants, leases, strict=True)
                ],
                fence,
            )
        finally:
            unused = [lease for i, lease in enumerate(leases) if i >= len(bound) or bound[i] is None]
            moved_from = [
                g.replace for g, r in zip(grants, bound, strict=False) if g.replace and r is not None
            ]
            await self._revoke([*unused, *moved_from])
        return [
            AliveKey(g.name, lease, revision, g.value) if revision is not None else None
            for g, lease, revision in zip(grants, leases, bound, strict=True)
        ]

    async def rewrite_alive(self, keys: Sequence[AliveKey], fence: Fence) -> list[AliveKey | None]:
        """Write new values into alive keys, each only while it is bound to the lease it names
        (the lease, and so its TTL, stays); each key as written, or None where it is gone."""
        revisions = await self._put_alive(
            [(self.alive_key(k.name), k.lease, k.value, k.lease) for k in keys], fence
        )
        return [
            k._replace(revision=revision) if revision is not None else None
            for k, revision in zip(keys, revisions, strict=True)
        ]

    async def _put_alive(
        self, puts: Sequence[tuple[bytes, int, bytes, int]], fence: Fence
    ) -> list[int | None]:
        """(key, lease it must have now or 0 for absent, value, lease to bind) for each put, in
        transactions of as many as etcd allows, falling back to one by one when a compare fails;
        each put's revision, or None where its compare failed."""
        out: list[int | None] = []
        per_txn = max(1, self.max_txn_ops - 1)  # room for the fence's compare
        for start in range(0, len(puts), per_txn):
            chunk = puts[start : start + per_txn]
            response = await self._txn(self._alive_txn(chunk, fence))
            if response.succeeded:
                out.extend([int(response.header.revision)] * len(chunk))
                continue
            check_fence(response, fence)
            if len(chunk) == 1:
                out.append(None)
                continue
            for put in chunk:
                response = await self._txn(self._alive_txn([put], fence))
                check_fence(response, fence)
                out.append(int(response.header.revision) if response.succeeded else None)
        return out

    @staticmethod
    def _alive_txn(puts: Sequence[tuple[bytes, int, bytes, int]], fence: Fence) -> _Txn:
        txn = _Txn()
        txn.fenced(fence)
        for key, expected, value, lease in puts:
            if expected:
                txn.request.compare.add(target=rpc.Compare.LEASE, key=key, lease=expected)
            else:
                txn.created_never(key)
            put = txn.request.success.add().request_put
            put.key, put.value, put.lease = key, value, lease
        return txn

    async def _revoke(self, leases: Sequence[int]) -> None:
        """Revoke leases no key needs any more, best effort: they would expire anyway."""
        if not leases:
            return
        results = await asyncio.gather(
            *(
                self.client.lease.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease), timeout=self.rpc_timeout, metadata=self.client.metadata
                )
                for lease in leases
            ),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            log.debug("revoking unused cluster leases failed", count=len(failed), error=str(failed[0]))

    @contextlib.asynccontextmanager
    async def cluster_lease_renewals(self) -> AsyncIterator[LeaseKeepAlives]:
        """One keepalive stream for renewing many leases, closed on leaving the context."""
        renewals = LeaseKeepAlives(self)
        try:
            yield renewals
        finally:
            await renewals.close()

    async def update_cluster(self, name: str, change: Callable[[bytes | None], bytes], fence: Fence) -> bytes:
        """Read, change and write a cluster's admin record under `fence`, by compare-and-swap (so
        that a cordon written meanwhile is kept): `change` gets the record as stored (None if
        there is none) and returns the new one. The record as written."""
        key = self.cluster_key(name)
        for _ in range(16):
            read = _Txn()
            read.get(key)
            kvs = (await self._txn(read)).responses[0].response_range.kvs
            blob = change(kvs[0].value if kvs else None)
            txn = _Txn()
            txn.fenced(fence)
            if kvs:
                txn.modified_at(key, int(kvs[0].mod_revision))
            else:
                txn.created_never(key)
            txn.put(key, blob)
            response = await self._txn(txn)
            if response.succeeded:
                return blob
            check_fence(response, fence)
        raise EtcdError(f"the record of cluster {name} kept changing")


class AliveKey(NamedTuple):
    """A cluster's alive key as etcd holds it, or its deletion."""

    name: str
    # The lease the key is bound to; 0: the key was deleted (its lease expired, or was revoked).
    lease: int
    # The put's mod revision, or the delete's revision.
    revision: int
    value: bytes


class LeaseGrant(NamedTuple):
    """A new lease for a cluster's alive key: `ttl` seconds, the key holding `value`."""

    name: str
    ttl: int
    value: bytes
    # The lease the key must be bound to now (it moves to the new one); 0: the key must be absent.
    replace: int = 0


class LeaseKeepAlives:
    """Renews many leases on one long-lived, bidirectional LeaseKeepAlive stream.

    etcd answers a stream's requests in order, one response each (with the lease's TTL, or 0
    when the lease is gone), so a round that renews a thousand leases is a thousand small
    messages written back to back and one wait for their answers: one round trip on one stream,
    not a thousand calls. A reader task takes the answers as they come, so that neither side's
    flow-control window stalls the other. The stream is opened on first use, and again after it
    fails. Keepalives cannot be fenced (they are not transactions): only the leader should hold
    one, and close it when it stops leading.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        # How many streams were opened, and keepalives sent (for tests and benchmarks).
        self.streams = 0
        self.sent = 0
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        # Requests sent and not yet answered, in order: (lease, its round's answers, the round).
        self._waiting: collections.deque[tuple[int, dict[int, int], asyncio.Future[None]]] = (
            collections.deque()
        )

    async def renew(self, leases: Sequence[int]) -> dict[int, int]:
        """Renew every lease; each one's TTL as etcd now has it (0: the lease is gone)."""
        if not leases:
            return {}
        call = await self._open()
        answers: dict[int, int] = {}
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._waiting
        for lease in leases:
            waiting.append((lease, answers, done))
        try:
            with self.store.client.errors():
                for lease in leases:
                    await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
            self.sent += len(leases)
            await asyncio.wait_for(done, self.store.rpc_timeout)
        except BaseException:
            await self.close()
            raise
        return answers

    async def _open(self) -> Any:
        if self._reader is not None and self._reader.done():
            await self.close()  # the stream failed since the last round
        if self._call is None:
            client = self.store.client
            self._call = client.lease.LeaseKeepAlive(metadata=client.metadata)
            self._reader = asyncio.create_task(self._read(self._call), name="etcd-lease-keepalive")
            self.streams += 1
        return self._call

    async def _read(self, call: Any) -> None:
        waiting = self._waiting
        try:
            while True:
                response = await call.read()
                if response is grpc_aio.EOF:
                    raise EtcdError("etcd closed the lease keepalive stream")
                if not waiting:
                    continue
                lease, answers, done = waiting.popleft()
                if int(response.ID) != lease:
                    raise EtcdError(f"keepalive answer for lease {response.ID:x}, expected {lease:x}")
                answers[lease] = int(response.TTL)
                if (not waiting or waiting[0][2] is not done) and not done.done():
                    done.set_result(None)  # the round's last answer
        except Exception as exc:
            # Every round still waiting fails with it (a round waits while requests are queued).
            failure = self.store.client.failure(exc)
            rounds = {id(done): done for _, _, done in waiting}
            waiting.clear()
            for done in rounds.values():
                if not done.done():
                    done.set_exception(failure)

    async def close(self) -> None:
        call, reader = self._call, self._reader
        self._call = self._reader = None
        for _, _, done in self._waiting:
            done.cancel()
        self._waiting.clear()
        if call is not None:
            call.cancel()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
