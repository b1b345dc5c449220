"""A job's whole path through a real federation: hub, agents, etcd and NATS."""

from __future__ import annotations

import grpc
import pytest

from fedplane.hub.store import Store
from fedplane.v1 import hub_pb2
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, cpu_nodes, gpu_nodes, job_spec, sim_agent_config


async def test_submit_places_runs_and_succeeds(federation: Federation) -> None:
    await federation.start_agent(sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(2)]))
    await federation.start_agent(
        sim_agent_config("gpu-a", federation.nats_url, nodes=[gpu_nodes(1)], labels={"kind": "gpu"})
    )
    await federation.wait_clusters_ready(["cpu-a", "gpu-a"])

    job = await federation.submit(job_spec("train", gpus=2, gpu_type="A100"))
    assert job.status.state == pb.PENDING
    done = await federation.wait_state(job.id, {pb.SUCCEEDED, pb.FAILED})

    assert done.status.state == pb.SUCCEEDED
    assert done.status.cluster == "gpu-a"
    assert done.status.generation == 1
    states = [t.state for t in done.status.history]
    assert states == [pb.PENDING, pb.DISPATCHED, pb.ADMITTED, pb.RUNNING, pb.SUCCEEDED]
    assert done.status.HasField("start_time") and done.status.HasField("finish_time")

    listed = await federation.jobs.ListJobs(hub_pb2.ListJobsRequest(cluster="gpu-a"))
    assert [j.id for j in listed.jobs] == [job.id]
    none = await federation.jobs.ListJobs(hub_pb2.ListJobsRequest(cluster="cpu-a"))
    assert list(none.jobs) == []


async def test_watch_streams_every_change_and_resumes_from_a_revision(federation: Federation) -> None:
    await federation.start_agent(sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(2)]))
    await federation.wait_clusters_ready(["cpu-a"])
    listed = await federation.jobs.ListJobs(hub_pb2.ListJobsRequest())
    start = listed.revision

    job = await federation.submit(job_spec("watched", duration="0.2s"))
    seen: list[tuple[int, int]] = []
    call = federation.jobs.WatchJobs(hub_pb2.WatchJobsRequest(from_revision=start, job_ids=[job.id]))
    async for event in call:
        seen.append((event.revision, event.job.status.state))
        if event.job.status.state == pb.SUCCEEDED:
            break
    call.cancel()
    states = [s for _, s in seen]
    # One event per write; updates applied together (ADMITTED with RUNNING) share one event,
    # and every transition is in the job's history.
    assert states[:2] == [pb.PENDING, pb.DISPATCHED] and states[-1] == pb.SUCCEEDED
    assert states == sorted(states)
    revisions = [r for r, _ in seen]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    final = await federation.get(job.id)
    assert [t.state for t in final.status.history] == [
        pb.PENDING,
        pb.DISPATCHED,
        pb.ADMITTED,
        pb.RUNNING,
        pb.SUCCEEDED,
    ]

    # A client that disconnected before the end resumes from that revision and misses nothing.
    resume_from = seen[-2][0]
    call = federation.jobs.WatchJobs(hub_pb2.WatchJobsRequest(from_revision=resume_from, job_ids=[job.id]))
    async for event in call:
        assert event.revision > resume_from
        assert event.job.status.state == pb.SUCCEEDED
        break
    call.cancel()


async def test_idempotency_key_never_creates_a_second_job(federation: Federation) -> None:
    first = await federation.jobs.SubmitJob(
        hub_pb2.SubmitJobRequest(spec=job_spec("once"), idempotency_key="client-retry-1")
    )
    again = await federation.jobs.SubmitJob(
        hub_pb2.SubmitJobRequest(spec=job_spec("once"), idempotency_key="client-retry-1")
    )
    assert first.created and not again.created
    assert again.job.id == first.job.id
    batch = await federation.jobs.SubmitJobs(
        hub_pb2.SubmitJobsRequest(
            jobs=[
                hub_pb2.SubmitJobRequest(spec=job_spec("once"), idempotency_key="client-retry-1"),
                hub_pb2.SubmitJobRequest(spec=job_spec("two"), idempotency_key="k2"),
                hub_pb2.SubmitJobRequest(spec=job_spec("two"), idempotency_key="k2"),
            ]
        )
    )
    ids = [r.job.id for r in batch.results]
    assert ids[0] == first.job.id and ids[1] == ids[2] != ids[0]
    listed = await federation.jobs.ListJobs(hub_pb2.ListJobsRequest())
    assert len(listed.jobs) == 2


