"""Hostile requests to every gRPC method of a real hub (issue 13, point 6).

Random bytes, valid requests with bytes flipped, inserted or deleted, and requests built
field by field with extreme values go to every method of JobService, ClusterService and
HubService, as raw bytes on the wire. Whatever arrives, the hub answers with a status a
client can act on (never UNKNOWN or INTERNAL), keeps serving, and a refused call changes
nothing in etcd. The hostile inputs of the issue, and those the fuzzing found, are kept as
plain examples below.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf import message_factory
from google.protobuf.message import Message
from hypothesis import strategies as st

from fedplane.hub.validation import MAX_MANIFEST_DEPTH, MAX_POD_SETS, MAX_PROBLEMS, MAX_REASON
from fedplane.local import servers as embedded
from fedplane.runtime import bus
from fedplane.runtime.config import HubConfig
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import hub_pb2
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, eventually, job_spec
from tests.fuzzing import payloads, run_examples

pytestmark = pytest.mark.asyncio(loop_scope="module")
TARGET = "fuzz-target"
# Codes that say the hub failed rather than the request: none of them may come back.
BROKEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@dataclass(frozen=True)
class Method:
    path: str
    request: type[Message]
    streaming: bool

    def __repr__(self) -> str:  # hypothesis prints failing examples with it
        return self.path


METHODS = [
    Method(
        f"/{service.full_name}/{method.name}",
        message_factory.GetMessageClass(method.input_type),
        method.server_streaming,
    )
    for service in hub_pb2.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[embedded.ServerProcess, embedded.ServerProcess]]:
    tmp = tmp_path_factory.mktemp("fuzz-grpc")
    etcd = embedded.start_etcd(tmp / "etcd")
    try:
        nats = embedded.start_nats(tmp / "nats")
    except Exception:
        etcd.stop()
        raise
    try:
        yield etcd, nats
    finally:
        nats.stop()
        etcd.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fed(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Federation]:
    """One hub for the whole module, with one job and one registered cluster to aim at."""
    etcd, nats = servers
    config = HubConfig(
        listen="127.0.0.1:0",
        implicit_queues=True,
        etcd_endpoint=etcd.address,
        nats_url=f"nats://{nats.address}",
        batch_window_seconds=0.01,
        # No authentication: every caller is the anonymous administrator, so that every method
        # is reached (what the authentication interceptor does is tested on its own).
        insecure=True,
    )
    federation = Federation(etcd, nats, Path(tmp_path_factory.mktemp("fuzz-grpc-hub")), config)
    await federation.start_hub()
    # A cluster with two nodes and no agent behind it: explains weigh real placements, accepted
    # jobs are placed and dispatched to it (and stay there), and it can be cordoned, approved
    # and removed. It heartbeats throughout, so that it is never lost while the fuzzing compares.
    nc = await bus.connect(federation.nats_url, "fuzz-target-agent")
    js = bus.jetstream(nc)
    node = pb.Node(name="n", ready=True, allocatable=pb.Resources(quantities={"cpu": 8000, "memory": 2**35}))
    node.free.CopyFrom(node.allocatable)
    inventory = agent_pb.Inventory(cluster=TARGET, agent_id="fuzz", sequence=1, nodes=[node, node])
    await bus.publish_report(js, "inventory", TARGET, inventory.SerializeToString())
    beat = agent_pb.Heartbeat(cluster=TARGET, agent_id="fuzz", version="0").SerializeToString()

    async def heartbeats() -> None:
        while True:
            await bus.publish_report(js, "heartbeat", TARGET, beat)
            await asyncio.sleep(1.0)

    beating = asyncio.create_task(heartbeats())

    async def registered() -> bool:
        return TARGET in {
            c.name for c in (await federation.clusters.ListClusters(hub_pb2.ListClustersRequest())).clusters
        }

    await eventually(registered, 10, f"cluster {TARGET} registered")
    try:
        yield federation
    finally:
        beating.cancel()
        await bus.close(nc)
        await federation.close()


Snapshot = tuple[dict[str, bool], dict[str, pb.Cluster]]
# A job's own progress (placed, admitted, running, finished) goes on while the fuzzer calls, at
# its own pace; what a refused call could do to a job is create it or cancel it.
_CANCELLED = {pb.CANCELLING, pb.CANCELLED}


async def snapshot(fed: Federation) -> Snapshot:
    """What etcd holds that a refused call could change: which jobs exist and whether each is
    cancelled, and each cluster's admin record (but its lost time, which the hub's liveness
    rounds record on their own)."""
    assert fed.hub is not None
    store = fed.hub.hub.store
    jobs, _ = await store.load_jobs()
    clusters = {name: pb.Cluster.FromString(blob) for name, blob in (await store.load_clusters()).items()}
    for cluster in clusters.values():
        cluster.ClearField("lost_time")
    cancelled = {job.id: pb.JobStatus.FromString(job.status_blob).state in _CANCELLED for job in jobs}
    return cancelled, clusters


async def quiet_snapshot(fed: Federation) -> Snapshot:
    """A snapshot that has stayed the same for 50 ms (waiting 3 s at most)."""
    last = await snapshot(fed)
    for _ in range(60):
        await asyncio.sleep(0.05)
        now = await snapshot(fed)
        if now == last:
            return now
        last = now
    raise AssertionError("etcd kept changing for 3 s after an accepted call")


async def call(fed: Federation, method: Method, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """Send raw bytes to a method; its status code and details (a stream: after its first event)."""
    assert fed.channel is not None
    try:
        if method.streaming:
            stream = fed.channel.unary_stream(method.path)(payload, timeout=0.2)
            async for _ in stream:
                stream.cancel()
                break
        else:
            await fed.channel.unary_unary(method.path)(payload, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def expect_refused(fed: Federation, method: str, request: Message | bytes) -> str:
    """Send a request that must be refused with INVALID_ARGUMENT and change nothing; its details."""
    found = next(m for m in METHODS if m.path.endswith(f"/{method}"))
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    before = await snapshot(fed)
    code, details = await call(fed, found, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:300])
    assert await snapshot(fed) == before
    return details


async def test_every_method_answers_hostile_requests_cleanly(fed: Federation) -> None:
    job = await fed.submit(job_spec("anchor"), key="anchor")
    seeds: dict[str, list[bytes]] = {}
    examples: list[Message] = [
        hub_pb2.SubmitJobRequest(spec=job_spec("seed", labels={"team": "a"}), idempotency_key="k"),
        hub_pb2.SubmitJobsRequest(jobs=[hub_pb2.SubmitJobRequest(spec=job_spec("seed-batch"))]),
        hub_pb2.GetJobRequest(job_id=job.id),
        hub_pb2.ListJobsRequest(queue="default", states=[pb.PENDING], labels={"team": "a"}, page_size=5),
        hub_pb2.CancelJobRequest(job_id=job.id, reason="because"),
        hub_pb2.WatchJobsRequest(from_revision=1, queue="default", job_ids=[job.id]),
        hub_pb2.ExplainJobRequest(job_id=job.id),
        hub_pb2.ExplainJobRequest(spec=job_spec("explained")),
        hub_pb2.GetJobStatsRequest(queue="default"),
        hub_pb2.GetClusterRequest(name=TARGET),
        hub_pb2.CordonClusterRequest(name=TARGET, reason="maintenance"),
        hub_pb2.UncordonClusterRequest(name=TARGET),
        hub_pb2.ApproveClusterRequest(name=TARGET, public_key="U" + "A" * 55),
        hub_pb2.RemoveClusterRequest(name=TARGET, reason="decommissioned"),
    ]
    for example in examples:
        seeds.setdefault(example.DESCRIPTOR.full_name, []).append(example.SerializeToString())
    hints = {
        "job_id": [job.id],
        "job_ids": [job.id],
        "name": [TARGET, "nowhere"],
        "cluster": [TARGET],
        "queue": ["default"],
        "page_token": [f"1:{job.id}"],
    }
    calls = st.sampled_from(METHODS).flatmap(
        lambda m: st.tuples(
            st.just(m), payloads(m.request, seeds.get(m.request.DESCRIPTOR.full_name, []), hints)
        )
    )

    settled = False  # the anchor job was just placed

    async def check(example: tuple[Method, bytes]) -> None:
        nonlocal settled
        method, payload = example
        # What an accepted call set going (a placement and dispatch, a removed cluster's loss)
        # has landed before the next call is judged.
        before = await snapshot(fed) if settled else await quiet_snapshot(fed)
        code, details = await call(fed, method, payload)
        assert code not in BROKEN, f"{method.path} answered {code.name}: {details[:500]}"
        accepted = code == grpc.StatusCode.OK or (
            method.streaming and code == grpc.StatusCode.DEADLINE_EXCEEDED
        )
        settled = not accepted
        if not accepted:
            assert await snapshot(fed) == before, f"{method.path} refused with {code.name} but changed etcd"

    await run_examples(calls, check, examples=300)
    # Still serving: a plain submit and read work as ever.
    after = await fed.submit(job_spec("after-fuzzing"))
    assert (await fed.get(after.id)).status.state == pb.PENDING


# ---------------------------------------------------------------------------- the inputs


async def test_a_manifest_nested_thousands_deep_is_refused(fed: Federation) -> None:
    spec = job_spec("deep")
    spec.workload.manifest_json = json.dumps({"apiVersion": "batch/v1", "kind": "Job"})[:-1] + (
        ', "x": ' + "[" * 5000 + "]" * 5000 + "}"
    )
    details = await expect_refused(fed, "SubmitJob", hub_pb2.SubmitJobRequest(spec=spec))
    assert details == f"spec.workload.manifest_json: nested more than {MAX_MANIFEST_DEPTH} levels deep"
    await expect_refused(fed, "ExplainJob", hub_pb2.ExplainJobRequest(spec=spec))


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("CancelJob", hub_pb2.CancelJobRequest(job_id="j0", reason="r" * 3_000_000)),
        ("CordonCluster", hub_pb2.CordonClusterRequest(name=TARGET, reason="r" * 3_000_000)),
        ("RemoveCluster", hub_pb2.RemoveClusterRequest(name=TARGET, reason="r" * 3_000_000)),
    ],
    ids=["cancel", "cordon", "remove"],
)
async def test_a_multi_megabyte_reason_is_refused(fed: Federation, method: str, request_: Message) -> None:
    details = await expect_refused(fed, method, request_)
    assert details == f"reason: 3000000 characters; at most {MAX_REASON} allowed"


async def test_a_reason_at_the_limit_is_taken(fed: Federation) -> None:
    job = await fed.submit(job_spec("cancel-me"))
    cancelled = await fed.jobs.CancelJob(hub_pb2.CancelJobRequest(job_id=job.id, reason="r" * MAX_REASON))
    assert cancelled.status.message == "r" * MAX_REASON


async def test_a_spec_with_ten_thousand_pod_sets_is_refused(fed: Federation) -> None:
    spec = job_spec("wide")
    spec.pod_sets.extend(
        pb.PodSet(name=f"p{i}", count=1, requests=pb.Resources(quantities={"cpu": 1})) for i in range(9_999)
    )
    details = await expect_refused(fed, "SubmitJob", hub_pb2.SubmitJobRequest(spec=spec))
    assert details == f"spec.pod_sets: 10000 pod sets; at most {MAX_POD_SETS} allowed"


async def test_label_keys_over_63_characters_are_refused(fed: Federation) -> None:
    spec = job_spec("labelled", labels={"k" * 64: "v"})
    spec.constraints.tolerations.append(pb.Toleration(key="example.com/" + "t" * 64, operator="Exists"))
    details = await expect_refused(fed, "SubmitJob", hub_pb2.SubmitJobRequest(spec=spec))
    assert (
        f"spec.labels.{'k' * 64}: not a valid label key: name part must be no more than 63 characters"
        in details
    )
    assert "spec.constraints.tolerations[0].key: " in details
    filtered = hub_pb2.ListJobsRequest(labels={"k" * 64: "v"})
    assert "not a valid label key" in await expect_refused(fed, "ListJobs", filtered)


# ---------------------------------------------------------------------------- malformed bytes


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",  # a truncated varint
        b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
        b"\x7b" * 5000,  # groups opened 5,000 deep: past protobuf's recursion limit
    ],
    ids=["truncated", "overlong", "deep-groups"],
)
async def test_bytes_that_do_not_parse_are_refused_for_every_method(fed: Federation, payload: bytes) -> None:
    for method in METHODS:
        code, details = await call(fed, method, payload)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method.path, code, details)
        assert details.startswith(f"request: not a valid protobuf message for {method.path} (")


async def test_a_string_that_is_not_utf8_is_refused(fed: Federation) -> None:
    details = await expect_refused(fed, "GetJob", b"\x0a\x02\xc3\x28")  # job_id = b"\xc3\x28"
    assert details.startswith("request: not a valid protobuf message for /fedplane.v1.JobService/GetJob (")


async def test_a_request_over_the_size_limit_is_refused_by_grpc(fed: Federation) -> None:
    method = next(m for m in METHODS if m.path.endswith("/CancelJob"))
    request = hub_pb2.CancelJobRequest(job_id="j0", reason="r" * (5 * 1024 * 1024))
    code, _ = await call(fed, method, request.SerializeToString())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_refusal_lists_a_bounded_number_of_problems(fed: Federation) -> None:
    """10,000 bad specs in one batch: the message must still fit in gRPC's trailers."""
    bad = hub_pb2.SubmitJobRequest(spec=pb.JobSpec(name="Bad Name"))
    details = await expect_refused(fed, "SubmitJobs", hub_pb2.SubmitJobsRequest(jobs=[bad] * 5000))
    assert details.count("; ") == MAX_PROBLEMS
    assert details.endswith(f"; and {2 * 5000 - MAX_PROBLEMS} more")


