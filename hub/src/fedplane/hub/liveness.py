"""Cluster liveness: each alive cluster's lease in etcd, kept by the leader, watched by every replica.

Every cluster that is alive has `<prefix>/alive/<cluster>` bound to an etcd lease of its own,
whose TTL is the cluster's lost threshold (longer for edge clusters), and whose value says
which cluster, agent and heartbeat it was written for, and which hub replica keeps it
(`AliveRecord`, JSON). `etcdctl lease list` and `etcdctl get --prefix <prefix>/alive/` therefore
show which clusters are alive, and a new leader knows it without waiting for anything.

- The leader (`lead`) grants a lease and creates the key, in one transaction, when a cluster
  with no key heartbeats. While heartbeats keep arriving, it renews the leases in rounds (a
  quarter of the shortest unknown threshold, at most 5 s): one keepalive per cluster that
  heartbeated since the last round, all of them written back to back on one long-lived
  LeaseKeepAlive stream, so that a thousand clusters cost one stream round trip per round, not
  a thousand calls. A cluster that stops heartbeating is simply not renewed: etcd expires its
  lease and deletes its key, within a round of its lost threshold.
- Every replica (`run`) loads the alive keys and watches them: a deleted key makes the cluster
  LOST (`ClusterState.lost_since`), a new key makes it not lost any more. So followers show the
  same states as the leader, and nothing but etcd decides that a cluster is lost.
- The leader records the lost time in the cluster's admin record (`Cluster.lost_time`), and
  clears it when the cluster returns, so that a new leader and a restarted hub keep the time the
  cluster was first lost (a job's disconnect delay counts from it).

A lease that expired while no leader was renewing proves nothing about its cluster (all hub
replicas were down, or an upgrade from hubs before leases). Such a loss has no lost time
recorded, so a replica starting does not count a registered cluster without a key as lost
unless its loss was recorded, and a leader taking over gives every cluster that has no key and
no recorded loss a fresh lease: it is lost only if it stays silent for its whole lost threshold
from then. Whoever acts on lost clusters (lost.py) waits for `settled`, set once a leader's
first round has done this.

Only the leader writes (grants, keepalives, rewrites, lost times), every transaction under its
fence; keepalives are no transactions and cannot be fenced, so `lead` is cancelled the moment
the replica stops leading, which closes its keepalive stream.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Protocol

from fedplane.core.health import HealthThresholds, lease_ttl
from fedplane.hub.clock import Clock
from fedplane.hub.clusters import ClusterRegistry, ClusterState
from fedplane.hub.store import NO_FENCE, AliveKey, Fence, FenceLost, LeaseGrant
from fedplane.runtime import logs, timestamps
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub.liveness")

# How many admin records (lost times) are written at once.
_RECORD_CONCURRENCY = 32


class LeaseRenewer(Protocol):
    async def renew(self, leases: Sequence[int]) -> dict[int, int]:
        """Renew every lease; each one's TTL as the store now has it (0: the lease is gone)."""
        ...


class ClusterLeaseStore(Protocol):
    """What cluster liveness needs of the store (store.Store on etcd; the tests' memory store)."""

    async def load_alive(self) -> tuple[list[AliveKey], int]: ...

    def watch_alive(self, from_revision: int) -> AsyncIterator[AliveKey]: ...

    async def grant_cluster_leases(
        self, grants: Sequence[LeaseGrant], fence: Fence
    ) -> list[AliveKey | None]: ...

    async def rewrite_alive(self, keys: Sequence[AliveKey], fence: Fence) -> list[AliveKey | None]: ...

    def cluster_lease_renewals(self) -> AbstractAsyncContextManager[LeaseRenewer]: ...

    async def load_clusters(self) -> dict[str, bytes]: ...

    async def update_cluster(
        self, name: str, change: Callable[[bytes | None], bytes], fence: Fence
    ) -> bytes: ...


