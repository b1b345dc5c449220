"""The Kubernetes backend against a real kube-apiserver (no kubelet, scheduler or controllers).

Tests play the missing parts: they create Nodes and set their status, bind Pods with
spec.nodeName, and act as the Job controller (and Kueue) by patching Job status and spec.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from fedplane.agent.backend import BackendError, CreateRequest, WorkloadEvent, WorkloadRef
from fedplane.agent.daemon import Agent
from fedplane.agent.daemon import make_backend as make_agent_backend
from fedplane.agent.kubernetes_backend import (
    ANNOTATION_GANG_PODS,
    ANNOTATION_JOB,
    KUEUE_QUEUE_LABEL,
    LABEL_GENERATION,
    LABEL_HUB,
    LABEL_JOB,
    KubernetesBackend,
    KubernetesBackendConfig,
    fluid_bytes,
    job_label_value,
    object_name,
    pod_requests,
    project_workload,
)
from fedplane.client.spec import default_manifest
from fedplane.runtime.config import AgentConfig, ConfigError
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation
from tests.kube import apiserver, helm
from tests.kube.apiserver import Admin, KubeAPIServer

pytestmark = pytest.mark.kube

GiB = 2**30


# ------------------------------------------------------------------------------ helpers


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def eventually(check: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Harness:
    backend: KubernetesBackend
    events: list[WorkloadEvent] = field(default_factory=list)
    changes: int = 0

    def states(self, job_id: str, generation: int = 1) -> list[pb.JobState.ValueType]:
        return [e.state for e in self.events if e.job_id == job_id and e.generation == generation]

    def event(self, job_id: str, state: pb.JobState.ValueType) -> WorkloadEvent:
        return next(e for e in self.events if e.job_id == job_id and e.state == state)

    async def wait_state(
        self, job_id: str, state: pb.JobState.ValueType, generation: int = 1
    ) -> WorkloadEvent:
        await eventually(lambda: state in self.states(job_id, generation), f"{pb.JobState.Name(state)}")
        return self.event(job_id, state)


Make = Callable[..., Awaitable[Harness]]


@pytest.fixture
def hub_id() -> str:
    """A hub id per test: workload watches and listings of different tests never overlap."""
    return f"hub-{secrets.token_hex(3)}"


@pytest.fixture
async def make_backend(kube: KubeAPIServer, namespace: str, hub_id: str) -> AsyncIterator[Make]:
    started: list[Harness] = []

    async def make(kubeconfig: Path | None = None, **settings: Any) -> Harness:
        config = KubernetesBackendConfig(
            kubeconfig=str(kubeconfig or kube.admin_kubeconfig_path),
            namespace=namespace,
            hub_id=hub_id,
            sync_timeout_seconds=20.0,
            **settings,
        )
        harness = Harness(KubernetesBackend(config))

        def changed() -> None:
            harness.changes += 1

        await harness.backend.start(harness.events.append, changed)
        started.append(harness)
        return harness

    yield make
    for harness in started:
        await harness.backend.stop()


@pytest.fixture
def nodes(admin: Admin) -> Iterator[Callable[..., str]]:
    """Create Nodes (status set through the status subresource, as a kubelet would); deleted after."""
    created: list[str] = []

    def make(
        *,
        cpu: str = "8",
        memory: str = "32Gi",
        gpu: int = 0,
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
        ready: bool = True,
        unschedulable: bool = False,
    ) -> str:
        name = f"node-{secrets.token_hex(3)}"
        admin.create(
            "/api/v1/nodes",
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels or {}},
                "spec": {"taints": taints or [], "unschedulable": unschedulable},
            },
        )
        allocatable = {"cpu": cpu, "memory": memory, "pods": "110"}
        if gpu:
            allocatable["nvidia.com/gpu"] = str(gpu)
        condition = {"type": "Ready", "status": "True" if ready else "False", "reason": "KubeletReady"}
        admin.patch(
            f"/api/v1/nodes/{name}/status",
            {"status": {"capacity": allocatable, "allocatable": allocatable, "conditions": [condition]}},
        )
        created.append(name)
        return name

    yield make
    for name in created:
        admin.delete(f"/api/v1/nodes/{name}")


def make_pod(
    admin: Admin,
    namespace: str,
    node: str | None,
    requests: dict[str, Any],
    *,
    labels: dict[str, str] | None = None,
    init_requests: dict[str, Any] | None = None,
) -> str:
    name = f"pod-{secrets.token_hex(3)}"
    resources: dict[str, Any] = {"requests": requests}
    extended = {k: v for k, v in requests.items() if "/" in k}
    if extended:
        resources["limits"] = extended  # extended resources cannot be overcommitted
    spec: dict[str, Any] = {"containers": [{"name": "main", "image": "busybox", "resources": resources}]}
    if node:
        spec["nodeName"] = node
    if init_requests:
        spec["initContainers"] = [
            {"name": "init", "image": "busybox", "resources": {"requests": init_requests}}
        ]
    admin.create(
        f"/api/v1/namespaces/{namespace}/pods",
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}}, "spec": spec},
    )
    return name


def job_manifest(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "train", "labels": {"team": "ml"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "train"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        # An integer quantity, as JSON manifests often have: must pass through unchanged.
                        {"name": "main", "image": "busybox", "resources": {"requests": {"cpu": 1}}}
                    ],
                },
            },
            **spec,
        },
    }


def create_request(
    job_id: str,
    manifest: dict[str, Any] | None = None,
    *,
    generation: int = 1,
    assignments: list[tuple[str, str, int]] | None = None,
    tolerations: list[pb.Toleration] | None = None,
    pod_sets: list[str] | None = None,
) -> CreateRequest:
    spec = pb.JobSpec(name="train", pod_sets=[pb.PodSet(name=n, count=1) for n in pod_sets or ["main"]])
    spec.workload.manifest_json = json.dumps(manifest or job_manifest())
    spec.constraints.tolerations.extend(tolerations or [])
    return CreateRequest(
        job_id,
        generation,
        spec,
        [pb.NodeAssignment(pod_set=p, node=n, count=c) for p, n, c in assignments or []],
        hub_id="",  # the backend's configured hub id applies
    )


def new_job_id() -> str:
    return f"j{secrets.token_hex(8)}"


def jobs_path(namespace: str, name: str = "") -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs" + (f"/{name}" if name else "")


def start_job(admin: Admin, namespace: str, name: str) -> None:
    admin.patch(jobs_path(namespace, name) + "/status", {"status": {"active": 1, "startTime": _now()}})


def complete_job(admin: Admin, namespace: str, name: str) -> None:
    now = _now()
    conditions = [
        {
            "type": "SuccessCriteriaMet",
            "status": "True",
            "reason": "CompletionsReached",
            "lastTransitionTime": now,
        },
        {
            "type": "Complete",
            "status": "True",
            "reason": "CompletionsReached",
            "message": "Reached expected number of succeeded pods",
            "lastTransitionTime": now,
        },
    ]
    # The apiserver refuses to change a running Job's startTime: keep the one start_job set.
    started = admin.get(jobs_path(namespace, name)).get("status", {}).get("startTime") or now
    admin.patch(
        jobs_path(namespace, name) + "/status",
        {
            "status": {
                "active": 0,
                "succeeded": 1,
                "startTime": started,
                "completionTime": now,
                "conditions": conditions,
            }
        },
    )


def fail_job(admin: Admin, namespace: str, name: str, reason: str, message: str) -> None:
    now = _now()
    conditions = [
        {"type": t, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now}
        for t in ("FailureTarget", "Failed")
    ]
    admin.patch(
        jobs_path(namespace, name) + "/status",
        {"status": {"active": 0, "failed": 1, "conditions": conditions}},
    )


def our_jobs(admin: Admin, namespace: str, hub_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = admin.get(jobs_path(namespace), label_selector=f"{LABEL_HUB}={hub_id}")[
        "items"
    ]
    return items


# ------------------------------------------------------------------------------ pure parts


def test_config_from_mapping() -> None:
    config = KubernetesBackendConfig.from_mapping(
        {"type": "kubernetes", "namespace": "batch", "kueue-local-queue": "team-a", "resync_seconds": 30}
    )
    assert (config.namespace, config.kueue_local_queue, config.resync_seconds) == ("batch", "team-a", 30.0)
    with pytest.raises(ConfigError, match="unknown setting"):
        KubernetesBackendConfig.from_mapping({"namepsace": "x"})
    with pytest.raises(ConfigError, match="fluid_bytes"):
        KubernetesBackendConfig.from_mapping({"fluid_bytes": "some"})
    for bad in ({"max_concurrent_requests": 0}, {"qps": -1}, {"qps": "inf"}, {"burst": 0}):
        with pytest.raises(ConfigError, match=f"^backend.{next(iter(bad))}: "):
            KubernetesBackendConfig.from_mapping(bad)
    # The Helm chart's agent configs load too: tests/kube/test_helm.py.


def test_names_labels_and_quantities() -> None:
    assert object_name("j0123abc", 3) == "j0123abc-g3"
    odd = object_name("Team/Job_1" + "x" * 80, 12, part=1)
    assert (
        len(odd) <= 63 and odd.startswith("team-job-1") and odd == object_name("Team/Job_1" + "x" * 80, 12, 1)
    )
    assert job_label_value("j0123abc") == "j0123abc"
    assert len(job_label_value("a/b" * 40)) <= 63
    assert fluid_bytes("1.50GiB") == int(1.5 * GiB) and fluid_bytes("[Calculating]") == 0
    spec = {
        "initContainers": [
            {"name": "sidecar", "restartPolicy": "Always", "resources": {"requests": {"cpu": "100m"}}},
            {"name": "init", "resources": {"requests": {"cpu": "3", "memory": "1Gi"}}},
        ],
        "containers": [{"name": "a", "resources": {"requests": {"cpu": "1", "memory": "2Gi"}}}],
        "overhead": {"cpu": "10m"},
    }
    # max(app 1 + sidecar 0.1, init 3 + sidecar 0.1) + overhead
    assert pod_requests(spec) == {"cpu": 3110, "memory": 2 * GiB, "pods": 1}


def test_a_batch_job_runs_once_its_gang_is_ready() -> None:
    """RUNNING, which the hub's gang timeout trusts, needs the gang's required pods ready (or
    done), not the Job controller's startTime or one active pod."""
    labels = {LABEL_JOB: "j1", LABEL_GENERATION: "1", LABEL_HUB: "h"}

    def started(status: dict[str, Any], gang_pods: str | None = "3", **spec: Any) -> bool:
        annotations = {ANNOTATION_JOB: "j1"} | ({ANNOTATION_GANG_PODS: gang_pods} if gang_pods else {})
        obj = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "j1-g1", "labels": labels, "annotations": annotations},
            "spec": {"parallelism": 4, "completions": 4} | spec,
            "status": status,
        }
        part = project_workload(obj, "h", kueue=False)
        assert part is not None
        return part.started

    now = _now()
    assert not started({"startTime": now, "active": 4, "ready": 0})
    assert not started({"startTime": now, "active": 4, "ready": 2})
    assert started({"startTime": now, "active": 4, "ready": 3})
    assert started({"startTime": now, "active": 2, "ready": 1, "succeeded": 2})  # fast pods count
    assert not started({"startTime": now, "active": 4, "ready": 3}, gang_pods=None)  # all 4 then
    assert started({"startTime": now, "active": 1, "ready": 1}, parallelism=1)  # at most what runs at once
    assert started({"startTime": now, "active": 3})  # a cluster without `ready` (before 1.24)


