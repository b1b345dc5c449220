"""How fast the agent's Kubernetes backend creates workloads in one real kube-apiserver.

Starts etcd and kube-apiserver (the cached build the Kubernetes tests use; no kubelet or
controllers, so a Job is "dispatched" once the object exists), drives a KubernetesBackend as the
agent does (commands arrive in batches; a batch's creates are issued together and the next batch
waits for them), and reports creates/s plus the CPU of this process (the agent side, by thread
role), the apiserver and its etcd, from /proc/PID/stat, so the limiting process shows.

Usage: python -m fedplane.bench.kubecreate --jobs 1000 [--batch 1024] [--set backend.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedplane.agent.backend import CreateRequest, WorkloadEvent
from fedplane.agent.kubernetes_backend import KubernetesBackend, KubernetesBackendConfig
from fedplane.bench.procstat import cpu_seconds, stat_cpu_seconds
from fedplane.client.spec import default_manifest
from fedplane.local import kubeapiserver
from fedplane.runtime import logs
from fedplane.runtime.config import ConfigError
from fedplane.v1 import types_pb2 as pb

HUB_ID = "bench"


def thread_cpu() -> dict[str, float]:
    """This process's CPU seconds by thread role: event loop, request pool, watches, other."""
    roles: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread is threading.main_thread():
            role = "loop"
        elif thread.name.startswith("fedplane-k8s"):
            role = "requests"
        elif thread.name.startswith("fedplane-watch"):
            role = "watches"
        else:
            role = "other"
        with contextlib.suppress(OSError):
            roles[role] = roles.get(role, 0.0) + stat_cpu_seconds(f"/proc/self/task/{thread.native_id}/stat")
    return roles


def one_pod_job(index: int) -> CreateRequest:
    spec = pb.JobSpec(name="bench", pod_sets=[pb.PodSet(name="main", count=1)])
    spec.pod_sets[0].requests.quantities["cpu"] = 100
    spec.workload.manifest_json = json.dumps(default_manifest(spec))
    assignment = pb.NodeAssignment(pod_set="main", node="n1", count=1)
    return CreateRequest(f"bench-{index:06d}", 1, spec, [assignment], hub_id=HUB_ID)


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`backend.KEY=VALUE` pairs; numbers and booleans as YAML would read them."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            settings[key.removeprefix("backend.")] = json.loads(value)
        except ValueError:
            settings[key.removeprefix("backend.")] = value
    return settings


async def run(
    jobs: int, batch: int, settings: dict[str, Any], server: kubeapiserver.KubeAPIServer
) -> dict[str, Any]:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}
    await asyncio.to_thread(server.request, "post", "/api/v1/namespaces", namespace)
    config = KubernetesBackendConfig.from_mapping(
        {"kubeconfig": str(server.admin_kubeconfig_path), "namespace": "bench", "hub_id": HUB_ID, **settings}
    )
    backend = KubernetesBackend(config)
    created: set[str] = set()

    def emit(event: WorkloadEvent) -> None:
        if event.state == pb.ADMITTED:
            created.add(event.job_id)

    def watched() -> int:
        return sum(1 for state in backend.workloads.values() if state.parts)

    await backend.start(emit, lambda: None)
    requests = [one_pod_job(i) for i in range(jobs)]
    pids = {"agent": os.getpid(), **server.pids}
    before, threads_before = {name: cpu_seconds(pid) for name, pid in pids.items()}, thread_cpu()
    start = time.monotonic()
    for first in range(0, jobs, batch):
        await asyncio.gather(*(backend.create(r) for r in requests[first : first + batch]))
    created_at = time.monotonic() - start
    # Seen back through the watch: the backend's informer cache holds every workload (polled:
    # the cache has no hook, and a poll every 20 ms costs nothing next to the creates).
    while watched() < jobs and time.monotonic() - start < created_at + 60:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    watched_at = time.monotonic() - start
    after, threads = {name: cpu_seconds(pid) for name, pid in pids.items()}, thread_cpu()
    seen = watched()
    await backend.stop()
    used = {name: after[name] - before[name] for name in pids}
    return {
        "jobs": jobs,
        "batch": batch,
        "settings": settings,
        "created": len(created),
        "watched": seen,
        "seconds": round(created_at, 2),
        "creates_per_second": round(jobs / created_at, 1),
        "all_watched_seconds": round(watched_at, 2),
        "cpu_seconds": {name: round(seconds, 2) for name, seconds in used.items()},
        "cpu_ms_per_create": {name: round(1000 * seconds / jobs, 2) for name, seconds in used.items()},
        "agent_cpu_seconds_by_thread": {
            role: round(seconds - threads_before.get(role, 0.0), 2)
            for role, seconds in sorted(threads.items())
        },
        "cpu_percent_of_one_core": {
            name: round(100 * seconds / watched_at) for name, seconds in used.items()
        },
        "load_average_1m": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1024, help="commands per batch (the agent takes 1024)")
    parser.add_argument("--set", action="append", default=[], metavar="backend.KEY=VALUE")
    parser.add_argument("--log-level", default="info", help="the agent logs JSON to stderr, as a daemon does")
    args = parser.parse_args()
    if args.jobs < 1 or args.batch < 1:
        print("kubecreate: --jobs and --batch must be at least 1", file=sys.stderr)
        raise SystemExit(2)
    settings = parse_settings(args.set)
    try:
        KubernetesBackendConfig.from_mapping(settings)
    except ConfigError as exc:
        print(f"kubecreate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(level=args.log_level, fmt="json", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="fedplane-bench-kube-"))
    server = kubeapiserver.start(kubeapiserver.build_binary(), workdir)
    try:
        result = asyncio.run(run(args.jobs, args.batch, settings, server))
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
