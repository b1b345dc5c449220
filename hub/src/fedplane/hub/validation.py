"""Semantic validation of job specs and the input limits of every request, naming the field and
the problem for every violation.

Runs where requests enter the hub: `request_problems` for every gRPC request before its servicer
(see decoding.py), `validate_spec` where specs enter (SubmitJob, SubmitJobs, an explain of a spec),
before anything is stored: an invalid request is refused whole and leaves no trace. It checks
the wire messages themselves, so it lives at the boundary, not in the core.

Every list, map and string a caller sends is bounded (the limits below, documented in
docs/security.md, *Input limits*): what the hub stores, places and echoes in its errors stays
small whatever a caller sends, and a refusal's message stays within gRPC's trailer size.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from google.protobuf.message import Message

from fedplane.core.model import TAINT_EFFECTS
from fedplane.core.queues import QueueConfig
from fedplane.hub.authz import DEFAULT_QUEUE
from fedplane.hub.errors import HubError
from fedplane.v1 import hub_pb2 as hub_pb
from fedplane.v1 import types_pb2 as pb

MAX_SPEC_BYTES = 512 * 1024
MAX_PODS = 100_000
# Kueue's Workload holds at most 8 pod sets; MultiKueue mirrors workloads, so no more could run.
MAX_POD_SETS = 8
# Entries of any label map: a job's labels, selectors, match_labels, a listing's label filter.
MAX_LABELS = 64
MAX_TOLERATIONS = 64
MAX_PREFERRED_GROUPS = 16
MAX_GROUP_CLUSTERS = 256
MAX_DATASETS = 64
MAX_RESOURCES = 32
MAX_DATASET_ID = 253
# Kubernetes objects nest a dozen levels deep; this leaves room for any CRD, and far less than
# would exhaust a parser's stack anywhere the manifest goes.
MAX_MANIFEST_DEPTH = 100
# Cancel, cordon and remove reasons: a sentence for a person, stored in every transition.
MAX_REASON = 1024
# Job ids the hub makes are 22 characters.
MAX_JOB_ID = 64
MAX_PAGE_TOKEN = 128
MAX_WATCH_JOB_IDS = 1000
MAX_STATE_FILTERS = 16
MAX_PUBLIC_KEY = 128
# A job is shielded from preemption for at most this long once running.
MAX_MIN_RUN_SECONDS = 7 * 24 * 3600
# Objects deleted by one queue Apply or Delete.
MAX_QUEUE_DELETES = 1000
# Of a refused value, at most this many characters are echoed back; of a refusal's problems,
# at most this many are listed (gRPC sends the message in trailers, 8 KiB by default).
MAX_SHOWN = 80
MAX_PROBLEMS = 20

_Bad = Callable[[str, str], None]
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
# UNSPECIFIED is allowed: the job then takes its queue's default action.
_DISCONNECT_ACTIONS = frozenset(pb.DisconnectAction.values())
_JOB_STATES = frozenset(pb.JobState.values())
_RESOURCE = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9_.]*[a-z0-9])?")
_NAME_RULE = "must be at most 63 lowercase letters, digits and '-'"


def shown(value: str) -> str:
    """`value` quoted for an error message, cut short: a refused value may be megabytes."""
    return repr(value) if len(value) <= MAX_SHOWN else f"{value[:MAX_SHOWN]!r}... ({len(value)} characters)"


def clipped(key: str) -> str:
    """A map key as it appears in a field path, cut short like `shown`."""
    return key if len(key) <= MAX_SHOWN else f"{key[:MAX_SHOWN]}..."


def refusal(problems: Sequence[str]) -> HubError:
    """One INVALID_ARGUMENT for all of `problems`, listing the first MAX_PROBLEMS."""
    more = len(problems) - MAX_PROBLEMS
    message = "; ".join(problems[:MAX_PROBLEMS])
    return HubError("INVALID_ARGUMENT", f"{message}; and {more} more" if more > 0 else message)


def is_name(value: str) -> bool:
    """A DNS label: job, pod set, queue and cluster names."""
    return len(value) <= 63 and _NAME.fullmatch(value) is not None


def is_resource_name(value: str) -> bool:
    """A resource name as Kubernetes writes them: "cpu", "nvidia.com/gpu"."""
    return len(value) <= 253 and _RESOURCE.fullmatch(value) is not None


def qualified_name_problem(key: str) -> str | None:
    """Why `key` is not a Kubernetes qualified name (label, node selector, toleration and taint
    keys), in Kubernetes' words; None when it is one."""
    parts = key.split("/")
    if len(parts) > 2:
        return "a qualified name has at most one '/' (an optional DNS subdomain prefix, '/', a name)"
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            return "prefix part must not be empty"
        if len(prefix) > 253:
            return "prefix part must be no more than 253 characters"
        if not _DNS_SUBDOMAIN.fullmatch(prefix):
            return "prefix part must be a DNS subdomain (lowercase letters, digits, '-' and '.')"
    if not name:
        return "name part must not be empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME.fullmatch(name):
        return (
            "name part must consist of letters, digits, '-', '_' or '.',"
            " and start and end with a letter or digit"
        )
    return None


