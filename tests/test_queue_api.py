"""Queue objects through a real hub (etcd, NATS, TLS and tokens): the CLI's apply, queues, delete
and hold; jobs checked against the queues at intake; who may change and see queues; the audit."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from fedplane.client.cli import app
from fedplane.client.objects import load_files, load_text
from fedplane.client.sdk import FedplaneClient, FedplaneError, Tls
from fedplane.hub.identity import issue_token
from fedplane.local import servers as embedded
from fedplane.local.pki import CertificateAuthority
from fedplane.runtime import logs
from fedplane.runtime.config import TlsConfig
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, hub_config, job_spec

pytestmark = pytest.mark.timeout(60)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUEUES = EXAMPLES / "queues.yaml"
CODE = grpc.StatusCode


@pytest.fixture
async def fed(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess], tmp_path: Path
) -> AsyncIterator[Federation]:
    """The shared federation's hub (TLS, an administrator's token), without implicit queues; its
    tokens file also holds a viewer's (`viewer`)."""
    etcd, nats = servers
    config = hub_config(etcd, nats)
    config.implicit_queues = False
    ca = CertificateAuthority(tmp_path / "pki")
    hub_cert = ca.issue("hub", server=True)
    config.tls = TlsConfig(cert_file=str(hub_cert.cert_file), key_file=str(hub_cert.key_file))
    config.auth.tokens_file = str(tmp_path / "tokens.yaml")
    token = issue_token(config.auth.tokens_file, "root", ["admin"])
    VIEWER_TOKENS[str(tmp_path)] = issue_token(config.auth.tokens_file, "victor", ["viewer"], ["research"])
    federation = Federation(etcd, nats, tmp_path, config, tls=Tls(ca_file=str(ca.cert_file)), token=token)
    await federation.start_hub()
    try:
        yield federation
    finally:
        await federation.close()


# The viewer "victor" (granted queue research) of each test's hub, by the test's directory.
VIEWER_TOKENS: dict[str, str] = {}


def viewer(fed: Federation) -> FedplaneClient:
    return FedplaneClient(fed.target, tls=fed.tls, token=VIEWER_TOKENS[str(fed.tmp)], retry_attempts=1)


def by_name(objects: pb.QueueObjects) -> dict[tuple[str, str], Any]:
    return {
        (field, item.name): item
        for field in ("queues", "cohorts", "flavors", "priority_classes")
        for item in getattr(objects, field)
    }


async def cli(fed: Federation, *args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, app, [*fed.cli_flags(), *args])


async def refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(FedplaneError) as caught:
        await call
    assert caught.value.code == code, caught.value
    return caught.value.message


async def test_apply_then_queues_round_trips_and_hold_toggles_a_queue(fed: Federation) -> None:
    applied = await cli(fed, "apply", "-f", str(QUEUES))
    assert applied.exit_code == 0, applied.output
    lines = applied.stdout.splitlines()
    assert "Queue research created" in lines and "Cohort org created" in lines
    assert "PriorityClass interruptible created" in lines and len(lines) == 16

    listed = await cli(fed, "queues", "-o", "yaml")
    assert listed.exit_code == 0, listed.output
    # What apply -f takes back, unchanged (the hub keeps each kind sorted by name).
    assert by_name(load_text(listed.stdout)) == by_name(load_files([QUEUES]))

    again = await cli(fed, "apply", "-f", str(QUEUES))
    assert set(again.stdout.splitlines()) == {line.replace("created", "unchanged") for line in lines}

    held = await cli(fed, "queue", "hold", "research")
    assert held.exit_code == 0 and held.stdout.strip() == "queue research held", held.output
    async with fed.client() as admin:
        objects = await admin.queue_objects()
        assert [q.name for q in objects.queues if q.held] == ["research"]
        assert objects.updated_by == "root"
        # The file no longer matches what is stored: a dry run says so and changes nothing.
        dry = await cli(fed, "apply", "--dry-run", "-f", str(QUEUES))
        assert "Queue research configured (dry run)" in dry.stdout.splitlines()
        assert (await admin.queue_objects()) == objects
    released = await cli(fed, "queue", "release", "research")
    assert released.exit_code == 0, released.output
    async with fed.client() as admin:
        assert not any(q.held for q in (await admin.queue_objects()).queues)

    table = await cli(fed, "queues")
    assert table.exit_code == 0, table.output
    assert "USAGE/NOMINAL" in table.stdout  # the rows are the live cycle's (table.queue.report())