@dataclass(frozen=True, slots=True)
class AliveRecord:
    """The value of a cluster's alive key: what an operator reads with etcdctl."""

    cluster: str
    agent_id: str
    # When the heartbeat the key was written for was stored (wall-clock seconds): the key is
    # written when it is created and when a new leader adopts it, not at every renewal.
    heartbeat: float
    # The hub replica that keeps the lease alive.
    keeper: str
    # The lease's TTL in seconds: the cluster's lost threshold.
    ttl: int

    def encode(self) -> bytes:
        """JSON, the heartbeat's time as ISO 8601 in UTC (what etcdctl shows is read by people)."""
        data = asdict(self)
        data["heartbeat"] = datetime.fromtimestamp(self.heartbeat, UTC).isoformat(timespec="milliseconds")
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, blob: bytes) -> AliveRecord | None:
        try:
            data = json.loads(blob)
            return cls(
                str(data["cluster"]),
                str(data["agent_id"]),
                datetime.fromisoformat(data["heartbeat"]).timestamp(),
                str(data["keeper"]),
                int(data["ttl"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


def round_seconds(thresholds: HealthThresholds) -> float:
    """How often the leader renews: a quarter of the shortest unknown threshold, 0.1 s to 5 s."""
    return min(5.0, max(0.1, thresholds.shortest_unknown / 4))


def _lost_time(record: pb.Cluster) -> float | None:
    """The lost time an admin record holds, if any."""
    return record.lost_time.ToNanoseconds() / 1e9 if record.HasField("lost_time") else None


def _with_lost_time(since: float | None, name: str) -> Callable[[bytes | None], bytes]:
    def change(blob: bytes | None) -> bytes:
        record = pb.Cluster.FromString(blob) if blob else pb.Cluster(name=name)
        if since is None:
            record.ClearField("lost_time")
        else:
            record.lost_time.CopyFrom(timestamps.at(since))
        return record.SerializeToString()

    return change


class Liveness:
    """The alive keys of every cluster: `run` on every replica, `lead` on the leader only."""

    def __init__(
        self,
        registry: ClusterRegistry,
        store: ClusterLeaseStore,
        clock: Clock,
        replica: str,
    ) -> None:
        self.registry = registry
        self.store = store
        self.clock = clock
        self.replica = replica
        # Every alive key as this replica knows it, by cluster.
        self.alive: dict[str, AliveKey] = {}
        # Set once the alive keys are loaded (lead waits for it).
        self.loaded = asyncio.Event()
        # Set once a leader's first round is done: lost states are then etcd's verdict, not a
        # leaderless spell's (see the module docstring); cleared when lead stops.
        self.settled = asyncio.Event()
        self._revisions: dict[str, int] = {}  # the last revision applied per key (puts and deletes)
        self._leading = False
        self._wake = asyncio.Event()
        # Per cluster, the heartbeat (its last_seen) its lease was last renewed or granted for.
        self._renewed: dict[str, float] = {}
        # Per cluster, the lost time its admin record holds, as this leader knows it.
        self._recorded: dict[str, float | None] = {}
        # Rounds run and keepalives sent while leading (for benchmarks and tests).
        self.rounds = 0
        self.keepalives = 0
        registry.on_heartbeat(self._heard)

    @property
    def round_seconds(self) -> float:
        return round_seconds(self.registry.thresholds)

    # ------------------------------------------------------------------ every replica
    async def run(self) -> None:
        """Load the alive keys, then follow them; load again after the watch fails."""
        first = True
        while True:
            try:
                keys, revision = await self.store.load_alive()
                self._load(keys, revision, first)
                first = False
                self.loaded.set()
                async for key in self.store.watch_alive(revision):
                    self._apply(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cluster liveness: the alive keys' watch failed; loading again", error=str(exc))
            await asyncio.sleep(1.0)

    def _load(self, keys: list[AliveKey], revision: int, first: bool) -> None:
        """Take a full load: keys not in it are gone. At the first load, a registered cluster
        without a key is LOST only if its loss was recorded (see the module docstring)."""
        had = set(self.alive)
        for key in keys:
            self._apply(key)
        present = {key.name for key in keys}
        for name in had - present:
            self._apply(AliveKey(name, 0, revision, b""))
        if not first:
            return
        for name, state in self.registry.clusters.items():
            if name not in self.alive and state.lost_since is None:
                since = _lost_time(state.admin)
                if since is not None:
                    state.lost_since = since

    def _apply(self, key: AliveKey) -> None:
        """A put or delete of an alive key, seen by the watch or written by this leader; older
        news than what was applied for the key is dropped."""
        if key.revision <= self._revisions.get(key.name, 0):
            return
        self._revisions[key.name] = key.revision
        state, _ = self.registry.get_or_add(key.name)
        if key.lease:
            self.alive[key.name] = key
            state.lost_since = None
        else:
            self.alive.pop(key.name, None)
            if state.lost_since is None:
                state.lost_since = self.clock.time()

    def _heard(self, name: str) -> None:
        """A heartbeat: a leader grants a cluster without a key its lease now, not next round."""
        if self._leading and name not in self.alive:
            self._wake.set()

    # ------------------------------------------------------------------ the leader
    async def lead(self, fence: Fence = NO_FENCE, on_fence_lost: Callable[[], None] | None = None) -> None:
        """Keep the alive clusters' leases while this replica leads; cancel it when it stops.

        Safe to cancel at any point and to start again: each round decides afresh from the
        registry and the alive keys. Returns (after calling `on_fence_lost`) when a write finds
        that another replica leads.
        """
        await self.loaded.wait()
        self._renewed.clear()
        self._leading = True
        try:
            async with self.store.cluster_lease_renewals() as renewer:
                first = True
                while True:
                    try:
                        if first:
                            await self._take_over(fence)
                        await self._round(renewer, fence)
                        if first:
                            first = False
                            self.settled.set()
                    except FenceLost:
                        log.warning("cluster liveness: another replica leads; no longer keeping leases")
                        if on_fence_lost is not None:
                            on_fence_lost()
                        return
                    except Exception as exc:
                        log.warning("cluster lease round failed; retrying", error=" ".join(str(exc).split()))
                    await self._pause()
        finally:
            self._leading = False
            self.settled.clear()

    async def _pause(self) -> None:
        """Until the next round, or sooner when a cluster without a key heartbeats."""
        self._wake.clear()
        sleep = asyncio.ensure_future(self.clock.sleep(self.round_seconds))
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleep, wake), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleep.cancel()
            wake.cancel()

    async def _take_over(self, fence: Fence) -> None:
        """Learn the recorded lost times; keep the original ones, and give every cluster without
        a key and without a recorded loss a fresh lease (its silence so far proves nothing)."""
        records = await self.store.load_clusters()
        self._recorded = {name: _lost_time(pb.Cluster.FromString(blob)) for name, blob in records.items()}
        thresholds = self.registry.thresholds
        grants = []
        for name, state in self.registry.clusters.items():
            if name in self.alive:
                continue
            recorded = self._recorded.get(name)
            if recorded is not None:
                lost_since = state.lost_since
                state.lost_since = recorded if lost_since is None else min(lost_since, recorded)
                continue
            ttl = lease_ttl(thresholds.lost_for(state.is_edge(thresholds)))
            grants.append(LeaseGrant(name, ttl, self._record(state, ttl).encode()))
        if grants:
            written = await self._grant(grants, fence)
            log.info(
                "cluster leases granted on taking over",
                clusters=written,
                why="no alive key and no recorded loss",
            )

    async def _round(self, renewer: LeaseRenewer, fence: Fence) -> None:
        now = self.clock.time()
        thresholds = self.registry.thresholds
        grants: list[LeaseGrant] = []
        renewals: list[tuple[str, int, float]] = []  # (cluster, lease, the heartbeat renewed for)
        rewrites: list[AliveKey] = []
        for name, state in self.registry.clusters.items():
            edge = state.is_edge(thresholds)
            ttl = lease_ttl(thresholds.lost_for(edge))
            key = self.alive.get(name)
            heard = (
                state.heartbeat is not None
                and state.last_seen > self._renewed.get(name, -math.inf)
                and now - state.last_seen <= thresholds.unknown_for(edge)
            )
            if key is None:
                if heard:
                    grants.append(LeaseGrant(name, ttl, self._record(state, ttl).encode()))
                continue
            record = AliveRecord.parse(key.value)
            if heard and (record is None or record.ttl != ttl):
                # Its lost threshold changed (it became an edge cluster, or the settings did).
                grants.append(LeaseGrant(name, ttl, self._record(state, ttl).encode(), replace=key.lease))
                continue
            if heard:
                renewals.append((name, key.lease, state.last_seen))
            if record is None or record.keeper != self.replica:
                kept = self._record(state, record.ttl if record is not None else ttl)
                rewrites.append(key._replace(value=kept.encode()))
        if grants:
            await self._grant(grants, fence)
        self.rounds += 1
        if renewals:
            self.keepalives += len(renewals)
            ttls = await renewer.renew([lease for _, lease, _ in renewals])
            for name, lease, heartbeat in renewals:
                if ttls.get(lease, 0) > 0:
                    self._renewed[name] = heartbeat
                elif (key := self.alive.get(name)) is not None and key.lease == lease:
                    # Expired before this renewal: the watch brings the deletion, and the
                    # next heartbeat a new lease.
                    del self.alive[name]
        if rewrites:
            for key in await self.store.rewrite_alive(rewrites, fence):
                if key is not None:
                    self._apply(key)
        await self._record_lost_times(fence)

    async def _grant(self, grants: Sequence[LeaseGrant], fence: Fence) -> int:
        """Grant the leases and apply the keys written; how many were."""
        clusters = self.registry.clusters
        written = 0
        for grant, key in zip(grants, await self.store.grant_cluster_leases(grants, fence), strict=True):
            if key is None:
                continue
            written += 1
            self._apply(key)
            self._renewed[grant.name] = clusters[grant.name].last_seen
            log.debug("cluster lease granted", cluster=grant.name, lease=f"{key.lease:x}", ttl=grant.ttl)
        return written

    def _record(self, state: ClusterState, ttl: int) -> AliveRecord:
        agent_id = state.heartbeat.agent_id if state.heartbeat is not None else ""
        return AliveRecord(state.name, agent_id, state.last_seen, self.replica, ttl)

    async def _record_lost_times(self, fence: Fence) -> None:
        """Make each cluster's admin record hold its lost time (none unless it is LOST)."""
        changes = [
            (name, state)
            for name, state in self.registry.clusters.items()
            if state.lost_since != self._recorded.get(name)
        ]
        for start in range(0, len(changes), _RECORD_CONCURRENCY):
            chunk = changes[start : start + _RECORD_CONCURRENCY]
            wanted = [state.lost_since for _, state in chunk]
            blobs = await asyncio.gather(
                *(
                    self.store.update_cluster(name, _with_lost_time(since, name), fence)
                    for (name, _), since in zip(chunk, wanted, strict=True)
                )
            )
            for (name, state), since, blob in zip(chunk, wanted, blobs, strict=True):
                self._recorded[name] = since
                state.admin = pb.Cluster.FromString(blob)
