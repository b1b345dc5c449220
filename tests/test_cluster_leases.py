"""Cluster leases on a real etcd: alive keys bound to leases, expiry when heartbeats stop, a new
leader that knows from etcd alone, and a batch of leases renewed over one keepalive stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fedplane.core import health as hl
from fedplane.core.health import HealthThresholds
from fedplane.hub.clock import SYSTEM
from fedplane.hub.clusters import ClusterRegistry
from fedplane.hub.liveness import AliveRecord, Liveness
from fedplane.hub.store import AliveKey, Fence, FenceLost, LeaseGrant, Store
from fedplane.local import servers as embedded
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb
from tests.federation import eventually

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[embedded.ServerProcess]:
    server = embedded.start_etcd(tmp_path / "etcd")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def store(etcd: embedded.ServerProcess) -> AsyncIterator[Store]:
    connected = await Store.connect(etcd.address)
    try:
        yield connected
    finally:
        await connected.close()


def heartbeat(registry: ClusterRegistry, *clusters: str) -> None:
    """Heartbeats as the reports driver records them."""
    for name in clusters:
        state, _ = registry.get_or_add(name)
        state.heartbeat = agent_pb.Heartbeat(cluster=name, agent_id=f"{name}-agent")
        state.last_seen = time.time()
        registry.heard(name)
    for name in clusters:
        registry.clusters[name].apply_inventory(agent_pb.Inventory(cluster=name))


async def alive_in_etcd(store: Store) -> dict[str, tuple[int, bytes]]:
    """What `etcdctl get --prefix /fedplane/alive/` shows: each alive key's lease and value."""
    prefix = store.alive_prefix
    return {
        kv.key[len(prefix) :].decode(): (int(kv.lease), kv.value)
        for kv in await store.client.get_prefix(prefix)
    }


async def lease_ttls(store: Store, leases: list[int]) -> list[tuple[int, int]]:
    """(remaining TTL, granted TTL) of each lease, from etcd's LeaseTimeToLive."""
    infos = await asyncio.gather(*(store.client.lease_time_to_live(lease) for lease in leases))
    return [(int(info.TTL), int(info.grantedTTL)) for info in infos]


async def all_leases(store: Store) -> set[int]:
    """What `etcdctl lease list` shows."""
    return set(await store.client.leases())


async def stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_alive_keys_are_leased_and_go_when_heartbeats_stop(store: Store) -> None:
    registry = ClusterRegistry(HealthThresholds(1.0, 2.0, 1.0, 2.0))
    liveness = Liveness(registry, store, SYSTEM, "hub-a")
    tasks = [asyncio.create_task(liveness.run()), asyncio.create_task(liveness.lead())]
    try:
        heartbeat(registry, "c1", "c2")

        async def both_alive() -> bool:
            return set(await alive_in_etcd(store)) == {"c1", "c2"}

        await eventually(both_alive, 5, "both alive keys")
        alive = await alive_in_etcd(store)
        leases = [alive["c1"][0], alive["c2"][0]]
        assert len(set(leases)) == 2 and 0 not in leases  # a lease of its own each
        assert set(leases) <= await all_leases(store)
        assert [granted for _, granted in await lease_ttls(store, leases)] == [2, 2]
        record = AliveRecord.parse(alive["c1"][1])
        assert record is not None and (record.cluster, record.agent_id, record.keeper) == (
            "c1",
            "c1-agent",
            "hub-a",
        )

        # c1 keeps heartbeating, c2 stops: etcd expires c2's lease and deletes its key.
        stopped = time.time()
        while time.time() - stopped < 3.5:
            heartbeat(registry, "c1")
            await asyncio.sleep(0.2)
            if "c2" not in await alive_in_etcd(store):
                break
        assert set(await alive_in_etcd(store)) == {"c1"}
        assert leases[1] not in await all_leases(store)

        async def c2_lost() -> bool:
            return registry.health("c2", time.time()).state == hl.LOST

        await eventually(c2_lost, 2, "c2 marked lost from the watch")
        lost_since = registry.clusters["c2"].lost_since
        assert lost_since is not None and stopped + 1.5 <= lost_since <= time.time()
        assert registry.health("c1", time.time()).state == hl.READY
        assert registry.clusters["c1"].lost_since is None
    finally:
        await stop(*tasks)


