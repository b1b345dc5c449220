"""Agents' identities on NATS: admission by key, per-cluster permissions, approval and removal.

Each attack here worked before admission existed: a stranger on NATS announced a cluster,
overwrote another cluster's inventory, turned another cluster's job into SUCCEEDED, or sent
an agent a command. Real etcd, nats-server with auth callout, and the hub answering it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats
import pytest

from fedplane.local import servers as embedded
from fedplane.local.natsauth import NatsIdentities
from fedplane.local.pki import CertificateAuthority
from fedplane.runtime import bus, natsjwt
from fedplane.runtime.config import AgentConfig, DisconnectConfig, NatsTlsConfig
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import hub_pb2
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, cpu_nodes, eventually, hub_config, job_spec, sim_agent_config


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Federation]:
    """A federation whose bootstrap token needs an administrator's approval, NATS over TLS."""
    identities = NatsIdentities.create(tmp_path / "identities", auto_approve=False)
    ca = CertificateAuthority(tmp_path / "pki")
    etcd = embedded.start_etcd(tmp_path / "etcd")
    nats_server = embedded.start_nats(tmp_path / "nats", auth=identities, tls=ca.issue("nats", server=True))
    config = hub_config(
        etcd,
        nats_server,
        disconnect=DisconnectConfig(requeue_after_seconds=0.0),
        nats_tls=NatsTlsConfig(ca_file=str(ca.cert_file)),
    )
    fed = Federation(etcd, nats_server, tmp_path, config)
    await fed.start_hub()
    try:
        yield fed
    finally:
        await fed.close()
        nats_server.stop()
        etcd.stop()


def agent_config(fed: Federation, name: str) -> AgentConfig:
    config = sim_agent_config(
        name,
        fed.nats_url,
        nodes=[cpu_nodes(2)],
        labels={"site": name},
        state_dir=str(fed.tmp / "agents" / name),
        duration=30,
    )
    assert fed.nats.identities is not None
    config.nats_tls = NatsTlsConfig(ca_file=fed.hub_config.nats_tls.ca_file)
    return fed.nats.identities.agent_config(config)


def agent_key(fed: Federation, name: str) -> str:
    return natsjwt.public_key((fed.tmp / "agents" / name / "nats.nk").read_bytes().strip())


async def cluster(fed: Federation, name: str) -> pb.Cluster:
    found: pb.Cluster = await fed.clusters.GetCluster(hub_pb2.GetClusterRequest(name=name))
    return found


async def approved(fed: Federation, name: str) -> None:
    """Start `name`'s agent, see it ask to join, and approve it."""
    starting = asyncio.create_task(fed.start_agent(agent_config(fed, name)))

    async def asked() -> bool:
        listed = await fed.clusters.ListClusters(hub_pb2.ListClustersRequest())
        return any(c.name == name and c.requested_key for c in listed.clusters)

    await eventually(asked, 10, f"{name} asking to join")
    await fed.clusters.ApproveCluster(
        hub_pb2.ApproveClusterRequest(name=name, public_key=agent_key(fed, name))
    )
    await asyncio.wait_for(starting, 20)
    await fed.wait_clusters_ready([name])


async def connect_as(fed: Federation, name: str, errors: list[str], token: str = "") -> bus.Connection:
    """A client holding `name`'s agent key (what a compromised or impersonating agent has)."""
    seed = natsjwt.load_or_create_seed(fed.tmp / "agents" / name / "nats.nk")

    async def error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(
        fed.nats_url,
        name=bus.agent_connection_name(name),
        nkeys_seed_str=seed.decode(),
        token=token or None,
        inbox_prefix=bus.agent_inbox_prefix(name),
        tls=bus.tls_context(fed.hub_config.nats_tls.ca_file),
        error_cb=error,
        allow_reconnect=False,
    )


async def test_an_agent_takes_part_only_once_an_administrator_approves_its_key(secured: Federation) -> None:
    fed = secured
    starting = asyncio.create_task(fed.start_agent(agent_config(fed, "c1")))

    async def asked() -> bool:
        listed = await fed.clusters.ListClusters(hub_pb2.ListClustersRequest())
        return any(c.name == "c1" and c.admission == pb.ADMISSION_PENDING for c in listed.clusters)

    await eventually(asked, 10, "c1 asking to join")
    record = await cluster(fed, "c1")
    assert record.requested_key == agent_key(fed, "c1")
    await asyncio.sleep(1.0)
    assert not starting.done(), "an agent waiting for approval must not be connected"
    assert (await cluster(fed, "c1")).health != pb.READY

    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await fed.clusters.ApproveCluster(
            hub_pb2.ApproveClusterRequest(name="c1", public_key=natsjwt.public_key(natsjwt.new_seed()))
        )
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    approved_record = await fed.clusters.ApproveCluster(hub_pb2.ApproveClusterRequest(name="c1"))
    assert approved_record.admission == pb.ADMISSION_APPROVED
    assert approved_record.public_key == agent_key(fed, "c1")

    await asyncio.wait_for(starting, 20)
    await fed.wait_clusters_ready(["c1"])
    job = await fed.submit(job_spec("after-approval", duration="0.2s"))
    done = await fed.wait_state(job.id, {pb.SUCCEEDED})
    assert done.status.cluster == "c1"


