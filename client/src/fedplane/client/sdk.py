"""An asyncio client for the hub's gRPC API, for programs and the CLI.

Unary calls are retried on UNAVAILABLE only; that is safe because every call is idempotent
(submits always carry an idempotency key). Watches reconnect and resume from the last revision
they delivered, so a hub restart is invisible to callers.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import importlib
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import grpc
import grpc.aio
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from fedplane.v1 import hub_pb2, hub_pb2_grpc
from fedplane.v1 import types_pb2 as pb

__all__ = ["TERMINAL_STATES", "FedplaneClient", "FedplaneError", "is_terminal"]

T = TypeVar("T")

TERMINAL_STATES: frozenset[int] = frozenset({pb.SUCCEEDED, pb.FAILED, pb.CANCELLED})

#: How long a watch keeps reconnecting before giving up with UNAVAILABLE.
DEFAULT_RECONNECT_TIMEOUT = 60.0


def is_terminal(state: int) -> bool:
    return state in TERMINAL_STATES


class FedplaneError(Exception):
    """A failed hub call: the gRPC status code plus the hub's message, printable on one line."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = " ".join(message.split())
        super().__init__(f"{code.name}: {self.message}")

    @classmethod
    def from_rpc(cls, error: grpc.aio.AioRpcError) -> FedplaneError:
        return cls(error.code(), error.details() or error.code().name.lower())

    @property
    def unavailable(self) -> bool:
        return bool(self.code == grpc.StatusCode.UNAVAILABLE)


def _is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE


def _default_interceptors() -> list[Any]:
    """Tracing interceptors when the telemetry module provides them; none otherwise."""
    try:
        telemetry = importlib.import_module("fedplane.runtime.telemetry")
        return list(telemetry.grpc_client_interceptors())
    except (ImportError, AttributeError):
        return []


