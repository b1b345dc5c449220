"""The hub on etcd with TLS and etcd's own RBAC: the hub's client certificate names its etcd user,
whose role may use the hub's prefix and nothing else (docs/security.md, etcd)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedplane.hub.etcd import EtcdClient, EtcdCredentials, EtcdRefused
from fedplane.hub.server import HubServer
from fedplane.hub.store import Store
from fedplane.local import servers as embedded
from fedplane.local.etcdauth import SecuredEtcd, secure_etcd
from fedplane.local.pki import CertificateAuthority
from fedplane.runtime.config import ConfigError, EtcdTlsConfig, HubConfig, StartupError, check_hub
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, cpu_nodes, eventually, job_spec, sim_agent_config

LEASE = 2.0


@dataclasses.dataclass
class SecureEtcd:
    etcd: embedded.ServerProcess
    nats: embedded.ServerProcess
    ca: CertificateAuthority
    secured: SecuredEtcd

    def hub_config(self, **changes: Any) -> HubConfig:
        config = HubConfig(
            listen="127.0.0.1:0",
            implicit_queues=True,
            nats_url=f"nats://{self.nats.address}",
            cluster_unknown_after_seconds=3.0,
            batch_window_seconds=0.01,
            leader_lease_seconds=LEASE,
            **self.secured.hub_fields(),
        )
        return dataclasses.replace(config, **changes)

    def client(self, tls: EtcdTlsConfig) -> EtcdClient:
        endpoint = self.secured.endpoint
        return EtcdClient(endpoint, EtcdCredentials.load(endpoint, tls), timeout=3)


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureEtcd]:
    """etcd serving TLS and requiring client certificates, auth enabled, the hub's user holding
    a role with readwrite on /fedplane/ only; and nats-server."""
    ca = CertificateAuthority(tmp_path / "pki")
    etcd = embedded.start_etcd(tmp_path / "etcd", tls=embedded.EtcdTls.issue(ca))
    try:
        secured = secure_etcd(etcd, ca, prefix="/fedplane")
        nats = embedded.start_nats(tmp_path / "nats")
    except Exception:
        etcd.stop()
        raise
    try:
        yield SecureEtcd(etcd, nats, ca, secured)
    finally:
        nats.stop()
        etcd.stop()


@pytest.fixture
async def leader_a(secure: SecureEtcd) -> AsyncIterator[HubServer]:
    a = await HubServer.start(secure.hub_config(replica_id="a"))
    try:
        await eventually(_leads(a), 5, "replica a leading")
        yield a
    finally:
        await a.stop(grace=0.1)


def _leads(hub: HubServer) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return hub.hub.leadership.leading

    return check


async def test_hubs_with_a_prefix_role_elect_a_leader_hold_cluster_leases_run_jobs_and_hand_over(
    secure: SecureEtcd, leader_a: HubServer, tmp_path: Path
) -> None:
    fed = Federation(secure.etcd, secure.nats, tmp_path, secure.hub_config(replica_id="b"))
    b = await fed.start_hub()
    try:
        assert not b.hub.leadership.leading
        await fed.start_agent(sim_agent_config("c1", fed.nats_url, nodes=[cpu_nodes(2)]))
        await fed.wait_clusters_ready(["c1"])
        job = await fed.submit(job_spec("over-tls"))
        done = await fed.wait_state(job.id, {pb.SUCCEEDED})
        assert done.status.cluster == "c1"

        # The leader holds the cluster's liveness as a lease of its own, granted under auth.
        alive, _ = await b.hub.store.load_alive()
        assert [key.name for key in alive] == ["c1"] and alive[0].lease
        assert (await b.hub.store.client.lease_time_to_live(alive[0].lease)).TTL > 0

        # The leader stops; the follower takes over and places the next job.
        await leader_a.stop(grace=0.1)
        await eventually(_leads(b), LEASE + 3, "replica b leading")
        job = await fed.submit(job_spec("after-handover"))
        assert (await fed.wait_state(job.id, {pb.SUCCEEDED})).status.cluster == "c1"
    finally:
        await fed.close()


async def test_the_hubs_etcd_user_may_touch_its_prefix_only(secure: SecureEtcd) -> None:
    assert secure.secured.root is not None
    root_tls = EtcdTlsConfig(
        str(secure.ca.cert_file), str(secure.secured.root.cert_file), str(secure.secured.root.key_file)
    )
    root, hub = secure.client(root_tls), secure.client(secure.secured.tls)
    try:
        await root.put(b"/other/secret", b"not the hub's")
        await hub.put(b"/fedplane/probe", b"ok")
        assert (await hub.get(b"/fedplane/probe")) is not None
        # Outside /fedplane/, a prefix sharing its first letters included: no read, no write.
        for key in (b"/other/secret", b"/fedplane-staging/x", b"/fedplane"):
            with pytest.raises(EtcdRefused, match="permission denied"):
                await hub.get(key)
            with pytest.raises(EtcdRefused, match="permission denied"):
                await hub.put(key, b"x")
        with pytest.raises(EtcdRefused, match="permission denied"):
            await hub.compact(1)  # administration is root's
        watching = Store(hub, prefix="/other").watch_statuses(0)
        with pytest.raises(EtcdRefused, match="permission denied"):
            await anext(watching)
        assert (await root.get(b"/other/secret")) is not None
        assert (await root.get(b"/fedplane-staging/x")) is None
    finally:
        await root.close()
        await hub.close()


async def test_a_hub_that_etcd_does_not_let_in_is_refused_in_one_line(
    secure: SecureEtcd, tmp_path: Path
) -> None:
    ca_file = str(secure.ca.cert_file)
    stranger = CertificateAuthority(tmp_path / "stranger").issue("fedplane-hub", client=True)
    nobody = secure.ca.issue("nobody", client=True)  # a certificate etcd trusts, for a user with no role
    tls = secure.secured.tls
    cases: list[tuple[dict[str, Any], str]] = [
        ({"etcd_tls": EtcdTlsConfig(ca_file=ca_file)}, "gave no client certificate"),
        (
            {"etcd_tls": EtcdTlsConfig(ca_file, str(stranger.cert_file), str(stranger.key_file))},
            "not signed by a CA that etcd trusts",
        ),
        (
            {"etcd_endpoint": secure.etcd.address, "etcd_tls": EtcdTlsConfig()},
            "closed a plaintext connection",
        ),
        (
            {"etcd_tls": EtcdTlsConfig(ca_file, str(nobody.cert_file), str(nobody.key_file))},
            "access to /fedplane/: its role needs readwrite",
        ),
        ({"etcd_prefix": "/elsewhere"}, "access to /elsewhere/"),
        (
            {"etcd_tls": dataclasses.replace(tls, key_file=str(tmp_path / "missing.key"))},
            f"etcd_tls.key_file: cannot read {tmp_path / 'missing.key'}",
        ),
    ]
    for changes, expected in cases:
        with pytest.raises(StartupError) as refused:
            await HubServer.start(secure.hub_config(**changes))
        assert expected in str(refused.value), (changes, str(refused.value))
        assert "\n" not in str(refused.value)


async def test_password_authentication_renews_its_token_when_etcd_restarts(tmp_path: Path) -> None:
    """For an etcd that authenticates by password (TLS without client certificates)."""
    ca = CertificateAuthority(tmp_path / "pki")
    tls = embedded.EtcdTls.issue(ca, client_cert_auth=False)
    etcd = embedded.start_etcd(tmp_path / "etcd", tls=tls)
    try:
        secured = secure_etcd(etcd, ca, password_file=tmp_path / "etcd-password")
        assert secured.username == "fedplane-hub"
        only_ca = EtcdTlsConfig(ca_file=str(ca.cert_file))
        wrong = tmp_path / "wrong-password"
        wrong.write_text("guess\n")
        with pytest.raises(StartupError, match="wrong user name or password"):
            await Store.connect(
                secured.endpoint,
                credentials=EtcdCredentials.load(secured.endpoint, only_ca, secured.username, str(wrong)),
            )
        store = await Store.connect(
            secured.endpoint,
            credentials=EtcdCredentials.load(
                secured.endpoint, only_ca, secured.username, secured.password_file
            ),
        )
        try:
            assert await store.create_cluster("c1", b"first")
            etcd.stop()  # etcd forgets its tokens
            etcd = embedded.start_etcd(tmp_path / "etcd", port=etcd.port, tls=tls)

            async def written() -> bool:
                try:
                    await store.put_cluster("c1", b"after restart")
                except Exception:
                    return False
                return True

            await eventually(written, 10, "a write with a renewed token")
            assert (await store.load_clusters()) == {"c1": b"after restart"}
        finally:
            await store.close()
    finally:
        etcd.stop()


def test_etcd_settings_that_cannot_work_are_refused_at_load() -> None:
    for changes, expected in [
        ({"etcd_tls": EtcdTlsConfig(cert_file="hub.pem")}, "etcd_tls: cert_file and key_file go together"),
        (
            {"etcd_endpoint": "http://127.0.0.1:2379", "etcd_tls": EtcdTlsConfig(ca_file="ca.pem")},
            "etcd_endpoint: http:// is plaintext",
        ),
        ({"etcd_username": "hub"}, "etcd_username and etcd_password_file go together"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            check_hub(dataclasses.replace(HubConfig(), **changes))  # type: ignore[arg-type]