async def test_invalid_spec_is_rejected_with_the_field_and_nothing_is_stored(federation: Federation) -> None:
    import grpc
    import pytest

    bad = job_spec("bad")
    bad.pod_sets[0].count = 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await federation.jobs.SubmitJob(hub_pb2.SubmitJobRequest(spec=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.pod_sets[0].count" in (err.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await federation.jobs.SubmitJobs(
            hub_pb2.SubmitJobsRequest(
                jobs=[hub_pb2.SubmitJobRequest(spec=job_spec("ok")), hub_pb2.SubmitJobRequest(spec=bad)]
            )
        )
    assert "jobs[1].spec.pod_sets[0].count" in (err.value.details() or "")
    listed = await federation.jobs.ListJobs(hub_pb2.ListJobsRequest())
    assert list(listed.jobs) == []
    keys = await federation.hub.hub.store.client.get_prefix(b"/fedplane/jobs/")  # type: ignore[union-attr]
    assert len(keys) == 0


async def test_cancel_pending_and_running_jobs(federation: Federation) -> None:
    await federation.start_agent(
        sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(1, cpu="4")])
    )
    await federation.wait_clusters_ready(["cpu-a"])
    running = await federation.submit(job_spec("long", cpu="4", duration="60s"))
    await federation.wait_state(running.id, {pb.RUNNING})
    # The cluster is full, so this one stays pending.
    pending = await federation.submit(job_spec("waits", cpu="4", duration="60s"))
    await federation.wait_state(pending.id, {pb.PENDING})

    cancelled = await federation.jobs.CancelJob(
        hub_pb2.CancelJobRequest(job_id=pending.id, reason="not needed")
    )
    assert cancelled.status.state == pb.CANCELLED

    cancelling = await federation.jobs.CancelJob(hub_pb2.CancelJobRequest(job_id=running.id))
    assert cancelling.status.state == pb.CANCELLING
    done = await federation.wait_state(running.id, {pb.CANCELLED})
    assert done.status.cluster == "cpu-a"
    # The capacity came back: the simulated cluster reports all 4 cpus free again.
    cluster = await federation.clusters.GetCluster(hub_pb2.GetClusterRequest(name="cpu-a"))
    from tests.federation import eventually

    async def freed() -> bool:
        c = await federation.clusters.GetCluster(hub_pb2.GetClusterRequest(name="cpu-a"))
        return bool(c.free.quantities["cpu"] == 4000)

    await eventually(freed, 10, "capacity released")
    assert cluster.name == "cpu-a"


async def test_job_needing_a_dataset_lands_where_the_data_is(federation: Federation) -> None:
    for name, datasets in (("east", {}), ("west", {"imagenet": "150Gi"}), ("north", {"imagenet": "10Gi"})):
        await federation.start_agent(
            sim_agent_config(name, federation.nats_url, nodes=[cpu_nodes(2)], datasets=datasets)
        )
    await federation.wait_clusters_ready(["east", "west", "north"])
    spec = job_spec("reads-imagenet", datasets=[pb.DatasetRef(id="imagenet", size_bytes=150 * 2**30)])
    job = await federation.submit(spec)
    done = await federation.wait_state(job.id, {pb.SUCCEEDED})
    assert done.status.cluster == "west"
    assert done.status.placement_score.data_locality == 1.0

    required = job_spec("needs-local", datasets=[pb.DatasetRef(id="camera", size_bytes=1, required=True)])
    held = await federation.submit(required)
    explanation = None
    from tests.federation import eventually

    async def explained() -> bool:
        nonlocal explanation
        explanation = await federation.jobs.ExplainJob(hub_pb2.ExplainJobRequest(job_id=held.id))
        return bool(explanation.verdicts)

    await eventually(explained, 5, "explanation")
    assert explanation is not None and explanation.chosen_cluster == ""
    assert all("required dataset camera not present" in v.reasons for v in explanation.verdicts)


