"""Dispatch commands on their way to the agents' durable consumers.

A command is queued once its dispatch record is in etcd and leaves the queue only when
JetStream has stored it; failed publishes are retried every second. Each command carries a
Nats-Msg-Id (job:generation:action), so a command sent again after a hub restart is stored once.
"""

from __future__ import annotations

import asyncio

from nats.js import JetStreamContext
from opentelemetry import trace

from fedplane import bus, logs, telemetry
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")


def create_command(job: pb.Job, hub_id: str) -> agent_pb.DispatchCommand:
    spec = pb.JobSpec()
    spec.CopyFrom(job.spec)
    return agent_pb.DispatchCommand(
        job_id=job.id,
        generation=job.status.generation,
        create=agent_pb.CreateWorkload(spec=spec, assignments=list(job.status.assignments), hub_id=hub_id),
    )


def delete_command(job: pb.Job, reason: str) -> agent_pb.DispatchCommand:
    return agent_pb.DispatchCommand(
        job_id=job.id,
        generation=job.status.generation,
        delete=agent_pb.DeleteWorkload(reason=reason or "cancelled"),
    )


class CommandSender:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._unsent: dict[str, tuple[str, agent_pb.DispatchCommand, dict[str, str]]] = {}

    def __len__(self) -> int:
        return len(self._unsent)

    def queue(self, job: pb.Job, command: agent_pb.DispatchCommand) -> None:
        """Queue a command for the job's cluster, under the job's trace."""
        key = f"{command.job_id}:{command.generation}:{command.WhichOneof('action') or ''}"
        self._unsent[key] = (job.status.cluster, command, dict(job.trace_context))

    async def flush(self) -> None:
        """Publish every queued command concurrently; failures stay queued."""
        if not self._unsent:
            return
        results = await asyncio.gather(
            *(self._publish(key, *item) for key, item in list(self._unsent.items())), return_exceptions=True
        )
        for result in results:
            if isinstance(result, str):
                self._unsent.pop(result, None)
            else:
                log.warning("command publish failed; will retry", error=str(result))

    async def _publish(
        self, key: str, cluster: str, command: agent_pb.DispatchCommand, ctx: dict[str, str]
    ) -> str:
        with telemetry.tracer().start_as_current_span(
            f"hub.dispatch.{command.WhichOneof('action')}",
            context=telemetry.extract(ctx),
            kind=trace.SpanKind.PRODUCER,
            attributes={"job.id": command.job_id, "cluster": cluster, "generation": command.generation},
        ):
            await self.js.publish(
                bus.subject("cmd", cluster),
                command.SerializeToString(),
                headers=bus.headers("DispatchCommand", key),
                timeout=5,
            )
        return key

    async def resend_forever(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.flush()
            except Exception as exc:
                log.warning("resend failed", error=str(exc))
