"""A real kube-apiserver on a real etcd for the Kubernetes backend tests (envtest-style).

The server itself is product code (`fedplane.local.kubeapiserver`, also the member clusters of
`fedplane bench --backend kubernetes`); this module adds what only tests need: Jobs watched
straight from etcd (so a test can expire a watch by compacting it) and the `Admin` client.
No kubelet, scheduler or controllers: tests create Nodes, bind Pods by `spec.nodeName` and play
the Job controller by patching Job status.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from fedplane.local.kubeapiserver import (
    ADMIN_USER,
    AGENT_GROUPS,
    AGENT_NAMESPACE,
    AGENT_SERVICE_ACCOUNT,
    AGENT_USER,
    NOBODY_USER,
    KubeAPIServer,
    KubeAPIServerError,
    build_binary,
)
from fedplane.local.kubeapiserver import start as _start

REPO = Path(__file__).resolve().parents[2]

__all__ = [
    "ADMIN_USER",
    "AGENT_GROUPS",
    "AGENT_NAMESPACE",
    "AGENT_SERVICE_ACCOUNT",
    "AGENT_USER",
    "NOBODY_USER",
    "REPO",
    "Admin",
    "KubeAPIServer",
    "KubeAPIServerError",
    "build_binary",
    "start",
]


def start(binary: Path, workdir: Path | None = None, timeout: float = 90.0) -> KubeAPIServer:
    """Start etcd and kube-apiserver, with Jobs watched from etcd (no watch cache for them)."""
    return _start(binary, workdir, timeout, extra_args=("--watch-cache-sizes=jobs.batch#0",))


class Admin:
    """Raw-JSON requests as the admin user, for test setup (creating nodes, playing controllers)."""

    def __init__(self, server: KubeAPIServer, kubeconfig: Path | None = None) -> None:
        from kubernetes import config as k8s_config
        from kubernetes.dynamic import DynamicClient

        self.server = server
        self.api = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig or server.admin_kubeconfig_path), persist_config=False
        )
        cache = str(server.workdir / f"discovery-{id(self)}.json")
        self.dynamic = DynamicClient(self.api, cache_file=cache)  # type: ignore[no-untyped-call]

    def request(self, method: str, path: str, body: Any = None, **params: Any) -> dict[str, Any]:
        response = self.dynamic.request(method, path, body=body, serialize=False, **params)
        data: dict[str, Any] = json.loads(response.data or b"{}")
        return data

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("post", path, body)

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return self.request("get", path, **params)

    def delete(self, path: str, **params: Any) -> dict[str, Any]:
        return self.request("delete", path, **params)

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("patch", path, body, content_type="application/merge-patch+json")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.api.close()
