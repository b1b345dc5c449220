"""The Kubernetes backend: a real member cluster behind the agent.

Inventory and datasets come from list+watch of Nodes, Pods, labelled PVCs and (when installed)
Fluid Datasets; workloads are the JSON manifests of the job specs, labelled with the job, its
generation and the hub, pinned to the nodes the hub chose, and followed by watching them.

Threading: the official client is blocking, so every request runs in a worker thread of the
backend's own pool (`max_concurrent_requests` threads: that many creates in flight, the rest
queued without blocking the loop) and every watch in its own daemon thread. Watch threads only
parse and project objects; they hand the results to the event loop with call_soon_threadsafe,
so all state lives on the loop and the Backend methods never lock. Status comes from the
watches alone: a create is one POST (a GET only to adopt an object that already exists).

Rate limits are configuration, not client defaults: client-go's QPS 5 / burst 10 is what held
MultiKueue to 2.8 jobs/s. Without `qps` the pool alone bounds the load on the API server.

Requests go through the dynamic client on raw JSON (creates, the hot path, through its
connection pool directly: see `post`), for Jobs too: the typed models of client
v37 are strict pydantic models that reject valid manifests (e.g. `nvidia.com/gpu: 1` as an
integer) and cannot carry fields they do not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import urllib3
import urllib3.exceptions
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from fedplane.agent.backend import (
    Backend,
    BackendError,
    CreateRequest,
    EmitStatus,
    InventorySnapshot,
    NotifyChange,
    WorkloadEvent,
    WorkloadRef,
)
from fedplane.core import quantity
from fedplane.runtime import logs
from fedplane.runtime.config import ConfigError, from_mapping
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.agent.kubernetes")

LABEL_JOB = "fedplane.io/job-id"
LABEL_GENERATION = "fedplane.io/generation"
LABEL_HUB = "fedplane.io/hub"
LABEL_DATASET = "fedplane.io/dataset"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# The exact job id (the label holds a shortened form when the id is not a valid label value).
ANNOTATION_JOB = "fedplane.io/job-id"
# How many objects make up the workload (a v1 List manifest creates one object per item).
ANNOTATION_PARTS = "fedplane.io/parts"
# How many of an object's pods the gang needs running (its pod sets' min_count, else count): a
# batch/v1 Job is RUNNING once that many are ready, not at its first pod.
ANNOTATION_GANG_PODS = "fedplane.io/gang-pods"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

_TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
_FINISHED_MEMORY = 10_000
# Connection-level failures (the API is unreachable or the connection broke): always retryable.
_NETWORK_ERRORS = (OSError, urllib3.exceptions.HTTPError)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# One thread and one connection each: beyond this the GIL, not the API server, is the limit.
MAX_CONCURRENT_REQUESTS = 256

# Workload kinds besides batch/v1 Job whose objects are watched when their CRD is installed.
KNOWN_WORKLOAD_KINDS: tuple[tuple[str, str], ...] = (
    ("jobset.x-k8s.io/v1alpha2", "JobSet"),
    ("kubeflow.org/v1", "PyTorchJob"),
    ("kubeflow.org/v1", "TFJob"),
    ("kubeflow.org/v1", "XGBoostJob"),
    ("kubeflow.org/v1", "PaddleJob"),
    ("kubeflow.org/v1", "JAXJob"),
    ("kubeflow.org/v2beta1", "MPIJob"),
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"),
    ("ray.io/v1", "RayJob"),
)
FLUID_DATASET = ("data.fluid.io/v1alpha1", "Dataset")


# ---------------------------------------------------------------------------------------- config


@dataclass
class KubernetesBackendConfig:
    """The `backend:` section of an agent config with `type: kubernetes`."""

    # Path of a kubeconfig; empty = in-cluster when running in a pod, else ~/.kube/config.
    kubeconfig: str = ""
    context: str = ""
    # Force the in-cluster service-account config.
    in_cluster: bool = False
    # Namespace of workloads whose manifest names none.
    namespace: str = "default"
    # Identity of the hub deployment; selects our objects (label fedplane.io/hub).
    hub_id: str = "fedplane"
    # Submit workloads to this Kueue LocalQueue; ADMITTED is reported when Kueue admits.
    kueue_local_queue: str | None = None
    # Relist everything this often even when watches are healthy.
    resync_seconds: float = 600.0
    # Server-side timeout of one watch request (reconnected right after).
    watch_timeout_seconds: int = 300
    # Timeout of ordinary requests.
    request_timeout_seconds: float = 30.0
    # start() waits this long for the first list of every resource.
    sync_timeout_seconds: float = 60.0
    # Fluid Datasets count "cached" bytes (the cluster's cache) or "total" (status.ufsTotal).
    fluid_bytes: str = "cached"
    # Requests (creates, deletes, listings) in flight at once; more wait their turn in a queue.
    max_concurrent_requests: int = 32
    # Client-side rate limit of those requests, per second; 0 = none (the pool bounds the load).
    # Watches are never limited, so status keeps flowing under a low limit.
    qps: float = 0.0
    # Requests allowed at once above the qps rate after a quiet spell (with qps only).
    burst: int = 100

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> KubernetesBackendConfig:
        """Build from the agent config's backend mapping (a `type` key, if any, must be kubernetes)."""
        settings = dict(data or {})
        kind = settings.pop("type", "kubernetes")
        if kind != "kubernetes":
            raise ConfigError(f"backend.type: {kind!r} is not kubernetes")
        config = from_mapping(cls, settings, "backend")
        if config.fluid_bytes not in ("cached", "total"):
            raise ConfigError("backend.fluid_bytes: use cached or total")
        if config.resync_seconds <= 0 or config.watch_timeout_seconds <= 0:
            raise ConfigError("backend: resync_seconds and watch_timeout_seconds must be positive")
        if not _LABEL_VALUE.match(config.hub_id) or not config.hub_id or len(config.hub_id) > 63:
            raise ConfigError(f"backend.hub_id: {config.hub_id!r} is not a valid label value")
        if not 1 <= config.max_concurrent_requests <= MAX_CONCURRENT_REQUESTS:
            raise ConfigError(f"backend.max_concurrent_requests: use 1 to {MAX_CONCURRENT_REQUESTS}")
        if not config.qps >= 0 or config.qps == float("inf"):
            raise ConfigError("backend.qps: use a number of requests per second, or 0 for no limit")
        if config.burst < 1:
            raise ConfigError("backend.burst: use 1 or more")
        return config


# ------------------------------------------------------------------------------ naming & labels


def job_label_value(job_id: str) -> str:
    """The job id as a label value; ids that are not valid label values are shortened and hashed."""
    if len(job_id) <= 63 and _LABEL_VALUE.match(job_id):
        return job_id
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:10]
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", job_id)[:50].strip("-_.")
    return f"{base}-{digest}" if base else digest


