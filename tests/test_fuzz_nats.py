"""Hostile messages on every NATS subject the hub and the agent listen on (issue 13, point 6).

Random bytes, valid messages with bytes flipped, inserted or deleted, and messages built field
by field with extreme values go to the hub's report subjects (heartbeat, inventory, datasets),
its status subject and its orphan queries (gc), and to an agent's command subject, for real
and made-up cluster names. Garbage (what does not parse) changes nothing, neither in etcd nor
in the hub's registry nor in the agent; nothing hostile stops a task of the hub or the agent;
and afterwards a real job still runs to the end.

NATS runs without permissions here on purpose: the fuzzer reaches every subject, as the
broadest peer could (a leaked hub credential, a compromised agent on its own subjects). With
the per-cluster permissions on, far fewer of these messages could be sent at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import pytest
import pytest_asyncio
from google.protobuf.message import DecodeError, Message
from hypothesis import strategies as st

from fedplane.agent.daemon import Agent
from fedplane.local import servers as embedded
from fedplane.runtime import bus, timestamps
from fedplane.runtime.config import HubConfig
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, cpu_nodes, job_spec, sim_agent_config
from tests.fuzzing import payloads, run_examples

pytestmark = pytest.mark.asyncio(loop_scope="module")
REAL = "real"
GHOST = "ghost"
# Subject tokens: the real cluster, a made-up one, and names no cluster may have.
CLUSTER_TOKENS = [REAL, GHOST, "Ghost", "x" * 64, "under_score"]
FORGED = "forged-1"


@dataclass(frozen=True)
class Subject:
    """A kind of subject someone listens on, with what it carries."""

    kind: str
    message: type[Message]
    # The Fedplane-Type header of a batch message, and what a message without it is read as.
    batch_header: str = ""
    single: type[Message] | None = None
    seeds: tuple[Message, ...] = field(default=(), compare=False)

    def __repr__(self) -> str:
        return self.kind


def _node() -> pb.Node:
    resources = pb.Resources(quantities={"cpu": 8000, "memory": 2**35})
    return pb.Node(
        name="n",
        ready=True,
        labels={"zone": "a"},
        taints=[pb.Taint(key="dedicated", value="x", effect="NoSchedule")],
        allocatable=resources,
        free=resources,
    )


def _create(job_id: str) -> agent_pb.DispatchCommand:
    return agent_pb.DispatchCommand(
        job_id=job_id,
        generation=1,
        create=agent_pb.CreateWorkload(
            spec=job_spec("forged", duration="0.1s"),
            assignments=[pb.NodeAssignment(pod_set="main", node="cpu-0", count=1)],
            hub_id="fedplane",
            fence_after_seconds=60,
        ),
    )


NOW = timestamps.now()
UPDATE = agent_pb.StatusUpdate(
    cluster=GHOST, job_id=FORGED, generation=1, state=pb.RUNNING, reason="Started", time=NOW
)
HUB_SUBJECTS = [
    Subject(
        "heartbeat", agent_pb.Heartbeat, seeds=(agent_pb.Heartbeat(cluster=GHOST, agent_id="a", time=NOW),)
    ),
    Subject(
        "inventory",
        agent_pb.Inventory,
        seeds=(
            agent_pb.Inventory(
                cluster=GHOST,
                agent_id="a",
                sequence=1,
                time=NOW,
                labels={"region": "eu"},
                taints=[pb.Taint(key="edge", value="true", effect="NoSchedule")],
                nodes=[_node()],
                cost=1.5,
                accounted_jobs=[f"{FORGED}:1"],
            ),
        ),
    ),
    Subject(
        "datasets",
        agent_pb.DataLocalityReport,
        seeds=(agent_pb.DataLocalityReport(cluster=GHOST, datasets=[pb.DatasetPresence(id="d", bytes=10)]),),
    ),
    Subject(
        "status",
        agent_pb.StatusBatch,
        "StatusBatch",
        agent_pb.StatusUpdate,
        seeds=(agent_pb.StatusBatch(updates=[UPDATE]),),
    ),
    Subject("status", agent_pb.StatusUpdate, seeds=(UPDATE,)),
    Subject(
        "gc",
        agent_pb.OrphanQuery,
        seeds=(
            agent_pb.OrphanQuery(
                cluster=GHOST, workloads=[agent_pb.WorkloadRef(job_id=FORGED, generation=1)]
            ),
        ),
    ),
]
AGENT_SUBJECTS = [
    Subject(
        "cmd",
        agent_pb.DispatchBatch,
        "DispatchBatch",
        agent_pb.DispatchCommand,
        seeds=(
            agent_pb.DispatchBatch(commands=[_create(FORGED)]),
            agent_pb.DispatchBatch(
                commands=[
                    agent_pb.DispatchCommand(
                        job_id=FORGED, generation=2, delete=agent_pb.DeleteWorkload(reason="x")
                    )
                ]
            ),
        ),
    ),
    Subject("cmd", agent_pb.DispatchCommand, seeds=(_create("forged-2"),)),
]
# Steer string fields towards values that reach deeper code: never the real jobs' ids, so that
# what parses can only speak of jobs no one runs.
HINTS = {"cluster": [GHOST, REAL], "job_id": [FORGED, "forged-2"], "pod_set": ["main"], "node": ["cpu-0"]}


def parses(subject: Subject, payload: bytes, batch_header: bool) -> bool:
    """Whether the listener can read `payload`: a batch without its type header is read as the
    single item earlier peers sent."""
    read_as = subject.message if batch_header or subject.single is None else subject.single
    try:
        read_as.FromString(payload)
    except DecodeError:
        return False
    return True


@dataclass
class Rig:
    """The federation under test, the fuzzer's own connection, and a job that must not move."""

    fed: Federation
    agent: Agent
    nc: bus.Connection
    js: bus.JetStream
    victim: str


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[embedded.ServerProcess, embedded.ServerProcess]]:
    tmp = tmp_path_factory.mktemp("fuzz-nats")
    etcd = embedded.start_etcd(tmp / "etcd")
    try:
        nats_server = embedded.start_nats(tmp / "nats")  # no permissions: see the module docstring
    except Exception:
        etcd.stop()
        raise
    try:
        yield etcd, nats_server
    finally:
        nats_server.stop()
        etcd.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(
    servers: tuple[embedded.ServerProcess, embedded.ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Rig]:
    etcd, nats_server = servers
    config = HubConfig(
        listen="127.0.0.1:0",
        implicit_queues=True,
        etcd_endpoint=etcd.address,
        nats_url=f"nats://{nats_server.address}",
        batch_window_seconds=0.01,
        insecure=True,
    )
    fed = Federation(etcd, nats_server, Path(tmp_path_factory.mktemp("fuzz-nats-hub")), config)
    await fed.start_hub()
    agent_config = sim_agent_config(
        REAL, fed.nats_url, nodes=[cpu_nodes(4, cpu="64", memory="256Gi")], duration=0.2
    )
    agent_config.insecure = True
    agent = await fed.start_agent(agent_config)
    nc = await bus.connect(fed.nats_url, "fuzzer")
    try:
        await fed.wait_clusters_ready([REAL])
        # Runs for the whole module: no hostile message may touch it.
        victim = await fed.submit(job_spec("victim", duration="1h"))
        await fed.wait_state(victim.id, {pb.RUNNING})
        yield Rig(fed, agent, nc, bus.jetstream(nc), victim.id)
    finally:
        await bus.close(nc)
        await fed.close()


# ---------------------------------------------------------------------------- observing


@dataclass(frozen=True)
class State:
    """What hostile messages must not change: the victim's record and the set of clusters (etcd
    and the hub's registry), and which workloads the agent holds at which generation."""

    victim_revision: int
    stored_clusters: frozenset[str]
    known_clusters: frozenset[str]
    agent_generations: tuple[tuple[str, int], ...]


async def state(rig: Rig) -> State:
    hub = rig.fed.hub
    assert hub is not None
    stored = await hub.hub.store.read_job(rig.victim)
    assert stored is not None
    return State(
        stored.revision,
        frozenset(await hub.hub.store.load_clusters()),
        frozenset(hub.hub.registry.clusters),
        tuple(sorted(rig.agent.generations.items())),
    )


def assert_running(rig: Rig) -> None:
    """Every task of the hub and the agent is still running (a crash ends its task)."""
    hub = rig.fed.hub
    assert hub is not None
    for task in [*hub.hub._tasks, *hub.hub._leader_tasks, *rig.agent._tasks]:
        assert not task.done(), (
            f"task {task.get_name()} ended: {task.exception() if not task.cancelled() else 'cancelled'}"
        )


async def drained(rig: Rig, stream: str, consumer: str, timeout: float = 5.0) -> None:
    """Wait until `consumer` has settled everything its stream holds for it."""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await rig.js.consumer_info(stream, consumer)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{consumer} still holds unsettled messages after {timeout}s")


async def send(rig: Rig, subject: Subject, cluster: str, payload: bytes, batch_header: bool) -> None:
    """Publish as a peer would, then wait until the listener has had it."""
    name = bus.subject(subject.kind, cluster)
    headers = {bus.MSG_TYPE_HEADER: subject.batch_header} if subject.batch_header and batch_header else None
    if subject.kind == "gc":
        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            await rig.nc.request(name, payload, timeout=0.1)  # garbage goes unanswered
        return
    try:
        await rig.js.publish(name, payload, headers=headers, timeout=5)
    except nats.errors.MaxPayloadError:
        return  # the server would never take it
    if subject.kind == "status":
        await drained(rig, bus.STATUS_STREAM, bus.STATUS_CONSUMER)
    elif subject.kind == "cmd":
        await drained(rig, bus.COMMANDS_STREAM, bus.consumer_name(cluster))
    else:
        await asyncio.sleep(0.03)  # reports go to ordered consumers, which keep no count


def messages(
    subjects: list[Subject], clusters: list[str], garbage: bool
) -> st.SearchStrategy[tuple[Subject, str, bytes, bool]]:
    """(subject, cluster token, payload, whether a batch carries its type header)."""

    def for_subject(subject: Subject, header: bool) -> st.SearchStrategy[tuple[Subject, str, bytes, bool]]:
        seeds = [seed.SerializeToString() for seed in subject.seeds]
        body = payloads(subject.message, seeds, HINTS)
        if garbage:
            body = body.filter(lambda payload: not parses(subject, payload, header))
        return st.tuples(st.just(subject), st.sampled_from(clusters), body, st.just(header))

    return st.tuples(st.sampled_from(subjects), st.booleans()).flatmap(lambda pair: for_subject(*pair))


async def a_real_job_completes(rig: Rig) -> None:
    job = await rig.fed.submit(job_spec("after-fuzzing", duration="0.2s"))
    await rig.fed.wait_state(job.id, {pb.SUCCEEDED}, timeout=30)


# ---------------------------------------------------------------------------- fuzzing


async def test_garbage_on_every_subject_changes_nothing(rig: Rig) -> None:
    before = await state(rig)

    async def check(example: tuple[Subject, str, bytes, bool]) -> None:
        subject, cluster, payload, header = example
        await send(rig, subject, cluster, payload, header)
        assert_running(rig)
        assert await state(rig) == before, f"garbage on {subject.kind}.{cluster} changed the federation"

    hub_side = messages(HUB_SUBJECTS, CLUSTER_TOKENS, garbage=True)
    agent_side = messages(AGENT_SUBJECTS, [REAL], garbage=True)
    await run_examples(st.one_of(hub_side, agent_side), check, examples=150)
    await a_real_job_completes(rig)


async def test_hostile_messages_on_every_subject_crash_nothing(rig: Rig) -> None:
    victim_before = (await state(rig)).victim_revision

    async def check(example: tuple[Subject, str, bytes, bool]) -> None:
        subject, cluster, payload, header = example
        await send(rig, subject, cluster, payload, header)
        assert_running(rig)
        # Nothing here speaks of the victim, so whatever parsed must have left it alone.
        assert (await state(rig)).victim_revision == victim_before

    hub_side = messages(HUB_SUBJECTS, CLUSTER_TOKENS, garbage=False)
    agent_side = messages(AGENT_SUBJECTS, [REAL], garbage=False)
    await run_examples(st.one_of(hub_side, agent_side), check, examples=200)
    # Names that are no DNS label never became clusters, whatever was sent on their subjects.
    assert {name for name in (await state(rig)).stored_clusters if not bus.valid_cluster_name(name)} == set()
    await a_real_job_completes(rig)


# ---------------------------------------------------------------------------- what the fuzzing found


async def test_a_command_whose_manifest_nests_thousands_deep_is_refused_not_retried(rig: Rig) -> None:
    """The agent's backend parsed it into a RecursionError, which counted as a passing failure:
    the command came back every 2 s for good. It is an invalid workload, refused once."""
    command = _create("forged-deep")
    command.create.spec.workload.manifest_json = (
        '{"apiVersion": "batch/v1", "kind": "Job", "x": ' + "[" * 5000 + "]" * 5000 + "}"
    )
    batch = agent_pb.DispatchBatch(commands=[command]).SerializeToString()
    await send(rig, AGENT_SUBJECTS[0], REAL, batch, batch_header=True)  # waits until it is settled
    assert_running(rig)
    assert rig.agent.generations.get("forged-deep") == 1


async def test_reports_that_do_not_parse_register_no_cluster(rig: Rig) -> None:
    """The hub registered (and stored for good) the cluster a report's subject named before it
    read the report: bytes that are no report made a cluster."""
    for kind in bus.REPORT_KINDS:
        await rig.js.publish(bus.subject(kind, "newcomer"), b"\xff\xff\xff", timeout=5)
    await asyncio.sleep(0.5)
    assert "newcomer" not in (await state(rig)).known_clusters
    assert "newcomer" not in (await state(rig)).stored_clusters
