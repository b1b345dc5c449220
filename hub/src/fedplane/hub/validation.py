"""Semantic validation of job specs, naming the field and the problem for every violation.

Runs where specs enter the hub (SubmitJob, SubmitJobs, an explain of a spec), before anything
is stored: an invalid spec is refused whole and leaves no trace. It checks the wire message
itself, so it lives at the boundary, not in the core.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping

from fedplane.core.model import TAINT_EFFECTS
from fedplane.v1 import types_pb2 as pb

MAX_SPEC_BYTES = 512 * 1024
MAX_PODS = 100_000
_Bad = Callable[[str, str], None]
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# UNSPECIFIED is allowed: the job then takes its queue's default action.
_DISCONNECT_ACTIONS = frozenset(pb.DisconnectAction.values())
_RESOURCE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")


def validate_spec(spec: pb.JobSpec, where: str = "spec") -> list[str]:
    """All problems with `spec`, each as "field.path: problem"; empty when valid."""
    problems: list[str] = []

    def bad(path: str, problem: str) -> None:
        problems.append(f"{where}.{path}: {problem}" if path else f"{where}: {problem}")

    if not spec.name:
        bad("name", "required")
    elif len(spec.name) > 63 or not _NAME.match(spec.name):
        bad("name", f"{spec.name!r} must be at most 63 lowercase letters, digits and '-'")
    if spec.queue and (len(spec.queue) > 63 or not _NAME.match(spec.queue)):
        bad("queue", f"{spec.queue!r} must be at most 63 lowercase letters, digits and '-'")
    _labels(spec.labels, "labels", bad)
    if not spec.pod_sets:
        bad("pod_sets", "at least one pod set is required")
    seen: set[str] = set()
    for i, pod_set in enumerate(spec.pod_sets):
        _pod_set(pod_set, f"pod_sets[{i}]", seen, bad)
    _constraints(spec.constraints, bad)
    ids: set[str] = set()
    for i, dataset in enumerate(spec.datasets):
        path = f"datasets[{i}]"
        if not dataset.id:
            bad(f"{path}.id", "required")
        elif dataset.id in ids:
            bad(f"{path}.id", f"dataset {dataset.id!r} listed twice")
        ids.add(dataset.id)
        if dataset.size_bytes < 0:
            bad(f"{path}.size_bytes", f"must not be negative (got {dataset.size_bytes})")
    if spec.max_run_seconds < 0:
        bad("max_run_seconds", f"must not be negative (got {spec.max_run_seconds})")
    if spec.HasField("disconnect"):
        _disconnect(spec.disconnect, bad)
    if spec.workload.manifest_json:
        _manifest(spec.workload.manifest_json, bad)
    if spec.ByteSize() > MAX_SPEC_BYTES:
        bad("", f"spec is {spec.ByteSize()} bytes, more than the {MAX_SPEC_BYTES} allowed")
    return problems


def _pod_set(pod_set: pb.PodSet, path: str, seen: set[str], bad: _Bad) -> None:
    if not pod_set.name:
        bad(f"{path}.name", "required")
    elif not _NAME.match(pod_set.name):
        bad(f"{path}.name", f"{pod_set.name!r} must be lowercase letters, digits and '-'")
    elif pod_set.name in seen:
        bad(f"{path}.name", f"pod set {pod_set.name!r} appears twice")
    seen.add(pod_set.name)
    if pod_set.count < 1 or pod_set.count > MAX_PODS:
        bad(f"{path}.count", f"must be between 1 and {MAX_PODS} (got {pod_set.count})")
    if pod_set.min_count < 0 or pod_set.min_count > max(pod_set.count, 0):
        bad(f"{path}.min_count", f"must be between 0 and count {pod_set.count} (got {pod_set.min_count})")
    requests = pod_set.requests.quantities
    for resource, amount in requests.items():
        if not _RESOURCE.match(resource):
            bad(f"{path}.requests.{resource}", "not a valid resource name")
        if amount < 0:
            bad(f"{path}.requests.{resource}", f"must not be negative (got {amount})")
    if not any(amount > 0 for amount in requests.values()):
        bad(f"{path}.requests", "at least one resource must be requested (e.g. cpu)")
    if pod_set.gpu_type and requests.get("nvidia.com/gpu", 0) <= 0:
        bad(f"{path}.gpu_type", f"{pod_set.gpu_type!r} is set but no nvidia.com/gpu is requested")


def _constraints(constraints: pb.ClusterConstraints, bad: _Bad) -> None:
    _labels(constraints.cluster_selector, "constraints.cluster_selector", bad)
    for i, tol in enumerate(constraints.tolerations):
        path = f"constraints.tolerations[{i}]"
        if tol.operator not in ("", "Equal", "Exists"):
            bad(f"{path}.operator", f"{tol.operator!r} must be Equal or Exists")
        if tol.operator == "Exists" and tol.value:
            bad(f"{path}.value", "must be empty when operator is Exists")
        if not tol.key and tol.operator != "Exists":
            bad(f"{path}.key", "required unless operator is Exists")
        if tol.effect and tol.effect not in TAINT_EFFECTS:
            bad(f"{path}.effect", f"{tol.effect!r} must be one of {', '.join(sorted(TAINT_EFFECTS))}")
    for i, group in enumerate(constraints.preferred_groups):
        if not group.clusters and not group.match_labels:
            bad(f"constraints.preferred_groups[{i}]", "name clusters or match_labels")
        _labels(group.match_labels, f"constraints.preferred_groups[{i}].match_labels", bad)


def _disconnect(policy: pb.DisconnectPolicy, bad: _Bad) -> None:
    if policy.action not in _DISCONNECT_ACTIONS:
        bad("disconnect.action", f"{policy.action} is not a DisconnectAction (REQUEUE, WAIT or FAIL)")
    after = policy.requeue_after_seconds
    if not math.isfinite(after):
        bad("disconnect.requeue_after_seconds", f"must be a finite number of seconds (got {after})")
    elif after < 0:
        bad("disconnect.requeue_after_seconds", f"must not be negative (got {after:g})")


def _labels(labels: Mapping[str, str], path: str, bad: _Bad) -> None:
    for key, value in labels.items():
        if len(key) > 253 or not _LABEL_KEY.match(key):
            bad(f"{path}.{key}", "not a valid label key")
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            bad(f"{path}.{key}", f"{value!r} is not a valid label value")


def _manifest(text: str, bad: _Bad) -> None:
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        bad("workload.manifest_json", f"not valid JSON ({exc.msg} at line {exc.lineno})")
        return
    if not isinstance(manifest, dict):
        bad("workload.manifest_json", "must be a JSON object (a Kubernetes manifest)")
        return
    for key in ("apiVersion", "kind"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            bad(f"workload.manifest_json.{key}", "required")