# ------------------------------------------------------------------------------ inventory & datasets


async def test_inventory_reports_nodes_and_free_capacity(
    make_backend: Make, nodes: Callable[..., str], admin: Admin, namespace: str, hub_id: str
) -> None:
    taint = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
    gpu = nodes(cpu="16", memory="64Gi", gpu=4, labels={"nvidia.com/gpu.product": "A100"}, taints=[taint])
    cpu = nodes(cpu="8", memory="32Gi", ready=False, unschedulable=True)
    make_pod(admin, namespace, gpu, {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1})
    # An init container larger than the app container sets the pod's effective request.
    make_pod(admin, namespace, gpu, {"cpu": "500m"}, init_requests={"cpu": "3"})
    make_pod(admin, namespace, None, {"cpu": "4"})  # not bound: uses nothing
    finished = make_pod(admin, namespace, cpu, {"cpu": "8"})
    admin.patch(f"/api/v1/namespaces/{namespace}/pods/{finished}/status", {"status": {"phase": "Succeeded"}})
    job_id = new_job_id()
    ours = {LABEL_HUB: hub_id, LABEL_JOB: job_id, LABEL_GENERATION: "2"}
    make_pod(admin, namespace, cpu, {"cpu": "1", "memory": "1Gi"}, labels=ours)

    harness = await make_backend()
    snapshot = await harness.backend.inventory()
    by_name = {n.name: n for n in snapshot.nodes}
    g, c = by_name[gpu], by_name[cpu]
    assert dict(g.allocatable.quantities) == {
        "cpu": 16000,
        "memory": 64 * GiB,
        "nvidia.com/gpu": 4,
        "pods": 110,
    }
    assert dict(g.free.quantities) == {"cpu": 11000, "memory": 60 * GiB, "nvidia.com/gpu": 3, "pods": 108}
    assert g.labels["nvidia.com/gpu.product"] == "A100"
    assert [(t.key, t.value, t.effect) for t in g.taints] == [("dedicated", "gpu", "NoSchedule")]
    assert g.ready and not g.unschedulable
    assert not c.ready and c.unschedulable
    assert dict(c.free.quantities) == {"cpu": 7000, "memory": 31 * GiB, "pods": 109}
    assert f"{job_id}:2" in snapshot.accounted_jobs

    # Watches keep it current: a new pod, a finished pod, a node label change.
    before = harness.changes
    extra = make_pod(admin, namespace, cpu, {"cpu": "3"})

    async def free_cpu(node: str) -> int:
        snap = await harness.backend.inventory()
        return next(n for n in snap.nodes if n.name == node).free.quantities["cpu"]

    deadline = time.monotonic() + 10
    while await free_cpu(cpu) != 4000:
        assert time.monotonic() < deadline, "new pod not subtracted"
        await asyncio.sleep(0.05)
    assert harness.changes > before
    admin.patch(f"/api/v1/namespaces/{namespace}/pods/{extra}/status", {"status": {"phase": "Failed"}})
    while await free_cpu(cpu) != 7000:
        assert time.monotonic() < deadline, "finished pod still subtracted"
        await asyncio.sleep(0.05)
    admin.patch(f"/api/v1/nodes/{gpu}", {"metadata": {"labels": {"zone": "b"}}})
    await eventually(lambda: _labels(harness, gpu).get("zone") == "b", "node label")


