"""Leadership among hub replicas: one leader lease in etcd, and the fence its writes carry.

Every replica holds a lease of its own (TTL `leader_lease_seconds`) with a key under
`<prefix>/hubs/<replica id>` describing it, kept alive while the process lives. A replica
leads by creating `<prefix>/leader` bound to that lease, if the key is absent, in one
transaction; the key's create revision is then the fencing token (`store.Fence`) that every
status write of the leader compares in etcd itself. So a lease alone is never trusted
(BRIEF 5b: a paused process outlives its lease): a deposed leader that still believes it
leads has its writes refused by etcd.

The leader also stops on its own, before etcd can expire its lease: it counts the lease's
life from the moment it *sent* the last successful keepalive, and steps down a margin before
that runs out, so that in practice the fence is a second line, not the first. Followers poll
the leader key; when it is gone (the leader died and its lease expired, or it stepped down and
revoked it), the first to create it leads. A replica restarted under the same id takes its own
stale key over at once instead of waiting out the dead process's lease: replica ids must
therefore be unique among running replicas (the default, host name and listen port, is).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from fedplane.hub.etcdpb import rpc_pb2 as rpc
from fedplane.hub.metrics import UNWIRED, HubMetrics
from fedplane.hub.store import Fence, Store, _Txn
from fedplane.runtime import logs, tasks
from fedplane.runtime.version import __version__
from fedplane.v1 import hub_pb2

log = logs.get("fedplane.hub.leader")

LEADER = "leader"
FOLLOWER = "follower"
STOPPING = "stopping"


def leader_key(prefix: str) -> bytes:
    return f"{prefix}/leader".encode()


def replicas_prefix(prefix: str) -> bytes:
    """Each replica's record is this and its id."""
    return f"{prefix}/hubs/".encode()


def default_replica_id(listen: str) -> str:
    """Host name and listen port: unique among the replicas running on one network, and the
    same for a replica restarted in place. A replica on an ephemeral port (0) is named by its
    process id instead."""
    port = listen.rpartition(":")[2]
    return f"{socket.gethostname()}:{port if port != '0' else f'pid{os.getpid()}'}"


@dataclass(slots=True)
class Replica:
    """What a replica says about itself under <prefix>/hubs/<id> (JSON)."""

    id: str
    address: str
    role: str
    started: float
    role_since: float
    version: str = __version__

    def to_pb(self) -> hub_pb2.HubReplica:
        replica = hub_pb2.HubReplica(id=self.id, address=self.address, role=self.role, version=self.version)
        replica.started.FromNanoseconds(int(self.started * 1e9))
        replica.role_since.FromNanoseconds(int(self.role_since * 1e9))
        return replica

    @classmethod
    def parse(cls, blob: bytes) -> Replica | None:
        try:
            data = json.loads(blob)
            return cls(**{k: data[k] for k in ("id", "address", "role", "started", "role_since", "version")})
        except (ValueError, KeyError, TypeError):
            return None


def steps_down_at(renewal_sent: float, ttl: float) -> float:
    """When a leader whose lease was last renewed by a keepalive sent at `renewal_sent`
    (monotonic) must have stopped: a margin before etcd may expire the lease, so that it has
    stopped dispatching before another replica can start."""
    return renewal_sent + ttl - max(0.5, ttl / 5)


