"""The jobs of lost clusters, on the leading replica: each follows its disconnect policy.

When a cluster is declared lost (`ClusterState.lost_since`, set by cluster health), this
driver decides for every job still on it with the core's rules (fedplane.core.disconnect):
wait, requeue once the job's delay is over and another cluster can take it, or fail it. It
writes what it decided through the table's fenced compare-and-swap; a write that loses its
race is decided again on the next pass. For each job taken off the cluster it then gives back
the job's reservation there and queues a DeleteWorkload for the old generation to the old
cluster. JetStream keeps that command, so a lost cluster that comes back learns which jobs it
no longer owns, and its agent deletes them. A requeued job re-enters the pending queue through
the table (`JobTable.merge`), which wakes placement; its next dispatch bumps the generation,
so whatever the old cluster still reports is stale.

It keeps nothing that a new leader could not rebuild: every pass reads the registry (which
clusters are lost, since when) and the table (which jobs are on them), so `run` may be
cancelled at any point and started again on another replica.

`DisconnectPolicies` also gives the scheduler each create's `fence_after_seconds`: how long an
agent cut off from the hub keeps the job before stopping it, a margin before the hub may run
it elsewhere.
"""

from __future__ import annotations

import asyncio
import math

from fedplane.core import disconnect
from fedplane.core import dispatch as sm
from fedplane.core.disconnect import Policy
from fedplane.core.model import ClusterView
from fedplane.core.placement import BatchPlacement, Weights
from fedplane.hub import convert, records
from fedplane.hub.clock import Clock
from fedplane.hub.clusters import ClusterRegistry, ClusterState
from fedplane.hub.commands import CommandQueue, delete_command
from fedplane.hub.store import FenceLost
from fedplane.hub.table import JobRecord, JobTable, StatusWrite
from fedplane.runtime import logs, telemetry
from fedplane.runtime.config import DisconnectConfig, HubConfig
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
S = sm.S
# The states in which a job is on its cluster (what table.active counts).
_HOLDING = sm.ON_CLUSTER | {S.CANCELLING}
_ACTIONS = {
    pb.DISCONNECT_REQUEUE: disconnect.Action.REQUEUE,
    pb.DISCONNECT_WAIT: disconnect.Action.WAIT,
    pb.DISCONNECT_FAIL: disconnect.Action.FAIL,
}


def policy_of(message: pb.DisconnectPolicy) -> Policy:
    """A job's own policy in the core's terms; an unset action is "" (the default's), an action
    number this hub does not know keeps a name the core does not know either (it never evicts)."""
    action = message.action
    name = (
        ""
        if action == pb.DISCONNECT_ACTION_UNSPECIFIED
        else _ACTIONS.get(action, f"DisconnectAction({action})")
    )
    return Policy(name, message.requeue_after_seconds)


def _configured(policy: DisconnectConfig) -> Policy:
    return Policy(policy.action, policy.requeue_after_seconds)


def lost_after_seconds(registry: ClusterRegistry, cluster: ClusterState) -> float:
    """How long the cluster may be silent before it is lost (longer for an edge cluster)."""
    thresholds = registry.thresholds
    return thresholds.lost_for(cluster.is_edge(thresholds))


class DisconnectPolicies:
    """The hub's default policies, per queue and overall, and what each job follows."""

    def __init__(self, config: HubConfig) -> None:
        self.default = _configured(config.disconnect)
        self.queues = {queue: _configured(p) for queue, p in config.queue_disconnect.items()}

    def of(self, spec: pb.JobSpec) -> Policy:
        """The job's own policy if it names one, else its queue's default, else the hub's."""
        own = policy_of(spec.disconnect) if spec.HasField("disconnect") else None
        return disconnect.resolve(own, spec.queue, self.queues, self.default)

    def fence_after_seconds(
        self, spec: pb.JobSpec, registry: ClusterRegistry, cluster: ClusterState
    ) -> float:
        """A create's `fence_after_seconds` for a job going to `cluster` (0 for WAIT)."""
        return disconnect.fence_after(self.of(spec), lost_after_seconds(registry, cluster))


