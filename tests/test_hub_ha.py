"""Hub replicas on one etcd and NATS: one leads, any serves, a deposed leader writes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from fedplane.hub.etcd import EtcdClient
from fedplane.hub.server import HubServer
from fedplane.hub.store import FenceLost
from fedplane.hub.table import StatusWrite
from fedplane.local import servers as embedded
from fedplane.v1 import hub_pb2, hub_pb2_grpc
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, cpu_nodes, eventually, hub_config, job_spec, sim_agent_config

LEASE = 2.0


@pytest.fixture
async def replicas(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess], tmp_path: Path
) -> AsyncIterator[tuple[Federation, list[HubServer]]]:
    """Two hub replicas (a and b, a started first), and a federation whose client talks to b."""
    etcd, nats = servers
    base = hub_config(etcd, nats, leader_lease_seconds=LEASE)
    a = await HubServer.start(dataclasses.replace(base, replica_id="a"))
    await eventually(_leads(a), 5, "replica a leading")
    fed = Federation(etcd, nats, tmp_path, dataclasses.replace(base, replica_id="b"))
    b = await fed.start_hub()
    hubs = [a, b]
    try:
        yield fed, hubs
    finally:
        await fed.close()
        for hub in hubs:
            if hub is not b:
                await hub.stop(grace=0.1)


def _leads(hub: HubServer) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return hub.hub.leadership.leading

    return check


async def _status(port: int) -> hub_pb2.HubStatus:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        status: hub_pb2.HubStatus = await hub_pb2_grpc.HubServiceStub(channel).GetHubStatus(
            hub_pb2.GetHubStatusRequest()
        )
        return status


async def test_one_replica_leads_and_a_follower_serves_submits_reads_and_cancels(
    replicas: tuple[Federation, list[HubServer]],
) -> None:
    fed, (a, b) = replicas
    assert a.hub.leadership.leading and not b.hub.leadership.leading
    for port in (a.port, b.port):
        status = await _status(port)
        assert status.leader == "a"
        assert {(r.id, r.role) for r in status.replicas} == {("a", "leader"), ("b", "follower")}
        assert status.fencing_revision > 0
    await fed.start_agent(sim_agent_config("c1", fed.nats_url, nodes=[cpu_nodes(2)]))
    await fed.wait_clusters_ready(["c1"])

    # Submitted to the follower, placed by the leader, visible on the follower.
    job = await fed.submit(job_spec("through-b"))
    done = await fed.wait_state(job.id, {pb.SUCCEEDED})
    assert done.status.cluster == "c1"

    # A cancel through the follower takes effect (the leader never placed the held job).
    held = await fed.submit(job_spec("too-big", cpu="64"))
    cancelled = await fed.jobs.CancelJob(hub_pb2.CancelJobRequest(job_id=held.id, reason="no"))
    assert cancelled.status.state == pb.CANCELLED


async def test_a_leader_that_stops_hands_over_at_once(
    replicas: tuple[Federation, list[HubServer]],
) -> None:
    """A stopping leader revokes its lease (a killed one is the chaos tests' case)."""
    fed, hubs = replicas
    a, b = hubs
    await fed.start_agent(sim_agent_config("c1", fed.nats_url, nodes=[cpu_nodes(2)]))
    await fed.wait_clusters_ready(["c1"])
    before = (await _status(b.port)).fencing_revision

    hubs.remove(a)
    await a.stop(grace=0.1)
    stopped = time.monotonic()
    await eventually(_leads(b), LEASE + 3, "replica b leading")
    took = time.monotonic() - stopped
    assert took < LEASE / 2, f"takeover took {took:.1f}s after a clean stop"
    status = await _status(b.port)
    assert status.leader == "b" and status.fencing_revision > before

    job = await fed.submit(job_spec("after-failover"))
    assert (await fed.wait_state(job.id, {pb.SUCCEEDED})).status.cluster == "c1"


async def test_a_deposed_leaders_writes_are_refused_by_etcd(
    replicas: tuple[Federation, list[HubServer]],
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess],
) -> None:
    fed, (a, b) = replicas
    held = await fed.submit(job_spec("nowhere-to-go", cpu="64"))
    await eventually(_has(a, held.id), 5, "the leader holding the job")
    stale_fence = a.hub.table.fence
    record = a.hub.table.jobs[held.id]

    # Its lease is revoked behind its back (as when it was paused past the TTL): b takes over
    # while a still believes it leads.
    other = EtcdClient(servers[0].address)
    await other.revoke_lease(a.hub.leadership.lease_id)
    await other.close()
    await eventually(_leads(b), LEASE + 3, "replica b leading")

    status = record.status
    status.message = "written by a deposed leader"
    a.hub.table.fence = stale_fence
    with pytest.raises(FenceLost):
        await a.hub.table.write([StatusWrite.of(held.id, status, record.revision)])
    after = await fed.get(held.id)
    assert after.status.message != "written by a deposed leader"
    assert after.revision == record.revision
    await eventually(lambda: _not(a.hub.leadership.leading), 5, "a stepping down")


