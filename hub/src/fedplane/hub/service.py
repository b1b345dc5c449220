"""gRPC servicers: translate requests to calls on the hub's intake and API, and HubError to
status codes, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from fedplane.hub import audit, identity, queuebook, scoping
from fedplane.hub.api import JobFilter
from fedplane.hub.authz import Permission
from fedplane.hub.errors import HubError
from fedplane.hub.etcd import EtcdUnavailable
from fedplane.hub.hub import Hub
from fedplane.runtime import bus
from fedplane.v1 import hub_pb2 as hub_pb
from fedplane.v1 import hub_pb2_grpc
from fedplane.v1 import types_pb2 as pb

T = TypeVar("T")


async def _call(context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await fn()
    except HubError as exc:
        await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        raise  # unreachable: abort raises
    except EtcdUnavailable as exc:
        # Nothing was decided: the client may retry (with the same idempotency key).
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"the hub cannot reach etcd: {exc}")
        raise


def _need(value: str, field: str) -> None:
    if not value:
        raise HubError("INVALID_ARGUMENT", f"{field}: required")


def _cluster_name(name: str) -> None:
    _need(name, "name")
    if not bus.valid_cluster_name(name):
        raise HubError(
            "INVALID_ARGUMENT",
            f"name: {name[:80]!r} is not a cluster name (a DNS label: at most 63 lowercase"
            " letters, digits and '-', starting and ending with a letter or digit)",
        )


class JobService(hub_pb2_grpc.JobServiceServicer):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def SubmitJob(self, request: hub_pb.SubmitJobRequest, context: Any) -> hub_pb.SubmitJobResponse:
        async def run() -> hub_pb.SubmitJobResponse:
            scoping.check_submit([request.spec])
            [(job, created)] = await self.hub.intake.submit(
                [(request.spec, request.idempotency_key)], batch=False, submitted_by=scoping.submitter()
            )
            audit.note_jobs([job.id])
            return hub_pb.SubmitJobResponse(job=job, created=created)

        return await _call(context, run)

    async def SubmitJobs(self, request: hub_pb.SubmitJobsRequest, context: Any) -> hub_pb.SubmitJobsResponse:
        async def run() -> hub_pb.SubmitJobsResponse:
            if not request.jobs:
                raise HubError("INVALID_ARGUMENT", "jobs: at least one job is required")
            if len(request.jobs) > 10_000:
                raise HubError("INVALID_ARGUMENT", f"jobs: {len(request.jobs)} jobs; at most 10000 per call")
            scoping.check_submit(r.spec for r in request.jobs)
            results = await self.hub.intake.submit(
                [(r.spec, r.idempotency_key) for r in request.jobs],
                batch=True,
                submitted_by=scoping.submitter(),
            )
            audit.note_jobs(job.id for job, _ in results)
            return hub_pb.SubmitJobsResponse(
                results=[hub_pb.SubmitJobResponse(job=job, created=created) for job, created in results]
            )

        return await _call(context, run)

    async def GetJob(self, request: hub_pb.GetJobRequest, context: Any) -> pb.Job:
        async def run() -> pb.Job:
            _need(request.job_id, "job_id")
            scoping.check_job(self.hub.table.jobs.get(request.job_id), request.job_id, Permission.READ_JOBS)
            return self.hub.api.get(request.job_id)

        return await _call(context, run)

    async def ListJobs(self, request: hub_pb.ListJobsRequest, context: Any) -> hub_pb.ListJobsResponse:
        async def run() -> hub_pb.ListJobsResponse:
            scoping.check_queue_filter(request.queue)
            flt = JobFilter(
                request.queue,
                frozenset(request.states),
                request.cluster,
                dict(request.labels),
                readable=scoping.readable(),
            )
            jobs, token, revision = self.hub.api.list_jobs(flt, request.page_size, request.page_token)
            return hub_pb.ListJobsResponse(jobs=jobs, next_page_token=token, revision=revision)

        return await _call(context, run)

    async def CancelJob(self, request: hub_pb.CancelJobRequest, context: Any) -> pb.Job:
        async def run() -> pb.Job:
            _need(request.job_id, "job_id")
            record = self.hub.table.jobs.get(request.job_id)
            scoping.check_job(record, request.job_id, Permission.CANCEL)
            audit.note(job_id=request.job_id, queue=record.queue if record else "")
            return await self.hub.api.cancel(request.job_id, request.reason)

        return await _call(context, run)

    async def SetJobPriority(self, request: hub_pb.SetJobPriorityRequest, context: Any) -> pb.Job:
        async def run() -> pb.Job:
            _need(request.job_id, "job_id")
            if request.WhichOneof("to") is None:
                raise HubError("INVALID_ARGUMENT", "priority_class or priority: one is required")
            record = self.hub.table.jobs.get(request.job_id)
            scoping.check_job(record, request.job_id, Permission.SUBMIT)
            audit.note(job_id=request.job_id, queue=record.queue if record else "")
            return await self.hub.api.set_priority(
                request.job_id,
                request.priority,
                request.priority_class,
                self.hub.queue_book.config.priority_classes,
            )

        return await _call(context, run)

    async def WatchJobs(
        self, request: hub_pb.WatchJobsRequest, context: Any
    ) -> AsyncIterator[hub_pb.JobEvent]:
        if request.from_revision < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "from_revision: must not be negative")
        try:
            scoping.check_queue_filter(request.queue)
            events = self.hub.api.watch(
                request.from_revision, request.queue, request.job_ids, readable=scoping.readable()
            )
            async for event in events:
                yield event
        except HubError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))

    async def ExplainJob(self, request: hub_pb.ExplainJobRequest, context: Any) -> pb.Explanation:
        async def run() -> pb.Explanation:
            target = request.WhichOneof("target")
            if target == "job_id":
                record = self.hub.table.jobs.get(request.job_id)
                scoping.check_job(record, request.job_id, Permission.READ_JOBS)
                return self.hub.api.explain_job(request.job_id)
            if target == "spec":
                return self.hub.api.explain_spec(request.spec)
            raise HubError("INVALID_ARGUMENT", "target: give job_id or spec")

        return await _call(context, run)

    async def GetJobStats(self, request: hub_pb.GetJobStatsRequest, context: Any) -> hub_pb.JobStats:
        async def run() -> hub_pb.JobStats:
            scoping.check_queue_filter(request.queue)
            by_state, total, revision = self.hub.api.job_stats(request.queue, scoping.readable())
            return hub_pb.JobStats(by_state=by_state, total=total, revision=revision)

        return await _call(context, run)


class ClusterService(hub_pb2_grpc.ClusterServiceServicer):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def ListClusters(
        self, request: hub_pb.ListClustersRequest, context: Any
    ) -> hub_pb.ListClustersResponse:
        return hub_pb.ListClustersResponse(clusters=self.hub.api.clusters())

    async def GetCluster(self, request: hub_pb.GetClusterRequest, context: Any) -> pb.Cluster:
        async def run() -> pb.Cluster:
            _cluster_name(request.name)
            return self.hub.api.cluster(request.name)

        return await _call(context, run)

    async def CordonCluster(self, request: hub_pb.CordonClusterRequest, context: Any) -> pb.Cluster:
        async def run() -> pb.Cluster:
            _cluster_name(request.name)
            audit.note(cluster=request.name)
            return await self.hub.api.set_cordon(
                request.name, True, request.reason or "cordoned by an operator"
            )

        return await _call(context, run)

    async def UncordonCluster(self, request: hub_pb.UncordonClusterRequest, context: Any) -> pb.Cluster:
        async def run() -> pb.Cluster:
            _cluster_name(request.name)
            audit.note(cluster=request.name)
            return await self.hub.api.set_cordon(request.name, False, "")

        return await _call(context, run)

    async def ApproveCluster(self, request: hub_pb.ApproveClusterRequest, context: Any) -> pb.Cluster:
        async def run() -> pb.Cluster:
            _cluster_name(request.name)
            audit.note(cluster=request.name)
            return await self.hub.admission.approve(
                request.name, request.public_key, by=identity.current().name
            )

        return await _call(context, run)

    async def RemoveCluster(
        self, request: hub_pb.RemoveClusterRequest, context: Any
    ) -> hub_pb.RemoveClusterResponse:
        async def run() -> hub_pb.RemoveClusterResponse:
            _cluster_name(request.name)
            audit.note(cluster=request.name)
            cluster, affected = await self.hub.admission.remove(
                request.name, request.reason or "removed by an operator", by=identity.current().name
            )
            return hub_pb.RemoveClusterResponse(cluster=cluster, jobs_affected=affected)

        return await _call(context, run)


class HubService(hub_pb2_grpc.HubServiceServicer):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def GetHubStatus(self, request: hub_pb.GetHubStatusRequest, context: Any) -> hub_pb.HubStatus:
        return await _call(context, self.hub.status)


class QueueService(hub_pb2_grpc.QueueServiceServicer):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def _apply(
        self,
        context: Any,
        objects: pb.QueueObjects,
        deletes: Sequence[hub_pb.ObjectRef],
        dry_run: bool,
        expected_revision: int,
    ) -> pb.QueueObjects:
        async def run() -> pb.QueueObjects:
            audit.note(**queuebook.describe(objects, deletes), dry_run=dry_run)
            return await self.hub.queue_book.apply(
                objects, deletes, dry_run, expected_revision, by=identity.current().name
            )

        return await _call(context, run)

    async def Apply(self, request: hub_pb.ApplyQueueObjectsRequest, context: Any) -> pb.QueueObjects:
        return await self._apply(
            context, request.objects, request.deletes, request.dry_run, request.expected_revision
        )

    async def Delete(self, request: hub_pb.DeleteQueueObjectsRequest, context: Any) -> pb.QueueObjects:
        if not request.refs:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refs: name at least one object to delete")
        return await self._apply(
            context, pb.QueueObjects(), request.refs, request.dry_run, request.expected_revision
        )

    async def ListQueueObjects(
        self, request: hub_pb.ListQueueObjectsRequest, context: Any
    ) -> pb.QueueObjects:
        return queuebook.visible_objects(self.hub.queue_book.objects, scoping.readable())

    async def GetQueueView(self, request: hub_pb.GetQueueViewRequest, context: Any) -> pb.QueueView:
        view = queuebook.view_pb(self.hub.table.queue.report(), self.hub.queue_book.config)
        return queuebook.visible_view(view, scoping.readable())