async def test_gang_too_big_for_every_node_waits_with_reasons_then_lands_on_a_bigger_cluster(
    federation: Federation,
) -> None:
    # 4 nodes x 8 cpu = 32 cpu free in total, but no node takes a 12-cpu pod.
    await federation.start_agent(
        sim_agent_config("small", federation.nats_url, nodes=[cpu_nodes(4, cpu="8")])
    )
    await federation.wait_clusters_ready(["small"])
    job = await federation.submit(job_spec("gang", cpu="12", count=2, min_count=2))
    from tests.federation import eventually

    async def has_reason() -> bool:
        got = await federation.get(job.id)
        return "small" in got.pending_reason and "fit" in got.pending_reason

    await eventually(has_reason, 5, "pending reason")
    got = await federation.get(job.id)
    assert got.status.state == pb.PENDING
    explanation = await federation.jobs.ExplainJob(hub_pb2.ExplainJobRequest(job_id=job.id))
    (verdict,) = explanation.verdicts
    assert not verdict.feasible and "only 0 of 2 pods fit" in verdict.reasons[0]

    await federation.start_agent(sim_agent_config("big", federation.nats_url, nodes=[cpu_nodes(2, cpu="16")]))
    done = await federation.wait_state(job.id, {pb.SUCCEEDED})
    assert done.status.cluster == "big"
    assert sorted((a.node, a.count) for a in done.status.assignments) == [("cpu-0", 1), ("cpu-1", 1)]


async def test_explain_dry_run_for_a_spec_not_submitted(federation: Federation) -> None:
    await federation.start_agent(sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(1)]))
    await federation.start_agent(
        sim_agent_config("gpu-a", federation.nats_url, nodes=[gpu_nodes(1, gpu_type="H100")])
    )
    await federation.wait_clusters_ready(["cpu-a", "gpu-a"])
    explanation = await federation.jobs.ExplainJob(
        hub_pb2.ExplainJobRequest(spec=job_spec("what-if", gpus=1, gpu_type="H100"))
    )
    assert explanation.chosen_cluster == "gpu-a"
    by_cluster = {v.cluster: v for v in explanation.verdicts}
    assert by_cluster["gpu-a"].feasible and by_cluster["gpu-a"].score.total > 0
    assert "no node has GPU type H100" in by_cluster["cpu-a"].reasons[0]
    listed = await federation.jobs.ListJobs(hub_pb2.ListJobsRequest())
    assert list(listed.jobs) == []


async def test_cordoned_cluster_gets_no_new_jobs(federation: Federation) -> None:
    await federation.start_agent(sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(1)]))
    await federation.wait_clusters_ready(["cpu-a"])
    cordoned = await federation.clusters.CordonCluster(
        hub_pb2.CordonClusterRequest(name="cpu-a", reason="maintenance")
    )
    assert cordoned.cordoned and cordoned.cordon_reason == "maintenance"
    job = await federation.submit(job_spec("blocked"))
    from tests.federation import eventually

    async def reason() -> bool:
        return "cordoned" in (await federation.get(job.id)).pending_reason

    await eventually(reason, 5, "cordon reason")
    await federation.clusters.UncordonCluster(hub_pb2.UncordonClusterRequest(name="cpu-a"))
    done = await federation.wait_state(job.id, {pb.SUCCEEDED})
    assert done.status.cluster == "cpu-a"