def _has(hub: HubServer, job_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return job_id in hub.hub.table.jobs

    return check


async def _not(value: bool) -> bool:
    return not value


async def test_a_cordon_through_a_follower_stops_the_leaders_placements(
    replicas: tuple[Federation, list[HubServer]],
) -> None:
    fed, (a, _) = replicas
    await fed.start_agent(sim_agent_config("c1", fed.nats_url, nodes=[cpu_nodes(2)]))
    await fed.wait_clusters_ready(["c1"])
    await fed.clusters.CordonCluster(hub_pb2.CordonClusterRequest(name="c1", reason="maintenance"))
    await eventually(_cordoned(a, "c1"), 5, "the leader seeing the cordon")

    job = await fed.submit(job_spec("waits"))
    await eventually(_has(a, job.id), 5, "the leader holding the job")
    await asyncio.sleep(1.0)  # placement runs within milliseconds of a submit
    assert a.hub.table.jobs[job.id].state == pb.PENDING
    assert "cordoned" in a.hub.table.pending_reason(job.id)

    await fed.clusters.UncordonCluster(hub_pb2.UncordonClusterRequest(name="c1"))
    assert (await fed.wait_state(job.id, {pb.SUCCEEDED})).status.cluster == "c1"


def _cordoned(hub: HubServer, name: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        state = hub.hub.registry.clusters.get(name)
        return state is not None and state.admin.cordoned

    return check


async def test_a_lone_hub_that_loses_its_lease_mid_round_places_the_round_when_it_leads_again(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess], tmp_path: Path
) -> None:
    """The bench's overloaded hub: a placement round whose fenced write etcd refuses (the
    lease ran out under it) must leave its jobs queued, not admitted to nowhere, so that they
    are placed once the hub leads again. Three times in a row."""
    etcd, nats = servers
    # A keepalive a second: right after one, the hub learns of a revoke by a refused write.
    fed = Federation(etcd, nats, tmp_path, hub_config(etcd, nats, replica_id="solo", leader_lease_seconds=3))
    server = await fed.start_hub()
    hub = server.hub
    other = EtcdClient(etcd.address)
    try:
        await eventually(_leads(server), 5, "the hub leading")
        await fed.start_agent(sim_agent_config("c1", fed.nats_url, nodes=[cpu_nodes(4)], duration=60))
        await fed.wait_clusters_ready(["c1"])
        for attempt in range(3):
            await eventually(_renewed_since(server, hub.leadership._renewed), 3, "a keepalive")
            await other.revoke_lease(hub.leadership.lease_id)
            jobs = await asyncio.gather(*(fed.submit(job_spec(f"j{attempt}-{i}")) for i in range(8)))
            await eventually(lambda: _not(hub.leadership.leading), 5, "the hub stepping down")
            await eventually(_leads(server), 5, "the hub leading again")
            for job in jobs:
                placed = await fed.wait_state(job.id, {pb.DISPATCHED, pb.ADMITTED, pb.RUNNING}, timeout=4)
                assert placed.status.cluster == "c1"
    finally:
        await other.close()
        await fed.close()


def _renewed_since(hub: HubServer, renewed: float) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return hub.hub.leadership._renewed != renewed

    return check
