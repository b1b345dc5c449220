"""What happens to the jobs of a lost cluster: each job's disconnect policy, and the decisions.

Like Nomad's `disconnect` block, a policy says how long a lost cluster is tolerated and what
then: REQUEUE (run the job elsewhere), WAIT (for the cluster, however long) or FAIL. A job's
own policy wins over its queue's default, which wins over the hub's (`resolve`).

The decisions (`decide`) keep the work whenever they can. Nothing happens before the cluster
has been lost for the policy's `requeue_after_seconds`; WAIT never acts; REQUEUE acts only
when another cluster could take the job now, and otherwise keeps the job where it is and says
why (Karmada's users complain of failovers that delete work when no replacement fits); FAIL
fails it. A job being cancelled is finished as CANCELLED as soon as its cluster is lost: it is
wanted nowhere, so there is nothing to keep. The transitions are the state machine's
(`dispatch.requeue`, `dispatch.give_up`), so a requeued job keeps its generation (its attempt
count) and its history, and the next dispatch fences off the old copy.

`fence_after` is the other half of never running a job in two clusters at once: how long an
agent cut off from the hub keeps a job before stopping it, which is shorter than the time
after which the hub may run the job elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from fedplane.core import dispatch as sm

S = sm.S
REASON = "ClusterLost"


class Action:
    """What to do with a job once its cluster has been lost for the policy's delay."""

    REQUEUE = "requeue"  # run it elsewhere, if another cluster can take it
    WAIT = "wait"  # keep waiting for the cluster, however long
    FAIL = "fail"  # fail it


ACTIONS = (Action.REQUEUE, Action.WAIT, Action.FAIL)
# Holds jobs on a lost cluster that are still wanted there (not being cancelled).
_ON_CLUSTER = sm.ON_CLUSTER


class Policy(NamedTuple):
    """A disconnect policy. `action` "" is a job's policy that names no action: it takes its
    default's (see `resolve`)."""

    action: str = Action.REQUEUE
    requeue_after_seconds: float = 0.0


def resolve(own: Policy | None, queue: str, queue_defaults: Mapping[str, Policy], default: Policy) -> Policy:
    """The policy a job follows: its own if it names an action, else its queue's default, else
    the hub's; a policy of its own that names only a delay keeps the default's action with it."""
    base = queue_defaults.get(queue, default)
    if own is None:
        return base
    if own.action:
        return own
    if own.requeue_after_seconds > 0:
        return Policy(base.action, own.requeue_after_seconds)
    return base


def acts_at(lost_since: float, policy: Policy) -> float | None:
    """When the policy acts on a job of a cluster lost since `lost_since`; None: never (WAIT,
    or an action this code does not know, which must never evict)."""
    if policy.action not in (Action.REQUEUE, Action.FAIL):
        return None
    return lost_since + max(0.0, policy.requeue_after_seconds)


def fence_after(policy: Policy, lost_after_seconds: float) -> float:
    """How long an agent cut off from the hub keeps running the job before it stops it; 0: keep
    it however long (WAIT).

    The hub may run the job elsewhere (or fail it) once the cluster has been silent for its
    lost threshold plus the job's delay; the agent stops its copy a margin before that (a tenth
    of the lost threshold, at least a second, at most half the total), so that the two copies
    never overlap even with some skew between the two clocks.
    """
    if policy.action not in (Action.REQUEUE, Action.FAIL) or not math.isfinite(lost_after_seconds):
        return 0.0  # (no lost threshold: the hub never acts by its own clock)
    total = max(0.0, lost_after_seconds) + max(0.0, policy.requeue_after_seconds)
    margin = max(1.0, 0.1 * lost_after_seconds)
    return max(total - margin, total / 2)


class LostJob(NamedTuple):
    """A job on a lost cluster, as the decision sees it."""

    job_id: str
    current: sm.DispatchState
    policy: Policy
    # Whether another ready cluster could take the job now, and if not, why not (placement's
    # summary). Only read for a REQUEUE that is due.
    elsewhere: bool = False
    why_not: str = ""


class Requeue(NamedTuple):
    """Take the job off the lost cluster: back to PENDING (or CANCELLED, if it was cancelling)."""

    job_id: str
    transition: sm.Transition
    why: str


class Fail(NamedTuple):
    """Fail the job where it was (or cancel it, if it was cancelling)."""

    job_id: str
    transition: sm.Transition
    why: str


class Wait(NamedTuple):
    """Leave the job on the lost cluster for now.

    `until` is when to look again; None when no time will change the decision: a WAIT policy
    (only the cluster's return ends it), or, with `needs_room`, a due REQUEUE that no other
    cluster can take now (look again when the clusters change).
    """

    job_id: str
    until: float | None
    why: str
    needs_room: bool = False


Outcome = Requeue | Fail | Wait


def decide_job(cluster: str, lost_since: float, now: float, job: LostJob) -> Outcome | None:
    """The decision for one job of `cluster`, lost since `lost_since`; None if the job is no
    longer on it (moved on, finished) and there is nothing to decide."""
    current = job.current
    if current.cluster != cluster or (current.state not in _ON_CLUSTER and current.state != S.CANCELLING):
        return None
    lost_for = max(0.0, now - lost_since)
    if current.state == S.CANCELLING:
        why = f"cluster {cluster} lost while the job was being cancelled"
        return Requeue(job.job_id, sm.requeue(current, REASON), why)
    policy = job.policy
    due = acts_at(lost_since, policy)
    if due is None:
        return Wait(job.job_id, None, f"disconnect policy {policy.action or 'unset'}: waiting for {cluster}")
    if now < due:
        # Worded the same on every pass, so that it is logged once.
        why = f"cluster {cluster} lost; {policy.action} once lost for {policy.requeue_after_seconds:g}s"
        return Wait(job.job_id, due, why)
    message = f"cluster {cluster} lost for {lost_for:.0f}s"
    if policy.action == Action.FAIL:
        return Fail(job.job_id, sm.give_up(current, REASON, message), "disconnect policy fail")
    if not job.elsewhere:
        why = (
            f"no other cluster can take it: {job.why_not}" if job.why_not else "no other cluster can take it"
        )
        return Wait(job.job_id, None, why, needs_room=True)
    move = sm.requeue(current, REASON, message=f"{message}; requeued")
    return Requeue(job.job_id, move, "disconnect policy requeue; another cluster can take it")


def decide(cluster: str, lost_since: float, now: float, jobs: Iterable[LostJob]) -> list[Outcome]:
    """The decisions for the jobs of `cluster`, lost since `lost_since`, in the jobs' order;
    jobs no longer on the cluster get none."""
    out = []
    for job in jobs:
        outcome = decide_job(cluster, lost_since, now, job)
        if outcome is not None:
            out.append(outcome)
    return out


def next_look(outcomes: Iterable[Outcome]) -> float:
    """The earliest time a Wait asked to be looked at again (inf if none did)."""
    return min((o.until for o in outcomes if isinstance(o, Wait) and o.until is not None), default=math.inf)


def disrupted(lost: int, known: int, threshold: float) -> bool:
    """Whether so many clusters are lost at once that the fault is more likely the hub's side
    (its NATS, its network) than theirs: evictions are then held, as Kubernetes' node lifecycle
    controller stops evicting when a zone's unhealthy fraction passes its threshold (0.55).
    A federation of one cluster has nowhere to requeue to anyway."""
    return known >= 2 and lost >= 1 and lost / known >= threshold