def _labels(harness: Harness, node: str) -> dict[str, str]:
    info = next((n for n in harness.backend.nodes.values() if n.name == node), None)
    return dict(info.labels) if info else {}


async def test_datasets_from_labelled_pvcs(make_backend: Make, admin: Admin, namespace: str) -> None:
    def pvc(name: str, dataset: str | None, size: str) -> None:
        labels = {"fedplane.io/dataset": dataset} if dataset else {}
        admin.create(
            f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": name, "labels": labels},
                "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": size}}},
            },
        )

    tag = secrets.token_hex(3)
    pvc("imagenet", f"imagenet-{tag}", "150Gi")
    pvc("scratch", None, "10Gi")
    harness = await make_backend()
    present = {d.id: d.bytes for d in await harness.backend.datasets()}
    assert present[f"imagenet-{tag}"] == 150 * GiB
    assert "scratch" not in present

    # Bound capacity (status) wins over the request; new PVCs appear through the watch.
    admin.patch(
        f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/imagenet/status",
        {"status": {"phase": "Bound", "capacity": {"storage": "160Gi"}}},
    )
    pvc("laion", f"laion-{tag}", "2Ti")

    async def sizes() -> dict[str, int]:
        return {d.id: d.bytes for d in await harness.backend.datasets()}

    deadline = time.monotonic() + 10
    while (await sizes()).get(f"imagenet-{tag}") != 160 * GiB or f"laion-{tag}" not in await sizes():
        assert time.monotonic() < deadline, await sizes()
        await asyncio.sleep(0.05)
    assert (await sizes())[f"laion-{tag}"] == 2 * 2**40