async def test_a_stranger_cannot_connect_and_leaves_nothing_behind(secured: Federation) -> None:
    fed = secured
    with pytest.raises(nats.errors.Error):
        await nats.connect(
            fed.nats_url,
            tls=bus.tls_context(fed.hub_config.nats_tls.ca_file),
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )
    errors: list[str] = []
    with pytest.raises(nats.errors.Error):
        # A key of its own, but no bootstrap token: refused, and no request recorded.
        await connect_as(fed, "ghost", errors)
    with pytest.raises(nats.errors.Error):
        await connect_as(fed, "ghost", errors, token="not-the-token")
    listed = await fed.clusters.ListClusters(hub_pb2.ListClustersRequest())
    assert [c.name for c in listed.clusters] == []


async def test_an_admitted_agent_can_speak_only_for_its_own_cluster(secured: Federation) -> None:
    fed = secured
    await approved(fed, "a")
    await approved(fed, "b")
    job = await fed.submit(job_spec("on-b", selector={"site": "b"}, duration="30s"))
    running = await fed.wait_state(job.id, {pb.RUNNING})
    assert running.status.cluster == "b"
    nodes_before = len((await cluster(fed, "b")).nodes)

    errors: list[str] = []
    nc = await connect_as(fed, "a", errors)
    try:
        forged = agent_pb.StatusUpdate(
            job_id=job.id, cluster="b", generation=running.status.generation, state=pb.SUCCEEDED
        )
        batch = agent_pb.StatusBatch(updates=[forged]).SerializeToString()
        await nc.publish(bus.subject("status", "b"), batch, headers={bus.MSG_TYPE_HEADER: "StatusBatch"})
        fake = agent_pb.Inventory(cluster="b", nodes=[pb.Node(name=f"fake-{i}") for i in range(100)])
        await nc.publish(bus.subject("inventory", "b"), fake.SerializeToString())
        await nc.publish(
            bus.subject("heartbeat", "ghost"), agent_pb.Heartbeat(cluster="ghost").SerializeToString()
        )
        command = agent_pb.DispatchCommand(job_id=job.id, generation=99)
        await nc.publish(bus.subject("cmd", "b"), command.SerializeToString())
        await nc.publish(bus.subject("cmd", "a"), command.SerializeToString())
        await nc.subscribe(bus.deliver_subject("b"))
        await nc.subscribe(f"{bus.PREFIX}.>")
        await nc.flush()
        await asyncio.sleep(0.5)
    finally:
        await nc.close()

    violations = [e for e in errors if "permissions violation" in e.lower()]
    assert len(violations) == 7, errors
    await asyncio.sleep(0.5)
    assert (await fed.get(job.id)).status.state == pb.RUNNING
    assert len((await cluster(fed, "b")).nodes) == nodes_before
    listed = await fed.clusters.ListClusters(hub_pb2.ListClustersRequest())
    assert "ghost" not in {c.name for c in listed.clusters}


async def test_a_removed_cluster_loses_its_jobs_and_cannot_come_back(secured: Federation) -> None:
    fed = secured
    await approved(fed, "a")
    await approved(fed, "b")
    job = await fed.submit(job_spec("moved", selector={}, duration="30s"))
    running = await fed.wait_state(job.id, {pb.RUNNING})
    doomed = running.status.cluster
    other = "b" if doomed == "a" else "a"

    removed = await fed.clusters.RemoveCluster(
        hub_pb2.RemoveClusterRequest(name=doomed, reason="decommissioned")
    )
    assert removed.jobs_affected == 1
    record = await cluster(fed, doomed)
    assert record.admission == pb.ADMISSION_REMOVED and record.cordoned and not record.public_key

    async def moved() -> bool:
        current = await fed.get(job.id)
        return current.status.state == pb.RUNNING and current.status.cluster == other

    await eventually(moved, 20, f"job moved from {doomed} to {other}")

    # Its live connection was closed, and its agent cannot get back in.
    agent_nc = fed.agents[doomed].nc
    assert agent_nc is not None

    async def cut_off() -> bool:
        return not agent_nc.is_connected

    await eventually(cut_off, 5, f"{doomed}'s connection closed")
    await asyncio.sleep(1.5)
    assert not agent_nc.is_connected
    await fed.stop_agent(doomed)
    errors: list[str] = []
    assert fed.nats.identities is not None
    with pytest.raises(nats.errors.Error):
        await connect_as(fed, doomed, errors, token=fed.nats.identities.bootstrap_token)
    record = await cluster(fed, doomed)
    assert record.admission == pb.ADMISSION_REMOVED
    assert record.requested_key == agent_key(fed, doomed), "it may only ask again, to be approved anew"


