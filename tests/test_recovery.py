"""Failures a federation must survive: hub restarts, agents down, the NATS link lost."""

from __future__ import annotations

import asyncio

from fedplane.agent.simulated import SimulatedBackend
from fedplane.local import servers as embedded
from fedplane.v1 import hub_pb2
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, cpu_nodes, eventually, job_spec, sim_agent_config


def started(federation: Federation, cluster: str) -> dict[str, int]:
    backend = federation.agents[cluster].backend
    assert isinstance(backend, SimulatedBackend)
    return dict(backend.started)


async def test_hub_restart_loses_no_accepted_job_and_dispatches_none_twice(federation: Federation) -> None:
    config = sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(4, cpu="8")], duration=0.3)
    await federation.start_agent(config)
    await federation.wait_clusters_ready(["cpu-a"])
    submitted = [await federation.submit(job_spec(f"job-{i}", cpu="2", duration="0.3s")) for i in range(30)]

    # Stop the hub while jobs are at every stage, then start a new one on the same etcd and NATS.
    await federation.stop_hub()
    await asyncio.sleep(0.5)
    await federation.start_hub()

    for job in submitted:
        done = await federation.wait_state(job.id, {pb.SUCCEEDED}, timeout=30)
        assert done.status.generation == 1
        dispatches = [t for t in done.status.history if t.state == pb.DISPATCHED]
        assert len(dispatches) == 1
    runs = started(federation, "cpu-a")
    assert sorted(runs) == sorted(j.id for j in submitted)
    assert set(runs.values()) == {1}


async def test_commands_sent_while_the_agent_was_down_are_delivered_when_it_returns(
    federation: Federation,
) -> None:
    config = sim_agent_config("edge", federation.nats_url, nodes=[cpu_nodes(1)])
    await federation.start_agent(config)
    await federation.wait_clusters_ready(["edge"])
    await federation.stop_agent("edge")

    # The hub still believes the cluster healthy for a moment, and dispatches to it.
    job = await federation.submit(job_spec("while-away"))
    dispatched = await federation.wait_state(job.id, {pb.DISPATCHED})
    assert dispatched.status.cluster == "edge"
    await asyncio.sleep(0.5)
    assert (await federation.get(job.id)).status.state == pb.DISPATCHED

    await federation.start_agent(config)
    done = await federation.wait_state(job.id, {pb.SUCCEEDED})
    assert done.status.cluster == "edge"
    assert started(federation, "edge") == {job.id: 1}


async def test_an_agent_replays_what_happened_while_its_nats_link_was_down(federation: Federation) -> None:
    config = sim_agent_config("edge", federation.nats_url, nodes=[cpu_nodes(1)])
    await federation.start_agent(config)
    await federation.wait_clusters_ready(["edge"])
    job = await federation.submit(job_spec("offline", duration="1.5s"))
    await federation.wait_state(job.id, {pb.RUNNING})

    # The link goes down; the workload finishes meanwhile; then the link returns.
    nats = federation.nats
    nats.stop()
    await asyncio.sleep(2.5)
    agent = federation.agents["edge"]
    assert len(agent.outbox) >= 1, "the finished state waits in the outbox"
    federation.nats = embedded.start_nats(nats.data_dir, port=nats.port, auth=nats.identities)

    done = await federation.wait_state(job.id, {pb.SUCCEEDED}, timeout=30)
    assert [t.state for t in done.status.history][-1] == pb.SUCCEEDED


async def test_one_trace_follows_a_job_through_hub_and_agent(federation: Federation, span_exporter) -> None:  # type: ignore[no-untyped-def]

    from fedplane.runtime import telemetry

    span_exporter.clear()
    await federation.start_agent(sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(1)]))
    await federation.wait_clusters_ready(["cpu-a"])
    assert federation.hub is not None
    channel = federation.open_channel(interceptors=telemetry.grpc_client_interceptors())
    from fedplane.v1 import hub_pb2_grpc

    with telemetry.tracer().start_as_current_span("client.submit") as root:
        response = await hub_pb2_grpc.JobServiceStub(channel).SubmitJob(
            hub_pb2.SubmitJobRequest(spec=job_spec("traced", duration="0.1s"))
        )
    await channel.close()
    await federation.wait_state(response.job.id, {pb.SUCCEEDED})
    trace_id = root.get_span_context().trace_id

    async def complete() -> bool:
        names = {s.name for s in span_exporter.get_finished_spans() if s.context.trace_id == trace_id}
        return {"hub.place", "hub.dispatch.create", "agent.create", "agent.status", "hub.status"} <= names

    await eventually(complete, 10, "spans of hub and agent in the submit's trace")
    in_trace = [s for s in span_exporter.get_finished_spans() if s.context.trace_id == trace_id]
    names = {s.name for s in in_trace}
    assert "/fedplane.v1.JobService/SubmitJob" in names
    agent_span = next(s for s in in_trace if s.name == "agent.create")
    assert agent_span.attributes is not None and agent_span.attributes[telemetry.JOB_ID] == response.job.id


async def test_agent_deletes_workloads_the_hub_no_longer_assigns_and_nothing_else(
    federation: Federation,
) -> None:
    from fedplane.agent.backend import CreateRequest

    config = sim_agent_config("cpu-a", federation.nats_url, nodes=[cpu_nodes(2)])
    config.gc_interval_seconds = 0  # driven by hand below
    agent = await federation.start_agent(config)
    await federation.wait_clusters_ready(["cpu-a"])
    job = await federation.submit(job_spec("legit", duration="3s"))
    await federation.wait_state(job.id, {pb.RUNNING})

    # Left behind by a failover: workloads of jobs the hub has no record of for this cluster.
    await agent.backend.create(CreateRequest("j-ghost", 1, job_spec("ghost", duration="60s")))
    await agent.backend.create(CreateRequest(job.id + "x", 3, job_spec("stale", duration="60s")))

    deleted = await agent.collect_orphans()
    assert sorted(deleted) == sorted(["j-ghost", job.id + "x"])
    remaining = {w.job_id for w in await agent.backend.list_workloads()}
    assert remaining == {job.id}
    done = await federation.wait_state(job.id, {pb.SUCCEEDED})
    assert done.status.cluster == "cpu-a"