def _install_crd(admin: Admin, group: str, version: str, kind: str, plural: str) -> None:
    name = f"{plural}.{group}"
    try:
        admin.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    except ApiException:
        admin.create(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": name},
                "spec": {
                    "group": group,
                    "scope": "Namespaced",
                    "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
                    "versions": [
                        {
                            "name": version,
                            "served": True,
                            "storage": True,
                            "subresources": {"status": {}},
                            "schema": {
                                "openAPIV3Schema": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    ],
                },
            },
        )
    deadline = time.monotonic() + 20
    while True:
        try:
            admin.get(f"/apis/{group}/{version}/{plural}")
            return
        except ApiException:
            assert time.monotonic() < deadline, f"CRD {name} not served"
            time.sleep(0.1)


async def test_fluid_datasets_when_the_crd_exists(make_backend: Make, admin: Admin, namespace: str) -> None:
    _install_crd(admin, "data.fluid.io", "v1alpha1", "Dataset", "datasets")
    path = f"/apis/data.fluid.io/v1alpha1/namespaces/{namespace}/datasets"
    tag = secrets.token_hex(3)
    admin.create(
        path,
        {
            "apiVersion": "data.fluid.io/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "coco", "labels": {"fedplane.io/dataset": f"coco-{tag}"}},
            "spec": {"mounts": [{"mountPoint": "s3://bucket/coco"}]},
        },
    )
    admin.patch(
        f"{path}/coco/status", {"status": {"ufsTotal": "20.00GiB", "cacheStates": {"cached": "5.00GiB"}}}
    )
    admin.create(
        path, {"apiVersion": "data.fluid.io/v1alpha1", "kind": "Dataset", "metadata": {"name": "raw"}}
    )

    cached = await make_backend()
    present = {d.id: d.bytes for d in await cached.backend.datasets()}
    assert present[f"coco-{tag}"] == 5 * GiB
    assert present[f"{namespace}/raw"] == 0  # present (required datasets match), nothing cached
    total = await make_backend(fluid_bytes="total")
    assert {d.id: d.bytes for d in await total.backend.datasets()}[f"coco-{tag}"] == 20 * GiB


# ------------------------------------------------------------------------------ workloads


async def test_create_labels_pins_and_admits(
    make_backend: Make, admin: Admin, namespace: str, hub_id: str
) -> None:
    harness = await make_backend()
    job_id = new_job_id()
    toleration = pb.Toleration(key="dedicated", operator="Equal", value="gpu", effect="NoSchedule")
    await harness.backend.create(
        create_request(
            job_id, assignments=[("main", "node-a", 1), ("main", "node-b", 1)], tolerations=[toleration]
        )
    )
    event = await harness.wait_state(job_id, pb.ADMITTED)
    assert event.reason == "Created"

    job = admin.get(jobs_path(namespace, object_name(job_id, 1)))
    meta, template = job["metadata"], job["spec"]["template"]
    for labels in (meta["labels"], template["metadata"]["labels"]):
        assert labels[LABEL_JOB] == job_id and labels[LABEL_GENERATION] == "1" and labels[LABEL_HUB] == hub_id
    assert meta["labels"]["team"] == "ml" and template["metadata"]["labels"]["app"] == "train"
    assert meta["annotations"][ANNOTATION_JOB] == job_id
    terms = template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert [t["matchFields"] for t in terms["nodeSelectorTerms"]] == [
        [{"key": "metadata.name", "operator": "In", "values": ["node-a"]}],
        [{"key": "metadata.name", "operator": "In", "values": ["node-b"]}],
    ]
    assert {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in template[
        "spec"
    ]["tolerations"]
    assert template["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "1"
    assert await harness.backend.list_workloads() == [WorkloadRef(job_id, 1)]


async def test_create_adopts_after_restart_without_duplicates(
    make_backend: Make, admin: Admin, namespace: str, hub_id: str
) -> None:
    job_id = new_job_id()
    first = await make_backend()
    await first.backend.create(create_request(job_id, assignments=[("main", "node-a", 1)]))
    await first.backend.stop()

    second = await make_backend()
    await second.backend.create(create_request(job_id, assignments=[("main", "node-a", 1)]))  # redelivery
    assert len(our_jobs(admin, namespace, hub_id)) == 1
    assert second.states(job_id) == [pb.ADMITTED]

    # Same name, but not ours: refused, never overwritten.
    foreign = job_manifest()
    foreign["metadata"] = {"name": object_name("jforeign", 1)}
    admin.create(jobs_path(namespace), foreign)
    with pytest.raises(BackendError) as refused:
        await second.backend.create(create_request("jforeign"))
    assert refused.value.permanent and refused.value.reason == "NameConflict"


async def test_creates_are_paced_by_qps(
    make_backend: Make, admin: Admin, namespace: str, hub_id: str
) -> None:
    """A low qps paces a burst of creates (client-go's default 5/s is what throttled MultiKueue)."""
    harness = await make_backend(qps=20, burst=2)
    jobs = [new_job_id() for _ in range(12)]
    began = time.monotonic()
    await asyncio.gather(*(harness.backend.create(create_request(j)) for j in jobs))
    elapsed = time.monotonic() - began
    # 2 at once, then 10 at 20/s: half a second at least (unpaced they take a few ms each).
    assert elapsed >= 0.45, elapsed
    assert len(our_jobs(admin, namespace, hub_id)) == len(jobs)


class _CountingBackend(KubernetesBackend):
    """Counts the creates in flight at once."""

    def __init__(self, config: KubernetesBackendConfig) -> None:
        super().__init__(config)
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0

    def post(self, path: str, obj: Mapping[str, Any]) -> None:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            super().post(path, obj)
        finally:
            with self.lock:
                self.in_flight -= 1


async def test_concurrent_creates_stay_within_the_pool(
    kube: KubeAPIServer, admin: Admin, namespace: str, hub_id: str
) -> None:
    config = KubernetesBackendConfig(
        kubeconfig=str(kube.admin_kubeconfig_path),
        namespace=namespace,
        hub_id=hub_id,
        max_concurrent_requests=3,
    )
    backend = _CountingBackend(config)
    await backend.start(lambda event: None, lambda: None)
    try:
        jobs = [new_job_id() for _ in range(30)]
        creating = asyncio.gather(*(backend.create(create_request(j)) for j in jobs))
        # Each create's first step hands its request to the pool: the event loop is not blocked.
        await asyncio.sleep(0)
        assert not creating.done()
        await creating
        assert backend.peak == 3
        assert len(our_jobs(admin, namespace, hub_id)) == len(jobs)
    finally:
        await backend.stop()


async def test_status_success_maps_running_then_succeeded_once(
    make_backend: Make, admin: Admin, namespace: str
) -> None:
    harness = await make_backend()
    job_id = new_job_id()
    await harness.backend.create(create_request(job_id))
    name = object_name(job_id, 1)
    start_job(admin, namespace, name)
    await harness.wait_state(job_id, pb.RUNNING)
    complete_job(admin, namespace, name)
    done = await harness.wait_state(job_id, pb.SUCCEEDED)
    assert done.reason == "CompletionsReached"
    admin.patch(jobs_path(namespace, name), {"metadata": {"labels": {"touched": "yes"}}})
    await asyncio.sleep(0.3)
    assert harness.states(job_id) == [pb.ADMITTED, pb.RUNNING, pb.SUCCEEDED]


async def test_status_failure_carries_reason_and_message(
    make_backend: Make, admin: Admin, namespace: str
) -> None:
    harness = await make_backend()
    job_id = new_job_id()
    await harness.backend.create(create_request(job_id))
    name = object_name(job_id, 1)
    start_job(admin, namespace, name)
    fail_job(admin, namespace, name, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    failed = await harness.wait_state(job_id, pb.FAILED)
    assert (failed.reason, failed.message) == (
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
    )
    assert harness.states(job_id) == [pb.ADMITTED, pb.RUNNING, pb.FAILED]


async def test_delete_cancels_once_and_tolerates_missing(
    make_backend: Make, admin: Admin, namespace: str, hub_id: str
) -> None:
    harness = await make_backend()
    job_id = new_job_id()
    await harness.backend.create(create_request(job_id))
    start_job(admin, namespace, object_name(job_id, 1))
    await harness.wait_state(job_id, pb.RUNNING)
    await harness.backend.delete(job_id, 1, "cancelled by user")
    cancelled = harness.event(job_id, pb.CANCELLED)
    assert cancelled.message == "cancelled by user"
    await eventually(lambda: not our_jobs(admin, namespace, hub_id), "job deleted")
    await asyncio.sleep(0.3)  # the watch's DELETED event must not turn into a FAILED
    assert harness.states(job_id) == [pb.ADMITTED, pb.RUNNING, pb.CANCELLED]
    await harness.backend.delete(job_id, 1, "again")  # idempotent
    assert harness.states(job_id).count(pb.CANCELLED) == 1
    # A workload that never existed here is cancelled without error.
    await harness.backend.delete("jmissing", 4, "gc")
    assert harness.states("jmissing", 4) == [pb.CANCELLED]


async def test_outside_deletion_is_reported_as_failed(
    make_backend: Make, admin: Admin, namespace: str
) -> None:
    harness = await make_backend()
    job_id = new_job_id()
    await harness.backend.create(create_request(job_id))
    await harness.wait_state(job_id, pb.ADMITTED)
    admin.delete(jobs_path(namespace, object_name(job_id, 1)), propagation_policy="Background")
    failed = await harness.wait_state(job_id, pb.FAILED)
    assert failed.reason == "WorkloadDeleted"


async def test_list_workloads_ignores_objects_without_our_labels(
    make_backend: Make, admin: Admin, namespace: str, hub_id: str
) -> None:
    harness = await make_backend()
    job_id = new_job_id()
    await harness.backend.create(create_request(job_id, generation=3))
    plain = job_manifest()
    plain["metadata"] = {"name": "plain"}
    admin.create(jobs_path(namespace), plain)
    other_hub = job_manifest()
    other_hub["metadata"] = {
        "name": "other-hub",
        "labels": {LABEL_HUB: "someone-else", LABEL_JOB: "jother", LABEL_GENERATION: "1"},
    }
    admin.create(jobs_path(namespace), other_hub)
    assert await harness.backend.list_workloads() == [WorkloadRef(job_id, 3)]
    await harness.backend.delete("jother", 1, "gc")  # not ours: untouched
    admin.get(jobs_path(namespace, "other-hub"))
    admin.get(jobs_path(namespace, "plain"))


async def test_multi_pod_set_list_pins_each_job_and_aggregates(
    make_backend: Make, admin: Admin, namespace: str, hub_id: str
) -> None:
    harness = await make_backend()
    job_id = new_job_id()
    spec = pb.JobSpec(
        name="etl", pod_sets=[pb.PodSet(name="extract", count=1), pb.PodSet(name="load", count=2)]
    )
    request = create_request(
        job_id,
        default_manifest(spec),
        assignments=[("extract", "node-x", 1), ("load", "node-y", 2)],
        pod_sets=["extract", "load"],
    )
    await harness.backend.create(request)
    jobs = {j["metadata"]["name"]: j for j in our_jobs(admin, namespace, hub_id)}
    assert sorted(jobs) == [object_name(job_id, 1, 0), object_name(job_id, 1, 1)]
    for index, node in enumerate(["node-x", "node-y"]):
        spec_ = jobs[object_name(job_id, 1, index)]["spec"]["template"]["spec"]
        terms = spec_["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"] == [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
        ]
    complete_job(admin, namespace, object_name(job_id, 1, 0))
    await asyncio.sleep(0.5)
    assert pb.SUCCEEDED not in harness.states(job_id)
    complete_job(admin, namespace, object_name(job_id, 1, 1))
    await harness.wait_state(job_id, pb.SUCCEEDED)


async def test_running_waits_for_the_gangs_required_pods(
    make_backend: Make, admin: Admin, namespace: str
) -> None:
    harness = await make_backend()
    job_id = new_job_id()
    request = create_request(
        job_id, job_manifest(parallelism=4, completions=4), assignments=[("main", "node-a", 2)]
    )
    request.spec.pod_sets[0].count, request.spec.pod_sets[0].min_count = 4, 2
    await harness.backend.create(request)
    name = object_name(job_id, 1)
    assert admin.get(jobs_path(namespace, name))["metadata"]["annotations"][ANNOTATION_GANG_PODS] == "2"
    # The Job controller has made every pod; one is ready.
    admin.patch(
        jobs_path(namespace, name) + "/status", {"status": {"startTime": _now(), "active": 4, "ready": 1}}
    )
    await asyncio.sleep(0.5)
    assert harness.states(job_id) == [pb.ADMITTED]
    admin.patch(jobs_path(namespace, name) + "/status", {"status": {"active": 4, "ready": 2}})
    await harness.wait_state(job_id, pb.RUNNING)


async def test_kueue_admission_is_reported_when_unsuspended(
    make_backend: Make, admin: Admin, namespace: str
) -> None:
    harness = await make_backend(kueue_local_queue="team-a")
    job_id = new_job_id()
    await harness.backend.create(create_request(job_id))
    name = object_name(job_id, 1)
    job = admin.get(jobs_path(namespace, name))
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    assert job["spec"]["suspend"] is True
    await asyncio.sleep(0.5)
    assert harness.states(job_id) == []  # queued in Kueue, not admitted yet
    admin.patch(jobs_path(namespace, name), {"spec": {"suspend": False}})  # Kueue admits
    await harness.wait_state(job_id, pb.ADMITTED)


async def test_unsupported_and_invalid_workloads_are_permanent_errors(make_backend: Make) -> None:
    harness = await make_backend()
    cases = [
        (
            {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "r"}, "spec": {}},
            "UnsupportedWorkloadKind",
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}},
            "UnsupportedWorkloadKind",
        ),
        (
            {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "bad"}, "spec": {}},
            "InvalidWorkload",
        ),
    ]
    for manifest, reason in cases:
        with pytest.raises(BackendError) as refused:
            await harness.backend.create(create_request(new_job_id(), manifest))
        assert refused.value.permanent and refused.value.reason == reason, refused.value