async def test_a_new_leader_sees_the_alive_clusters_in_etcd_and_adopts_their_leases(store: Store) -> None:
    thresholds = HealthThresholds(2.0, 10.0, 2.0, 10.0)
    old_registry = ClusterRegistry(thresholds)
    old = Liveness(old_registry, store, SYSTEM, "hub-a")
    tasks = [asyncio.create_task(old.run()), asyncio.create_task(old.lead())]
    heartbeat(old_registry, "c1", "c2")

    async def both_alive() -> bool:
        return set(await alive_in_etcd(store)) == {"c1", "c2"}

    await eventually(both_alive, 5, "both alive keys")
    await stop(*tasks)  # the old leader dies (its keys live on in etcd)
    before = await alive_in_etcd(store)

    # A new replica: a registry of its own, knowing nothing but what etcd says.
    registry = ClusterRegistry(thresholds)
    new = Liveness(registry, store, SYSTEM, "hub-b")
    tasks = [asyncio.create_task(new.run())]
    try:
        await asyncio.wait_for(new.loaded.wait(), 5)
        assert {name: key.lease for name, key in new.alive.items()} == {n: v[0] for n, v in before.items()}
        assert registry.clusters["c1"].lost_since is None and registry.clusters["c2"].lost_since is None

        await asyncio.sleep(1.1)  # let the leases age
        assert all(ttl <= 9 for ttl, _ in await lease_ttls(store, [before["c1"][0]]))
        heartbeat(registry, "c1")
        tasks.append(asyncio.create_task(new.lead()))
        await asyncio.wait_for(new.settled.wait(), 5)

        async def adopted() -> bool:
            record = AliveRecord.parse((await alive_in_etcd(store))["c1"][1])
            return record is not None and record.keeper == "hub-b"

        await eventually(adopted, 5, "c1's key rewritten by its new keeper")
        after = await alive_in_etcd(store)
        assert after["c1"][0] == before["c1"][0]  # the same lease, renewed
        [(ttl, granted)] = await lease_ttls(store, [after["c1"][0]])
        assert granted == 10 and ttl >= 9
    finally:
        await stop(*tasks)


async def test_five_hundred_leases_are_renewed_over_one_stream(store: Store) -> None:
    names = [f"c{i:03d}" for i in range(500)]
    record = AliveRecord("c", "a", 0.0, "hub-a", 10).encode()
    keys = await store.grant_cluster_leases([LeaseGrant(name, 10, record) for name in names], Fence())
    assert all(isinstance(key, AliveKey) for key in keys)
    leases = [key.lease for key in keys if key is not None]
    assert len(set(leases)) == 500 and len(await alive_in_etcd(store)) == 500

    await asyncio.sleep(2.1)
    aged = await lease_ttls(store, leases)
    assert max(ttl for ttl, _ in aged) <= 8

    async with store.cluster_lease_renewals() as renewals:
        began = time.perf_counter()
        answered = await renewals.renew(leases)
        took = time.perf_counter() - began
        assert answered == dict.fromkeys(leases, 10)
        refreshed = await lease_ttls(store, leases)
        assert min(ttl for ttl, _ in refreshed) >= 9
        # A second round, and a lease that is gone, on the same stream.
        answered = await renewals.renew([*leases[:10], 0x7FFF_FFFF])
        assert answered == {**dict.fromkeys(leases[:10], 10), 0x7FFF_FFFF: 0}
        assert renewals.streams == 1 and renewals.sent == 511
    print(f"renewed 500 leases in {took * 1e3:.0f} ms over one stream")
    assert took < 2.0


async def test_a_deposed_leader_binds_no_key_and_leaves_no_lease(store: Store) -> None:
    stale = Fence(f"{store.prefix}/leader".encode(), 12345)  # no such leader key
    with pytest.raises(FenceLost):
        await store.grant_cluster_leases([LeaseGrant("c1", 10, b"{}")], stale)
    assert await alive_in_etcd(store) == {}
    assert await all_leases(store) == set()
    with pytest.raises(FenceLost):
        await store.update_cluster("c1", lambda _: pb.Cluster(name="c1").SerializeToString(), stale)
    assert await store.load_clusters() == {}
