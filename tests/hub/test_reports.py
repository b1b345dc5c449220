"""Cluster reports: registration, health by the clock, and orphan queries."""

from __future__ import annotations

import asyncio

from fedplane.core import dispatch as sm
from fedplane.hub.reports import ClusterReports
from fedplane.runtime import bus
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb
from tests.hub.fakes import Parts, report_msg, settle, spec

S = sm.S


def reports(parts: Parts) -> ClusterReports:
    return ClusterReports(parts.table, parts.registry, parts.store, parts.clock)


def inventory(parts: Parts, cluster: str) -> bus.Message:
    node = pb.Node(name="n0", ready=True)
    node.free.quantities["cpu"] = 4000
    node.allocatable.quantities["cpu"] = 4000
    report = agent_pb.Inventory(cluster=cluster, nodes=[node])
    return report_msg("inventory", cluster, report.SerializeToString(), parts.clock.time())


def heartbeat(parts: Parts, cluster: str, ahead: float = 0.0) -> bus.Message:
    """A heartbeat the server stored `ahead` seconds past the hub's clock."""
    beat = agent_pb.Heartbeat(cluster=cluster)
    return report_msg("heartbeat", cluster, beat.SerializeToString(), parts.clock.time() + ahead)


async def test_a_cluster_goes_stale_when_the_clock_passes_its_heartbeat_timeout() -> None:
    parts = Parts()
    timeout = parts.config.cluster_unknown_after_seconds
    driver = reports(parts)
    await driver.on_report(inventory(parts, "c1"))
    await driver.on_report(heartbeat(parts, "c1"))
    assert "c1" in parts.store.clusters  # registered on first contact
    assert driver.ready == {"c1"}
    assert parts.registry.clusters["c1"].last_seen == parts.clock.time()
    health = asyncio.create_task(driver.run_health())
    try:
        await settle()
        parts.table.wake.clear()
        await parts.clock.advance(timeout - 1)
        assert driver.ready == {"c1"} and not parts.table.wake.is_set()

        await parts.clock.advance(timeout / 2)
        assert driver.ready == frozenset()
        assert parts.table.wake.is_set()
        cluster = driver.registry.clusters["c1"].to_pb(parts.clock.time(), parts.registry.thresholds, 0)
        assert cluster.health == pb.UNKNOWN
        assert cluster.heartbeat_age_seconds == timeout - 1 + timeout / 2
        assert cluster.health_reason.startswith("no heartbeat for")

        await driver.on_report(heartbeat(parts, "c1"))
        assert driver.ready == {"c1"}
    finally:
        health.cancel()


async def test_a_heartbeat_stamped_ahead_of_the_hubs_clock_counts_from_the_hubs_now() -> None:
    parts = Parts()
    driver = reports(parts)
    await driver.on_report(heartbeat(parts, "c1", ahead=3600))
    assert parts.registry.clusters["c1"].last_seen == parts.clock.time()


async def test_a_report_under_a_name_no_agent_may_have_registers_nothing() -> None:
    parts = Parts()
    driver = reports(parts)
    for name in ("Upper", "under_score", "-dash", "x" * 64):
        await driver.on_report(heartbeat(parts, name))
    assert parts.registry.clusters == {}
    assert parts.store.clusters == {}
    await driver.on_report(heartbeat(parts, "ok-1"))
    assert list(parts.registry.clusters) == ["ok-1"]


async def test_a_heartbeat_counts_from_when_the_server_stored_it() -> None:
    parts = Parts()
    driver = reports(parts)
    await driver.on_report(heartbeat(parts, "c1", ahead=-5))
    assert parts.registry.clusters["c1"].last_seen == parts.clock.time() - 5


async def test_an_orphan_query_names_the_workloads_not_assigned_to_the_cluster() -> None:
    parts = Parts()
    mine, moved = await parts.submit(spec("mine"), spec("moved"))
    await parts.dispatched(mine, "c1")
    await parts.dispatched(moved, "c2")
    query = agent_pb.OrphanQuery(
        cluster="c1",
        workloads=[
            agent_pb.WorkloadRef(job_id=mine.id, generation=1),
            agent_pb.WorkloadRef(job_id=moved.id, generation=1),
            agent_pb.WorkloadRef(job_id="forgotten", generation=3),
        ],
    )

    reply = await reports(parts).answer_orphan_query("c1", query.SerializeToString())

    orphans = agent_pb.OrphanReply.FromString(reply).orphans
    assert sorted(o.job_id for o in orphans) == sorted([moved.id, "forgotten"])


async def test_a_replica_whose_table_lags_never_calls_a_running_job_an_orphan() -> None:
    """Submitted and dispatched through another replica, not yet in this one's table: etcd says."""
    parts = Parts()
    (job,) = await parts.submit(spec("elsewhere"))
    await parts.dispatched(job, "c1")
    parts.table.forget(job)  # this replica's watch has not brought it yet
    ahead = agent_pb.WorkloadRef(job_id=job.id, generation=1)
    query = agent_pb.OrphanQuery(cluster="c1", workloads=[ahead])

    reply = await reports(parts).answer_orphan_query("c1", query.SerializeToString())

    assert list(agent_pb.OrphanReply.FromString(reply).orphans) == []