@pytest.mark.parametrize("name", ["Upper", "under_score", "-lead", "x" * 64, "a.b"])
async def test_a_cluster_call_with_a_name_no_cluster_may_have_is_refused(
    federation: Federation, name: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await federation.clusters.CordonCluster(hub_pb2.CordonClusterRequest(name=name))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a cluster name (a DNS label" in str(raised.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await federation.clusters.GetCluster(hub_pb2.GetClusterRequest(name=name))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_delivers_every_job_changed_in_one_batch(federation: Federation) -> None:
    # Placement writes a whole batch of dispatches in one etcd transaction: one revision, many jobs.
    listed = await federation.jobs.ListJobs(hub_pb2.ListJobsRequest())
    batch = await federation.jobs.SubmitJobs(
        hub_pb2.SubmitJobsRequest(jobs=[hub_pb2.SubmitJobRequest(spec=job_spec(f"b{i}")) for i in range(5)])
    )
    ids = {r.job.id for r in batch.results}
    await federation.start_agent(sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(2)]))
    dispatched: dict[str, int] = {}
    call = federation.jobs.WatchJobs(hub_pb2.WatchJobsRequest(from_revision=listed.revision))
    async for event in call:
        if event.job.status.state == pb.DISPATCHED:
            dispatched[event.job.id] = event.revision
        if set(dispatched) == ids:
            break
    call.cancel()
    assert len(set(dispatched.values())) == 1, "the five dispatches share one revision"


async def test_generic_grpc_tools_can_find_and_check_the_hub(federation: Federation) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert federation.channel is not None
    health = health_pb2_grpc.HealthStub(federation.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="fedplane.v1.JobService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(federation.channel)

    async def ask() -> object:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in reflection.ServerReflectionInfo(ask()):
        services = {s.name for s in response.list_services_response.service}
        break
    assert {"fedplane.v1.JobService", "fedplane.v1.ClusterService", "grpc.health.v1.Health"} <= services


async def test_batch_with_repeated_keys_answers_every_entry_with_its_own_job(federation: Federation) -> None:
    batch = await federation.jobs.SubmitJobs(
        hub_pb2.SubmitJobsRequest(
            jobs=[
                hub_pb2.SubmitJobRequest(spec=job_spec("a"), idempotency_key="k"),
                hub_pb2.SubmitJobRequest(spec=job_spec("a"), idempotency_key="k"),
                hub_pb2.SubmitJobRequest(spec=job_spec("c")),
            ]
        )
    )
    first, repeat, unkeyed = batch.results
    assert first.created and not repeat.created and repeat.job.id == first.job.id
    assert unkeyed.created and unkeyed.job.spec.name == "c" and unkeyed.job.id != first.job.id


async def test_paging_returns_every_job_once_even_within_one_transaction(federation: Federation) -> None:
    await federation.jobs.SubmitJobs(
        hub_pb2.SubmitJobsRequest(jobs=[hub_pb2.SubmitJobRequest(spec=job_spec(f"p{i}")) for i in range(7)])
    )
    seen: list[str] = []
    token = ""
    while True:
        page = await federation.jobs.ListJobs(hub_pb2.ListJobsRequest(page_size=2, page_token=token))
        assert len(page.jobs) <= 2
        seen += [j.spec.name for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == [f"p{i}" for i in range(7)]


async def test_client_wait_returns_only_when_every_job_is_finished(federation: Federation) -> None:

    await federation.start_agent(sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(2)]))
    await federation.wait_clusters_ready(["cpu-a"])
    quick = await federation.submit(job_spec("quick", duration="0.1s"))
    await federation.wait_state(quick.id, {pb.SUCCEEDED})
    slow = await federation.submit(job_spec("slow", duration="1.5s"))
    assert federation.hub is not None
    async with federation.client() as client:
        # The first job read is already finished; the second is not.
        final = await client.wait([quick.id, slow.id])
    assert [final[quick.id].status.state, final[slow.id].status.state] == [pb.SUCCEEDED, pb.SUCCEEDED]


