"""Cluster liveness on the memory store, whose leases expire by the test's clock: ready, unknown,
lost and back, edge thresholds, a new leader, and a leader that is no longer one."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from fedplane.core import dispatch as sm
from fedplane.core import health as hl
from fedplane.hub.clusters import ClusterRegistry, health_thresholds
from fedplane.hub.liveness import AliveRecord, Liveness
from fedplane.hub.reports import ClusterReports
from fedplane.hub.scheduler import Scheduler
from fedplane.hub.store import Fence
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb
from tests.hub.fakes import Parts, report_msg, settle, spec

S = sm.S
EDGE = {"fedplane.io/edge": "true"}


@dataclass
class Replica:
    """A hub replica's part in liveness: its registry fed by its reports driver, and the driver."""

    parts: Parts
    name: str
    registry: ClusterRegistry
    reports: ClusterReports = field(init=False)
    liveness: Liveness = field(init=False)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    lost_events: list[tuple[str, float | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reports = ClusterReports(self.parts.table, self.registry, self.parts.store, self.parts.clock)
        self.liveness = Liveness(self.registry, self.parts.store, self.parts.clock, self.name)
        self.registry.on_lost_change(lambda name, since: self.lost_events.append((name, since)))

    async def start(self, lead: bool = True) -> None:
        self.tasks.append(asyncio.create_task(self.liveness.run()))
        await settle()
        if lead:
            await self.lead()

    async def lead(self, fence: Fence | None = None) -> asyncio.Task[None]:
        task = asyncio.create_task(self.liveness.lead(fence or Fence()))
        self.tasks.append(task)
        await settle()
        return task

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()

    async def heartbeat(self, cluster: str) -> None:
        beat = agent_pb.Heartbeat(cluster=cluster, agent_id=f"{cluster}-agent")
        now = self.parts.clock.time()
        await self.reports.on_report(report_msg("heartbeat", cluster, beat.SerializeToString(), now))
        await settle()

    async def inventory(self, cluster: str, labels: dict[str, str] | None = None) -> None:
        node = pb.Node(name="n0", ready=True)
        node.free.quantities["cpu"] = 4000
        node.allocatable.quantities["cpu"] = 4000
        report = agent_pb.Inventory(cluster=cluster, nodes=[node], labels=labels or {})
        now = self.parts.clock.time()
        await self.reports.on_report(report_msg("inventory", cluster, report.SerializeToString(), now))
        await settle()

    def health(self, cluster: str) -> int:
        return self.registry.health(cluster, self.parts.clock.time()).state


@pytest.fixture
def parts() -> Parts:
    return Parts()


def replica(parts: Parts, name: str, registry: ClusterRegistry | None = None) -> Replica:
    return Replica(parts, name, registry if registry is not None else parts.registry)


def restarted_registry(parts: Parts) -> ClusterRegistry:
    """A registry as a starting hub builds it: every cluster's admin record from the store."""
    registry = ClusterRegistry(health_thresholds(parts.config))
    for name, blob in parts.store.clusters.items():
        state, _ = registry.get_or_add(name)
        state.admin = pb.Cluster.FromString(blob)
    return registry


async def beat_for(parts: Parts, seconds: float, *replicas_clusters: tuple[Replica, str]) -> None:
    """Heartbeats every 5 s (the agent's default) for `seconds`."""
    for _ in range(int(seconds // 5)):
        await parts.clock.advance(5)
        for r, cluster in replicas_clusters:
            await r.heartbeat(cluster)


def stored_lost_time(parts: Parts, cluster: str) -> float | None:
    record = pb.Cluster.FromString(parts.store.clusters[cluster])
    return record.lost_time.ToNanoseconds() / 1e9 if record.HasField("lost_time") else None


async def test_a_silent_cluster_goes_ready_unknown_lost_and_back(parts: Parts) -> None:
    leader = replica(parts, "hub-a")
    follower = replica(parts, "hub-b", restarted_registry(parts))
    await leader.start()
    await follower.start(lead=False)
    thresholds = parts.registry.thresholds
    round_s = leader.liveness.round_seconds
    assert round_s == thresholds.unknown_after / 4

    for r in (leader, follower):
        await r.inventory("c1")
        await r.heartbeat("c1")
    # The first heartbeat gets the cluster its lease and alive key at once, not next round.
    key = parts.store.alive["c1"]
    assert AliveRecord.parse(key.value) == AliveRecord("c1", "c1-agent", parts.clock.time(), "hub-a", 60)
    assert parts.store.lease_ttl_left(key.lease) == 60
    assert leader.health("c1") == follower.health("c1") == hl.READY

    # Heartbeats keep the lease alive: renewed in rounds, the same lease.
    await beat_for(parts, 90, (leader, "c1"), (follower, "c1"))
    last_beat = parts.clock.time()
    assert parts.store.alive["c1"].lease == key.lease
    assert parts.store.lease_ttl_left(key.lease) >= 60 - round_s
    # One keepalive stream; a keepalive only in rounds after a heartbeat (every 5 s, not every round).
    assert parts.store.renewal_streams == 1 and 90 / 5 - 1 <= len(parts.store.renewal_rounds) <= 90 / 5 + 1

    # Silent past the unknown threshold: UNKNOWN, and no new jobs.
    await parts.clock.advance(thresholds.unknown_after + 1)
    assert leader.health("c1") == follower.health("c1") == hl.UNKNOWN
    (job,) = await parts.submit(spec(cpu_millis=1000))
    scheduler = Scheduler(parts.table, parts.registry, parts.commands, parts.clock, parts.config)
    await scheduler.place_pending()
    assert job.state == S.PENDING and parts.commands.queued == []
    assert "no heartbeat for 16s" in parts.table.pending_reason(job.id)
    shown = parts.registry.clusters["c1"].to_pb(parts.clock.time(), thresholds, 0)
    assert shown.health == pb.UNKNOWN and shown.heartbeat_age_seconds == 16 and not shown.edge

    # Still not lost just before the lost threshold: nothing has happened to it.
    await parts.clock.advance(last_beat + thresholds.lost_after - 1 - parts.clock.time())
    assert "c1" in parts.store.alive and leader.health("c1") == hl.UNKNOWN
    assert leader.lost_events == [] and not parts.registry.lost_changed.is_set()

    # Its lease expires within a round of the lost threshold; etcd deletes the key, and every
    # replica marks it LOST.
    await parts.clock.advance(1 + round_s)
    assert "c1" not in parts.store.alive
    assert leader.health("c1") == follower.health("c1") == hl.LOST
    lost_since = parts.registry.clusters["c1"].lost_since
    assert lost_since is not None and last_beat + 60 <= lost_since <= last_beat + 60 + round_s
    assert leader.lost_events == [("c1", lost_since)] and parts.registry.lost_changed.is_set()
    assert parts.registry.lost() == {"c1": lost_since}
    assert stored_lost_time(parts, "c1") == pytest.approx(lost_since)  # recorded for later leaders
    shown = parts.registry.clusters["c1"].to_pb(parts.clock.time(), thresholds, 0)
    assert shown.health == pb.LOST and shown.lost_time.ToNanoseconds() / 1e9 == pytest.approx(lost_since)
    assert "lease expired" in shown.health_reason

    # It comes back: a new lease and key, READY again, the lost time cleared.
    await parts.clock.advance(30)
    for r in (leader, follower):
        await r.heartbeat("c1")
        await r.inventory("c1")
    back = parts.store.alive["c1"]
    assert back.lease != key.lease
    assert leader.health("c1") == follower.health("c1") == hl.READY
    assert leader.lost_events[-1] == ("c1", None) and follower.lost_events[-1] == ("c1", None)
    await parts.clock.advance(round_s)
    assert stored_lost_time(parts, "c1") is None
    await scheduler.place_pending()
    assert job.state == S.DISPATCHED and job.cluster == "c1"

    await leader.stop()
    await follower.stop()


async def test_edge_clusters_wait_longer_before_unknown_and_lost(parts: Parts) -> None:
    leader = replica(parts, "hub-a")
    await leader.start()
    thresholds = parts.registry.thresholds
    await leader.heartbeat("e1")
    first = parts.store.alive["e1"]
    assert AliveRecord.parse(first.value).ttl == 60  # type: ignore[union-attr]

    # Its inventory says it is an edge cluster: the next heartbeat moves its key to a lease of
    # the edge lost threshold, without the key ever going away.
    await leader.inventory("e1", EDGE)
    await beat_for(parts, 5, (leader, "e1"))
    await parts.clock.advance(leader.liveness.round_seconds)
    moved = parts.store.alive["e1"]
    assert moved.lease != first.lease
    assert AliveRecord.parse(moved.value).ttl == 900  # type: ignore[union-attr]
    assert parts.store.lease_ttl_left(first.lease) == 0  # revoked, not left to run out
    assert all(key.lease for key in parts.store.alive_history if key.name == "e1")
    last_beat = parts.registry.clusters["e1"].last_seen

    await parts.clock.advance(last_beat + 59 - parts.clock.time())
    assert leader.health("e1") == hl.READY  # 59 s: an ordinary cluster would be unknown
    assert parts.registry.clusters["e1"].to_pb(parts.clock.time(), thresholds, 0).edge
    await parts.clock.advance(2)
    assert leader.health("e1") == hl.UNKNOWN
    await parts.clock.advance(last_beat + 899 - parts.clock.time())
    assert leader.health("e1") == hl.UNKNOWN and leader.lost_events == []
    await parts.clock.advance(1 + leader.liveness.round_seconds)
    assert leader.health("e1") == hl.LOST
    await leader.stop()


async def test_a_new_leader_knows_from_the_store_alone_and_adopts_the_leases(parts: Parts) -> None:
    old = replica(parts, "hub-a")
    await old.start()
    for cluster in ("c1", "c2"):
        await old.inventory(cluster)
        await old.heartbeat(cluster)
    c1_lease = parts.store.alive["c1"].lease
    await beat_for(parts, 70, (old, "c1"))  # c2 falls silent and is lost
    lost_since = parts.registry.clusters["c2"].lost_since
    assert lost_since is not None and stored_lost_time(parts, "c2") == pytest.approx(lost_since)
    await old.stop()

    # A restarted hub: its registry from the admin records, its liveness from the alive keys.
    new = replica(parts, "hub-b", restarted_registry(parts))
    await new.start(lead=False)
    assert new.registry.clusters["c1"].lost_since is None
    assert new.registry.clusters["c2"].lost_since == pytest.approx(lost_since)  # the original time

    await parts.clock.advance(3)
    await new.heartbeat("c1")
    await new.lead()
    await parts.clock.advance(new.liveness.round_seconds)
    adopted = parts.store.alive["c1"]
    assert adopted.lease == c1_lease  # lease ids are etcd's, not the replica's
    assert parts.store.lease_ttl_left(c1_lease) >= 60 - new.liveness.round_seconds
    assert AliveRecord.parse(adopted.value).keeper == "hub-b"  # type: ignore[union-attr]
    assert "c2" not in parts.store.alive and new.health("c2") == hl.LOST
    assert new.registry.clusters["c2"].lost_since == pytest.approx(lost_since)
    await new.stop()


async def test_a_loss_no_leader_recorded_proves_nothing_and_gets_a_fresh_lease(parts: Parts) -> None:
    # Clusters registered (by an earlier hub) whose keys ran out while no leader kept them.
    for cluster in ("c1", "c2"):
        parts.store.clusters[cluster] = pb.Cluster(name=cluster).SerializeToString()
    hub = replica(parts, "hub-a", restarted_registry(parts))
    await hub.start(lead=False)
    assert hub.health("c1") == hub.health("c2") == hl.NOT_READY  # not LOST

    await hub.lead()
    assert hub.liveness.settled.is_set()
    assert sorted(parts.store.alive) == ["c1", "c2"]
    assert hub.lost_events == []
    # c1 reports; c2 stays silent, and is lost a lost threshold after the takeover.
    await beat_for(parts, 65, (hub, "c1"))
    await parts.clock.advance(hub.liveness.round_seconds)
    assert hub.health("c2") == hl.LOST and "c1" in parts.store.alive
    await hub.stop()
    assert not hub.liveness.settled.is_set()


async def test_lead_can_be_cancelled_anywhere_and_started_again(parts: Parts) -> None:
    hub = replica(parts, "hub-a")
    await hub.start(lead=False)
    await hub.heartbeat("c1")
    for turns in range(6):
        task = asyncio.create_task(hub.liveness.lead())
        await settle(turns)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await hub.lead()
    lease = parts.store.alive["c1"].lease
    await beat_for(parts, 30, (hub, "c1"))
    assert parts.store.alive["c1"].lease == lease and parts.store.lease_ttl_left(lease) > 55
    assert [name for name, _ in hub.lost_events] == []
    await hub.stop()


async def test_a_leader_whose_fence_is_gone_writes_nothing_and_says_so(parts: Parts) -> None:
    parts.store.leader = Fence(b"/fedplane/leader", 7)
    hub = replica(parts, "hub-a")
    await hub.start(lead=False)
    told: list[bool] = []
    task = asyncio.create_task(hub.liveness.lead(Fence(b"/fedplane/leader", 3), lambda: told.append(True)))
    await settle()
    await hub.heartbeat("c1")
    await parts.clock.advance(hub.liveness.round_seconds)
    assert told == [True] and task.done()
    assert parts.store.alive == {} and parts.store.leases == {}
    await hub.stop()
