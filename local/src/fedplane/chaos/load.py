"""The chaos runs' submission stream: jobs submitted through the client SDK at a steady rate,
each with its own idempotency key, retried against any hub replica until one accepts it.

A client need not know which replica leads: every replica accepts submissions. A call that
fails as unavailable, or times out (a paused hub), is retried on the next replica with the
same key, so a submission stored by a hub that died before answering is found again, not
made twice. What was accepted (the job id the hub returned) is what the checks hold the
federation to; a key never confirmed is looked up in etcd afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from fedplane.bench.pace import Pacer
from fedplane.client.sdk import FedplaneClient, FedplaneError
from fedplane.v1 import types_pb2 as pb

DURATION_ANNOTATION = "fedplane.io/simulated-duration"
EDGE_LABEL = "fedplane.io/edge"
# Worth another try on another replica: the hub is down, paused, or without etcd for now.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass(frozen=True)
class LoadParams:
    rate: float = 8.0
    # Each job runs for a duration drawn uniformly from this range, seconds.
    durations: tuple[float, float] = (0.3, 1.5)
    # The share of jobs that prefer edge clusters (they overflow to the others).
    edge_share: float = 0.0
    # A submission not accepted this long after it was first tried is given up (unconfirmed).
    give_up_after: float = 30.0
    call_timeout: float = 3.0
    max_in_flight: int = 32
    queue: str = "chaos"
    seed: int = 0


@dataclass
class Submission:
    key: str
    first_try: float
    job_id: str = ""
    accepted_at: float = 0.0
    accepted_by: str = ""
    created: bool = False
    attempts: int = 0
    # The last error seen, and the final verdict when not accepted: "rejected" or "unconfirmed".
    error: str = ""
    outcome: str = "in flight"


def job_spec(name: str, duration: float, *, prefer_edge: bool, queue: str) -> pb.JobSpec:
    pod_set = pb.PodSet(name="main", count=1)
    pod_set.requests.quantities.update({"cpu": 1000})
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "annotations": {DURATION_ANNOTATION: f"{duration:.3f}s"}},
    }
    spec = pb.JobSpec(
        name=name,
        queue=queue,
        pod_sets=[pod_set],
        workload=pb.Workload(manifest_json=json.dumps(manifest)),
    )
    if prefer_edge:
        spec.constraints.preferred_groups.add().match_labels[EDGE_LABEL] = "true"
    return spec


@dataclass
class LoadGenerator:
    """Submits at `params.rate` from `run` until `stop`; `drain` waits for the submissions in flight."""

    addresses: dict[str, str]
    params: LoadParams = field(default_factory=LoadParams)
    run_id: str = "chaos"
    submissions: list[Submission] = field(default_factory=list)
    _clients: dict[str, FedplaneClient] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.random = random.Random(self.params.seed)
        self._pacer = Pacer(self._submit, self.params.rate, self.params.max_in_flight, "chaos-submit")

    def _client(self, name: str) -> FedplaneClient:
        client = self._clients.get(name)
        if client is None:
            client = FedplaneClient(
                self.addresses[name], interceptors=[], timeout=self.params.call_timeout, retry_attempts=1
            )
            self._clients[name] = client
        return client

    async def run(self) -> None:
        """Submit until `stop` is called."""
        await self._pacer.run()

    def stop(self) -> None:
        self._pacer.stop()

    async def drain(self) -> None:
        """Wait for the submissions in flight (each gives up on its own), then close the clients."""
        await self._pacer.drain()
        await asyncio.gather(*(c.close() for c in self._clients.values()), return_exceptions=True)
        self._clients.clear()

    async def _submit(self, n: int) -> None:
        p = self.params
        duration = self.random.uniform(*p.durations)
        prefer_edge = self.random.random() < p.edge_share
        name = f"chaos-{n}"
        spec = job_spec(name, duration, prefer_edge=prefer_edge, queue=p.queue)
        sub = Submission(f"{self.run_id}-{n}", time.monotonic())
        self.submissions.append(sub)
        replicas = list(self.addresses)
        delay = 0.05
        while True:
            target = replicas[(n + sub.attempts) % len(replicas)]
            sub.attempts += 1
            try:
                job, created = await self._client(target).submit(spec, sub.key)
            except FedplaneError as exc:
                sub.error = str(exc)
                if exc.code not in RETRYABLE:
                    sub.outcome = "rejected"
                    return
            else:
                sub.job_id, sub.created, sub.accepted_by = job.id, created, target
                sub.accepted_at = time.monotonic()
                sub.outcome = "accepted"
                return
            if time.monotonic() - sub.first_try > p.give_up_after:
                sub.outcome = "unconfirmed"
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    # -- results ----------------------------------------------------------------------------------

    def accepted(self) -> dict[str, str]:
        """Job id -> idempotency key, for every submission a hub accepted."""
        return {s.job_id: s.key for s in self.submissions if s.outcome == "accepted"}

    def unconfirmed_keys(self) -> list[str]:
        return [s.key for s in self.submissions if s.outcome == "unconfirmed"]

    def summary(self) -> dict[str, Any]:
        subs: Sequence[Submission] = self.submissions
        accepted = [s for s in subs if s.outcome == "accepted"]
        return {
            "submitted": len(subs),
            "accepted": len(accepted),
            # Accepted on a retry after an attempt that had already stored the job.
            "found_on_retry": sum(1 for s in accepted if not s.created),
            "retried": sum(1 for s in subs if s.attempts > 1),
            "rejected": sum(1 for s in subs if s.outcome == "rejected"),
            "unconfirmed": sum(1 for s in subs if s.outcome == "unconfirmed"),
            "by_replica": {
                name: sum(1 for s in accepted if s.accepted_by == name) for name in sorted(self.addresses)
            },
            "errors": sorted({s.error.split(":")[0] for s in subs if s.error}),
        }