def label_value_problem(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL_VALUE.fullmatch(value):
        return "must be empty or letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
    return None


def validate_spec(spec: pb.JobSpec, where: str = "spec") -> list[str]:
    """All problems with `spec`, each as "field.path: problem"; empty when valid."""
    problems: list[str] = []

    def bad(path: str, problem: str) -> None:
        problems.append(f"{where}.{path}: {problem}" if path else f"{where}: {problem}")

    if spec.ByteSize() > MAX_SPEC_BYTES:
        # Nothing else is looked at: checking a huge spec costs what refusing it should not.
        bad("", f"spec is {spec.ByteSize()} bytes, more than the {MAX_SPEC_BYTES} allowed")
        return problems
    if not spec.name:
        bad("name", "required")
    elif not is_name(spec.name):
        bad("name", f"{shown(spec.name)} {_NAME_RULE}")
    if spec.queue and not is_name(spec.queue):
        bad("queue", f"{shown(spec.queue)} {_NAME_RULE}")
    _labels(spec.labels, "labels", bad)
    if not spec.pod_sets:
        bad("pod_sets", "at least one pod set is required")
    elif _bounded(spec.pod_sets, MAX_POD_SETS, "pod_sets", "pod sets", bad):
        seen: set[str] = set()
        for i, pod_set in enumerate(spec.pod_sets):
            _pod_set(pod_set, f"pod_sets[{i}]", seen, bad)
    _constraints(spec.constraints, bad)
    if _bounded(spec.datasets, MAX_DATASETS, "datasets", "datasets", bad):
        _datasets(spec.datasets, bad)
    if spec.max_run_seconds < 0:
        bad("max_run_seconds", f"must not be negative (got {spec.max_run_seconds})")
    if not 0 <= spec.min_run_seconds <= MAX_MIN_RUN_SECONDS:
        bad(
            "min_run_seconds",
            f"must be between 0 and {MAX_MIN_RUN_SECONDS} (a week; got {spec.min_run_seconds})",
        )
    if spec.priority_class and not is_name(spec.priority_class):
        bad("priority_class", f"{shown(spec.priority_class)} is not a priority class name (a DNS label)")
    if spec.HasField("disconnect"):
        _disconnect(spec.disconnect, bad)
    if spec.workload.manifest_json:
        _manifest(spec.workload.manifest_json, bad)
    return problems


def queue_problems(
    spec: pb.JobSpec, config: QueueConfig, implicit_queues: bool, where: str = "spec"
) -> list[str]:
    """What in a (valid) spec names a queue or priority class the hub does not hold. A spec
    without a queue goes to queue "default"; with `implicit_queues`, an unknown queue is one
    without quota (development and tests)."""
    problems: list[str] = []
    queue = spec.queue or DEFAULT_QUEUE
    if queue not in config.queues and not implicit_queues:
        hint = f'; a job without a queue goes to "{DEFAULT_QUEUE}"' if not spec.queue else ""
        problems.append(f'{where}.queue: queue "{queue}" does not exist (fedplane queues lists them){hint}')
    if spec.priority_class:
        cls = config.priority_classes.get(spec.priority_class)
        if cls is None:
            problems.append(
                f'{where}.priority_class: priority class "{spec.priority_class}" does not exist'
                " (fedplane queues -o yaml lists them)"
            )
        elif spec.priority and spec.priority != cls.value:
            problems.append(
                f"{where}.priority: {spec.priority} contradicts priority class {spec.priority_class!r}"
                f" (value {cls.value}); give one or the other"
            )
    return problems


def _bounded(items: Sequence[Any] | Mapping[str, Any], limit: int, path: str, what: str, bad: _Bad) -> bool:
    """Whether `items` is within `limit` (its entries are worth checking one by one)."""
    if len(items) <= limit:
        return True
    bad(path, f"{len(items)} {what}; at most {limit} allowed")
    return False


def _pod_set(pod_set: pb.PodSet, path: str, seen: set[str], bad: _Bad) -> None:
    if not pod_set.name:
        bad(f"{path}.name", "required")
    elif not is_name(pod_set.name):
        bad(f"{path}.name", f"{shown(pod_set.name)} must be lowercase letters, digits and '-'")
    elif pod_set.name in seen:
        bad(f"{path}.name", f"pod set {pod_set.name!r} appears twice")
    seen.add(pod_set.name)
    if pod_set.count < 1 or pod_set.count > MAX_PODS:
        bad(f"{path}.count", f"must be between 1 and {MAX_PODS} (got {pod_set.count})")
    if pod_set.min_count < 0 or pod_set.min_count > max(pod_set.count, 0):
        bad(f"{path}.min_count", f"must be between 0 and count {pod_set.count} (got {pod_set.min_count})")
    requests = pod_set.requests.quantities
    if not _bounded(requests, MAX_RESOURCES, f"{path}.requests", "resources", bad):
        return
    for resource, amount in requests.items():
        if not is_resource_name(resource):
            bad(f"{path}.requests.{clipped(resource)}", "not a valid resource name")
        if amount < 0:
            bad(f"{path}.requests.{clipped(resource)}", f"must not be negative (got {amount})")
    if not any(amount > 0 for amount in requests.values()):
        bad(f"{path}.requests", "at least one resource must be requested (e.g. cpu)")
    if pod_set.gpu_type:
        # Matched against a node label's value (nvidia.com/gpu.product).
        problem = label_value_problem(pod_set.gpu_type)
        if problem is not None:
            bad(f"{path}.gpu_type", f"{shown(pod_set.gpu_type)} is not a valid label value: {problem}")
        elif requests.get("nvidia.com/gpu", 0) <= 0:
            bad(f"{path}.gpu_type", f"{pod_set.gpu_type!r} is set but no nvidia.com/gpu is requested")


def _constraints(constraints: pb.ClusterConstraints, bad: _Bad) -> None:
    _labels(constraints.cluster_selector, "constraints.cluster_selector", bad)
    tolerations = constraints.tolerations
    if _bounded(tolerations, MAX_TOLERATIONS, "constraints.tolerations", "tolerations", bad):
        for i, tol in enumerate(tolerations):
            _toleration(tol, f"constraints.tolerations[{i}]", bad)
    groups = constraints.preferred_groups
    if not _bounded(groups, MAX_PREFERRED_GROUPS, "constraints.preferred_groups", "groups", bad):
        return
    for i, group in enumerate(groups):
        path = f"constraints.preferred_groups[{i}]"
        if not group.clusters and not group.match_labels:
            bad(path, "name clusters or match_labels")
        if _bounded(group.clusters, MAX_GROUP_CLUSTERS, f"{path}.clusters", "clusters", bad):
            for j, cluster in enumerate(group.clusters):
                if not is_name(cluster):
                    bad(f"{path}.clusters[{j}]", f"{shown(cluster)} is not a cluster name (a DNS label)")
        _labels(group.match_labels, f"{path}.match_labels", bad)


def _toleration(tol: pb.Toleration, path: str, bad: _Bad) -> None:
    if tol.operator not in ("", "Equal", "Exists"):
        bad(f"{path}.operator", f"{shown(tol.operator)} must be Equal or Exists")
    if tol.operator == "Exists" and tol.value:
        bad(f"{path}.value", "must be empty when operator is Exists")
    if not tol.key and tol.operator != "Exists":
        bad(f"{path}.key", "required unless operator is Exists")
    if tol.key:
        problem = qualified_name_problem(tol.key)
        if problem is not None:
            bad(f"{path}.key", f"{shown(tol.key)} is not a valid taint key: {problem}")
    if tol.value:
        problem = label_value_problem(tol.value)
        if problem is not None:
            bad(f"{path}.value", f"{shown(tol.value)} is not a valid taint value: {problem}")
    if tol.effect and tol.effect not in TAINT_EFFECTS:
        bad(f"{path}.effect", f"{shown(tol.effect)} must be one of {', '.join(sorted(TAINT_EFFECTS))}")


def _datasets(datasets: Iterable[pb.DatasetRef], bad: _Bad) -> None:
    ids: set[str] = set()
    for i, dataset in enumerate(datasets):
        path = f"datasets[{i}]"
        if not dataset.id:
            bad(f"{path}.id", "required")
        elif len(dataset.id) > MAX_DATASET_ID:
            bad(f"{path}.id", f"{shown(dataset.id)} is longer than {MAX_DATASET_ID} characters")
        elif dataset.id in ids:
            bad(f"{path}.id", f"dataset {dataset.id!r} listed twice")
        ids.add(dataset.id)
        if dataset.size_bytes < 0:
            bad(f"{path}.size_bytes", f"must not be negative (got {dataset.size_bytes})")


def _disconnect(policy: pb.DisconnectPolicy, bad: _Bad) -> None:
    if policy.action not in _DISCONNECT_ACTIONS:
        bad("disconnect.action", f"{policy.action} is not a DisconnectAction (REQUEUE, WAIT or FAIL)")
    after = policy.requeue_after_seconds
    if not math.isfinite(after):
        bad("disconnect.requeue_after_seconds", f"must be a finite number of seconds (got {after})")
    elif after < 0:
        bad("disconnect.requeue_after_seconds", f"must not be negative (got {after:g})")


def _labels(labels: Mapping[str, str], path: str, bad: _Bad) -> None:
    if not _bounded(labels, MAX_LABELS, path, "labels", bad):
        return
    for key, value in labels.items():
        problem = qualified_name_problem(key)
        if problem is not None:
            bad(f"{path}.{clipped(key)}", f"not a valid label key: {problem}")
        problem = label_value_problem(value)
        if problem is not None:
            bad(f"{path}.{clipped(key)}", f"{shown(value)} is not a valid label value: {problem}")


def _manifest(text: str, bad: _Bad) -> None:
    try:
        manifest = json.loads(text)
    except RecursionError:
        bad("workload.manifest_json", f"nested more than {MAX_MANIFEST_DEPTH} levels deep")
        return
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        bad("workload.manifest_json", f"not valid JSON ({getattr(exc, 'msg', str(exc))}{where})")
        return
    if not isinstance(manifest, dict):
        bad("workload.manifest_json", "must be a JSON object (a Kubernetes manifest)")
        return
    # Only as deep as it has brackets: an ordinary manifest is never walked.
    if text.count("{") + text.count("[") > MAX_MANIFEST_DEPTH and _depth(manifest) > MAX_MANIFEST_DEPTH:
        bad("workload.manifest_json", f"nested more than {MAX_MANIFEST_DEPTH} levels deep")
        return
    for key in ("apiVersion", "kind"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            bad(f"workload.manifest_json.{key}", "required")


def _depth(document: object) -> int:
    """How deep objects and arrays nest in a parsed JSON document (without recursing)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


# ---------------------------------------------------------------------------- requests


def reason_problems(reason: str, field: str = "reason") -> list[str]:
    """The limit of every free-text reason (cancel, cordon, remove)."""
    if len(reason) > MAX_REASON:
        return [f"{field}: {len(reason)} characters; at most {MAX_REASON} allowed"]
    return []


def _length(value: str, field: str, limit: int) -> list[str]:
    return [f"{field}: {shown(value)} is longer than {limit} characters"] if len(value) > limit else []


def _filter_name(value: str, field: str, what: str) -> list[str]:
    """An optional queue or cluster name in a filter: one that no job can carry is refused."""
    return [f"{field}: {shown(value)} is not a {what} (a DNS label)"] if value and not is_name(value) else []


def _job_ids(ids: Sequence[str], field: str, limit: int) -> list[str]:
    if len(ids) > limit:
        return [f"{field}: {len(ids)} job ids; at most {limit} allowed"]
    return [p for i, job_id in enumerate(ids) for p in _length(job_id, f"{field}[{i}]", MAX_JOB_ID)]


def _list_jobs(request: hub_pb.ListJobsRequest) -> list[str]:
    problems = _filter_name(request.queue, "queue", "queue name")
    problems += _filter_name(request.cluster, "cluster", "cluster name")
    if len(request.states) > MAX_STATE_FILTERS:
        problems.append(f"states: {len(request.states)} states; at most {MAX_STATE_FILTERS} allowed")
    else:
        problems += [
            f"states[{i}]: {s} is not a JobState"
            for i, s in enumerate(request.states)
            if s not in _JOB_STATES
        ]
    _labels(request.labels, "labels", lambda path, problem: problems.append(f"{path}: {problem}"))
    return problems + _length(request.page_token, "page_token", MAX_PAGE_TOKEN)


def _watch_jobs(request: hub_pb.WatchJobsRequest) -> list[str]:
    problems = _filter_name(request.queue, "queue", "queue name")
    if request.from_revision < 0:
        problems.append("from_revision: must not be negative")
    return problems + _job_ids(request.job_ids, "job_ids", MAX_WATCH_JOB_IDS)


def _explain_job(request: hub_pb.ExplainJobRequest) -> list[str]:
    return _length(request.job_id, "job_id", MAX_JOB_ID)  # a spec is validated as a submitted one


def _refs(refs: Sequence[hub_pb.ObjectRef], field: str) -> list[str]:
    """Queue object references: bounded in number, and names no longer than a DNS label's
    (the queue book names whatever else is wrong with them)."""
    if len(refs) > MAX_QUEUE_DELETES:
        return [f"{field}: {len(refs)} objects; at most {MAX_QUEUE_DELETES} allowed"]
    problems: list[str] = []
    for i, ref in enumerate(refs):
        problems += _length(ref.kind, f"{field}[{i}].kind", 63) + _length(ref.name, f"{field}[{i}].name", 63)
    return problems


_REQUEST_LIMITS: dict[str, Callable[[Any], list[str]]] = {
    "fedplane.v1.GetJobRequest": lambda r: _length(r.job_id, "job_id", MAX_JOB_ID),
    "fedplane.v1.ListJobsRequest": _list_jobs,
    "fedplane.v1.CancelJobRequest": lambda r: (
        _length(r.job_id, "job_id", MAX_JOB_ID) + reason_problems(r.reason)
    ),
    "fedplane.v1.SetJobPriorityRequest": lambda r: (
        _length(r.job_id, "job_id", MAX_JOB_ID) + _length(r.priority_class, "priority_class", 63)
    ),
    "fedplane.v1.WatchJobsRequest": _watch_jobs,
    "fedplane.v1.ExplainJobRequest": _explain_job,
    "fedplane.v1.GetJobStatsRequest": lambda r: _filter_name(r.queue, "queue", "queue name"),
    "fedplane.v1.CordonClusterRequest": lambda r: reason_problems(r.reason),
    "fedplane.v1.RemoveClusterRequest": lambda r: reason_problems(r.reason),
    "fedplane.v1.ApproveClusterRequest": lambda r: _length(r.public_key, "public_key", MAX_PUBLIC_KEY),
    "fedplane.v1.ApplyQueueObjectsRequest": lambda r: _refs(r.deletes, "deletes"),
    "fedplane.v1.DeleteQueueObjectsRequest": lambda r: _refs(r.refs, "refs"),
}


def request_problems(request: Message) -> list[str]:
    """What in a request exceeds the input limits (before any servicer code sees it). Specs and
    idempotency keys are checked where they enter (intake, explain), cluster names by the
    servicers; a request type without limits here has none beyond those."""
    limits = _REQUEST_LIMITS.get(request.DESCRIPTOR.full_name)
    return limits(request) if limits is not None else []
