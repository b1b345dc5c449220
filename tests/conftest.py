from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedplane.client.sdk import Tls
from fedplane.hub.identity import issue_token
from fedplane.local import servers as embedded
from fedplane.local.natsauth import NatsIdentities
from fedplane.local.pki import CertificateAuthority
from fedplane.runtime import logs
from fedplane.runtime.config import TlsConfig
from tests.federation import Federation, hub_config

logs.configure("warning", "console")
# The CLI reads a context file from the user's configuration directory, and `fedplane up` writes
# one there: the tests use a directory of their own, never the user's.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="fedplane-tests-config-")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[embedded.ServerProcess, embedded.ServerProcess]]:
    """Real etcd and nats-server on free loopback ports, data under the test's tmp dir."""
    etcd = embedded.start_etcd(tmp_path / "etcd")
    try:
        # Secure as production runs: the hub's auth callout admits the agents by key.
        nats = embedded.start_nats(tmp_path / "nats", auth=NatsIdentities.create(tmp_path / "identities"))
    except Exception:
        etcd.stop()
        raise
    try:
        yield etcd, nats
    finally:
        nats.stop()
        etcd.stop()


@pytest.fixture
async def federation(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess], tmp_path: Path
) -> AsyncIterator[Federation]:
    etcd, nats = servers
    config = hub_config(etcd, nats)
    # Secure as production runs: TLS on the gRPC port, and callers with a token (an admin's).
    ca = CertificateAuthority(tmp_path / "pki")
    hub_cert = ca.issue("hub", server=True)
    config.tls = TlsConfig(cert_file=str(hub_cert.cert_file), key_file=str(hub_cert.key_file))
    config.auth.tokens_file = str(tmp_path / "tokens.yaml")
    token = issue_token(config.auth.tokens_file, "test-admin", ["admin"])
    fed = Federation(etcd, nats, tmp_path, config, tls=Tls(ca_file=str(ca.cert_file)), token=token)
    await fed.start_hub()
    try:
        yield fed
    finally:
        await fed.close()


@pytest.fixture(scope="session")
def span_exporter() -> Any:
    """Every span of the test process, for asserting that traces cross process boundaries."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from fedplane.runtime import telemetry

    exporter = InMemorySpanExporter()
    telemetry.configure("fedplane-tests", "none", extra_exporter=exporter)
    return exporter
