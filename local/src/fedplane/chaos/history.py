"""What happened, read back after a chaos run: every write of every job's status key from
etcd's history, the stored specs' idempotency keys, and the simulated clusters' ledgers.

etcd keeps every revision until it is compacted, and the chaos federation's etcd never is, so
a watch from revision 1 replays each status write in order, including those a later write
overwrote. That is the hub's side of the story; the ledgers are the clusters' side.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from fedplane.agent.simulated import read_ledger
from fedplane.chaos.invariants import Change, Run
from fedplane.hub.etcdpb import kv_pb2, rpc_pb2_grpc
from fedplane.hub.etcdpb import rpc_pb2 as rpc
from fedplane.v1 import types_pb2 as pb

PAGE = 500


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _channel(endpoint: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(endpoint.removeprefix("http://"))


async def _range(
    kv: Any, prefix: bytes, *, revision: int = 0, keys_only: bool = False
) -> AsyncIterator[tuple[Any, int]]:
    """Every key under `prefix` at `revision` (0: now), a page at a time, with the read's revision."""
    start, end = prefix, _prefix_end(prefix)
    while True:
        request = rpc.RangeRequest(
            key=start, range_end=end, limit=PAGE, revision=revision, keys_only=keys_only
        )
        response = await kv.Range(request, timeout=10)
        revision = revision or int(response.header.revision)
        for item in response.kvs:
            yield item, revision
        if not response.more or not response.kvs:
            return
        start = response.kvs[-1].key + b"\0"


def _change(revision: int, job_id: str, value: bytes, deleted: bool) -> Change:
    if deleted:
        return Change(revision, job_id, 0, "", 0)
    status = pb.JobStatus.FromString(value)
    return Change(revision, job_id, int(status.state), status.cluster, int(status.generation), status.reason)


async def revision(endpoint: str) -> int:
    """etcd's current revision: every write so far is at or below it."""
    async with _channel(endpoint) as channel:
        response = await rpc_pb2_grpc.KVStub(channel).Range(rpc.RangeRequest(key=b"\0", limit=1), timeout=10)
        return int(response.header.revision)


async def current_statuses(endpoint: str, prefix: str) -> dict[str, Change]:
    """Each job's status now."""
    key = f"{prefix.rstrip('/')}/jobs/status/".encode()
    out: dict[str, Change] = {}
    async with _channel(endpoint) as channel:
        async for item, _ in _range(rpc_pb2_grpc.KVStub(channel), key):
            job_id = item.key[len(key) :].decode()
            out[job_id] = _change(int(item.mod_revision), job_id, item.value, False)
    return out


async def read_specs(endpoint: str, prefix: str) -> dict[str, str]:
    """Job id -> the idempotency key stored with its spec."""
    key = f"{prefix.rstrip('/')}/jobs/spec/".encode()
    out: dict[str, str] = {}
    async with _channel(endpoint) as channel:
        async for item, _ in _range(rpc_pb2_grpc.KVStub(channel), key):
            out[item.key[len(key) :].decode()] = pb.Job.FromString(item.value).idempotency_key
    return out


async def read_status_history(endpoint: str, prefix: str, within: float = 60.0) -> dict[str, list[Change]]:
    """Every write (and delete) of every job's status key, per job in revision order.

    A watch from revision 1 replays the history; it is read up to the newest write under the
    prefix as of now (found by a range at the current revision). Raises TimeoutError if etcd
    does not deliver that much within `within`.
    """
    key = f"{prefix.rstrip('/')}/jobs/status/".encode()
    history: dict[str, list[Change]] = {}
    async with _channel(endpoint) as channel:
        newest = 0
        async for item, _ in _range(rpc_pb2_grpc.KVStub(channel), key, keys_only=True):
            newest = max(newest, int(item.mod_revision))
        if newest == 0:
            return history
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(key=key, range_end=_prefix_end(key), start_revision=1)
        )

        async def requests() -> AsyncIterator[Any]:
            yield create
            await asyncio.Event().wait()  # the stream stays open until cancelled

        call = rpc_pb2_grpc.WatchStub(channel).Watch(requests())
        deadline = time.monotonic() + within
        try:
            async with asyncio.timeout(within):
                async for response in call:
                    if response.compact_revision:
                        raise RuntimeError(f"etcd was compacted at revision {response.compact_revision}")
                    if response.canceled:
                        raise RuntimeError(f"etcd cancelled the watch: {response.cancel_reason}")
                    seen = 0
                    for event in response.events:
                        item = event.kv
                        seen = int(item.mod_revision)
                        job_id = item.key[len(key) :].decode()
                        deleted = event.type == kv_pb2.Event.DELETE
                        history.setdefault(job_id, []).append(_change(seen, job_id, item.value, deleted))
                    if seen >= newest or time.monotonic() > deadline:
                        break
        finally:
            call.cancel()
    return history


def read_runs(ledgers: Mapping[str, Path]) -> list[Run]:
    """Every ledger's events, by wall time; `ledgers` maps each cluster to its ledger file (a
    line that does not name its cluster is taken to be that file's)."""
    runs: list[Run] = []
    for cluster, path in ledgers.items():
        runs.extend(_runs(cluster, read_ledger(path)))
    runs.sort(key=lambda r: r.time)
    return runs


def _runs(cluster: str, events: Iterable[dict[str, Any]]) -> Iterable[Run]:
    for event in events:
        try:
            yield Run(
                float(event["time"]),
                str(event.get("cluster") or cluster),
                str(event["job_id"]),
                int(event["generation"]),
                str(event["event"]),
                str(event.get("state", "")),
            )
        except (KeyError, TypeError, ValueError):
            continue