@dataclass(frozen=True)
class Tls:
    """TLS to the hub: the CA that signed its certificate (empty: the system's roots), and this
    client's certificate and key for mutual TLS (empty: none)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


class FedplaneClient:
    """`async with FedplaneClient("127.0.0.1:50051") as c: job, created = await c.submit(spec)`."""

    def __init__(
        self,
        target: str,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        *,
        timeout: float | None = 30.0,
        retry_attempts: int = 4,
        retry_max_wait: float = 2.0,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        tls: Tls | None = None,
        token: str = "",
    ) -> None:
        """`token`: a bearer token (a static token or an OIDC JWT) sent with every call; use it
        with TLS, since on a plaintext channel anyone on the path can read it."""
        self.target = target
        self.tls = tls
        token = token.strip()
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._interceptors = list(interceptors) if interceptors is not None else None
        self._timeout = timeout
        self._retry_attempts = max(1, retry_attempts)
        self._retry_max_wait = retry_max_wait
        self._reconnect_timeout = reconnect_timeout
        self._channel: grpc.aio.Channel | None = None
        self._jobs: hub_pb2_grpc.JobServiceAsyncStub | None = None
        self._clusters: hub_pb2_grpc.ClusterServiceAsyncStub | None = None
        self._hubs: hub_pb2_grpc.HubServiceAsyncStub | None = None
        self._queues: hub_pb2_grpc.QueueServiceAsyncStub | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._jobs = self._clusters = self._hubs = None
            self._queues = None
            # Cancels every call; bounded, so a stream that never acknowledges its
            # cancellation cannot keep a CLI command (say, watch after Ctrl-C) from exiting.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.close(), 5)

    def _connect(self) -> None:
        # Created lazily so the channel binds to the event loop that uses it.
        if self._channel is None:
            interceptors = self._interceptors if self._interceptors is not None else _default_interceptors()
            if self.tls is None:
                self._channel = grpc.aio.insecure_channel(self.target, interceptors=interceptors or None)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self.tls.credentials(), interceptors=interceptors or None
                )
            # The generated stubs type the aio flavour by overload, which untyped grpc defeats.
            self._jobs = cast("hub_pb2_grpc.JobServiceAsyncStub", hub_pb2_grpc.JobServiceStub(self._channel))
            self._clusters = cast(
                "hub_pb2_grpc.ClusterServiceAsyncStub", hub_pb2_grpc.ClusterServiceStub(self._channel)
            )
            self._hubs = cast("hub_pb2_grpc.HubServiceAsyncStub", hub_pb2_grpc.HubServiceStub(self._channel))
            self._queues = cast(
                "hub_pb2_grpc.QueueServiceAsyncStub", hub_pb2_grpc.QueueServiceStub(self._channel)
            )

    @property
    def _job_stub(self) -> hub_pb2_grpc.JobServiceAsyncStub:
        self._connect()
        assert self._jobs is not None
        return self._jobs

    @property
    def _cluster_stub(self) -> hub_pb2_grpc.ClusterServiceAsyncStub:
        self._connect()
        assert self._clusters is not None
        return self._clusters

    @property
    def _hub_stub(self) -> hub_pb2_grpc.HubServiceAsyncStub:
        self._connect()
        assert self._hubs is not None
        return self._hubs

    @property
    def _queue_stub(self) -> hub_pb2_grpc.QueueServiceAsyncStub:
        self._connect()
        assert self._queues is not None
        return self._queues

    async def _call(self, rpc: Callable[..., Awaitable[T]], request: Any) -> T:
        """One unary call, retried with backoff while the hub is UNAVAILABLE."""
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_is_unavailable),
                stop=stop_after_attempt(self._retry_attempts),
                wait=wait_exponential(multiplier=0.2, max=self._retry_max_wait),
                reraise=True,
            ):
                with attempt:
                    return await rpc(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise FedplaneError.from_rpc(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover - AsyncRetrying reraises

    # -- jobs -----------------------------------------------------------------------------------

    async def submit(self, spec: pb.JobSpec, idempotency_key: str = "") -> tuple[pb.Job, bool]:
        """Submit one job; returns (job, created). Without a key one is made up, so retries are safe."""
        request = hub_pb2.SubmitJobRequest(spec=spec, idempotency_key=idempotency_key or str(uuid.uuid4()))
        response = await self._call(self._job_stub.SubmitJob, request)
        return response.job, response.created

    async def submit_many(
        self, specs: Iterable[tuple[pb.JobSpec, str]]
    ) -> builtins.list[tuple[pb.Job, bool]]:
        """Submit a batch atomically: the hub rejects all of it if any spec is invalid."""
        request = hub_pb2.SubmitJobsRequest(
            jobs=[hub_pb2.SubmitJobRequest(spec=s, idempotency_key=k or str(uuid.uuid4())) for s, k in specs]
        )
        response = await self._call(self._job_stub.SubmitJobs, request)
        return [(r.job, r.created) for r in response.results]

    async def get(self, job_id: str) -> pb.Job:
        return await self._call(self._job_stub.GetJob, hub_pb2.GetJobRequest(job_id=job_id))

    async def get_many(self, job_ids: Iterable[str], concurrency: int = 32) -> builtins.list[pb.Job]:
        """Several jobs, in order, with a bounded number of calls in flight."""
        limit = asyncio.Semaphore(concurrency)

        async def one(job_id: str) -> pb.Job:
            async with limit:
                return await self.get(job_id)

        return builtins.list(await asyncio.gather(*(one(i) for i in job_ids)))

    async def cancel(self, job_id: str, reason: str = "") -> pb.Job:
        return await self._call(
            self._job_stub.CancelJob, hub_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        )

    async def set_priority(
        self, job_id: str, *, priority: int | None = None, priority_class: str = ""
    ) -> pb.Job:
        """Change a job's priority while it waits or runs: to a value, or to a class's value."""
        request = hub_pb2.SetJobPriorityRequest(job_id=job_id)
        if priority_class:
            request.priority_class = priority_class
        elif priority is not None:
            request.priority = priority
        return await self._call(self._job_stub.SetJobPriority, request)

    async def list_page(
        self,
        *,
        queue: str = "",
        states: Iterable[pb.JobState.ValueType] = (),
        cluster: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> hub_pb2.ListJobsResponse:
        request = hub_pb2.ListJobsRequest(
            queue=queue,
            states=list(states),
            cluster=cluster,
            labels=dict(labels or {}),
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call(self._job_stub.ListJobs, request)

    async def pages(
        self,
        *,
        queue: str = "",
        states: Iterable[pb.JobState.ValueType] = (),
        cluster: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
    ) -> AsyncGenerator[hub_pb2.ListJobsResponse, None]:
        """Every page of matching jobs, fetched as the caller consumes them."""
        token = ""
        states = builtins.list(states)
        while True:
            page = await self.list_page(
                queue=queue,
                states=states,
                cluster=cluster,
                labels=labels,
                page_size=page_size,
                page_token=token,
            )
            yield page
            token = page.next_page_token
            if not token:
                return

    async def iter_jobs(
        self,
        *,
        queue: str = "",
        states: Iterable[pb.JobState.ValueType] = (),
        cluster: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
    ) -> AsyncGenerator[pb.Job, None]:
        """Every matching job, fetching pages as the caller consumes them."""
        async for page in self.pages(
            queue=queue, states=states, cluster=cluster, labels=labels, page_size=page_size
        ):
            for job in page.jobs:
                yield job

    async def list_with_revision(
        self,
        *,
        queue: str = "",
        states: Iterable[pb.JobState.ValueType] = (),
        cluster: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
    ) -> tuple[builtins.list[pb.Job], int]:
        """All matching jobs and the revision of the first page: watching from it misses nothing."""
        jobs: builtins.list[pb.Job] = []
        revision = 0
        async for page in self.pages(
            queue=queue, states=states, cluster=cluster, labels=labels, page_size=page_size
        ):
            jobs.extend(page.jobs)
            revision = revision or page.revision
        return jobs, revision

    async def list(
        self,
        *,
        queue: str = "",
        states: Iterable[pb.JobState.ValueType] = (),
        cluster: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
    ) -> builtins.list[pb.Job]:
        """All matching jobs (every page)."""
        jobs, _ = await self.list_with_revision(
            queue=queue, states=states, cluster=cluster, labels=labels, page_size=page_size
        )
        return jobs

    async def current_revision(self) -> int:
        """The hub's current revision, i.e. the `from_revision` that means "from now on"."""
        page = await self.list_page(page_size=1)
        return page.revision

    async def watch(
        self, from_revision: int = 0, queue: str = "", job_ids: Iterable[str] = ()
    ) -> AsyncGenerator[hub_pb2.JobEvent, None]:
        """Job changes after `from_revision` (0 = from now on), across hub restarts.

        On UNAVAILABLE (or a stream the hub closes) it reconnects with backoff and resumes; it
        gives up with FedplaneError(UNAVAILABLE) after `reconnect_timeout` seconds without a
        working stream. Other errors are raised as FedplaneError.

        One etcd revision can carry several jobs' changes, so a stream cut inside a revision
        resumes from the revision before it and drops the events already delivered.
        """
        last = from_revision or await self.current_revision()
        seen_at_last: set[str] = set()
        ids = builtins.list(job_ids)
        loop = asyncio.get_running_loop()
        down_since: float | None = None
        delay = 0.2
        while True:
            opened = loop.time()
            resume = last - 1 if seen_at_last and last > 1 else last
            call = self._job_stub.WatchJobs(
                hub_pb2.WatchJobsRequest(from_revision=resume, queue=queue, job_ids=ids),
                metadata=self._metadata,
            )
            error: grpc.aio.AioRpcError | None = None
            try:
                async for event in call:
                    down_since, delay = None, 0.2
                    if event.revision < last or (event.revision == last and event.job.id in seen_at_last):
                        continue  # replayed by the resume above
                    if event.revision > last:
                        last, seen_at_last = event.revision, set()
                    seen_at_last.add(event.job.id)
                    yield event
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise FedplaneError.from_rpc(exc) from None
                error = exc
            finally:
                call.cancel()
            now = loop.time()
            if now - opened > 5.0:
                down_since, delay = None, 0.2  # the stream was healthy for a while
            if down_since is None:
                down_since = now
            elif now - down_since > self._reconnect_timeout:
                message = error.details() if error is not None else "the watch stream keeps closing"
                raise FedplaneError(grpc.StatusCode.UNAVAILABLE, message or "hub unavailable")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def wait(
        self,
        job_ids: Iterable[str],
        on_event: Callable[[pb.Job], None] | None = None,
        *,
        resync_interval: float = 30.0,
    ) -> dict[str, pb.Job]:
        """Block until every job is SUCCEEDED, FAILED or CANCELLED; returns their final state.

        Reads the current revision first, then each job, then watches from that revision: a
        change between the reads and the watch is replayed, never lost. Unfinished jobs are
        also re-read every `resync_interval` seconds, a safety net that costs little.
        `on_event` sees the initial state of each job and every later change. Bound the wait
        with `asyncio.timeout` if needed.
        """
        ids = builtins.list(dict.fromkeys(job_ids))
        jobs: dict[str, pb.Job] = {}
        finished = asyncio.Event()

        unfinished = set(ids)

        def accept(job: pb.Job) -> None:
            known = jobs.get(job.id)
            if known is not None and (job.revision < known.revision or job == known):
                return  # older or already seen
            jobs[job.id] = job
            if on_event is not None:
                on_event(job)
            if is_terminal(job.status.state):
                unfinished.discard(job.id)
            if not unfinished:
                finished.set()

        async def follow(revision: int) -> None:
            events = self.watch(from_revision=revision, job_ids=ids)
            try:
                async for event in events:
                    if event.job.id in jobs:
                        accept(event.job)
                    if finished.is_set():
                        return
            finally:
                await events.aclose()

        async def resync() -> None:
            while not finished.is_set():
                await asyncio.sleep(resync_interval)
                pending = [i for i, j in jobs.items() if not is_terminal(j.status.state)]
                try:
                    for job in await self.get_many(pending):
                        accept(job)
                except FedplaneError as exc:
                    if not exc.unavailable:
                        raise  # a hub outage is the watch's business, which rides it out

        if not ids:
            return {}
        revision = await self.current_revision()
        for job in await self.get_many(ids):
            accept(job)
        if not finished.is_set():
            tasks = {asyncio.create_task(follow(revision)), asyncio.create_task(resync())}
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # re-raises the watch's error
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return {i: jobs[i] for i in ids}

    async def explain(self, job_id: str) -> pb.Explanation:
        return await self._call(self._job_stub.ExplainJob, hub_pb2.ExplainJobRequest(job_id=job_id))

    async def explain_spec(self, spec: pb.JobSpec) -> pb.Explanation:
        """A dry run: where the job would go now, without submitting it."""
        return await self._call(self._job_stub.ExplainJob, hub_pb2.ExplainJobRequest(spec=spec))

    async def job_stats(self, queue: str = "") -> hub_pb2.JobStats:
        """Jobs per state (by name) and in total, optionally in one queue: a cheap progress poll."""
        return await self._call(self._job_stub.GetJobStats, hub_pb2.GetJobStatsRequest(queue=queue))

    # -- clusters -------------------------------------------------------------------------------

    async def clusters(self) -> builtins.list[pb.Cluster]:
        response = await self._call(self._cluster_stub.ListClusters, hub_pb2.ListClustersRequest())
        return builtins.list(response.clusters)

    async def cluster(self, name: str) -> pb.Cluster:
        return await self._call(self._cluster_stub.GetCluster, hub_pb2.GetClusterRequest(name=name))

    async def cordon(self, name: str, reason: str = "") -> pb.Cluster:
        request = hub_pb2.CordonClusterRequest(name=name, reason=reason)
        return await self._call(self._cluster_stub.CordonCluster, request)

    async def uncordon(self, name: str) -> pb.Cluster:
        return await self._call(self._cluster_stub.UncordonCluster, hub_pb2.UncordonClusterRequest(name=name))

    async def approve_cluster(self, name: str, public_key: str = "") -> pb.Cluster:
        """Admit `name`'s requested key (only if it is `public_key`, when given)."""
        request = hub_pb2.ApproveClusterRequest(name=name, public_key=public_key)
        return await self._call(self._cluster_stub.ApproveCluster, request)

    async def remove_cluster(self, name: str, reason: str = "") -> tuple[pb.Cluster, int]:
        """Remove `name`: its record as it was, and how many jobs it held."""
        request = hub_pb2.RemoveClusterRequest(name=name, reason=reason)
        response = await self._call(self._cluster_stub.RemoveCluster, request)
        return response.cluster, response.jobs_affected

    # -- hub replicas ---------------------------------------------------------------------------

    async def hub_status(self) -> hub_pb2.HubStatus:
        """Which replica leads, since when, and every replica's role (any replica answers)."""
        return await self._call(self._hub_stub.GetHubStatus, hub_pb2.GetHubStatusRequest())

    # -- queues ---------------------------------------------------------------------------------

    async def queue_objects(self) -> pb.QueueObjects:
        """Every queue the caller may see, and every cohort, flavor and priority class."""
        return await self._call(self._queue_stub.ListQueueObjects, hub_pb2.ListQueueObjectsRequest())

    async def apply_queue_objects(
        self,
        objects: pb.QueueObjects,
        deletes: Iterable[tuple[str, str]] = (),
        *,
        dry_run: bool = False,
        expected_revision: int = 0,
    ) -> pb.QueueObjects:
        """Create or replace `objects` and delete `deletes` ((kind, name) pairs), all or none;
        the whole configuration after it. With `expected_revision`, only if nobody changed the
        configuration since that revision (ABORTED otherwise)."""
        request = hub_pb2.ApplyQueueObjectsRequest(
            objects=objects,
            deletes=[hub_pb2.ObjectRef(kind=kind, name=name) for kind, name in deletes],
            dry_run=dry_run,
            expected_revision=expected_revision,
        )
        return await self._call(self._queue_stub.Apply, request)

    async def delete_queue_objects(
        self, refs: Iterable[tuple[str, str]], *, dry_run: bool = False, expected_revision: int = 0
    ) -> pb.QueueObjects:
        """Delete (kind, name) objects, all or none."""
        request = hub_pb2.DeleteQueueObjectsRequest(
            refs=[hub_pb2.ObjectRef(kind=kind, name=name) for kind, name in refs],
            dry_run=dry_run,
            expected_revision=expected_revision,
        )
        return await self._call(self._queue_stub.Delete, request)

    async def set_queue_held(self, name: str, held: bool, attempts: int = 5) -> pb.Queue:
        """Hold (no new admissions) or release a queue: its stored object with `held` changed,
        applied only if nothing else changed meanwhile (re-read and retried when it did)."""
        for attempt in range(attempts):
            objects = await self.queue_objects()
            queue = next((q for q in objects.queues if q.name == name), None)
            if queue is None:
                raise FedplaneError(grpc.StatusCode.NOT_FOUND, f"queue {name!r} not found")
            queue.held = held
            try:
                result = await self.apply_queue_objects(
                    pb.QueueObjects(queues=[queue]), expected_revision=objects.revision
                )
            except FedplaneError as exc:
                if exc.code != grpc.StatusCode.ABORTED or attempt == attempts - 1:
                    raise
                continue
            return next(q for q in result.queues if q.name == name)
        raise AssertionError("unreachable")  # pragma: no cover

    async def queue_view(self) -> pb.QueueView:
        """Each queue's and cohort's usage, borrowing, lending, share and job counts."""
        return await self._call(self._queue_stub.GetQueueView, hub_pb2.GetQueueViewRequest())