async def test_crd_workload_kinds_use_the_dynamic_client(
    make_backend: Make, admin: Admin, namespace: str, hub_id: str
) -> None:
    _install_crd(admin, "jobset.x-k8s.io", "v1alpha2", "JobSet", "jobsets")
    harness = await make_backend()
    job_id = new_job_id()
    pod_spec = {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox"}]}
    manifest = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "js"},
        "spec": {
            "replicatedJobs": [
                {"name": "driver", "replicas": 1, "template": {"spec": {"template": {"spec": pod_spec}}}},
                {"name": "workers", "replicas": 1, "template": {"spec": {"template": {"spec": pod_spec}}}},
            ]
        },
    }
    await harness.backend.create(
        create_request(job_id, manifest, assignments=[("driver", "node-d", 1), ("workers", "node-w", 4)])
    )
    path = f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{namespace}/jobsets/{object_name(job_id, 1)}"
    jobset = admin.get(path)
    for replicated, node in zip(jobset["spec"]["replicatedJobs"], ["node-d", "node-w"], strict=True):
        template = replicated["template"]["spec"]["template"]
        assert template["metadata"]["labels"][LABEL_HUB] == hub_id
        terms = template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchFields"][0]["values"] == [node]
    assert await harness.backend.list_workloads() == [WorkloadRef(job_id, 1)]
    admin.patch(
        path + "/status",
        {"status": {"conditions": [{"type": "Completed", "status": "True", "reason": "AllJobsCompleted"}]}},
    )
    done = await harness.wait_state(job_id, pb.SUCCEEDED)
    assert done.reason == "AllJobsCompleted"
    await harness.backend.delete(job_id, 1, "gc")
    await eventually(lambda: not admin.get(path.rsplit("/", 1)[0])["items"], "JobSet deleted")