async def test_an_agent_with_a_new_key_waits_for_approval_of_that_key(secured: Federation) -> None:
    fed = secured
    await approved(fed, "a")
    old_key = agent_key(fed, "a")
    await fed.stop_agent("a")
    (fed.tmp / "agents" / "a" / "nats.nk").unlink()  # the site lost its key
    errors: list[str] = []
    assert fed.nats.identities is not None
    with pytest.raises(nats.errors.Error):
        await connect_as(fed, "a", errors, token=fed.nats.identities.bootstrap_token)
    record = await cluster(fed, "a")
    assert record.public_key == old_key and record.requested_key == agent_key(fed, "a")
    await fed.clusters.ApproveCluster(hub_pb2.ApproveClusterRequest(name="a", public_key=agent_key(fed, "a")))
    nc = await connect_as(fed, "a", errors)
    await nc.close()


async def test_an_edge_sites_leaf_node_admits_its_own_agents_with_their_clusters_permissions(
    tmp_path: Path,
) -> None:
    """The leaf authenticates as the site; its agents are its own static users, each held to
    its own cluster's subjects there, since a leaf connection does not pass the hub's callout.
    The hub holds the site's link itself to the site's clusters, so that a site whose
    nats-server admits anyone still cannot forge a command or another cluster's status."""
    identities = NatsIdentities.create(tmp_path / "identities")
    edge_seed = natsjwt.new_seed()
    started = [
        embedded.start_nats(tmp_path / "nats", auth=identities, leafnode_port=0, edge_clusters=["edge0"])
    ]
    hub_nats = started[0]
    try:
        started.append(
            embedded.start_nats_leaf(
                tmp_path / "wrong-leaf", hub_nats.leafnode_address, password="not-the-password", agents={}
            )
        )
        leaf = embedded.start_nats_leaf(
            tmp_path / "leaf",
            hub_nats.leafnode_address,
            password=identities.leaf_password,
            agents={"edge0": natsjwt.public_key(edge_seed)},
        )
        started.append(leaf)
        rogue_site = embedded.start_nats_leaf(
            tmp_path / "rogue-leaf", hub_nats.leafnode_address, password=identities.leaf_password
        )
        started.append(rogue_site)
        hub_seed = identities.hub_seed_file.read_bytes().strip()
        hub = await bus.connect(
            f"nats://{hub_nats.address}", "hub", credentials=bus.Credentials(seed=hub_seed)
        )
        heard: list[str] = []

        async def hear(msg: bus.Message) -> None:
            heard.append(msg.subject)

        await hub.subscribe(f"{bus.PREFIX}.>", cb=hear)
        await hub.flush()
        errors: list[str] = []

        async def error(exc: Exception) -> None:
            errors.append(str(exc))

        agent = await nats.connect(
            f"nats://{leaf.address}",
            name=bus.agent_connection_name("edge0"),
            nkeys_seed_str=edge_seed.decode(),
            error_cb=error,
            allow_reconnect=False,
        )
        with pytest.raises(nats.errors.Error):
            await nats.connect(
                f"nats://{leaf.address}", nkeys_seed_str=natsjwt.new_seed().decode(), allow_reconnect=False
            )

        async def linked() -> bool:
            await agent.publish(bus.subject("heartbeat", "edge0"), b"beat")
            await agent.flush()
            await asyncio.sleep(0.1)
            return bus.subject("heartbeat", "edge0") in heard

        await eventually(linked, 10, "the leaf linked to the hub's nats-server")
        await agent.publish(bus.subject("cmd", "edge0"), b"forged")
        await agent.publish(bus.subject("status", "other"), b"forged")
        await agent.flush()
        await asyncio.sleep(0.5)
        assert len([e for e in errors if "permissions violation" in e.lower()]) == 2, errors
        assert bus.subject("cmd", "edge0") not in heard and bus.subject("status", "other") not in heard
        assert "authentication error" in hub_nats.log_path.read_text().lower(), "the wrong password links"
        # A site's nats-server that admits anyone: its link carries its clusters' reports only.
        rogue = await nats.connect(f"nats://{rogue_site.address}", allow_reconnect=False)

        async def site_linked() -> bool:
            for kind, cluster in [
                ("cmd", "edge0"),
                ("status", "other"),
                ("inventory", "other"),
                ("status", "edge0"),
            ]:
                await rogue.publish(bus.subject(kind, cluster), b"forged")
            await rogue.flush()
            await asyncio.sleep(0.1)
            return bus.subject("status", "edge0") in heard

        await eventually(site_linked, 10, "the rogue site linked, carrying its own cluster's status")
        forged = {
            bus.subject("cmd", "edge0"),
            bus.subject("status", "other"),
            bus.subject("inventory", "other"),
        }
        assert not forged & set(heard), heard
        await rogue.close()
        await agent.close()
        await hub.close()
    finally:
        for server in started:
            server.stop()
