"""The max-run-time policy through a whole federation: hub, etcd, NATS and a simulated agent."""

from __future__ import annotations

from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, cpu_nodes, job_spec, sim_agent_config


async def test_the_hub_records_a_job_stopped_past_its_max_run_time_as_failed(federation: Federation) -> None:
    await federation.start_agent(sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(1)]))
    await federation.wait_clusters_ready(["cpu-a"])

    job = await federation.submit(job_spec("overrun", duration="60s", max_run_seconds=1))
    done = await federation.wait_state(job.id, {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}, timeout=15)

    assert done.status.state == pb.FAILED
    assert done.status.reason == "MaxRunTimeExceeded"
    assert [t.state for t in done.status.history] == [
        pb.PENDING,
        pb.DISPATCHED,
        pb.ADMITTED,
        pb.RUNNING,
        pb.FAILED,
    ]