def object_name(job_id: str, generation: int, part: int | None = None) -> str:
    """Deterministic DNS-1123 name, so a redelivered dispatch finds (and adopts) its object."""
    base = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")
    suffix = f"-g{generation}" + (f"-{part}" if part is not None else "")
    if base != job_id or len(base) + len(suffix) > 63:
        suffix += "-" + hashlib.sha256(job_id.encode()).hexdigest()[:8]
    base = base[: 63 - len(suffix)].strip("-") or "fp"
    return f"{base}{suffix}"


def _workload_key(meta: Mapping[str, Any], hub_id: str) -> tuple[str, int] | None:
    """(job id, generation) of an object carrying our labels, else None (never touched)."""
    labels = meta.get("labels") or {}
    if labels.get(LABEL_HUB) != hub_id or LABEL_JOB not in labels:
        return None
    try:
        generation = int(labels.get(LABEL_GENERATION, ""))
    except ValueError:
        return None
    job_id = (meta.get("annotations") or {}).get(ANNOTATION_JOB) or labels[LABEL_JOB]
    return str(job_id), generation


# ------------------------------------------------------------------------------ resource kinds


@dataclass(frozen=True)
class Kind:
    """An API resource: what a watch or request needs (resolved through discovery for CRDs)."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        prefix = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        ns = f"/namespaces/{namespace}" if namespace and self.namespaced else ""
        return f"{prefix}{ns}/{self.plural}" + (f"/{name}" if name else "")

    @property
    def key(self) -> tuple[str, str]:
        return self.api_version, self.kind

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]


NODES = Kind("v1", "Node", "nodes", namespaced=False)
PODS = Kind("v1", "Pod", "pods")
PVCS = Kind("v1", "PersistentVolumeClaim", "persistentvolumeclaims")
JOBS = Kind("batch/v1", "Job", "jobs")


# ------------------------------------------------------------------------------ projections


@dataclass(frozen=True)
class _NodeInfo:
    name: str
    labels: tuple[tuple[str, str], ...]
    taints: tuple[tuple[str, str, str], ...]
    allocatable: tuple[tuple[str, int], ...]
    ready: bool
    unschedulable: bool


@dataclass(frozen=True)
class _PodUse:
    node: str
    requests: tuple[tuple[str, int], ...]
    job: str | None  # "job_id:generation" of our workloads


@dataclass(frozen=True)
class _Dataset:
    id: str
    bytes: int


@dataclass(frozen=True)
class _Part:
    """One object of a workload, reduced to what state mapping needs."""

    job_id: str
    generation: int
    kind: tuple[str, str]
    namespace: str
    name: str
    parts: int
    admitted: bool
    started: bool
    outcome: pb.JobState.ValueType | None = None  # SUCCEEDED or FAILED
    reason: str = ""
    message: str = ""
    deleting: bool = False


def _quantities(values: Mapping[str, Any] | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, value in (values or {}).items():
        with contextlib.suppress(quantity.QuantityError):
            out[name] = quantity.parse(name, value)
    return out


def _add(into: dict[str, int], more: Mapping[str, int]) -> None:
    for name, amount in more.items():
        into[name] = into.get(name, 0) + amount


def _max(into: dict[str, int], other: Mapping[str, int]) -> None:
    for name, amount in other.items():
        into[name] = max(into.get(name, 0), amount)


def pod_requests(spec: Mapping[str, Any]) -> dict[str, int]:
    """Effective requests of a pod, as the scheduler counts them.

    max(app containers + sidecars, each init container + the sidecars started before it),
    pod-level resources when set, plus overhead, plus one "pods" slot.
    """
    pod_level = _quantities((spec.get("resources") or {}).get("requests"))
    total: dict[str, int] = {}
    for container in spec.get("containers") or []:
        _add(total, _quantities((container.get("resources") or {}).get("requests")))
    sidecars: dict[str, int] = {}
    init_peak: dict[str, int] = {}
    for container in spec.get("initContainers") or []:
        requests = _quantities((container.get("resources") or {}).get("requests"))
        if container.get("restartPolicy") == "Always":
            _add(sidecars, requests)
            _max(init_peak, sidecars)
        else:
            step = dict(sidecars)
            _add(step, requests)
            _max(init_peak, step)
    _add(total, sidecars)
    _max(total, init_peak)
    if pod_level:
        total.update(pod_level)
    _add(total, _quantities(spec.get("overhead")))
    total["pods"] = total.get("pods", 0) + 1
    return total


def project_node(obj: Mapping[str, Any]) -> _NodeInfo:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    taints = tuple(
        (str(t.get("key", "")), str(t.get("value", "")), str(t.get("effect", "")))
        for t in spec.get("taints") or []
    )
    return _NodeInfo(
        name=str(meta.get("name", "")),
        labels=tuple(sorted((meta.get("labels") or {}).items())),
        taints=taints,
        allocatable=tuple(sorted(_quantities(status.get("allocatable")).items())),
        ready=ready,
        unschedulable=bool(spec.get("unschedulable")),
    )


def project_pod(obj: Mapping[str, Any], hub_id: str) -> _PodUse | None:
    """A bound, non-terminal pod's use of its node; None when it uses nothing."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    node = spec.get("nodeName")
    if not node or status.get("phase") in ("Succeeded", "Failed"):
        return None
    key = _workload_key(obj.get("metadata") or {}, hub_id)
    return _PodUse(
        node=str(node),
        requests=tuple(sorted(pod_requests(spec).items())),
        job=f"{key[0]}:{key[1]}" if key else None,
    )


def project_pvc(obj: Mapping[str, Any]) -> _Dataset | None:
    meta = obj.get("metadata") or {}
    dataset = (meta.get("labels") or {}).get(LABEL_DATASET)
    if not dataset or meta.get("deletionTimestamp"):
        return None
    status, spec = obj.get("status") or {}, obj.get("spec") or {}
    if status.get("phase") == "Lost":
        return None
    size = (status.get("capacity") or {}).get("storage") or (
        ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    )
    try:
        amount = quantity.parse("storage", size) if size is not None else 0
    except quantity.QuantityError:
        amount = 0
    return _Dataset(str(dataset), amount)


_FLUID_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGTPE]i?)?B?\s*$")
_FLUID_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_FLUID_UNITS.update({f"{k}i": 1024 ** (i + 1) for i, k in enumerate("KMGTPE")})


def fluid_bytes(text: object) -> int:
    """Fluid's human sizes ("1.50GiB", "0.00B", "[Calculating]") to bytes; unknown = 0."""
    match = _FLUID_SIZE.match(str(text or ""))
    if not match:
        return 0
    return int(float(match.group(1)) * _FLUID_UNITS[match.group(2) or ""])


def project_fluid_dataset(obj: Mapping[str, Any], which: str) -> _Dataset | None:
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return None
    dataset = (meta.get("labels") or {}).get(LABEL_DATASET) or f"{meta.get('namespace')}/{meta.get('name')}"
    if which == "total":
        amount = fluid_bytes(status.get("ufsTotal"))
    else:
        amount = fluid_bytes((status.get("cacheStates") or {}).get("cached"))
    return _Dataset(str(dataset), amount)


