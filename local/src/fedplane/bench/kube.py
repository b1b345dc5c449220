"""The member clusters of `fedplane bench --backend kubernetes`: real kube-apiservers, their
agents, and a watch on the Jobs the agents create.

Each member is a kube-apiserver with its own etcd (`fedplane.local.kubeapiserver`) and one
agent process (`fedplane agent`, Kubernetes backend with its default settings, as the admin
user). No kubelet, scheduler or controllers run: the bench creates `nodes` Ready Node objects
per cluster so the agents have an inventory to report, and Jobs never get pods. A job counts
as dispatched when its Job object exists; the bench watches the Jobs itself and takes each
one's arrival time here, since creationTimestamp has only whole seconds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedplane.agent.kubernetes_backend import ANNOTATION_JOB, LABEL_HUB
from fedplane.bench import loadgen
from fedplane.local.kubeapiserver import KubeAPIServer

# Agents at most: each cluster costs an apiserver, an etcd and an agent (~400 MiB together).
MAX_CLUSTERS = 10
NAMESPACE = "default"
HUB_ID = "fedplane"
NODE_CREATE_CONCURRENCY = 8
# Server-side timeout of one watch request; the watch then resumes from its last version.
WATCH_SECONDS = 5
# After the load: how long the watch may lag behind the hub's ADMITTED before Jobs count as missing.
CATCH_UP_SECONDS = 30.0


def cluster_name(index: int) -> str:
    return f"kube-{index:03d}"


def node_name(index: int) -> str:
    return f"node-{index:04d}"


async def create_nodes(server: KubeAPIServer, nodes: int, cpu: int, memory: str) -> None:
    """`nodes` Ready Nodes of `cpu` cpus: what a kubelet would register, since none runs."""
    allocatable = {"cpu": str(cpu), "memory": memory, "pods": str(max(110, cpu))}
    limit = asyncio.Semaphore(NODE_CREATE_CONCURRENCY)

    async def one(i: int) -> None:
        async with limit:
            await asyncio.to_thread(
                server.create_node, node_name(i), allocatable, {"fedplane.io/fake": "true"}
            )

    await asyncio.gather(*(one(i) for i in range(nodes)))


def agent_config(
    cluster: str,
    server: KubeAPIServer,
    nats_url: str,
    heartbeat: float,
    *,
    bootstrap_token_file: str = "",
    nats_ca_file: str = "",
) -> dict[str, Any]:
    """An agent's YAML config: the Kubernetes backend with its defaults, admin credentials
    (no Helm chart installs the agent's RBAC here), no state_dir (in memory, like the fleet)."""
    config: dict[str, Any] = {
        "cluster": cluster,
        "nats_url": nats_url,
        "hub_id": HUB_ID,
        "labels": {"fedplane.io/benchmark": "true"},
        "heartbeat_interval_seconds": heartbeat,
        "backend": {
            "type": "kubernetes",
            "kubeconfig": str(server.admin_kubeconfig_path),
            "namespace": NAMESPACE,
        },
        "telemetry": {"exporter": "none", "log_level": "info", "log_format": "json"},
    }
    if bootstrap_token_file:
        config["bootstrap_token_file"] = bootstrap_token_file
    if nats_ca_file:
        config["nats_tls"] = {"ca_file": nats_ca_file}
    return config


def write_agent_config(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(config)))
    return path