@pytest.mark.parametrize(
    ("method", "request_", "problem"),
    [
        ("GetJob", hub_pb2.GetJobRequest(job_id="j" * 100_000), "job_id: 'jjjj"),
        ("ListJobs", hub_pb2.ListJobsRequest(page_token="1:" + "x" * 100_000), "page_token: '1:xx"),
        (
            "ListJobs",
            hub_pb2.ListJobsRequest(states=[pb.JobState.ValueType(99)]),
            "states[0]: 99 is not a JobState",
        ),
        (
            "ListJobs",
            hub_pb2.ListJobsRequest(queue="Not A Queue"),
            "queue: 'Not A Queue' is not a queue name",
        ),
        ("ListJobs", hub_pb2.ListJobsRequest(labels={f"k{i}": "v" for i in range(65)}), "labels: 65 labels"),
        ("WatchJobs", hub_pb2.WatchJobsRequest(job_ids=["j"] * 1001), "job_ids: 1001 job ids"),
        ("WatchJobs", hub_pb2.WatchJobsRequest(from_revision=-1), "from_revision: must not be negative"),
        ("GetJobStats", hub_pb2.GetJobStatsRequest(queue="q" * 64), "queue: 'qqqq"),
        (
            "ApproveCluster",
            hub_pb2.ApproveClusterRequest(name=TARGET, public_key="U" * 1000),
            "public_key: 'UUU",
        ),
        ("GetCluster", hub_pb2.GetClusterRequest(name=f"{TARGET}\n"), "is not a cluster name"),
    ],
)
async def test_unbounded_fields_are_bounded(
    fed: Federation, method: str, request_: Message, problem: str
) -> None:
    details = await expect_refused(fed, method, request_)
    assert problem in details
    assert len(details) < 500
