"""TLS on the hub's gRPC port, and mutual TLS: certificates made by openssl for each test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedplane.client.sdk import Tls
from fedplane.hub.server import HubServer
from fedplane.local import servers as embedded
from fedplane.runtime.config import ConfigError, HubConfig, StartupError, TlsConfig, check_hub
from tests.federation import connects

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(name: str, ca: Path, extensions: str, cwd: Path) -> None:
    _openssl("req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca / "ca.pem"), "-CAkey", str(ca / "ca.key"),
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a hub certificate for 127.0.0.1, a client certificate from the same CA, and an
    impostor CA that signed nothing here."""
    _openssl(
        "req",
        "-x509",
        *EC,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=ca",
        cwd=tmp_path,
    )
    _signed("hub", tmp_path, "subjectAltName=IP:127.0.0.1,DNS:localhost\n", tmp_path)
    _signed("client", tmp_path, "extendedKeyUsage=clientAuth\n", tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _openssl(
        "req",
        "-x509",
        *EC,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=other",
        cwd=other,
    )
    return tmp_path


def _config(servers: tuple[embedded.ServerProcess, embedded.ServerProcess], tls: TlsConfig) -> HubConfig:
    etcd, nats = servers
    assert nats.identities is not None
    return nats.identities.hub_config(
        HubConfig(
            listen="127.0.0.1:0", etcd_endpoint=etcd.address, nats_url=f"nats://{nats.address}", tls=tls
        )
    )


async def test_a_hub_with_tls_answers_only_clients_that_trust_its_certificate(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess], pki: Path
) -> None:
    tls = TlsConfig(cert_file=str(pki / "hub.pem"), key_file=str(pki / "hub.key"))
    hub = await HubServer.start(_config(servers, tls))
    try:
        assert await connects(f"127.0.0.1:{hub.port}", Tls(ca_file=str(pki / "ca.pem")))
        assert not await connects(f"127.0.0.1:{hub.port}", None)  # plaintext
        assert not await connects(f"127.0.0.1:{hub.port}", Tls(ca_file=str(pki / "other" / "ca.pem")))
    finally:
        await hub.stop(grace=0.1)


async def test_mutual_tls_refuses_a_client_without_a_certificate_from_the_ca(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess], pki: Path
) -> None:
    tls = TlsConfig(
        cert_file=str(pki / "hub.pem"),
        key_file=str(pki / "hub.key"),
        client_ca_file=str(pki / "ca.pem"),
        require_client_cert=True,
    )
    hub = await HubServer.start(_config(servers, tls))
    ca = str(pki / "ca.pem")
    try:
        assert not await connects(f"127.0.0.1:{hub.port}", Tls(ca_file=ca))
        assert await connects(
            f"127.0.0.1:{hub.port}", Tls(ca, str(pki / "client.pem"), str(pki / "client.key"))
        )
        # A certificate its holder signed itself is no client certificate.
        impostor = Tls(ca, str(pki / "other" / "ca.pem"), str(pki / "other" / "ca.key"))
        assert not await connects(f"127.0.0.1:{hub.port}", impostor)
    finally:
        await hub.stop(grace=0.1)


def test_tls_settings_that_cannot_work_are_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        check_hub(HubConfig(tls=TlsConfig(cert_file="hub.pem")))
    with pytest.raises(ConfigError, match="require_client_cert: needs client_ca_file"):
        check_hub(HubConfig(tls=TlsConfig(cert_file="a", key_file="b", require_client_cert=True)))
    with pytest.raises(ConfigError, match="client certificates need TLS itself"):
        check_hub(HubConfig(tls=TlsConfig(client_ca_file="ca.pem")))


async def test_a_missing_certificate_file_stops_the_hub_before_it_connects(tmp_path: Path) -> None:
    # Nothing listens on these endpoints: the refusal must come before any connection.
    config = HubConfig(
        listen="127.0.0.1:0",
        etcd_endpoint="127.0.0.1:1",
        nats_url="nats://127.0.0.1:1",
        tls=TlsConfig(cert_file=str(tmp_path / "missing.pem"), key_file=str(tmp_path / "missing.key")),
    )
    with pytest.raises(StartupError, match=r"tls: cannot read .*missing"):
        await HubServer.start(config)
