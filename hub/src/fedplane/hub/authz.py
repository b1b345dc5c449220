"""Authorization: what a caller may do, by role and queue (pure: plain types, no I/O).

Three roles, each granted on a set of queues ("*": every queue). A viewer reads jobs, a
submitter also submits and cancels, and an administrator may do everything, including what
is no queue's (clusters, queues, priority classes), so an administrator's grant covers every
queue. Every RPC the hub serves is in `METHODS` with the one permission it needs; a method
missing from it is refused, so that a new RPC is closed until someone decides who may call it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

ALL_QUEUES = "*"
DEFAULT_QUEUE = "default"


class Role(enum.StrEnum):
    ADMIN = "admin"
    SUBMITTER = "submitter"
    VIEWER = "viewer"


class Permission(enum.StrEnum):
    # No credentials needed (health probes).
    OPEN = "open"
    # Any authenticated caller, whatever its grants (cluster and hub reads, reflection).
    AUTHENTICATED = "authenticated"
    READ_JOBS = "read jobs"
    SUBMIT = "submit"
    CANCEL = "cancel"
    MANAGE_CLUSTERS = "manage clusters"
    MANAGE_QUEUES = "manage queues"


# The queue-scoped permissions each role grants in its queues; an administrator holds every one.
ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ_JOBS}),
    Role.SUBMITTER: frozenset({Permission.READ_JOBS, Permission.SUBMIT, Permission.CANCEL}),
    Role.ADMIN: frozenset(Permission),
}

_JOBS = "/fedplane.v1.JobService/"
_CLUSTERS = "/fedplane.v1.ClusterService/"
_QUEUES = "/fedplane.v1.QueueService/"
METHODS: dict[str, Permission] = {
    f"{_JOBS}SubmitJob": Permission.SUBMIT,
    f"{_JOBS}SubmitJobs": Permission.SUBMIT,
    f"{_JOBS}GetJob": Permission.READ_JOBS,
    f"{_JOBS}ListJobs": Permission.READ_JOBS,
    f"{_JOBS}CancelJob": Permission.CANCEL,
    # A submitter to the job's queue may reorder its jobs there.
    f"{_JOBS}SetJobPriority": Permission.SUBMIT,
    f"{_JOBS}WatchJobs": Permission.READ_JOBS,
    f"{_JOBS}ExplainJob": Permission.READ_JOBS,
    f"{_JOBS}GetJobStats": Permission.READ_JOBS,
    f"{_CLUSTERS}ListClusters": Permission.AUTHENTICATED,
    f"{_CLUSTERS}GetCluster": Permission.AUTHENTICATED,
    f"{_CLUSTERS}CordonCluster": Permission.MANAGE_CLUSTERS,
    f"{_CLUSTERS}UncordonCluster": Permission.MANAGE_CLUSTERS,
    f"{_CLUSTERS}ApproveCluster": Permission.MANAGE_CLUSTERS,
    f"{_CLUSTERS}RemoveCluster": Permission.MANAGE_CLUSTERS,
    f"{_QUEUES}Apply": Permission.MANAGE_QUEUES,
    f"{_QUEUES}Delete": Permission.MANAGE_QUEUES,
    # Every caller sees the queues it is granted, and every cohort, flavor and priority class.
    f"{_QUEUES}ListQueueObjects": Permission.AUTHENTICATED,
    f"{_QUEUES}GetQueueView": Permission.AUTHENTICATED,
    "/fedplane.v1.HubService/GetHubStatus": Permission.AUTHENTICATED,
    "/grpc.health.v1.Health/Check": Permission.OPEN,
    "/grpc.health.v1.Health/Watch": Permission.OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Permission.AUTHENTICATED,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Permission.AUTHENTICATED,
}

# Calls that change something: each leaves an audit line even when allowed.
MUTATING = frozenset(
    {
        f"{_JOBS}SubmitJob",
        f"{_JOBS}SubmitJobs",
        f"{_JOBS}CancelJob",
        f"{_JOBS}SetJobPriority",
        f"{_CLUSTERS}CordonCluster",
        f"{_CLUSTERS}UncordonCluster",
        f"{_CLUSTERS}ApproveCluster",
        f"{_CLUSTERS}RemoveCluster",
        f"{_QUEUES}Apply",
        f"{_QUEUES}Delete",
    }
)


@dataclass(frozen=True)
class Grant:
    """A role on some queues ("*" among them: every queue)."""

    role: Role
    queues: frozenset[str] = frozenset({ALL_QUEUES})


@dataclass(frozen=True)
class GrantRule:
    """A configured grant: to these principal names and groups."""

    grant: Grant
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    def applies(self, name: str, groups: frozenset[str]) -> bool:
        return name in self.users or not self.groups.isdisjoint(groups)


@dataclass(frozen=True)
class Access:
    """What one caller may do: per queue-scoped permission, the queues (None: every queue)."""

    queues: dict[Permission, frozenset[str] | None]

    def may(self, permission: Permission, queue: str | None = None) -> bool:
        """Whether the caller holds `permission` in `queue` (None: in at least one queue)."""
        if permission in (Permission.OPEN, Permission.AUTHENTICATED):
            return True
        if permission not in self.queues:
            return False
        scope = self.queues[permission]
        return scope is None or queue is None or (queue or DEFAULT_QUEUE) in scope

    def scope(self, permission: Permission) -> frozenset[str] | None:
        """The queues in which the caller holds `permission` (None: every queue)."""
        return self.queues.get(permission, frozenset())

    @property
    def admin(self) -> bool:
        return self.queues.get(Permission.MANAGE_CLUSTERS, frozenset()) is None


EVERYTHING = Access({permission: None for permission in Permission})
NOTHING = Access({})


def access(grants: Iterable[Grant]) -> Access:
    """The union of grants."""
    scopes: dict[Permission, frozenset[str] | None] = {}
    for grant in grants:
        everywhere = grant.role is Role.ADMIN or ALL_QUEUES in grant.queues
        for permission in ROLE_PERMISSIONS[grant.role]:
            held = scopes.get(permission, frozenset())
            if everywhere or held is None:
                scopes[permission] = None
            else:
                scopes[permission] = held | grant.queues
    return Access(scopes)


def resolve(name: str, groups: frozenset[str], own: Iterable[Grant], rules: Iterable[GrantRule]) -> Access:
    """A caller's access: the grants its credential carries and the configured rules naming it
    or one of its groups."""
    return access([*own, *(rule.grant for rule in rules if rule.applies(name, groups))])


def method_denial(method: str, caller: Access) -> str | None:
    """Why `caller` may not call `method` at all (None: it may, perhaps only in some queues)."""
    permission = METHODS.get(method)
    if permission is None:
        return f"{method} is not in the hub's authorization table"
    if caller.may(permission):
        return None
    roles = " or ".join(
        role for role in (Role.VIEWER, Role.SUBMITTER, Role.ADMIN) if permission in ROLE_PERMISSIONS[role]
    )
    where = "" if permission in (Permission.MANAGE_CLUSTERS, Permission.MANAGE_QUEUES) else " in some queue"
    return f"{method.rsplit('/', 1)[-1]} needs the {roles} role{where}, which none of your grants gives"