@dataclass
class JobWatch:
    """List+watch of one apiserver's Fedplane Jobs in a thread: when each job's Job first
    appeared (this machine's clock) and how many distinct Job objects each job got."""

    server: KubeAPIServer
    first_seen: dict[str, float] = field(default_factory=dict)
    objects: Counter[str] = field(default_factory=Counter)
    error: str = ""
    _uids: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-job-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; it does at its watch's timeout, or at once when its apiserver stops."""
        self._stop.set()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def seen(self) -> int:
        with self._lock:
            return len(self.first_seen)

    def _record(self, obj: Mapping[str, Any], when: float) -> None:
        meta = obj.get("metadata") or {}
        uid = meta.get("uid", "")
        job_id = (meta.get("annotations") or {}).get(ANNOTATION_JOB)
        if not job_id or uid in self._uids:
            return
        with self._lock:
            self._uids.add(uid)
            self.objects[job_id] += 1
            self.first_seen.setdefault(job_id, when)

    def _path(self, **query: str) -> str:
        selector = {"labelSelector": f"{LABEL_HUB}={HUB_ID}"}
        return f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs?" + urllib.parse.urlencode({**selector, **query})

    def _list(self) -> str:
        listed = self.server.request("get", self._path())
        now = time.time()
        for item in listed.get("items") or []:
            self._record(item, now)
        return str(listed["metadata"]["resourceVersion"])

    def _run(self) -> None:
        try:
            version = self._list()
            while not self._stop.is_set():
                version = self._watch(version)
        except Exception as exc:  # reported with the figures: a broken watch must not pass silently
            self.error = f"{type(exc).__name__}: {exc}"[:300]

    def _watch(self, version: str) -> str:
        """One watch request; returns the version to resume from (relists after 410 Gone)."""
        query = {"watch": "1", "resourceVersion": version, "timeoutSeconds": str(WATCH_SECONDS)}
        request = urllib.request.Request(
            f"{self.server.url}{self._path(allowWatchBookmarks='true', **query)}",
            headers={"Authorization": f"Bearer {self.server.admin_token}"},
        )
        context = self.server.ssl_context()
        with urllib.request.urlopen(request, timeout=WATCH_SECONDS + 30, context=context) as response:
            for line in response:
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    if obj.get("code") == 410:
                        return self._list()
                    raise RuntimeError(f"watch error: {obj.get('message', obj)}")
                if event.get("type") in ("ADDED", "MODIFIED"):
                    self._record(obj, time.time())
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
        return version


async def catch_up(watches: Sequence[JobWatch], expected: int, within: float = CATCH_UP_SECONDS) -> None:
    """Until the watches have seen `expected` jobs (or `within` seconds): the hub's ADMITTED can come
    just before the watch event of the same Job reaches this process."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and sum(w.seen() for w in watches) < expected:
        if any(w.error for w in watches):
            return
        await asyncio.sleep(0.1)


def figures(watches: Mapping[str, JobWatch], sends: Mapping[str, float]) -> dict[str, Any]:
    """submit -> workload created per job, created/s sustained, and every job's Job counted
    across the clusters: exactly one each, or the run is not what it claims to measure."""
    created: list[float] = []
    latencies: list[float] = []
    per_cluster: dict[str, int] = {}
    objects: Counter[str] = Counter()
    for cluster, watch in watches.items():
        per_cluster[cluster] = len(watch.first_seen)
        objects.update(watch.objects)
        for job_id, when in watch.first_seen.items():
            created.append(when)
            sent = sends.get(job_id)
            if sent is not None:
                latencies.append(when - sent)
    sustained, window = loadgen.sustained_rate(created)
    duplicated = sorted(job for job, count in objects.items() if count > 1)
    missing = sorted(set(sends) - set(objects))
    unexpected = sorted(set(objects) - set(sends))
    errors = {cluster: w.error for cluster, w in watches.items() if w.error}
    return {
        "submit_to_workload_created": loadgen.summary_ms(latencies),
        "created": len(objects),
        "created_per_cluster": per_cluster,
        "created_per_s_sustained": round(sustained, 1) if sustained is not None else None,
        "created_sustained_window_s": round(window, 3) if window is not None else None,
        "duplicated": len(duplicated),
        "missing": len(missing),
        "unexpected": len(unexpected),
        "samples": {"duplicated": duplicated[:5], "missing": missing[:5], "unexpected": unexpected[:5]},
        "watch_errors": errors,
        "last_created": max(created) if created else None,
    }


def stop_watches(watches: Sequence[JobWatch]) -> None:
    for watch in watches:
        watch.stop()


def join_watches(watches: Sequence[JobWatch], timeout: float = WATCH_SECONDS + 5) -> None:
    """After their apiservers stopped, which ends every watch request at once."""
    deadline = time.monotonic() + timeout
    for watch in watches:
        watch.join(max(0.0, deadline - time.monotonic()))