async def test_finished_jobs_are_forgotten_after_their_retention_and_nothing_else(
    federation: Federation,
) -> None:
    import grpc
    import pytest

    await federation.stop_hub()
    federation.hub_config.finished_job_retention_seconds = 1.0
    await federation.start_hub()
    await federation.start_agent(
        sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(1, cpu="2")])
    )
    await federation.wait_clusters_ready(["cpu-a"])
    done = await federation.submit(job_spec("short", cpu="2", duration="0.1s"), key="k-short")
    await federation.wait_state(done.id, {pb.SUCCEEDED})
    running = await federation.submit(job_spec("long", cpu="2", duration="30s"))
    waiting = await federation.submit(job_spec("waiting", cpu="2"))  # the cluster is full
    await federation.wait_state(running.id, {pb.RUNNING})

    from tests.federation import eventually

    async def forgotten() -> bool:
        try:
            await federation.get(done.id)
        except grpc.aio.AioRpcError as err:
            return bool(err.code() == grpc.StatusCode.NOT_FOUND)
        return False

    await eventually(forgotten, 10, "the finished job to be deleted")
    assert (await federation.get(running.id)).status.state == pb.RUNNING
    assert (await federation.get(waiting.id)).status.state == pb.PENDING
    assert federation.hub is not None
    store = federation.hub.hub.store
    assert await store.read_job(done.id) is None
    assert await store.client.get(store.idem_key("k-short")) is None
    with pytest.raises(grpc.aio.AioRpcError):
        await federation.jobs.CancelJob(hub_pb2.CancelJobRequest(job_id=done.id))


async def test_job_stats_count_jobs_per_state_and_queue(federation: Federation) -> None:
    import asyncio
    import json

    from typer.testing import CliRunner

    from fedplane.client.cli import app

    await federation.start_agent(sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(1)]))
    await federation.wait_clusters_ready(["cpu-a"])
    running = [await federation.submit(job_spec(f"r{i}", queue="a", duration="60s")) for i in range(3)]
    # More cpu than any node has: these stay PENDING.
    for i in range(2):
        await federation.submit(job_spec(f"p{i}", queue="b", cpu="100"))
    for job in running:
        await federation.wait_state(job.id, {pb.RUNNING})

    assert federation.hub is not None
    async with federation.client() as client:
        every = await client.job_stats()
        in_a = await client.job_stats(queue="a")
        in_b = await client.job_stats(queue="b")
        nowhere = await client.job_stats(queue="nowhere")
        listed = await client.list_page(page_size=1)
    assert dict(every.by_state) == {"RUNNING": 3, "PENDING": 2} and every.total == 5
    assert dict(in_a.by_state) == {"RUNNING": 3} and in_a.total == 3
    assert dict(in_b.by_state) == {"PENDING": 2} and in_b.total == 2
    assert dict(nowhere.by_state) == {} and nowhere.total == 0
    assert 0 < every.revision <= listed.revision

    # The CLI runs its own event loop, so it goes to a thread while this loop serves the hub.
    runner = CliRunner()
    flags = federation.cli_flags()
    result = await asyncio.to_thread(runner.invoke, app, [*flags, "stats", "-o", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["byState"] == {"RUNNING": "3", "PENDING": "2"} and data["total"] == "5"
    table = await asyncio.to_thread(runner.invoke, app, [*flags, "stats", "--queue", "a"])
    assert table.exit_code == 0, table.output
    assert "RUNNING" in table.stdout and "3" in table.stdout and "queue a" in table.stdout


async def test_watch_from_a_compacted_revision_says_to_list_again(federation: Federation) -> None:
    first = await federation.submit(job_spec("old", cpu="100"))  # fits nowhere: stays pending
    await federation.submit(job_spec("newer", cpu="100"))
    # A new hub holds no events in memory before its start, so an old revision is read from
    # etcd, where compaction has removed it.
    await federation.stop_hub()
    store = await Store.connect(federation.hub_config.etcd_endpoint, federation.hub_config.etcd_prefix)
    try:
        await store.client.compact(await store.revision())
    finally:
        await store.close()
    await federation.start_hub()

    call = federation.jobs.WatchJobs(hub_pb2.WatchJobsRequest(from_revision=first.revision - 1))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "list again" in (raised.value.details() or "")

    # Watching from now still works, and sees new changes.
    listed = await federation.jobs.ListJobs(hub_pb2.ListJobsRequest())
    job = await federation.submit(job_spec("after", cpu="100"))
    call = federation.jobs.WatchJobs(hub_pb2.WatchJobsRequest(from_revision=listed.revision))
    async for event in call:
        assert event.job.id == job.id and event.job.status.state == pb.PENDING
        break
    call.cancel()