class LostClusterJobs:
    """Applies the disconnect policies of the jobs on lost clusters (leading replica only).

    The registry wakes it when a cluster becomes lost or comes back (`on_lost_change`);
    besides, every `recheck_seconds` a pass looks at the registry (cheap while no lost cluster
    holds jobs), so that jobs waiting for another cluster to have room are decided again.
    """

    def __init__(
        self,
        table: JobTable,
        registry: ClusterRegistry,
        commands: CommandQueue,
        clock: Clock,
        config: HubConfig,
        *,
        recheck_seconds: float = 1.0,
    ) -> None:
        self.table = table
        self.registry = registry
        self.commands = commands
        self.clock = clock
        self.policies = DisconnectPolicies(config)
        self.weights = Weights(**vars(config.weights))
        self.recheck = recheck_seconds
        self.disruption_fraction = config.lost_disruption_fraction
        self._held = False  # evictions held: too many clusters lost at once
        self._wake = asyncio.Event()
        registry.on_lost_change(lambda _name, _since: self._wake.set())
        # Rebuilt from the table whenever in doubt; they only save work between passes.
        self._index: dict[str, list[str]] = {}  # lost cluster -> ids of the jobs on it
        self._policy: dict[str, Policy] = {}  # job id -> its policy (a spec never changes)
        self._said: dict[str, str] = {}  # job id -> why it waits, as last logged
        # The last room check: the views it ran on, and its answer per job.
        self._room_views: list[ClusterView] = []
        self._room: dict[str, tuple[bool, str]] = {}

    async def run(self) -> None:
        """Decide on every wake, at the next time a job asked for, and every `recheck_seconds`."""
        while True:
            self._wake.clear()
            try:
                until = await self.decide()
            except asyncio.CancelledError:
                raise
            except FenceLost as exc:
                log.warning("lost-cluster decisions not written: not leading", error=str(exc))
                until = math.inf
            except Exception:
                log.exception("lost-cluster decisions failed; retrying")
                until = math.inf
            await self._sleep_until(min(until, self.clock.time() + self.recheck))

    async def _sleep_until(self, until: float) -> None:
        delay = until - self.clock.time()
        if delay <= 0:
            await asyncio.sleep(0)
            return
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            woken.cancel()

    async def decide(self) -> float:
        """One pass over the lost clusters' jobs: decide, write, and act on what was written.

        Returns when to look again (inf: only when woken, or at the next recheck).
        """
        now = self.clock.time()
        lost = self.registry.lost()
        on = self._jobs_on(lost)
        if not on:
            self._policy.clear()
            self._said.clear()
            self._room.clear()
            self._held = False
            return math.inf
        known = len(self.registry.clusters)
        if disconnect.disrupted(len(lost), known, self.disruption_fraction):
            if not self._held:
                log.warning(
                    "federation-wide disruption: evictions held",
                    lost_clusters=len(lost),
                    clusters=known,
                    threshold=self.disruption_fraction,
                )
                self._held = True
            return math.inf
        if self._held:
            log.info(
                "disruption over: lost clusters' jobs follow their policies again", lost_clusters=len(lost)
            )
            self._held = False
        room = self._room_for(on, lost, now)
        again = math.inf
        writes: list[StatusWrite] = []
        acting: list[tuple[disconnect.Requeue | disconnect.Fail, str, pb.Job]] = []
        seen: set[str] = set()
        for cluster, held in on.items():
            lost_since = lost[cluster]
            jobs = []
            for record in held:
                seen.add(record.id)
                fits, why_not = room.get(record.id, (False, ""))
                jobs.append(
                    disconnect.LostJob(
                        record.id, record.dispatch_state, self._policy_of(record), fits, why_not
                    )
                )
            for outcome in disconnect.decide(cluster, lost_since, now, jobs):
                if isinstance(outcome, disconnect.Wait):
                    self._waits(cluster, outcome)
                    if outcome.needs_room:
                        again = min(again, now + self.recheck)
                    elif outcome.until is not None:
                        again = min(again, outcome.until)
                    continue
                record = self.table.jobs[outcome.job_id]
                job = record.job  # its status as it is on the old cluster, for the delete
                status = records.record(job.status, outcome.transition, now)
                writes.append(StatusWrite.of(record.id, status, record.revision))
                acting.append((outcome, cluster, job))
        for stale in [job_id for job_id in self._said if job_id not in seen]:
            del self._said[stale]
        for stale in [job_id for job_id in self._policy if job_id not in seen]:
            del self._policy[stale]
        if writes and self._apply(acting, await self.table.write(writes)):
            again = min(again, now + self.recheck)  # lost races: decide those again
        return again

    def _jobs_on(self, lost: dict[str, float]) -> dict[str, list[JobRecord]]:
        """The jobs on each lost cluster that holds any, from the index while it matches the
        table's count of them, else from a scan of the table."""
        active, jobs = self.table.active, self.table.jobs
        for name in [name for name in self._index if name not in lost]:
            del self._index[name]
        names = [name for name in lost if active.get(name, 0) > 0]
        out: dict[str, list[JobRecord]] = {}
        for name in names:
            ids = self._index.get(name)
            if ids is None:
                break
            held = [
                r for r in map(jobs.get, ids) if r is not None and r.cluster == name and r.state in _HOLDING
            ]
            if len(held) != active[name]:
                break  # a job came to the cluster since (a dispatch racing the loss)
            out[name] = held
        else:
            for name, held in out.items():
                self._index[name] = [r.id for r in held]
            return out
        wanted = set(names)
        out = {name: [] for name in names}
        for record in jobs.values():
            if record.cluster in wanted and record.state in _HOLDING:
                out[record.cluster].append(record)
        for name, held in out.items():
            self._index[name] = [r.id for r in held]
        return out

    def _policy_of(self, record: JobRecord) -> Policy:
        policy = self._policy.get(record.id)
        if policy is None:
            policy = self._policy[record.id] = self.policies.of(record.spec_record.spec)
        return policy

    def _room_for(
        self, on: dict[str, list[JobRecord]], lost: dict[str, float], now: float
    ) -> dict[str, tuple[bool, str]]:
        """For each job whose REQUEUE is due: whether another ready cluster could take it now,
        and if not, why (placement's summary).

        The due jobs are placed together, in placement's order (priority, then submission), on
        working copies of the views of the clusters not lost, so two jobs are never promised
        the same room. Unchanged views give the last answers again without placing anything.
        """
        due: list[JobRecord] = []
        for cluster, held in on.items():
            for record in held:
                if record.state not in sm.ON_CLUSTER:
                    continue
                policy = self._policy_of(record)
                at = disconnect.acts_at(lost[cluster], policy)
                if policy.action == disconnect.Action.REQUEUE and at is not None and at <= now:
                    due.append(record)
        if not due:
            self._room.clear()
            return {}
        views = [view for view in self.registry.views(now) if view.name not in lost]
        unchanged = len(views) == len(self._room_views) and all(
            a is b for a, b in zip(views, self._room_views, strict=True)
        )
        if unchanged and all(record.id in self._room for record in due):
            return self._room
        requests = [convert.job_request(record.spec_record, record.seq) for record in due]
        requests.sort(key=lambda j: (-j.priority, j.seq, j.id))
        batch = BatchPlacement(views, self.weights)
        room: dict[str, tuple[bool, str]] = {}
        for request in requests:
            decision = batch.place(request)
            room[request.id] = (True, "") if decision.cluster is not None else (False, decision.summary())
        self._room_views, self._room = views, room
        return room

    def _waits(self, cluster: str, wait: disconnect.Wait) -> None:
        """Log a job's wait once, and again only when the reason changes."""
        if self._said.get(wait.job_id) == wait.why:
            return
        self._said[wait.job_id] = wait.why
        record = self.table.jobs.get(wait.job_id)
        log.info(
            "lost cluster: job waits",
            job_id=wait.job_id,
            cluster=cluster,
            generation=record.generation if record is not None else 0,
            action="wait",
            reason=wait.why,
        )

    def _apply(
        self,
        acting: list[tuple[disconnect.Requeue | disconnect.Fail, str, pb.Job]],
        written: list[JobRecord | None],
    ) -> bool:
        """Act on what landed: release, delete the old copy, log. Whether any write lost its race."""
        lost_race = False
        for (outcome, cluster, job), record in zip(acting, written, strict=True):
            if record is None:
                lost_race = True
                log.info(
                    "lost cluster: decision lost a race; deciding again",
                    job_id=outcome.job_id,
                    cluster=cluster,
                )
                continue
            generation = job.status.generation
            state = self.registry.clusters.get(cluster)
            if state is not None:
                state.release(job.id, generation)
            moved = outcome.transition.state
            action = "requeue" if moved == S.PENDING else "fail" if moved == S.FAILED else "cancel"
            # `job` still holds the old cluster and generation: the command goes there, for that copy.
            self.commands.queue(
                job, delete_command(job, f"{disconnect.REASON}: {outcome.transition.message}")
            )
            self._said.pop(job.id, None)
            self._policy.pop(job.id, None)
            self._room.pop(job.id, None)
            log.info(
                "lost cluster: job moved",
                job_id=job.id,
                cluster=cluster,
                generation=generation,
                action=action,
                state=sm.state_name(moved),
                reason=outcome.why,
                **telemetry.log_ids(job.trace_context),
            )
        return lost_race
