"""Parts for the lost-cluster tests: the shared harness with a registry that judges health by
the hub's thresholds, the drivers a lost cluster involves, and readers of the queued commands."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from fedplane.core import dispatch as sm
from fedplane.hub.clusters import ClusterRegistry, health_thresholds
from fedplane.hub.lost import LostClusterJobs
from fedplane.hub.scheduler import Scheduler
from fedplane.hub.statuses import StatusIntake
from fedplane.hub.table import JobRecord
from fedplane.runtime.config import DisconnectConfig, HubConfig
from fedplane.v1 import types_pb2 as pb
from tests.hub.fakes import Parts, reported_status

S = sm.S


def config(**settings: object) -> HubConfig:
    """A hub config whose clusters stay READY for ten minutes after a heartbeat (tests move the
    clock by minutes), lost after twenty."""
    base: dict[str, object] = {"cluster_unknown_after_seconds": 600.0, "cluster_lost_after_seconds": 1200.0}
    return HubConfig(**(base | settings))  # type: ignore[arg-type]


def policy(action: int, requeue_after: float = 0.0) -> pb.DisconnectPolicy:
    return pb.DisconnectPolicy(action=action, requeue_after_seconds=requeue_after)  # type: ignore[arg-type]


def defaults(action: str, requeue_after: float = 0.0) -> DisconnectConfig:
    return DisconnectConfig(action, requeue_after)


class Sent(NamedTuple):
    """A queued command, as the sender would address it."""

    cluster: str
    job_id: str
    generation: int
    action: str  # create | delete
    fence_after_seconds: float
    reason: str


@dataclass
class LostParts(Parts):
    config: HubConfig = field(default_factory=config)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.registry = ClusterRegistry(health_thresholds(self.config))

    def driver(self, recheck_seconds: float = 1.0) -> LostClusterJobs:
        return LostClusterJobs(
            self.table, self.registry, self.commands, self.clock, self.config, recheck_seconds=recheck_seconds
        )

    def scheduler(self) -> Scheduler:
        return Scheduler(self.table, self.registry, self.commands, self.clock, self.config)

    def statuses(self) -> StatusIntake:
        return StatusIntake(self.table, self.registry, self.clock)

    def lose(self, name: str) -> None:
        """Declare the cluster lost now, as cluster health does when its lease expires."""
        self.registry.clusters[name].lost_since = self.clock.time()

    async def running_on(self, cluster: str, *specs: pb.JobSpec) -> list[JobRecord]:
        """Jobs submitted, placed by the scheduler (only `cluster` must be ready) and RUNNING there."""
        records = await self.submit(*specs)
        await self.scheduler().place_pending()
        out = []
        for record in records:
            assert record.state == S.DISPATCHED and record.cluster == cluster, (record.state, record.cluster)
            out.append(
                await self.set_status(record, reported_status(record.status, S.RUNNING, self.clock.time()))
            )
        return out

    def sent(self) -> list[Sent]:
        out = []
        for job, command in self.commands.queued:
            action = command.WhichOneof("action") or ""
            out.append(
                Sent(
                    job.status.cluster,
                    command.job_id,
                    command.generation,
                    action,
                    command.create.fence_after_seconds,
                    command.delete.reason,
                )
            )
        return out

    def deletes(self) -> list[Sent]:
        return [s for s in self.sent() if s.action == "delete"]

    def creates(self) -> list[Sent]:
        return [s for s in self.sent() if s.action == "create"]