# ------------------------------------------------------------------------------ watch resumption


async def test_watch_resumes_after_the_connection_drops(
    make_backend: Make, admin: Admin, namespace: str
) -> None:
    harness = await make_backend()
    job_id = new_job_id()
    await harness.backend.create(create_request(job_id))
    await harness.wait_state(job_id, pb.ADMITTED)
    watcher = harness.backend.watchers["workloads:batch/v1:Job"]
    relists = watcher.relists
    for _ in range(3):
        watcher.interrupt()
        await asyncio.sleep(0.05)
    start_job(admin, namespace, object_name(job_id, 1))
    await harness.wait_state(job_id, pb.RUNNING)
    assert watcher.relists == relists  # resumed from the last resource version, no relist


async def test_watch_relists_after_410_gone(
    make_backend: Make, admin: Admin, namespace: str, kube: KubeAPIServer
) -> None:
    harness = await make_backend()
    job_id = new_job_id()
    await harness.backend.create(create_request(job_id))
    await harness.wait_state(job_id, pb.ADMITTED)
    watcher = harness.backend.watchers["workloads:batch/v1:Job"]
    relists = watcher.relists
    watcher.gate.clear()  # hold the reconnection while history is compacted away
    watcher.interrupt()
    await asyncio.sleep(0.3)
    name = object_name(job_id, 1)
    start_job(admin, namespace, name)
    complete_job(admin, namespace, name)
    kube.compact_etcd()
    watcher.gate.set()
    await harness.wait_state(job_id, pb.SUCCEEDED)
    assert watcher.relists > relists
    assert harness.states(job_id) == [pb.ADMITTED, pb.RUNNING, pb.SUCCEEDED]