_SUCCESS_CONDITIONS = ("Complete", "Completed", "Succeeded")


def project_workload(obj: Mapping[str, Any], hub_id: str, kueue: bool) -> _Part | None:
    """Map a workload object's status to admitted / started / outcome, for any supported kind.

    batch/v1 Job: Complete / Failed conditions, active or startTime; JobSet, Kubeflow and
    TrainJob: Completed / Succeeded / Failed / Running conditions; RayJob: status.jobStatus.
    With Kueue a suspended object is not admitted yet.
    """
    meta = obj.get("metadata") or {}
    key = _workload_key(meta, hub_id)
    if key is None:
        return None
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    suspended = bool(spec.get("suspend")) or bool((spec.get("runPolicy") or {}).get("suspend"))
    conditions = {str(c.get("type")): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    started = bool(status.get("startTime")) or int(status.get("active") or 0) > 0 or "Running" in conditions
    api_version, kind = str(obj.get("apiVersion", "")), str(obj.get("kind", ""))
    if (api_version, kind) == JOBS.key:
        started = _job_gang_running(meta, spec, status)
    outcome: pb.JobState.ValueType | None = None
    reason = message = ""
    ray_status = str(status.get("jobStatus") or "")
    if ray_status == "RUNNING":
        started = True
    if "Failed" in conditions:
        outcome, reason = pb.FAILED, str(conditions["Failed"].get("reason") or "Failed")
        message = str(conditions["Failed"].get("message") or "")
    elif ray_status in ("FAILED", "STOPPED") or status.get("jobDeploymentStatus") == "Failed":
        outcome, reason = pb.FAILED, str(status.get("reason") or "RayJobFailed")
        message = str(status.get("message") or "")
    else:
        done = next((conditions[t] for t in _SUCCESS_CONDITIONS if t in conditions), None)
        if done is not None:
            outcome, reason = pb.SUCCEEDED, str(done.get("reason") or "Completed")
            message = str(done.get("message") or "")
        elif ray_status == "SUCCEEDED":
            outcome, reason = pb.SUCCEEDED, "Completed"
    try:
        parts = max(1, int((meta.get("annotations") or {}).get(ANNOTATION_PARTS, "1")))
    except ValueError:
        parts = 1
    return _Part(
        job_id=key[0],
        generation=key[1],
        kind=(api_version, kind),
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        parts=parts,
        admitted=(not suspended) or not kueue or started,
        started=started,
        outcome=outcome,
        reason=reason,
        message=message,
        deleting=bool(meta.get("deletionTimestamp")),
    )


def _count(value: Any, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _job_gang_running(meta: Mapping[str, Any], spec: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """Whether a batch/v1 Job's gang runs: its required pods ready or already succeeded, as
    Kueue's PodsReady counts them. Not `startTime`, which the Job controller sets before any pod
    is scheduled, nor one active pod: the gang timeout (hub/gangs.py) trusts RUNNING to mean the
    whole gang started. The required pods are the object's `fedplane.io/gang-pods` (its pod
    sets' min_count), at most the pods the Job runs at once (parallelism, capped by
    completions); a cluster without the Job's `ready` count (before Kubernetes 1.24) counts
    active pods instead."""
    pods = _count(spec.get("parallelism"), 1)
    completions = spec.get("completions")
    if completions is not None:
        pods = min(pods, _count(completions, pods))
    wanted = _count((meta.get("annotations") or {}).get(ANNOTATION_GANG_PODS), pods)
    required = max(1, min(wanted, pods))
    ready = status.get("ready")
    running = _count(ready if ready is not None else status.get("active"), 0)
    return running + _count(status.get("succeeded"), 0) >= required


# ------------------------------------------------------------------------------ manifests


def _pod_templates(node: Any, hint: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template in a manifest, with the name of the role it belongs to.

    Roles: JobSet replicatedJobs[].name, Kubeflow *ReplicaSpecs keys, Ray group names.
    """
    if isinstance(node, dict):
        spec = node.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("containers"), list) and "kind" not in node:
            yield hint, node
            return
        for key, value in node.items():
            if key in ("metadata", "status"):
                continue
            child_hint = hint
            if key.endswith("ReplicaSpecs") and isinstance(value, dict):
                for role, sub in value.items():
                    yield from _pod_templates(sub, str(role))
                continue
            if key == "headGroupSpec":
                child_hint = "head"
            elif isinstance(value, dict) and isinstance(value.get("groupName"), str):
                child_hint = value["groupName"]
            yield from _pod_templates(value, child_hint)
    elif isinstance(node, list):
        for item in node:
            child_hint = hint
            if isinstance(item, dict):
                name = item.get("groupName") or item.get("name")
                spec = item.get("spec")
                is_template = isinstance(spec, dict) and isinstance(spec.get("containers"), list)
                if isinstance(name, str) and not is_template:
                    child_hint = name
            yield from _pod_templates(item, child_hint)


def _pin_to_nodes(pod_spec: dict[str, Any], nodes: list[str]) -> None:
    """AND a "node name in `nodes`" requirement into the pod's required node affinity.

    matchFields on metadata.name takes a single value, so the requirement is one term per node,
    crossed with the manifest's own terms (terms are ORed, requirements within a term ANDed).
    """
    affinity = pod_spec.setdefault("affinity", {}).setdefault("nodeAffinity", {})
    required = affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    crossed = []
    for term in terms:
        for node in nodes:
            new = json.loads(json.dumps(term))
            new.setdefault("matchFields", []).append(
                {"key": "metadata.name", "operator": "In", "values": [node]}
            )
            crossed.append(new)
    required["nodeSelectorTerms"] = crossed


def _toleration(t: pb.Toleration) -> dict[str, str]:
    out = {"key": t.key, "operator": t.operator or "Equal", "value": t.value, "effect": t.effect}
    if out["operator"] == "Exists":
        out.pop("value")
    return {k: v for k, v in out.items() if v}


def _set_suspend(obj: dict[str, Any]) -> None:
    spec = obj.setdefault("spec", {})
    if str(obj.get("apiVersion", "")).startswith("kubeflow.org/"):
        spec.setdefault("runPolicy", {})["suspend"] = True
    else:
        spec["suspend"] = True


def render_workload(request: CreateRequest, config: KubernetesBackendConfig) -> list[dict[str, Any]]:
    """The objects to create for a dispatch: labelled, annotated, pinned and (with Kueue) queued."""
    text = request.spec.workload.manifest_json
    if not text:
        raise BackendError("the job has no workload manifest", permanent=True, reason="InvalidWorkload")
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise BackendError(
            f"workload manifest is not JSON: {exc}", permanent=True, reason="InvalidWorkload"
        ) from exc
    except RecursionError:  # refused once, not retried for good (the hub refuses it at submit)
        raise BackendError(
            "workload manifest nests too deep to parse", permanent=True, reason="InvalidWorkload"
        ) from None
    if not isinstance(manifest, dict):
        raise BackendError("workload manifest must be an object", permanent=True, reason="InvalidWorkload")
    items = manifest.get("items") if manifest.get("kind") == "List" else [manifest]
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise BackendError("workload List has no objects", permanent=True, reason="InvalidWorkload")
    pod_sets = [p.name for p in request.spec.pod_sets]
    gang_pods = {p.name: p.min_count or p.count for p in request.spec.pod_sets}
    all_nodes = sorted({a.node for a in request.assignments})
    tolerations = [_toleration(t) for t in request.spec.constraints.tolerations]
    label = job_label_value(request.job_id)
    objects = []
    for index, item in enumerate(items):
        obj: dict[str, Any] = json.loads(json.dumps(item))
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str) or not api_version or not kind:
            raise BackendError(
                f"workload object {index} needs apiVersion and kind", permanent=True, reason="InvalidWorkload"
            )
        if "/" not in api_version:
            raise BackendError(
                f"{api_version} {kind} is not a workload kind; use a batch/v1 Job or a workload CRD",
                permanent=True,
                reason="UnsupportedWorkloadKind",
            )
        meta = obj.setdefault("metadata", {})
        for transient in ("resourceVersion", "uid", "creationTimestamp", "generateName", "managedFields"):
            meta.pop(transient, None)
        obj.pop("status", None)
        meta["name"] = object_name(request.job_id, request.generation, index if len(items) > 1 else None)
        meta["namespace"] = meta.get("namespace") or config.namespace
        ours = {
            LABEL_JOB: label,
            LABEL_GENERATION: str(request.generation),
            LABEL_HUB: config.hub_id,
            LABEL_MANAGED_BY: "fedplane",
        }
        meta["labels"] = {**(meta.get("labels") or {}), **ours}
        meta["annotations"] = {
            **(meta.get("annotations") or {}),
            ANNOTATION_JOB: request.job_id,
            ANNOTATION_PARTS: str(len(items)),
        }
        if config.kueue_local_queue:
            meta["labels"][KUEUE_QUEUE_LABEL] = config.kueue_local_queue
            _set_suspend(obj)
        # A List made from pod sets has one item per pod set, in order.
        item_pod_set = pod_sets[index] if len(items) > 1 and len(items) == len(pod_sets) else None
        if item_pod_set is not None:
            meta["annotations"][ANNOTATION_GANG_PODS] = str(gang_pods[item_pod_set])
        elif len(items) == 1 and gang_pods:
            meta["annotations"][ANNOTATION_GANG_PODS] = str(sum(gang_pods.values()))
        templates = list(_pod_templates(obj.get("spec")))
        for hint, template in templates:
            tmeta = template.setdefault("metadata", {})
            tmeta["labels"] = {**(tmeta.get("labels") or {}), **ours}
            tmeta["annotations"] = {**(tmeta.get("annotations") or {}), ANNOTATION_JOB: request.job_id}
            pod_spec = template["spec"]
            role = item_pod_set or hint
            mine = {a.node for a in request.assignments if role and a.pod_set.lower() == role.lower()}
            nodes = sorted(mine) or all_nodes
            if nodes:
                _pin_to_nodes(pod_spec, nodes)
            if tolerations:
                present = pod_spec.setdefault("tolerations", [])
                present.extend(t for t in tolerations if t not in present)
        objects.append(obj)
    return objects


# ------------------------------------------------------------------------------ watches

T = TypeVar("T")


class _Expired(Exception):
    """The resource version is too old (410 Gone): relist."""


class _Watcher(Generic[T]):
    """List+watch of one resource in a daemon thread (a client-go reflector, reduced).

    Lists (paginated), then watches from the list's resource version with bookmarks; resumes
    from the last seen version after a disconnect and relists on 410 Gone or every resync.
    Objects are projected in the thread; `on_reset(items)` and `on_event(type, uid, value)` run
    on the event loop.
    """

    def __init__(
        self,
        backend: KubernetesBackend,
        kind: Kind,
        project: Callable[[dict[str, Any]], T],
        on_reset: Callable[[dict[str, T]], None],
        on_event: Callable[[str, str, T], None],
        *,
        label_selector: str = "",
        field_selector: str = "",
        required: bool = True,
    ) -> None:
        self.backend = backend
        self.kind = kind
        self.project = project
        self.on_reset = on_reset
        self.on_event = on_event
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.required = required
        self.resource_version: str | None = None
        self.relists = 0
        self.synced = asyncio.Event()
        self.fatal: BaseException | None = None
        # Cleared, the thread holds before its next request (tests use it to expire a watch).
        self.gate = threading.Event()
        self.gate.set()
        self._listed = False
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._response: Any = None
        self._next_resync = 0.0
        self._thread = threading.Thread(target=self._run, name=f"fedplane-watch-{kind.plural}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.gate.set()
        self.interrupt()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def interrupt(self) -> None:
        """Drop the current watch connection, as a network failure would (the watch resumes)."""
        with self._lock:
            response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()

    # -- thread side
    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.backend.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stopping.set()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            self.gate.wait()
            if self._stopping.is_set():
                break
            try:
                if self.resource_version is None or time.monotonic() >= self._next_resync:
                    self._list()
                self._watch()
                backoff = 0.5
            except _Expired:
                log.info("watch expired; relisting", resource=self.kind.plural)
                self.resource_version = None
            except Exception as exc:
                if self._stopping.is_set():
                    break
                status = getattr(exc, "status", None)
                if status == 410:
                    self.resource_version = None
                    continue
                if status in (401, 403, 404) and not self._listed:
                    if self.required:
                        self.fatal = exc
                        self._post(self._mark_synced)
                        log.error("cannot list", resource=self.kind.plural, error=_error_text(exc))
                    else:
                        log.warning("optional resource unavailable", resource=self.kind.plural, status=status)
                        self._post(self._mark_synced)
                        return
                else:
                    log.warning("watch failed; retrying", resource=self.kind.plural, error=_error_text(exc))
                self._stopping.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, 30.0)

    def _mark_synced(self) -> None:
        self.synced.set()

    def _query(self) -> dict[str, Any]:
        query: dict[str, Any] = {}
        if self.label_selector:
            query["label_selector"] = self.label_selector
        if self.field_selector:
            query["field_selector"] = self.field_selector
        return query

    def _list(self) -> None:
        items: dict[str, T] = {}
        cont: str | None = None
        while True:
            query: list[tuple[str, str]] = [("limit", "500")]
            if cont:
                query.append(("continue", cont))
            body = self.backend.request_json(
                "get", self.kind.path(), paced=False, query_params=query, **self._query()
            )
            for obj in body.get("items") or []:
                uid = (obj.get("metadata") or {}).get("uid")
                if uid:
                    obj.setdefault("apiVersion", self.kind.api_version)
                    obj.setdefault("kind", self.kind.kind)
                    items[uid] = self.project(obj)
            meta = body.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                self.resource_version = str(meta.get("resourceVersion") or "")
                break
        self.relists += 1
        self._listed = True
        self._next_resync = time.monotonic() + self.backend.config.resync_seconds * random.uniform(0.9, 1.1)
        self._post(self._reset, items)

    def _reset(self, items: dict[str, T]) -> None:
        self.on_reset(items)
        self.synced.set()

    def _watch(self) -> None:
        timeout = int(self.backend.config.watch_timeout_seconds * random.uniform(0.8, 1.0)) or 1
        timeout = max(1, min(timeout, int(self._next_resync - time.monotonic()) + 1))
        response = self.backend.request(
            "get",
            self.kind.path(),
            paced=False,
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(10, timeout + 30),
            **self._query(),
        )
        with self._lock:
            self._response = response
        try:
            if self._stopping.is_set() or not self.gate.is_set():
                return
            for line in _lines(response):
                self._handle(json.loads(line))
                if self._stopping.is_set():
                    return
        finally:
            with self._lock:
                self._response = None
            with contextlib.suppress(Exception):
                response.close()
            with contextlib.suppress(Exception):
                response.release_conn()

    def _handle(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired(obj.get("message", ""))
            raise ApiException(status=obj.get("code"), reason=obj.get("message", "watch error"))
        meta = obj.get("metadata") or {}
        if meta.get("resourceVersion"):
            self.resource_version = str(meta["resourceVersion"])
        if kind == "BOOKMARK" or not meta.get("uid"):
            return
        obj.setdefault("apiVersion", self.kind.api_version)
        obj.setdefault("kind", self.kind.kind)
        self._post(self.on_event, str(kind), str(meta["uid"]), self.project(obj))


def _lines(response: Any) -> Iterator[bytes]:
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=True):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def _error_text(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if body:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(body).get("message")
            if message:
                return str(message)
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"HTTP {status}: {reason}"
    return str(exc) or type(exc).__name__


# ------------------------------------------------------------------------------ the backend


class RateLimiter:
    """A token bucket, as client-go's: `burst` requests at once, then `qps` a second.

    Taken in the worker thread that makes the request, so waiting never blocks the event loop;
    reservations go negative, so waiters leave in order at the rate, not all at once.
    """

    def __init__(self, qps: float, burst: int) -> None:
        self.qps = qps
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token; returns the seconds to wait before using it."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps) - 1
            self._at = now
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def wait(self) -> None:
        delay = self.reserve()
        if delay > 0:
            time.sleep(delay)


@dataclass
class _WorkloadState:
    parts: dict[str, _Part] = field(default_factory=dict)  # uid -> part
    emitted: set[pb.JobState.ValueType] = field(default_factory=set)
    # A delete() is in flight: its DELETED events are not an outside deletion.
    deleting: bool = False

    @property
    def terminal(self) -> bool:
        return any(s in _TERMINAL for s in self.emitted)


class KubernetesBackend(Backend):
    """A real member cluster; see the module docstring for the threading model."""

    def __init__(self, config: KubernetesBackendConfig) -> None:
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self.api: Any = None
        self.dynamic: Any = None
        self._discovery_lock = threading.Lock()
        self._tmpdir: str | None = None
        self._emit: EmitStatus = lambda event: None
        self._changed: NotifyChange = lambda: None
        self.nodes: dict[str, _NodeInfo] = {}
        self.pods: dict[str, _PodUse] = {}
        self.pvcs: dict[str, _Dataset] = {}
        self.fluid: dict[str, _Dataset] = {}
        self.workloads: dict[tuple[str, int], _WorkloadState] = {}
        # Workloads gone from the cluster after a terminal state: never reported again (bounded).
        self._finished: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.watchers: dict[str, _Watcher[Any]] = {}
        self.workload_kinds: dict[tuple[str, str], Kind] = {JOBS.key: JOBS}
        self._maintenance: asyncio.Task[None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.limiter = RateLimiter(config.qps, config.burst) if config.qps > 0 else None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the backend is not started")
        return self._loop

    # -- requests (worker threads)
    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in the request pool (queued while the pool is busy)."""
        if self._pool is None:
            raise RuntimeError("the backend is not started")
        context = contextvars.copy_context()  # log and trace context, as asyncio.to_thread keeps it
        return await self.loop.run_in_executor(self._pool, functools.partial(context.run, fn, *args))

    def request(self, method: str, path: str, *, paced: bool = True, **params: Any) -> Any:
        """A raw request; returns the urllib3 response unread. Raises ApiException subclasses.

        `paced` requests wait for the rate limit; watches are not paced."""
        params.setdefault("_request_timeout", (10, self.config.request_timeout_seconds))
        params = {k: v for k, v in params.items() if v is not None}
        if paced and self.limiter is not None:
            self.limiter.wait()
        return self.dynamic.request(method, path, serialize=False, **params)

    def request_json(self, method: str, path: str, *, paced: bool = True, **params: Any) -> dict[str, Any]:
        response = self.request(method, path, paced=paced, **params)
        try:
            data: dict[str, Any] = json.loads(response.data or b"{}")
        finally:
            with contextlib.suppress(Exception):
                response.release_conn()
        return data

    def post(self, path: str, obj: Mapping[str, Any]) -> None:
        """Create an object: a paced POST straight through the client's connection pool.

        The generic client path (parameter handling, serialising the body by walking it, a
        response wrapper) costs as much CPU as the request itself, and creates are the hot path.
        Authentication, TLS and proxies are the client's own: its configuration's headers and its
        pool. Raises ApiException on an error status."""
        if self.limiter is not None:
            self.limiter.wait()
        configuration = self.api.configuration
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": self.api.user_agent,
        }
        for setting in configuration.auth_settings().values():
            if setting["in"] == "header" and setting["value"]:
                headers[setting["key"]] = setting["value"]
        response = self.api.rest_client.pool_manager.request(
            "POST",
            configuration.host + path,
            body=json.dumps(obj).encode(),
            headers=headers,
            timeout=urllib3.Timeout(connect=10, read=self.config.request_timeout_seconds),
        )
        if response.status >= 400:
            raise ApiException(
                status=response.status, reason=response.reason, body=response.data.decode(errors="replace")
            )

    def _connect(self) -> None:
        configuration = k8s_client.Configuration()
        in_cluster = self.config.in_cluster or (
            not self.config.kubeconfig and "KUBERNETES_SERVICE_HOST" in os.environ
        )
        if in_cluster:
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=self.config.kubeconfig or None,
                context=self.config.context or None,
                client_configuration=configuration,
                persist_config=False,
            )
        # The loaders re-apply the whole kubeconfig before every request (to pick up rotated or
        # expiring tokens), a large share of a create's client CPU: once a second is enough.
        hook = configuration.refresh_api_key_hook
        if hook is not None:
            configuration.refresh_api_key_hook = _at_most_every(1.0, hook)
        # A connection per pooled request and per watch (the default, 5 per core, would make
        # the client open and drop a TLS connection for every request beyond it).
        configuration.connection_pool_maxsize = (
            self.config.max_concurrent_requests + len(KNOWN_WORKLOAD_KINDS) + 8
        )
        self.api = k8s_client.ApiClient(configuration)
        self.api.user_agent = "fedplane-agent"
        self._tmpdir = tempfile.mkdtemp(prefix="fedplane-k8s-")
        # A private discovery cache: the default one in /tmp is shared by every client of the host.
        cache = os.path.join(self._tmpdir, "discovery.json")
        self.dynamic = DynamicClient(self.api, cache_file=cache)  # type: ignore[no-untyped-call]

    def resolve(self, api_version: str, kind: str) -> Kind | None:
        """The served resource for a kind, via discovery (refreshed on a miss); None if not served."""
        if (api_version, kind) == JOBS.key:
            return JOBS
        with self._discovery_lock:
            try:
                resource = self.dynamic.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                return None
        return Kind(api_version, kind, str(resource.name), bool(resource.namespaced))

    # -- lifecycle
    async def start(self, emit: EmitStatus, changed: NotifyChange) -> None:
        self._loop = asyncio.get_running_loop()
        self._emit, self._changed = emit, changed
        self._pool = ThreadPoolExecutor(
            self.config.max_concurrent_requests, thread_name_prefix="fedplane-k8s"
        )
        try:
            await asyncio.wait_for(asyncio.to_thread(self._connect), self.config.sync_timeout_seconds)
        except k8s_config.ConfigException as exc:
            await self.stop()
            raise BackendError(f"Kubernetes config: {exc}", permanent=True, reason="Config") from exc
        except (TimeoutError, ApiException, *_NETWORK_ERRORS) as exc:
            await self.stop()
            raise BackendError(
                f"cannot reach the Kubernetes API: {_error_text(exc)}", permanent=False, reason="Unreachable"
            ) from exc
        self._watch(NODES, project_node, self._reset_nodes, self._node_event)
        self._watch(
            PODS,
            lambda obj: project_pod(obj, self.config.hub_id),
            self._reset_pods,
            self._pod_event,
            # Only pods holding node resources: bound and not finished.
            field_selector="spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed",
        )
        self._watch(
            PVCS,
            project_pvc,
            self._dataset_reset(self.pvcs),
            self._dataset_event(self.pvcs),
            label_selector=LABEL_DATASET,
        )
        self._watch_workloads(JOBS, required=True)
        try:
            await self._discover_optional()
        except (ApiException, *_NETWORK_ERRORS) as exc:
            log.warning("discovery of optional kinds failed; retrying later", error=_error_text(exc))
        await self._wait_synced()
        self._maintenance = asyncio.create_task(self._maintain(), name="kubernetes-backend-maintenance")
        log.info(
            "kubernetes backend started",
            nodes=len(self.nodes),
            workloads=len(self.workloads),
            kinds=sorted(f"{k.kind}.{k.api_version}" for k in self.workload_kinds.values()),
        )

    async def _wait_synced(self) -> None:
        watchers = list(self.watchers.values())
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.synced.wait() for w in watchers)), self.config.sync_timeout_seconds
            )
        except TimeoutError:
            pending = [w.kind.plural for w in watchers if not w.synced.is_set()]
            log.warning("initial sync incomplete; continuing with partial state", pending=pending)
        fatal = [w for w in watchers if w.fatal is not None]
        if fatal:
            await self.stop()
            w = fatal[0]
            assert w.fatal is not None
            raise BackendError(
                f"cannot list {w.kind.plural}: {_error_text(w.fatal)} (check the agent's RBAC)",
                permanent=True,
                reason="Forbidden",
            )

    async def _discover_optional(self) -> None:
        """Watch Fluid Datasets and workload CRDs that are installed (missing CRDs are normal)."""
        wanted = [*KNOWN_WORKLOAD_KINDS, FLUID_DATASET]

        def find() -> list[Kind | None]:
            # One /apis request rules out absent groups without a discovery refresh per kind.
            groups = self.request_json("get", "/apis").get("groups") or []
            served = {v.get("groupVersion") for g in groups for v in g.get("versions") or []}
            return [self.resolve(v, k) for v, k in wanted if v in served]

        found = await self._in_pool(find)
        for kind in found:
            if kind is None:
                continue
            if kind.key == FLUID_DATASET:
                if "fluid" not in self.watchers:
                    self._watch(
                        kind,
                        functools.partial(project_fluid_dataset, which=self.config.fluid_bytes),
                        self._dataset_reset(self.fluid),
                        self._dataset_event(self.fluid),
                        name="fluid",
                        required=False,
                    )
            else:
                self._watch_workloads(kind, required=False)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            try:
                await self._discover_optional()
            except (ApiException, *_NETWORK_ERRORS) as exc:
                log.warning("discovery of optional kinds failed", error=_error_text(exc))

    def _watch(
        self,
        kind: Kind,
        project: Callable[[dict[str, Any]], Any],
        on_reset: Callable[[dict[str, Any]], None],
        on_event: Callable[[str, str, Any], None],
        *,
        name: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
        required: bool = True,
    ) -> _Watcher[Any]:
        watcher: _Watcher[Any] = _Watcher(
            self,
            kind,
            project,
            on_reset,
            on_event,
            label_selector=label_selector,
            field_selector=field_selector,
            required=required,
        )
        self.watchers[name or kind.plural] = watcher
        watcher.start()
        return watcher

    def _watch_workloads(self, kind: Kind, *, required: bool) -> _Watcher[Any] | None:
        name = f"workloads:{kind.api_version}:{kind.kind}"
        if name in self.watchers:
            return None
        self.workload_kinds[kind.key] = kind
        hub, kueue = self.config.hub_id, bool(self.config.kueue_local_queue)
        return self._watch(
            kind,
            lambda obj: project_workload(obj, hub, kueue),
            lambda items: self._reset_workloads(kind.key, items),
            self._workload_event,
            name=name,
            label_selector=f"{LABEL_HUB}={hub}",
            required=required,
        )

    async def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        watchers = list(self.watchers.values())
        self.watchers.clear()
        for watcher in watchers:
            watcher.stop()

        def join() -> None:
            for watcher in watchers:
                watcher.join(2.0)

        await asyncio.to_thread(join)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self.api is not None:
            with contextlib.suppress(Exception):
                self.api.close()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        # Events the watch threads queued before stopping are dropped, not reported after stop().
        self._emit, self._changed = (lambda event: None), (lambda: None)

    # -- inventory and datasets (event loop)
    def _reset_nodes(self, items: dict[str, _NodeInfo]) -> None:
        if items != self.nodes:
            self.nodes = items
            self._changed()

    def _node_event(self, kind: str, uid: str, info: _NodeInfo) -> None:
        if kind == "DELETED":
            if self.nodes.pop(uid, None) is not None:
                self._changed()
        elif self.nodes.get(uid) != info:
            self.nodes[uid] = info
            self._changed()

    def _reset_pods(self, items: dict[str, _PodUse | None]) -> None:
        pods = {uid: use for uid, use in items.items() if use is not None}
        if pods != self.pods:
            self.pods = pods
            self._changed()

    def _pod_event(self, kind: str, uid: str, use: _PodUse | None) -> None:
        if kind == "DELETED" or use is None:
            if self.pods.pop(uid, None) is not None:
                self._changed()
        elif self.pods.get(uid) != use:
            self.pods[uid] = use
            self._changed()

    def _dataset_reset(self, store: dict[str, _Dataset]) -> Callable[[dict[str, _Dataset | None]], None]:
        def reset(items: dict[str, _Dataset | None]) -> None:
            fresh = {uid: d for uid, d in items.items() if d is not None}
            if fresh != store:
                store.clear()
                store.update(fresh)
                self._changed()

        return reset

    def _dataset_event(self, store: dict[str, _Dataset]) -> Callable[[str, str, _Dataset | None], None]:
        def event(kind: str, uid: str, dataset: _Dataset | None) -> None:
            if kind == "DELETED" or dataset is None:
                if store.pop(uid, None) is not None:
                    self._changed()
            elif store.get(uid) != dataset:
                store[uid] = dataset
                self._changed()

        return event

    async def inventory(self) -> InventorySnapshot:
        used: dict[str, dict[str, int]] = {}
        accounted: set[str] = set()
        for use in self.pods.values():
            _add(used.setdefault(use.node, {}), dict(use.requests))
            if use.job:
                accounted.add(use.job)
        nodes = []
        for info in sorted(self.nodes.values(), key=lambda n: n.name):
            node = pb.Node(
                name=info.name,
                labels=dict(info.labels),
                taints=[pb.Taint(key=k, value=v, effect=e) for k, v, e in info.taints],
                ready=info.ready,
                unschedulable=info.unschedulable,
            )
            allocatable = dict(info.allocatable)
            node.allocatable.quantities.update(allocatable)
            taken = used.get(info.name, {})
            node.free.quantities.update({r: max(0, v - taken.get(r, 0)) for r, v in allocatable.items()})
            nodes.append(node)
        return InventorySnapshot(nodes, sorted(accounted))

    async def datasets(self) -> list[pb.DatasetPresence]:
        sizes: dict[str, int] = {}
        for dataset in [*self.pvcs.values(), *self.fluid.values()]:
            sizes[dataset.id] = max(sizes.get(dataset.id, 0), dataset.bytes)
        return [pb.DatasetPresence(id=k, bytes=v) for k, v in sorted(sizes.items())]

    # -- workload status (event loop)
    def _reset_workloads(self, kind: tuple[str, str], items: dict[str, _Part | None]) -> None:
        fresh = {uid: part for uid, part in items.items() if part is not None}
        touched: set[tuple[str, int]] = set()
        for key, state in self.workloads.items():
            for uid in [u for u, p in state.parts.items() if p.kind == kind and u not in fresh]:
                del state.parts[uid]
                touched.add(key)
        for uid, part in fresh.items():
            key = (part.job_id, part.generation)
            self.workloads.setdefault(key, _WorkloadState()).parts[uid] = part
            touched.add(key)
        for key in sorted(touched):
            self._evaluate(key)

    def _workload_event(self, kind: str, uid: str, part: _Part | None) -> None:
        if part is None:
            return
        key = (part.job_id, part.generation)
        if kind == "DELETED":
            state = self.workloads.get(key)
            if state is None or state.parts.pop(uid, None) is None:
                return
        else:
            self.workloads.setdefault(key, _WorkloadState()).parts[uid] = part
        self._evaluate(key)

    def _evaluate(self, key: tuple[str, int]) -> None:
        """Emit the states the workload has reached and not yet reported, in order, each once."""
        state = self.workloads.get(key)
        if state is None:
            return
        parts = list(state.parts.values())
        if not parts:
            if not state.terminal and not state.deleting:
                # Deleted by someone else before finishing: the hub should know it is gone.
                self._report(key, pb.FAILED, "WorkloadDeleted", "the workload was deleted outside Fedplane")
            if not state.deleting:
                self._forget(key)
            return
        if state.terminal or state.deleting:
            return
        expected = max(p.parts for p in parts)
        # The gang runs when every part does (a part that already ended has run).
        started = len(parts) >= expected and all(p.started or p.outcome is not None for p in parts)
        admitted = started or (len(parts) >= expected and all(p.admitted for p in parts))
        failed = next((p for p in parts if p.outcome == pb.FAILED), None)
        succeeded = len(parts) >= expected and all(p.outcome == pb.SUCCEEDED for p in parts)
        if admitted:
            first = parts[0]
            reason = "Admitted" if self.config.kueue_local_queue else "Created"
            self._report(key, pb.ADMITTED, reason, f"{first.kind[1]} {first.namespace}/{first.name}")
        if started:
            self._report(key, pb.RUNNING, "Started", "")
        if failed is not None:
            message = failed.message if expected == 1 else f"{failed.name}: {failed.message}"
            self._report(key, pb.FAILED, failed.reason, message)
        elif succeeded:
            self._report(key, pb.SUCCEEDED, parts[0].reason or "Completed", parts[0].message)

    def _forget(self, key: tuple[str, int]) -> None:
        state = self.workloads.pop(key, None)
        if state is not None and state.terminal:
            self._finished[key] = None
            while len(self._finished) > _FINISHED_MEMORY:
                self._finished.popitem(last=False)

    def _report(self, key: tuple[str, int], state: pb.JobState.ValueType, reason: str, message: str) -> None:
        if key in self._finished:
            return
        record = self.workloads.setdefault(key, _WorkloadState())
        if state in record.emitted or record.terminal:
            return
        record.emitted.add(state)
        self._emit(WorkloadEvent(key[0], key[1], state, reason, message))

    # -- commands
    async def create(self, request: CreateRequest) -> None:
        if request.hub_id and request.hub_id != self.config.hub_id:
            log.warning(
                "dispatch hub_id differs from the backend's; labelling with the backend's",
                job_id=request.job_id,
                dispatch_hub=request.hub_id,
                backend_hub=self.config.hub_id,
            )
        objects = render_workload(request, self.config)
        kinds: list[Kind] = []
        for obj in objects:
            kind = await self._in_pool(self._create_object, obj, request.job_id, request.generation)
            kinds.append(kind)
        for kind in kinds:
            if kind is not JOBS:
                self._watch_workloads(kind, required=False)
        key = (request.job_id, request.generation)
        if not self.config.kueue_local_queue:
            first = objects[0]["metadata"]
            self._report(
                key, pb.ADMITTED, "Created", f"{objects[0]['kind']} {first['namespace']}/{first['name']}"
            )

    def _create_object(self, obj: dict[str, Any], job_id: str, generation: int) -> Kind:
        """Create one object or adopt ours; BackendError says whether retrying can help (thread)."""
        api_version, kind_name = obj["apiVersion"], obj["kind"]
        meta = obj["metadata"]
        where = f"{kind_name} {meta['namespace']}/{meta['name']}"
        try:
            kind = self.resolve(api_version, kind_name)
        except ApiException as exc:
            raise _backend_error(exc, where) from exc
        except _NETWORK_ERRORS as exc:
            raise BackendError(f"discovery failed: {exc}", permanent=False, reason="Unreachable") from exc
        if kind is None:
            raise BackendError(
                f"{kind_name} ({api_version}) is not served by this cluster: install its CRD or operator",
                permanent=True,
                reason="UnsupportedWorkloadKind",
            )
        if not kind.namespaced:
            raise BackendError(
                f"{where}: cluster-scoped kinds are not workloads",
                permanent=True,
                reason="UnsupportedWorkloadKind",
            )
        try:
            self.post(kind.path(meta["namespace"]), obj)
            log.info("workload object created", job_id=job_id, generation=generation, object=where)
            return kind
        except ApiException as exc:
            if exc.status != 409:
                raise _backend_error(exc, where) from exc
        except _NETWORK_ERRORS as exc:
            raise BackendError(f"{where}: {exc}", permanent=False, reason="Unreachable") from exc
        # AlreadyExists: ours for this dispatch (a redelivered command, or an agent restart) is adopted.
        try:
            existing = self.request_json("get", kind.path(meta["namespace"], meta["name"]))
        except ApiException as exc:
            raise _backend_error(exc, where) from exc
        except _NETWORK_ERRORS as exc:
            raise BackendError(f"{where}: {exc}", permanent=False, reason="Unreachable") from exc
        if _workload_key(existing.get("metadata") or {}, self.config.hub_id) != (job_id, generation):
            raise BackendError(
                f"{where} already exists and does not belong to job {job_id} generation {generation}",
                permanent=True,
                reason="NameConflict",
            )
        log.info("workload object adopted", job_id=job_id, generation=generation, object=where)
        return kind

    async def delete(self, job_id: str, generation: int, reason: str) -> None:
        key = (job_id, generation)
        state = self.workloads.setdefault(key, _WorkloadState())
        state.deleting = True
        known = [(p.kind, p.namespace, p.name) for p in state.parts.values()]
        try:
            await self._in_pool(self._delete_objects, job_id, generation, known, dict(self.workload_kinds))
        except BackendError:
            state.deleting = False
            raise
        # Background propagation: the object is gone (its pods follow), so the job is cancelled now.
        self._report(key, pb.CANCELLED, "Deleted", reason)
        state.deleting = False
        if not state.parts:
            self._forget(key)

    def _delete_objects(
        self,
        job_id: str,
        generation: int,
        known: list[tuple[tuple[str, str], str, str]],
        kinds: dict[tuple[str, str], Kind],
    ) -> None:
        targets = {(k, ns, name) for k, ns, name in known}
        # Objects the watches have not shown yet (just created, or right after a restart).
        selector = (
            f"{LABEL_HUB}={self.config.hub_id},{LABEL_JOB}={job_label_value(job_id)},"
            f"{LABEL_GENERATION}={generation}"
        )
        for kind in kinds.values():
            try:
                body = self.request_json("get", kind.path(), label_selector=selector)
            except ApiException as exc:
                if exc.status in (403, 404):
                    continue
                raise _backend_error(exc, f"{kind.kind} list") from exc
            except _NETWORK_ERRORS as exc:
                raise BackendError(str(exc), permanent=False, reason="Unreachable") from exc
            for obj in body.get("items") or []:
                meta = obj.get("metadata") or {}
                if _workload_key(meta, self.config.hub_id) == (job_id, generation):
                    targets.add((kind.key, str(meta.get("namespace")), str(meta.get("name"))))
        for kind_key, namespace, name in sorted(targets):
            if kind_key not in kinds:
                continue
            kind = kinds[kind_key]
            try:
                self.request_json("delete", kind.path(namespace, name), propagation_policy="Background")
                log.info("workload object deleted", job_id=job_id, object=f"{kind.kind} {namespace}/{name}")
            except ApiException as exc:
                if exc.status != 404:
                    raise _backend_error(exc, f"{kind.kind} {namespace}/{name}") from exc
            except _NETWORK_ERRORS as exc:
                raise BackendError(str(exc), permanent=False, reason="Unreachable") from exc

    async def list_workloads(self) -> list[WorkloadRef]:
        kinds = list(self.workload_kinds.values())
        try:
            return await self._in_pool(self._list_workloads, kinds)
        except _NETWORK_ERRORS as exc:
            raise BackendError(str(exc), permanent=False, reason="Unreachable") from exc

    def _list_workloads(self, kinds: list[Kind]) -> list[WorkloadRef]:
        refs: set[WorkloadRef] = set()
        for kind in kinds:
            try:
                body = self.request_json(
                    "get", kind.path(), label_selector=f"{LABEL_HUB}={self.config.hub_id}"
                )
            except ApiException as exc:
                if exc.status in (403, 404) and kind is not JOBS:
                    continue
                raise _backend_error(exc, f"{kind.kind} list") from exc
            for obj in body.get("items") or []:
                meta = obj.get("metadata") or {}
                key = _workload_key(meta, self.config.hub_id)
                if key is not None and not meta.get("deletionTimestamp"):
                    refs.add(WorkloadRef(*key))
        return sorted(refs, key=lambda r: (r.job_id, r.generation))


def _at_most_every(seconds: float, fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """`fn`, skipped when it ran less than `seconds` ago (a race only runs it twice)."""
    last = [-math.inf]

    def throttled(arg: Any) -> None:
        now = time.monotonic()
        if now - last[0] >= seconds:
            last[0] = now
            fn(arg)

    return throttled


def _backend_error(exc: ApiException, where: str) -> BackendError:
    """Classify an API error: invalid or forbidden objects are permanent, the rest retryable."""
    text = f"{where}: {_error_text(exc)}"
    status = exc.status
    if status in (400, 422):
        return BackendError(text, permanent=True, reason="InvalidWorkload")
    if status == 403:
        if "exceeded quota" in text:
            return BackendError(text, permanent=False, reason="QuotaExceeded")
        return BackendError(text, permanent=True, reason="Forbidden")
    if status == 404:
        return BackendError(text, permanent=True, reason="NotFound")
    if status == 401:
        return BackendError(text, permanent=False, reason="Unauthorized")
    return BackendError(text, permanent=False, reason="ApiError")
