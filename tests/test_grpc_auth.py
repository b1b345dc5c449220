"""Authentication and authorization on the hub's gRPC API, against real etcd, nats-server and
hub: bearer tokens from a token file, OIDC JWTs checked against a JWKS file, client
certificates under mutual TLS; roles and queue grants; caller-scoped idempotency keys; the
audit log; and the CLI through a context file."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from fedplane.client import context as context_file
from fedplane.client.cli import app
from fedplane.client.sdk import FedplaneClient, FedplaneError, Tls
from fedplane.hub import authz, identity
from fedplane.hub.server import HubServer
from fedplane.local import servers as embedded
from fedplane.local.pki import CertificateAuthority
from fedplane.runtime import logs
from fedplane.runtime.config import (
    AuthConfig,
    ConfigError,
    GrantConfig,
    HubConfig,
    OidcConfig,
    StartupError,
    TlsConfig,
    check_hub,
)
from fedplane.v1 import hub_pb2, hub_pb2_grpc
from fedplane.v1 import types_pb2 as pb
from tests.federation import job_spec

Servers = tuple[embedded.ServerProcess, embedded.ServerProcess]
ISSUER = "https://idp.example.test"
AUDIENCE = "fedplane"
CODE = grpc.StatusCode


@dataclass
class Realm:
    """A hub with TLS, a token file and OIDC, and the credentials of its users."""

    hub: HubServer
    ca_file: str
    tokens: dict[str, str]
    oidc_key: ec.EllipticCurvePrivateKey
    jwks_file: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.hub.port}"

    def client(self, token: str = "", **tls: str) -> FedplaneClient:
        return FedplaneClient(
            self.address, tls=Tls(self.ca_file, **tls), token=token, timeout=5, retry_attempts=1
        )

    def as_user(self, name: str) -> FedplaneClient:
        return self.client(self.tokens[name])

    def jwt(self, key: ec.EllipticCurvePrivateKey | None = None, kid: str = "k1", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "iat": now, "sub": "u-123"}
        body |= {"email": "carol@example.test", "groups": ["team-a"]} | claims
        return jwt.encode(body, key or self.oidc_key, algorithm="ES256", headers={"kid": kid})


def _jwks(path: Path, keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    entries = []
    for kid, key in keys.items():
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        entries.append(jwk | {"kid": kid, "use": "sig", "alg": "ES256"})
    path.write_text(json.dumps({"keys": entries}))


def _hub_config(servers: Servers, **settings: Any) -> HubConfig:
    etcd, nats = servers
    config = HubConfig(
        listen="127.0.0.1:0",
        etcd_endpoint=etcd.address,
        nats_url=f"nats://{nats.address}",
        implicit_queues=True,
        **settings,
    )
    return nats.identities.hub_config(config) if nats.identities is not None else config


@pytest.fixture
def pki(tmp_path: Path) -> CertificateAuthority:
    ca = CertificateAuthority(tmp_path / "pki", days=1)
    ca.issue("hub", server=True)
    return ca


@pytest.fixture
async def realm(servers: Servers, tmp_path: Path, pki: CertificateAuthority) -> AsyncIterator[Realm]:
    tokens_file = tmp_path / "tokens.yaml"
    tokens = {
        "root": identity.issue_token(tokens_file, "root", ["admin"]),
        "alice": identity.issue_token(tokens_file, "alice", ["submitter"], ["team-a"]),
        "bob": identity.issue_token(tokens_file, "bob", ["submitter"], ["team-b"]),
        "victor": identity.issue_token(tokens_file, "victor", ["viewer"], ["team-a"]),
        "nobody": identity.issue_token(tokens_file, "nobody", []),
    }
    oidc_key = ec.generate_private_key(ec.SECP256R1())
    jwks_file = tmp_path / "jwks.json"
    _jwks(jwks_file, {"k1": oidc_key})
    auth = AuthConfig(
        tokens_file=str(tokens_file),
        oidc=OidcConfig(
            issuer=ISSUER,
            audience=AUDIENCE,
            jwks_file=str(jwks_file),
            username_claim="email",
            leeway_seconds=0,
        ),
        grants=[GrantConfig(role="submitter", groups=["team-a"], queues=["team-a"])],
    )
    tls = TlsConfig(cert_file=str(pki.directory / "hub.pem"), key_file=str(pki.directory / "hub.key"))
    hub = await HubServer.start(check_hub(_hub_config(servers, tls=tls, auth=auth)))
    try:
        yield Realm(hub, str(pki.cert_file), tokens, oidc_key, jwks_file)
    finally:
        await hub.stop(grace=0.1)


AuditLines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def audit_lines() -> Iterator[AuditLines]:
    """Reads the audit lines the hub has written since the test began (parsed JSON)."""
    out = io.StringIO()
    logs.configure("info", "json", file=out)

    def read() -> list[dict[str, Any]]:
        return [json.loads(line) for line in out.getvalue().splitlines() if '"fedplane.audit"' in line]

    try:
        yield read
    finally:
        logs.configure("warning", "console")  # as tests/conftest.py sets it


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, text: str) -> None:
    path.write_text(text)


async def _refused(call: Any, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(FedplaneError) as raised:
        await call
    assert raised.value.code == code, raised.value
    for word in words:
        assert word in raised.value.message, raised.value.message
    return raised.value.message


# ------------------------------------------------------------------ authentication


async def test_calls_without_valid_credentials_are_refused_and_probes_stay_open(realm: Realm) -> None:
    async with realm.client() as anonymous:
        await _refused(anonymous.clusters(), CODE.UNAUTHENTICATED, "no credentials")
        await _refused(anonymous.submit(job_spec("x", queue="team-a")), CODE.UNAUTHENTICATED)
    async with realm.client(identity.new_token()) as stranger:
        await _refused(stranger.list(), CODE.UNAUTHENTICATED, "bad token")
    async with realm.as_user("alice") as alice:
        assert await alice.clusters() == []
    async with realm.as_user("nobody") as nobody:  # authenticated, granted nothing
        assert await nobody.clusters() == []
        await _refused(nobody.list(), CODE.PERMISSION_DENIED, "nobody")

    channel = grpc.aio.secure_channel(realm.address, Tls(realm.ca_file).credentials())
    try:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in reflection.ServerReflectionInfo(iter(ask), timeout=5):
                pass
        assert raised.value.code() == CODE.UNAUTHENTICATED
        bearer = (("authorization", f"Bearer {realm.tokens['victor']}"),)
        replies = [r async for r in reflection.ServerReflectionInfo(iter(ask), timeout=5, metadata=bearer)]
        names = {s.name for s in replies[0].list_services_response.service}
        assert "fedplane.v1.JobService" in names
    finally:
        await channel.close()


async def test_a_token_removed_from_the_file_is_refused_without_a_restart(
    realm: Realm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(identity, "RELOAD_CHECK_SECONDS", 0.0)
    async with realm.as_user("alice") as alice, realm.as_user("bob") as bob:
        assert await alice.list() == []
        tokens_file = Path(realm.hub.hub.config.auth.tokens_file)
        data = yaml.safe_load(_read(tokens_file))
        data["tokens"] = [t for t in data["tokens"] if t["name"] != "alice"]
        _write(tokens_file, yaml.safe_dump(data))
        await _refused(alice.list(), CODE.UNAUTHENTICATED, "bad token")
        assert await bob.list() == []
        _write(tokens_file, "tokens: [oops")  # a broken file keeps the tokens loaded before
        assert await bob.list() == []


async def test_oidc_tokens_are_checked_against_the_issuers_keys(
    realm: Realm, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with realm.client(realm.jwt()) as carol:  # group team-a: submitter in team-a
        job, _ = await carol.submit(job_spec("by-carol", queue="team-a"))
        assert job.submitted_by == "carol@example.test"
        await _refused(carol.submit(job_spec("x", queue="team-b")), CODE.PERMISSION_DENIED, "team-b")
    refusals = {
        "not issued by": realm.jwt(iss="https://evil.example.test"),
        "not meant for this hub": realm.jwt(aud="another-service"),
        "expired": realm.jwt(exp=int(time.time()) - 60),
        "signature does not verify": realm.jwt(key=ec.generate_private_key(ec.SECP256R1())),
        "not among the issuer's keys": realm.jwt(kid="k9"),
        "no user name": realm.jwt(email=""),
    }
    for reason, token in refusals.items():
        async with realm.client(token) as client:
            await _refused(client.list(), CODE.UNAUTHENTICATED, reason)

    # Keys rotate by rewriting the JWKS file: the hub reads it again, without a restart.
    monkeypatch.setattr(identity, "RELOAD_CHECK_SECONDS", 0.0)
    new_key = ec.generate_private_key(ec.SECP256R1())
    _jwks(realm.jwks_file, {"k2": new_key})
    async with realm.client(realm.jwt(key=new_key, kid="k2")) as carol:
        assert [j.id for j in await carol.list()] == [job.id]
    async with realm.client(realm.jwt()) as old:  # the retired key signs nothing any more
        await _refused(old.list(), CODE.UNAUTHENTICATED, "not among the issuer's keys")


async def test_a_client_certificate_names_the_caller_under_mutual_tls(
    servers: Servers, pki: CertificateAuthority, audit_lines: AuditLines
) -> None:
    ops, dev = pki.issue("ops", client=True), pki.issue("dev", client=True)
    tls = TlsConfig(
        cert_file=str(pki.directory / "hub.pem"),
        key_file=str(pki.directory / "hub.key"),
        client_ca_file=str(pki.cert_file),
        require_client_cert=True,
    )
    auth = AuthConfig(grants=[GrantConfig(role="admin", users=["ops"])])
    hub = await HubServer.start(check_hub(_hub_config(servers, tls=tls, auth=auth)))
    ca = str(pki.cert_file)
    try:
        address = f"127.0.0.1:{hub.port}"
        async with FedplaneClient(address, tls=Tls(ca, str(ops.cert_file), str(ops.key_file))) as admin:
            # Allowed: the answer is about the cluster, not about the caller.
            await _refused(admin.cordon("gpu-eu"), CODE.NOT_FOUND, "gpu-eu")
            assert await admin.list() == []
        async with FedplaneClient(address, tls=Tls(ca, str(dev.cert_file), str(dev.key_file))) as other:
            assert await other.clusters() == []
            await _refused(other.cordon("gpu-eu"), CODE.PERMISSION_DENIED, "dev", "CordonCluster")
    finally:
        await hub.stop(grace=0.1)
    lines = audit_lines()
    cordons = [(a["who"], a["authenticated_by"], a["decision"]) for a in lines if "Cordon" in a["method"]]
    assert cordons == [("ops", "certificate", "allowed"), ("dev", "certificate", "denied")]


# ------------------------------------------------------------------ authorization


async def test_a_viewer_reads_its_queues_but_changes_nothing(realm: Realm) -> None:
    async with realm.as_user("alice") as alice:
        job, _ = await alice.submit(job_spec("a1", queue="team-a"))
    async with realm.as_user("victor") as victor:
        assert (await victor.get(job.id)).id == job.id
        assert [j.id for j in await victor.list()] == [job.id]
        assert (await victor.explain(job.id)).job_id == job.id
        await _refused(victor.cancel(job.id), CODE.PERMISSION_DENIED, "victor", "CancelJob")
        await _refused(victor.submit(job_spec("v1", queue="team-a")), CODE.PERMISSION_DENIED, "SubmitJob")
        await _refused(victor.cordon("gpu-eu"), CODE.PERMISSION_DENIED)
    async with realm.as_user("alice") as alice:
        assert (await alice.get(job.id)).status.state == pb.PENDING


async def test_a_submitter_sees_and_touches_only_its_own_queues(realm: Realm) -> None:
    async with realm.as_user("bob") as bob:
        theirs, _ = await bob.submit(job_spec("b1", queue="team-b"))
    async with realm.as_user("alice") as alice:
        events: list[str] = []

        async def watch() -> None:
            async for event in alice.watch(from_revision=1):
                events.append(event.job.id)

        watcher = asyncio.create_task(watch())
        ours, _ = await alice.submit(job_spec("a1", queue="team-a"))
        message = await _refused(
            alice.submit_many([(job_spec("a2", queue="team-a"), ""), (job_spec("b2", queue="team-b"), "")]),
            CODE.PERMISSION_DENIED,
            "'team-b'",
            "nothing was submitted",
        )
        assert "team-a'" not in message
        await _refused(alice.submit(job_spec("d1")), CODE.PERMISSION_DENIED, "'default'")
        assert [j.id for j in await alice.list()] == [ours.id]
        # Another queue's job is answered exactly as one that never existed.
        for call in (alice.get, alice.cancel, alice.explain):
            missing = await _refused(call("j0000000000000000000000"), CODE.NOT_FOUND)
            hidden = await _refused(call(theirs.id), CODE.NOT_FOUND)
            assert hidden == missing.replace("j0000000000000000000000", theirs.id)
        await _refused(alice.list(queue="team-b"), CODE.PERMISSION_DENIED, "team-b")
        assert (await alice.job_stats()).total == 1
        await alice.cancel(ours.id)
        async with realm.as_user("bob") as bob:
            await bob.cancel(theirs.id)
        await asyncio.sleep(0.3)
        watcher.cancel()
        assert set(events) == {ours.id}
    async with realm.as_user("root") as root:
        jobs = await root.list()
        assert sorted(j.spec.name for j in jobs) == ["a1", "b1"]  # the refused batch stored nothing
        assert (await root.job_stats()).total == 2


async def test_only_administrators_manage_clusters(realm: Realm) -> None:
    async with realm.as_user("root") as root:
        await _refused(root.cordon("gpu-eu"), CODE.NOT_FOUND, "gpu-eu")  # allowed; no such cluster
        await _refused(root.uncordon("gpu-eu"), CODE.NOT_FOUND)
    channel = grpc.aio.secure_channel(realm.address, Tls(realm.ca_file).credentials())
    try:
        stub = hub_pb2_grpc.ClusterServiceStub(channel)
        bearer = (("authorization", f"Bearer {realm.tokens['alice']}"),)
        for call, request in (
            (stub.CordonCluster, hub_pb2.CordonClusterRequest(name="gpu-eu")),
            (stub.ApproveCluster, hub_pb2.ApproveClusterRequest(name="gpu-eu")),
            (stub.RemoveCluster, hub_pb2.RemoveClusterRequest(name="gpu-eu")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(request, metadata=bearer, timeout=5)
            assert raised.value.code() == CODE.PERMISSION_DENIED, raised.value
            assert "admin" in (raised.value.details() or "")
    finally:
        await channel.close()


async def test_idempotency_keys_are_scoped_to_the_caller(realm: Realm) -> None:
    async with realm.as_user("alice") as alice:
        first, created = await alice.submit(job_spec("a1", queue="team-a"), idempotency_key="nightly")
        assert created and first.submitted_by == "alice" and first.idempotency_key == "nightly"
        again, created = await alice.submit(job_spec("a1", queue="team-a"), idempotency_key="nightly")
        assert (again.id, created) == (first.id, False)
    async with realm.as_user("bob") as bob:
        # The same key from another team is a new job, and says nothing of alice's.
        theirs, created = await bob.submit(job_spec("b1", queue="team-b"), idempotency_key="nightly")
        assert created and theirs.id != first.id and theirs.submitted_by == "bob"
        message = await _refused(
            bob.submit(job_spec("b1", queue="team-a"), idempotency_key="nightly"), CODE.PERMISSION_DENIED
        )
        assert first.id not in message


# ------------------------------------------------------------------ audit


async def test_denied_and_mutating_calls_leave_one_audit_line_each(
    realm: Realm, audit_lines: AuditLines
) -> None:
    async with realm.as_user("alice") as alice:
        job, _ = await alice.submit(job_spec("a1", queue="team-a"))
        batch = await alice.submit_many([(job_spec(f"a{i}", queue="team-a"), "") for i in range(30)])
        await alice.list()  # a read: no line
        await _refused(alice.submit(job_spec("b", queue="team-b")), CODE.PERMISSION_DENIED)
        await alice.cancel(job.id)
    async with realm.as_user("bob") as bob:
        await _refused(bob.get(job.id), CODE.NOT_FOUND)
    async with realm.client("fpt_wrong") as stranger:
        await _refused(stranger.list(), CODE.UNAUTHENTICATED)
    lines = [{k: v for k, v in a.items() if k not in ("timestamp", "level", "event", "logger", "peer")}
             for a in audit_lines()]  # fmt: skip
    jobs = "/fedplane.v1.JobService/"
    common = {"who": "alice", "authenticated_by": "token", "decision": "allowed", "code": "OK"}
    assert lines[0] == common | {
        "method": f"{jobs}SubmitJob",
        "count": 1,
        "queues": ["team-a"],
        "job_id": job.id,
    }
    assert lines[1] == common | {
        "method": f"{jobs}SubmitJobs",
        "count": 30,
        "queues": ["team-a"],
        "job_ids": [j.id for j, _ in batch][:20],
    }
    assert lines[2]["decision"] == "denied" and lines[2]["code"] == "PERMISSION_DENIED"
    assert lines[2]["queues"] == ["team-b"] and "team-b" in lines[2]["reason"]
    assert lines[3] == common | {"method": f"{jobs}CancelJob", "job_id": job.id, "queue": "team-a"}
    assert lines[4]["who"] == "bob" and lines[4]["decision"] == "denied" and lines[4]["code"] == "NOT_FOUND"
    assert "team-a" in lines[4]["reason"]  # the operator learns what the caller did not
    assert (
        lines[5]["code"] == "UNAUTHENTICATED" and lines[5]["who"] == "" and "bad token" in lines[5]["reason"]
    )
    assert len(lines) == 6


# ------------------------------------------------------------------ the CLI


async def test_the_cli_needs_no_flags_with_a_context_file(realm: Realm, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "from-cli",
                "queue": "team-a",
                "podSets": [{"name": "main", "count": 1, "requests": {"cpu": "1"}}],
                "workload": {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "from-cli"}},
            }
        )
    )
    token_file = tmp_path / "alice.token"
    token_file.write_text(realm.tokens["alice"] + "\n")
    context = context_file.write(
        tmp_path / "ctx" / "context.yaml", realm.address, ca_file=realm.ca_file, token_file=str(token_file)
    )
    assert context.stat().st_mode & 0o777 == 0o600
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "FEDPLANE_TOKEN": "", "FEDPLANE_HUB": ""}

    def cli(*args: str, **extra: str) -> Any:
        return CliRunner().invoke(app, list(args), env=env | extra)

    submitted = await asyncio.to_thread(cli, "--context", str(context), "submit", str(spec))
    assert submitted.exit_code == 0, submitted.output
    listed = await asyncio.to_thread(cli, "list", "-o", "json", FEDPLANE_CONTEXT=str(context))
    assert listed.exit_code == 0, listed.output
    assert [j["spec"]["name"] for j in json.loads(listed.stdout)] == ["from-cli"]

    # The default location, and explicit flags over the file.
    context_file.write(
        tmp_path / "config" / "fedplane" / "context.yaml", realm.address, ca_file=realm.ca_file,
        token=realm.tokens["bob"],
    )  # fmt: skip
    as_bob = await asyncio.to_thread(cli, "list", "-o", "json")
    assert as_bob.exit_code == 0 and json.loads(as_bob.stdout) == [], as_bob.output
    as_alice = await asyncio.to_thread(cli, "--token", realm.tokens["alice"], "list", "-o", "json")
    assert [j["spec"]["name"] for j in json.loads(as_alice.stdout)] == ["from-cli"]

    refused = await asyncio.to_thread(cli, "--token", "fpt_wrong", "list")
    assert refused.exit_code == 2
    assert "UNAUTHENTICATED" in refused.output and "--token" in refused.output


# ------------------------------------------------------------------ configuration


def test_every_rpc_the_hub_serves_has_a_permission() -> None:
    served = {
        f"/{service.full_name}/{method.name}"
        for service in hub_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served - set(authz.METHODS) == set()
    assert authz.method_denial("/fedplane.v1.JobService/Nonexistent", authz.EVERYTHING) is not None


def test_auth_settings_that_cannot_work_are_refused_at_load() -> None:
    def problems(**auth: Any) -> str:
        with pytest.raises(ConfigError) as raised:
            check_hub(HubConfig(auth=AuthConfig(**auth)))
        return str(raised.value)

    assert "issuer needs audience and jwks_file" in problems(oidc=OidcConfig(issuer=ISSUER))
    assert "'owner' is not one of admin, submitter, viewer" in problems(
        grants=[GrantConfig(role="owner", users=["x"])]
    )
    assert "names no users and no groups" in problems(grants=[GrantConfig(role="viewer")])
    assert "an admin grant covers every queue" in problems(
        grants=[GrantConfig(role="admin", users=["x"], queues=["a"])]
    )


async def test_a_bad_token_file_stops_the_hub_before_it_connects(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.yaml"
    bad.write_text("tokens:\n  - name: alice\n    sha256: abc\n    roles: [owner]\n")
    for path, message in ((tmp_path / "missing.yaml", "cannot read"), (bad, "sha256")):
        config = HubConfig(
            listen="127.0.0.1:0",
            etcd_endpoint="127.0.0.1:1",
            nats_url="nats://127.0.0.1:1",
            auth=AuthConfig(tokens_file=str(path)),
        )
        with pytest.raises(StartupError, match=message):
            await HubServer.start(config)