# ------------------------------------------------------------------------------ RBAC


@pytest.fixture(scope="module")
def agent_rbac(admin: Admin) -> None:
    """Install the Helm chart's agent as an operator would (once: cluster-scoped objects):
    release fedplane in fedplane-system, whose ServiceAccount the agent's token stands for."""
    try:
        admin.get("/apis/rbac.authorization.k8s.io/v1/clusterroles/fedplane-agent")
        return
    except ApiException:
        pass
    objects = helm.template(
        helm.CHART / "ci" / "agent-values.yaml",
        release="fedplane",
        namespace=apiserver.AGENT_NAMESPACE,
        set_values=["metrics.serviceMonitor.enabled=false"],
    )
    admin.create(
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": apiserver.AGENT_NAMESPACE}},
    )
    helm.apply(admin, objects, dry_run=False)


async def test_backend_works_with_exactly_the_shipped_rbac(
    agent_rbac: None,
    make_backend: Make,
    kube: KubeAPIServer,
    admin: Admin,
    nodes: Callable[..., str],
    namespace: str,
) -> None:
    node = nodes(cpu="4")
    make_pod(admin, namespace, node, {"cpu": "1"})
    harness = await make_backend(kubeconfig=kube.agent_kubeconfig_path)
    snapshot = await harness.backend.inventory()
    assert next(n for n in snapshot.nodes if n.name == node).free.quantities["cpu"] == 3000
    job_id = new_job_id()
    await harness.backend.create(create_request(job_id, assignments=[("main", node, 1)]))
    start_job(admin, namespace, object_name(job_id, 1))
    await harness.wait_state(job_id, pb.RUNNING)
    assert await harness.backend.list_workloads() == [WorkloadRef(job_id, 1)]
    await harness.backend.delete(job_id, 1, "done")
    await harness.backend.create(create_request(job_id, generation=2))  # re-create then adopt (get)
    await harness.backend.create(create_request(job_id, generation=2))

    # What the agent must not be able to do.
    agent = Admin(kube, kube.agent_kubeconfig_path)
    try:
        admin.create(
            f"/api/v1/namespaces/{namespace}/secrets",
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}},
        )
        forbidden: list[Callable[[], object]] = [
            lambda: agent.delete(f"/api/v1/namespaces/{namespace}/secrets/s"),
            lambda: agent.get(f"/api/v1/namespaces/{namespace}/secrets"),
            lambda: agent.delete(f"/api/v1/nodes/{node}"),
            lambda: agent.create(
                f"/api/v1/namespaces/{namespace}/pods",
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": []}},
            ),
            lambda: agent.patch(
                jobs_path(namespace, object_name(job_id, 2)), {"metadata": {"labels": {"a": "b"}}}
            ),
        ]
        for attempt in forbidden:
            with pytest.raises(ApiException) as denied:
                attempt()
            assert denied.value.status == 403
    finally:
        agent.close()


