"""The queue checks the servicers make for the current caller: which jobs it may see and touch.

A job in a queue the caller may not read does not exist for it: GetJob, CancelJob and
ExplainJob answer NOT_FOUND exactly as for a job that never was, and lists, watches and counts
leave it out. Refusals are marked on the call's audit line with the real reason.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedplane.hub import audit, authz, identity
from fedplane.hub.authz import Permission
from fedplane.hub.errors import HubError
from fedplane.hub.table import JobRecord
from fedplane.v1 import types_pb2 as pb


def submitter() -> str:
    """The name a submitted job is recorded under ("" for the anonymous caller, whose
    idempotency keys stay unscoped)."""
    caller = identity.current()
    return "" if caller.anonymous else caller.name


def readable() -> frozenset[str] | None:
    """The queues whose jobs the caller may read (None: every queue)."""
    return identity.current().access.scope(Permission.READ_JOBS)


def check_queue_filter(queue: str) -> None:
    """A listing, watch or count asked for one queue: refuse it plainly when not granted."""
    caller = identity.current()
    if queue and not caller.access.may(Permission.READ_JOBS, queue):
        audit.deny(f"read of queue {queue!r}, not granted")
        raise HubError("PERMISSION_DENIED", f"{caller.name}: may not read jobs in queue {queue!r}")


def check_submit(specs: Iterable[pb.JobSpec]) -> None:
    """Every spec's queue must be one the caller may submit to; otherwise nothing is stored."""
    caller = identity.current()
    queues = [spec.queue or authz.DEFAULT_QUEUE for spec in specs]
    audit.note(count=len(queues), queues=sorted(set(queues)))
    scope = caller.access.scope(Permission.SUBMIT)
    if scope is None:
        return
    refused = sorted(set(queues) - scope)
    if refused:
        named = ", ".join(repr(q) for q in refused)
        audit.deny(f"submit to queue {named}, not granted")
        raise HubError(
            "PERMISSION_DENIED",
            f"{caller.name}: may not submit to queue {named}"
            f" (granted: {', '.join(sorted(scope)) or 'none'}); nothing was submitted",
        )


def check_job(record: JobRecord | None, job_id: str, permission: Permission) -> None:
    """The caller may `permission` this job; one it may not read answers as a missing job."""
    if record is None:
        return  # the API answers NOT_FOUND itself
    caller = identity.current()
    if not caller.access.may(Permission.READ_JOBS, record.queue):
        audit.deny(f"job {job_id} is in queue {record.queue!r}, not granted")
        audit.note(job_id=job_id, queue=record.queue)
        raise HubError("NOT_FOUND", f"job {job_id!r} not found")
    if not caller.access.may(permission, record.queue):
        audit.deny(f"{permission} in queue {record.queue!r}, not granted")
        audit.note(job_id=job_id, queue=record.queue)
        raise HubError(
            "PERMISSION_DENIED", f"{caller.name}: may not {permission} jobs in queue {record.queue!r}"
        )