async def test_jobs_are_checked_against_the_queues_and_a_busy_queue_is_not_deleted(fed: Federation) -> None:
    async with fed.client() as admin:
        await admin.apply_queue_objects(load_files([QUEUES]))
        message = await refused(admin.submit(job_spec("lost", queue="nowhere")), CODE.INVALID_ARGUMENT)
        assert message == 'spec.queue: queue "nowhere" does not exist (fedplane queues lists them)'

        spec = job_spec("urgent", queue="research")
        spec.priority_class = "guaranteed"
        job, _ = await admin.submit(spec)
        assert job.spec.priority == 1000 and job.status.state == pb.PENDING  # no cluster to run on
        spec.priority = 5
        assert "contradicts priority class" in await refused(admin.submit(spec), CODE.INVALID_ARGUMENT)

        deleted = await cli(fed, "delete", "queue", "research")
        assert deleted.exit_code == 2
        assert 'queue "research" holds 1 unfinished job' in deleted.stderr
        assert any(q.name == "research" for q in (await admin.queue_objects()).queues)
        # A priority class in use may go; the job keeps its priority.
        await admin.delete_queue_objects([("PriorityClass", "guaranteed")])
        assert (await admin.get(job.id)).spec.priority == 1000

        await admin.cancel(job.id)
        deleted = await cli(fed, "delete", "queue", "research")
        assert deleted.exit_code == 0 and deleted.stdout.strip() == "Queue research deleted", deleted.output
        assert not any(q.name == "research" for q in (await admin.queue_objects()).queues)
        gone = await cli(fed, "delete", "queue", "research")
        assert gone.exit_code == 2 and "NOT_FOUND" in gone.stderr


async def test_only_an_administrator_changes_queues_and_a_viewer_sees_only_its_own(fed: Federation) -> None:
    out = io.StringIO()
    logs.configure("info", "json", file=out)
    try:
        async with fed.client() as admin:
            await admin.apply_queue_objects(load_files([QUEUES]))
            for queue in ("research", "batch"):
                await admin.submit(job_spec(f"in-{queue}", queue=queue))
    finally:
        logs.configure("warning", "console")  # as tests/conftest.py sets it
    [line] = [json.loads(x) for x in out.getvalue().splitlines() if "QueueService/Apply" in x]
    assert line["who"] == "root" and line["decision"] == "allowed" and line["code"] == "OK"
    assert "Queue/research" in line["applied"] and "PriorityClass/guaranteed" in line["applied"]

    async with viewer(fed) as victor:
        extra = pb.QueueObjects(queues=[pb.Queue(name="mine", cohort="org")])
        denied = await refused(victor.apply_queue_objects(extra), CODE.PERMISSION_DENIED)
        assert "Apply needs the admin role" in denied
        await refused(victor.delete_queue_objects([("Queue", "batch")]), CODE.PERMISSION_DENIED)
        await refused(victor.set_queue_held("research", True), CODE.PERMISSION_DENIED)

        seen = await victor.queue_objects()
        assert [q.name for q in seen.queues] == ["research"]
        everything = load_files([QUEUES])
        assert len(seen.cohorts) == len(everything.cohorts) and len(seen.flavors) == len(everything.flavors)
        assert len(seen.priority_classes) == 3

        view = await victor.queue_view()
        assert {r.name for r in view.rows if r.kind == "queue"} == {"research"}
    async with fed.client() as admin:
        assert {"research", "batch"} <= {r.name for r in (await admin.queue_view()).rows if r.kind == "queue"}
        assert not any(q.name == "mine" for q in (await admin.queue_objects()).queues)