async def test_service_account_token_from_the_token_api(
    agent_rbac: None, make_backend: Make, kube: KubeAPIServer, admin: Admin
) -> None:
    """The shipped ServiceAccount with a real bound token (the test's signing keys) is enough."""
    sa = f"/api/v1/namespaces/{apiserver.AGENT_NAMESPACE}/serviceaccounts/{apiserver.AGENT_SERVICE_ACCOUNT}"
    token = admin.create(
        f"{sa}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 600},
        },
    )["status"]["token"]
    harness = await make_backend(kubeconfig=kube.kubeconfig("fedplane-agent-sa", token))
    assert isinstance((await harness.backend.inventory()).nodes, list)


async def test_start_without_permissions_is_a_clear_permanent_error(
    make_backend: Make, kube: KubeAPIServer
) -> None:
    with pytest.raises(BackendError) as refused:
        await make_backend(kubeconfig=kube.kubeconfig(apiserver.NOBODY_USER))
    assert refused.value.permanent and refused.value.reason == "Forbidden"
    assert "RBAC" in str(refused.value)


# ------------------------------------------------------------------------------ through the daemon


async def test_agent_daemon_runs_a_hub_job_on_the_cluster(
    federation: Federation, kube: KubeAPIServer, admin: Admin, nodes: Callable[..., str], namespace: str
) -> None:
    """Hub → NATS → agent daemon → Kubernetes backend → apiserver, and the status back to the hub."""
    node = nodes(cpu="4", memory="16Gi")
    config = AgentConfig(
        cluster="kube-a",
        nats_url=federation.nats_url,
        heartbeat_interval_seconds=0.3,
        inventory_interval_seconds=2.0,
        backend={"type": "kubernetes", "kubeconfig": str(kube.admin_kubeconfig_path), "namespace": namespace},
    )
    agent = Agent(federation.admissible(config), make_agent_backend(config))
    await agent.start()
    federation.agents[config.cluster] = agent
    await federation.wait_clusters_ready(["kube-a"])

    spec = pb.JobSpec(name="hello", queue="default", pod_sets=[pb.PodSet(name="main", count=1)])
    spec.pod_sets[0].requests.quantities["cpu"] = 1000
    spec.workload.manifest_json = json.dumps(default_manifest(spec))
    job = await federation.submit(spec)
    admitted = await federation.wait_state(job.id, {pb.ADMITTED})
    assert admitted.status.cluster == "kube-a"
    assert [(a.node, a.count) for a in admitted.status.assignments] == [(node, 1)]

    name = object_name(job.id, admitted.status.generation)
    created = admin.get(jobs_path(namespace, name))
    terms = created["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    assert terms["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchFields"][0][
        "values"
    ] == [node]
    start_job(admin, namespace, name)
    complete_job(admin, namespace, name)
    done = await federation.wait_state(job.id, {pb.SUCCEEDED, pb.FAILED})
    assert done.status.state == pb.SUCCEEDED
    assert [t.state for t in done.status.history] == [
        pb.PENDING,
        pb.DISPATCHED,
        pb.ADMITTED,
        pb.RUNNING,
        pb.SUCCEEDED,
    ]


async def test_agent_deletes_orphaned_jobs_the_hub_no_longer_assigns_and_nothing_else(
    federation: Federation, kube: KubeAPIServer, admin: Admin, namespace: str
) -> None:
    """Orphans left by a failover are deleted with background propagation; foreign objects are not."""
    config = AgentConfig(
        cluster="kube-gc",
        nats_url=federation.nats_url,
        heartbeat_interval_seconds=0.3,
        gc_interval_seconds=0,  # driven by hand below
        backend={"type": "kubernetes", "kubeconfig": str(kube.admin_kubeconfig_path), "namespace": namespace},
    )
    agent = Agent(federation.admissible(config), make_agent_backend(config))
    await agent.start()
    federation.agents[config.cluster] = agent
    orphan_id = new_job_id()
    await agent.backend.create(create_request(orphan_id, generation=2))
    plain = job_manifest()
    plain["metadata"] = {"name": "not-ours"}
    admin.create(jobs_path(namespace), plain)

    assert orphan_id in await agent.collect_orphans()

    async def gone() -> bool:
        try:
            admin.get(jobs_path(namespace, object_name(orphan_id, 2)))
        except Exception:
            return True
        return False

    deadline = time.monotonic() + 10
    while not await gone():
        assert time.monotonic() < deadline, "the orphaned Job was not deleted"
        await asyncio.sleep(0.1)
    admin.get(jobs_path(namespace, "not-ours"))
    assert orphan_id not in {w.job_id for w in await agent.backend.list_workloads()}
