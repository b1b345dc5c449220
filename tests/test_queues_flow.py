"""Queues on a real federation (hub, agents, etcd, NATS): priority preemption with requeue,
borrowing then reclaim in a two-level cohort tree, a held queue, and the queue view."""

from __future__ import annotations

import asyncio

from fedplane.client.objects import load_text
from fedplane.v1 import hub_pb2
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, cpu_nodes, job_spec, sim_agent_config

TREE = """
kind: ResourceFlavor
name: cpu
---
kind: PriorityClass
name: normal
value: 100
---
kind: PriorityClass
name: urgent
value: 1000
---
kind: Cohort
name: org
---
kind: Cohort
name: research
parent: org
---
kind: Queue
name: team-a
cohort: research
quotas: [{flavor: cpu, resources: {cpu: {nominal: "8"}}}]
---
kind: Queue
name: team-b
cohort: research
quotas: [{flavor: cpu, resources: {cpu: {nominal: "8"}}}]
"""


async def apply(federation: Federation, text: str) -> None:
    async with federation.client() as client:
        await client.apply_queue_objects(load_text(text))


def spec(name: str, queue: str, *, cpu: str = "8", priority_class: str = "normal") -> pb.JobSpec:
    job = job_spec(name, cpu=cpu, queue=queue, duration="120s")
    job.priority_class = priority_class
    return job


async def test_a_higher_priority_job_preempts_and_its_victim_waits_in_its_queue_again(
    federation: Federation,
) -> None:
    await apply(federation, TREE)
    await federation.start_agent(sim_agent_config("c1", federation.nats_url, nodes=[cpu_nodes(1)]))
    await federation.wait_clusters_ready(["c1"])
    low = await federation.submit(spec("low", "team-a"))
    await federation.wait_state(low.id, {pb.RUNNING})

    high = await federation.submit(spec("high", "team-a", priority_class="urgent"))
    assert high.spec.priority == 1000  # the class's value
    await federation.wait_state(high.id, {pb.RUNNING})
    victim = await federation.get(low.id)
    # Requeued, not failed: back in its queue with why in its history.
    assert victim.status.state == pb.PENDING
    preempted = victim.status.history[-1]
    assert preempted.reason == "Preempted" and "cluster c1" in preempted.message
    assert f"preempted by job {high.id}" in preempted.message
    assert victim.status.generation == 1  # its next dispatch makes it attempt 2


async def test_a_queue_borrows_idle_quota_and_its_owner_reclaims_it(federation: Federation) -> None:
    await apply(federation, TREE)
    await federation.start_agent(sim_agent_config("c1", federation.nats_url, nodes=[cpu_nodes(2)]))
    await federation.wait_clusters_ready(["c1"])
    # team-a runs 16 cores: its own 8 and 8 of team-b's, borrowed while team-b is idle.
    first = await federation.submit(spec("a1", "team-a"))
    await federation.wait_state(first.id, {pb.RUNNING})
    second = await federation.submit(spec("a2", "team-a"))
    await federation.wait_state(second.id, {pb.RUNNING})
    async with federation.client() as client:
        rows = {row.name: row for row in (await client.queue_view()).rows}
    assert rows["team-a"].resources[0].borrowed == 16_000 - 8_000
    assert rows["research"].admitted == 2 and rows["org"].admitted == 2

    # team-b claims its own quota: the borrower's newest job goes back to its queue.
    owner = await federation.submit(spec("b1", "team-b"))
    await federation.wait_state(owner.id, {pb.RUNNING})
    evicted = await federation.get(second.id)
    assert evicted.status.state == pb.PENDING
    assert evicted.status.history[-1].reason == "Preempted"
    assert (await federation.get(first.id)).status.state == pb.RUNNING
    # It waits for quota now, and says so, with its place in its queue.
    assert "team-a" in evicted.pending_reason and "cpu" in evicted.pending_reason
    behind = await federation.submit(spec("a3", "team-a"))
    explained = await federation.jobs.ExplainJob(hub_pb2.ExplainJobRequest(job_id=behind.id))
    assert (explained.queue, explained.queue_position) == ("team-a", 1)
    assert "no quota" in explained.summary


async def test_a_held_queue_admits_nothing_until_released(federation: Federation) -> None:
    await apply(federation, TREE)
    await federation.start_agent(sim_agent_config("c1", federation.nats_url, nodes=[cpu_nodes(1)]))
    await federation.wait_clusters_ready(["c1"])
    async with federation.client() as client:
        await client.set_queue_held("team-a", True)
    job = await federation.submit(spec("held", "team-a", cpu="1"))

    await asyncio.sleep(1.5)  # placement rounds come and go
    waiting = await federation.get(job.id)
    assert waiting.status.state == pb.PENDING and "team-a is held" in waiting.pending_reason
    async with federation.client() as client:
        await client.set_queue_held("team-a", False)
    await federation.wait_state(job.id, {pb.RUNNING})


async def test_a_waiting_jobs_priority_changes_its_place_and_whom_it_may_preempt(
    federation: Federation,
) -> None:
    await apply(federation, TREE)
    await federation.start_agent(sim_agent_config("c1", federation.nats_url, nodes=[cpu_nodes(1)]))
    await federation.wait_clusters_ready(["c1"])
    running = await federation.submit(spec("running", "team-a"))
    await federation.wait_state(running.id, {pb.RUNNING})
    first = await federation.submit(spec("first", "team-a"))
    second = await federation.submit(spec("second", "team-a"))

    async def position(job: pb.Job) -> int:
        explained: pb.Explanation = await federation.jobs.ExplainJob(hub_pb2.ExplainJobRequest(job_id=job.id))
        return explained.queue_position

    assert (await position(first), await position(second)) == (0, 1)
    # Equal priorities: nobody preempts anybody; raised, the second overtakes and preempts.
    async with federation.client() as client:
        changed = await client.set_priority(second.id, priority_class="urgent")
    assert changed.status.priority == 1000 and changed.status.priority_class == "urgent"
    await federation.wait_state(second.id, {pb.RUNNING})
    assert (await federation.get(running.id)).status.history[-1].reason == "Preempted"
    assert (await federation.get(first.id)).status.state == pb.PENDING
    async with federation.client() as client:
        finished = await client.set_priority(second.id, priority=5)  # running: allowed
        assert finished.status.priority == 5
