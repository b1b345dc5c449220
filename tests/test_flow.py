"""A job's whole path through a real federation: hub, agents, etcd and NATS."""

from __future__ import annotations

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
