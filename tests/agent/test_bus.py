"""fedplane.runtime.bus against a real nats-server: both sides' consumers, acks, reports and requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest
from nats.js.api import AckPolicy

from fedplane.runtime import bus
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb


def message(data: bytes, headers: dict[str, str] | None = None) -> bus.Message:
    return bus.Message(_client=cast(Any, None), subject="fedplane.v1.x.edge", data=data, headers=headers)


async def next_batch(
    batches: AsyncGenerator[list[bus.Message], None], timeout: float = 5.0
) -> list[bus.Message]:
    return await asyncio.wait_for(anext(batches), timeout)


def command(job_id: str, generation: int = 1) -> agent_pb.DispatchCommand:
    return agent_pb.DispatchCommand(job_id=job_id, generation=generation, delete=agent_pb.DeleteWorkload())


def test_subject_tokens() -> None:
    name = bus.subject("inventory", "gpu-eu")
    assert name == "fedplane.v1.inventory.gpu-eu"
    assert (bus.kind_of(name), bus.cluster_of(name)) == ("inventory", "gpu-eu")


def test_consumer_configs_are_the_protocols() -> None:
    commands = bus.command_consumer_config()
    assert (commands.ack_policy, commands.ack_wait, commands.max_deliver, commands.max_ack_pending) == (
        AckPolicy.EXPLICIT,
        30,
        -1,
        10_000,
    )
    statuses = bus.status_consumer_config()
    assert (statuses.ack_policy, statuses.ack_wait, statuses.max_ack_pending) == (
        AckPolicy.EXPLICIT,
        10,
        4096,
    )


def test_a_batch_message_is_unpacked_and_a_single_one_takes_its_trace_from_the_headers() -> None:
    batch = agent_pb.DispatchBatch(commands=[command("a"), command("b")])
    subject_name, payload, headers = bus.command_batch_message("edge", batch.SerializeToString())
    assert subject_name == "fedplane.v1.cmd.edge" and headers[bus.MSG_TYPE_HEADER] == "DispatchBatch"
    assert [c.job_id for c in bus.dispatch_commands_in(message(payload, headers))] == ["a", "b"]

    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    (single,) = bus.dispatch_commands_in(message(command("c").SerializeToString(), dict(trace)))
    assert single.job_id == "c" and dict(single.trace_context) == trace

    updates = agent_pb.StatusBatch(updates=[agent_pb.StatusUpdate(job_id="a", state=pb.RUNNING)])
    batch_headers = {bus.MSG_TYPE_HEADER: "StatusBatch"}
    assert [u.job_id for u in bus.status_updates_in(message(updates.SerializeToString(), batch_headers))] == [
        "a"
    ]
    lone = agent_pb.StatusUpdate(job_id="d", state=pb.SUCCEEDED).SerializeToString()
    (update,) = bus.status_updates_in(message(lone, dict(trace)))
    assert update.job_id == "d" and dict(update.trace_context) == trace


def test_a_message_that_does_not_parse_carries_nothing() -> None:
    garbage = b"\xff\xff\xff\xff"
    assert bus.dispatch_commands_in(message(garbage, {})) == []
    assert bus.dispatch_commands_in(message(garbage, {bus.MSG_TYPE_HEADER: "DispatchBatch"})) == []
    assert bus.status_updates_in(message(garbage, {})) == []
    assert bus.status_updates_in(message(garbage, {bus.MSG_TYPE_HEADER: "StatusBatch"})) == []


class FakeMessage:
    """A stand-in for nats-py's Msg, as the hub's unit tests use: it records how it was settled."""

    def __init__(self, data: bytes = b"", fail: bool = False) -> None:
        self.data = data
        self.headers: dict[str, str] | None = None
        self.settled: list[tuple[str, float | None]] = []
        self.fail = fail

    async def ack(self) -> None:
        self.settled.append(("ack", None))
        if self.fail:
            raise ConnectionError("the connection is closing")

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append(("nak", delay))


async def test_a_batch_is_settled_at_once_and_a_failed_ack_is_not_raised() -> None:
    msgs = [FakeMessage(fail=True), FakeMessage(), FakeMessage()]
    await bus.ack_or_nak(msgs, {1}, delay=0.1)
    assert [m.settled for m in msgs] == [[("ack", None)], [("nak", 0.1)], [("ack", None)]]
    lone = agent_pb.StatusUpdate(job_id="a", state=pb.RUNNING).SerializeToString()
    assert [u.job_id for u in bus.status_updates_in(FakeMessage(lone))] == ["a"]


async def test_commands_are_acked_or_redelivered_after_a_nak(hub_js: bus.JetStream, nats_url: str) -> None:
    results = await bus.publish_all(
        hub_js,
        [
            bus.command_batch_message(
                "edge", agent_pb.DispatchBatch(commands=[command(job)]).SerializeToString()
            )
            for job in ("first", "second")
        ],
    )
    assert results == [None, None]
    nc = await bus.connect(nats_url, "test-agent")
    stopping = False
    batches = bus.consume_commands(bus.jetstream(nc), "edge", lambda: stopping)
    try:
        msgs = await next_batch(batches)
        while len(msgs) < 2:
            msgs += await next_batch(batches)
        jobs = [bus.dispatch_commands_in(m)[0].job_id for m in msgs]
        assert jobs == ["first", "second"]
        await bus.ack_or_nak(msgs, {0}, delay=0.1)

        again = await next_batch(batches)
        assert [bus.dispatch_commands_in(m)[0].job_id for m in again] == ["first"]
        await bus.ack_or_nak(again, (), delay=0.1)
        with pytest.raises(TimeoutError):
            await next_batch(batches, timeout=0.8)
        info = await hub_js.consumer_info(bus.COMMANDS_STREAM, bus.consumer_name("edge"))
        assert info.config.max_ack_pending == 10_000
        assert info.config.deliver_group == bus.consumer_name("edge")  # a restarted agent takes it over
    finally:
        stopping = True
        await batches.aclose()
        await bus.close(nc)


async def test_status_batches_reach_the_hubs_consumer(hub_js: bus.JetStream) -> None:
    batch = agent_pb.StatusBatch(
        updates=[agent_pb.StatusUpdate(cluster="edge", job_id="a", state=pb.RUNNING)]
    )
    await bus.publish_status_batch(hub_js, "edge", batch.SerializeToString())
    stopping = False
    batches = bus.consume_statuses(hub_js, lambda: stopping)
    try:
        msgs = await next_batch(batches)
        assert [(u.cluster, u.job_id) for m in msgs for u in bus.status_updates_in(m)] == [("edge", "a")]
        await bus.ack_or_nak(msgs, (), delay=0.1)
        info = await hub_js.consumer_info(bus.STATUS_STREAM, bus.STATUS_CONSUMER)
        assert info.config.max_ack_pending == 4096
    finally:
        stopping = True
        await batches.aclose()


async def test_a_status_batch_with_a_forged_trace_context_is_stored_with_only_w3c_headers(
    hub_js: bus.JetStream,
) -> None:
    """A workload's trace context comes from the command that made it, which a peer may have
    forged; as headers it once failed every publish of the batch, which held up the agent's
    outbox for good (found by tests/test_fuzz_nats.py)."""
    parent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    for forged in (
        {"traceparent": parent + "\r\nFedplane-Type: DispatchBatch", "tracestate": "k=v"},
        {"traceparent": parent, "tracestate": "k=v\n", "Nats-Msg-Id": "x", "bad key": "\x00"},
    ):
        update = agent_pb.StatusUpdate(cluster="edge", job_id="a", state=pb.RUNNING, trace_context=forged)
        batch = agent_pb.StatusBatch(updates=[update]).SerializeToString()
        await bus.publish_status_batch(hub_js, "edge", batch, ack_wait=5, trace=forged)
    stopping = False
    batches = bus.consume_statuses(hub_js, lambda: stopping)
    try:
        msgs = await next_batch(batches)
        while len(msgs) < 2:
            msgs += await next_batch(batches)
        assert [dict(m.headers or {}) for m in msgs] == [
            {bus.MSG_TYPE_HEADER: "StatusBatch"},
            {bus.MSG_TYPE_HEADER: "StatusBatch", "traceparent": parent},
        ]
        await bus.ack_or_nak(msgs, (), delay=0.1)
    finally:
        stopping = True
        await batches.aclose()


async def test_a_subscriber_reads_each_clusters_latest_report_then_new_ones(hub_js: bus.JetStream) -> None:
    for cluster, sequence in (("a", 1), ("a", 2), ("b", 7)):
        inventory = agent_pb.Inventory(cluster=cluster, sequence=sequence)
        await bus.publish_report(hub_js, "inventory", cluster, inventory.SerializeToString())
    await bus.publish_report(hub_js, "heartbeat", "a", agent_pb.Heartbeat(cluster="a").SerializeToString())
    seen: asyncio.Queue[tuple[str, str, int, float | None]] = asyncio.Queue()

    async def on_report(msg: bus.Message) -> None:
        sequence = agent_pb.Inventory.FromString(msg.data).sequence
        seen.put_nowait((bus.kind_of(msg.subject), bus.cluster_of(msg.subject), sequence, bus.stored_at(msg)))

    subs = await bus.subscribe_latest_reports(hub_js, on_report, kinds=("inventory",))
    try:
        first = {(await asyncio.wait_for(seen.get(), 5))[:3] for _ in range(2)}
        assert first == {("inventory", "a", 2), ("inventory", "b", 7)}  # the last of each, no heartbeat
        await bus.publish_report(hub_js, "inventory", "b", agent_pb.Inventory(sequence=8).SerializeToString())
        kind, cluster, sequence, stored = await asyncio.wait_for(seen.get(), 5)
        assert (kind, cluster, sequence) == ("inventory", "b", 8)
        assert stored is not None and abs(stored - time.time()) < 5
    finally:
        for sub in subs:
            await bus.unsubscribe(sub)


async def test_each_request_is_answered_by_one_member_of_the_queue_group(nats_url: str) -> None:
    nc = await bus.connect(nats_url, "test-hubs")
    answered: list[str] = []

    def server(name: str) -> Any:
        async def answer(cluster: str, payload: bytes) -> bytes:
            answered.append(name)
            return payload[::-1]

        return answer

    subs = [await bus.serve_requests(nc, "gc", server(name)) for name in ("hub-1", "hub-2")]
    try:
        for i in range(10):
            assert await bus.request(nc, "gc", "edge", f"q{i}".encode(), within=2) == f"{i}q".encode()
        assert len(answered) == 10
    finally:
        for sub in subs:
            await bus.unsubscribe(sub)
        await bus.close(nc)


async def test_a_request_the_answer_fails_on_times_out(nats_url: str) -> None:
    nc = await bus.connect(nats_url, "test-hub")

    async def broken(cluster: str, payload: bytes) -> bytes:
        raise ValueError("cannot parse")

    sub = await bus.serve_requests(nc, "gc", broken)
    try:
        with pytest.raises(TimeoutError):
            await bus.request(nc, "gc", "edge", b"?", within=0.3)
    finally:
        await bus.unsubscribe(sub)
        await bus.close(nc)