class Leadership:
    """Campaigns for the leader key and calls `on_lead(fence)` / `on_follow()` as the role changes.

    `on_follow` must stop every leader-only task at once (it is awaited before anything else
    happens); `on_lead` starts them.
    """

    metrics: HubMetrics = UNWIRED

    def __init__(
        self,
        store: Store,
        replica_id: str,
        address: str,
        ttl: float,
        on_lead: Callable[[Fence], Awaitable[None]],
        on_follow: Callable[[], Awaitable[None]],
    ) -> None:
        self.store = store
        self.client = store.client
        self.ttl = max(1, math.ceil(ttl))
        self.on_lead = on_lead
        self.on_follow = on_follow
        now = time.time()
        self.me = Replica(replica_id, address, FOLLOWER, now, now)
        self.fence: Fence | None = None
        self.lease_id = 0
        self._renewed = -math.inf  # monotonic time the last successful keepalive was sent
        self._lost = asyncio.Event()  # set when the lease or the fence is known to be gone
        self._started = False

    @property
    def leader_key(self) -> bytes:
        return leader_key(self.store.prefix)

    def replica_key(self, replica_id: str) -> bytes:
        return replicas_prefix(self.store.prefix) + replica_id.encode()

    @property
    def leading(self) -> bool:
        return self.fence is not None

    def fence_lost(self) -> None:
        """A write found the fence gone (etcd says another replica leads): stop leading now."""
        if self.fence is not None:
            log.warning("leader fence lost: another replica leads", replica=self.me.id)
            self._lost.set()

    async def run(self) -> None:
        """Hold a lease, campaign, lead while it lasts; start over after losing it."""
        while True:
            try:
                await self._one_lease()
            except asyncio.CancelledError:
                await self._follow("stopping")
                raise
            except Exception as exc:
                log.warning("leadership: etcd unavailable; retrying", error=" ".join(str(exc).split()))
            await self._follow("lease lost")
            await asyncio.sleep(min(1.0, self.ttl / 4))

    async def _one_lease(self) -> None:
        self.lease_id = await self.client.grant_lease(self.ttl)
        self._renewed = time.monotonic()
        self._lost.clear()
        keepalive = asyncio.create_task(self._keep_alive(), name="hub-leader-keepalive")
        try:
            await self._describe(FOLLOWER)
            while not self._lost.is_set():
                if self.fence is None:
                    await self._campaign()
                if self.fence is not None and time.monotonic() >= steps_down_at(self._renewed, self.ttl):
                    log.warning("leader lease not renewed in time; stepping down", replica=self.me.id)
                    return
                with_timeout = min(0.5, self.ttl / 8) if self.fence is None else 0.1
                await tasks.wait_at_most(self._lost, with_timeout)
        finally:
            keepalive.cancel()
            await tasks.cancel_all([keepalive])
            await self._follow("stepping down")
            lease_id, self.lease_id = self.lease_id, 0
            # Let the next leader start now rather than after the lease's TTL.
            await tasks.bounded(self.client.revoke_lease(lease_id), 2, "revoke leader lease")

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            sent = time.monotonic()
            try:
                ttl = await asyncio.wait_for(self.client.keep_alive_once(self.lease_id), self.ttl / 3)
            except Exception as exc:
                log.warning("leader lease keepalive failed", error=" ".join(str(exc).split()))
                if time.monotonic() >= self._renewed + self.ttl:
                    self._lost.set()
                    return
                continue
            if ttl <= 0:
                log.warning("lease expired in etcd", replica=self.me.id)
                self._lost.set()
                return
            self._renewed = sent

    async def _campaign(self) -> None:
        """Create the leader key if absent (or held by this replica's dead predecessor)."""
        key = self.leader_key
        found = await self.client.get(key)
        if found is not None:
            holder = Replica.parse(found.value)
            if holder is None or holder.id != self.me.id or int(found.lease) == self.lease_id:
                return
            # Our own id from an earlier process: it is dead (ids are unique among live replicas).
            txn = _Txn()
            txn.request.compare.add(
                target=rpc.Compare.CREATE, key=key, create_revision=int(found.create_revision)
            )
            txn.delete(key)
            await self.store._txn(txn)
            log.info("took over the leader key of this replica's previous process", replica=self.me.id)
        now = time.time()
        value = json.dumps({"id": self.me.id, "address": self.me.address, "since": now}).encode()
        txn = _Txn()
        txn.created_never(key)
        put = txn.request.success.add().request_put
        put.key, put.value, put.lease = key, value, self.lease_id
        response = await self.store._txn(txn)
        if not response.succeeded:
            return
        fence = Fence(key, int(response.header.revision))
        log.info("leading", replica=self.me.id, fencing_revision=fence.revision)
        self.fence = fence
        self.metrics.leader_changes.inc()
        try:
            await self.on_lead(fence)
        except Exception:
            log.exception("taking over as leader failed; stepping down")
            self._lost.set()
            return
        await self._describe(LEADER)

    async def _follow(self, why: str) -> None:
        if self.fence is None:
            return
        self.fence = None
        log.warning("stopped leading", replica=self.me.id, why=why)
        await self.on_follow()
        if self.lease_id:
            await tasks.bounded(self._describe(FOLLOWER), 2, "describe replica")

    async def _describe(self, role: str) -> None:
        if role != self.me.role:
            self.me.role, self.me.role_since = role, time.time()
        await self.client.put(
            self.replica_key(self.me.id), json.dumps(asdict(self.me)).encode(), lease=self.lease_id
        )


async def hub_status(store: Store, answered_by: str, ttl: float) -> hub_pb2.HubStatus:
    """Who leads and every live replica, read from etcd (any replica answers the same)."""
    status = hub_pb2.HubStatus(answered_by=answered_by, lease_seconds=max(1, math.ceil(ttl)))
    found = await store.client.get(leader_key(store.prefix))
    if found is not None:
        try:
            data: dict[str, Any] = json.loads(found.value)
            status.leader = str(data["id"])
            status.leader_since.FromNanoseconds(int(float(data["since"]) * 1e9))
        except (ValueError, KeyError, TypeError):
            status.leader = found.value.decode(errors="replace")
        status.fencing_revision = int(found.create_revision)
    for kv in await store.client.get_prefix(replicas_prefix(store.prefix)):
        replica = Replica.parse(kv.value)
        if replica is not None:
            status.replicas.append(replica.to_pb())
    status.replicas.sort(key=lambda r: r.id)
    return status
