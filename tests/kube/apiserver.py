"""A real kube-apiserver on a real etcd for the Kubernetes backend tests (envtest-style).

No kubelet, scheduler or controllers: tests create Nodes, bind Pods by `spec.nodeName` and play
the Job controller by patching Job status. The binary comes from tools/build_kube_apiserver.sh,
cached outside the repository, so the first run builds it and later runs start in seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedplane.local import servers as embedded

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tools" / "build_kube_apiserver.sh"

ADMIN_USER = "fedplane-test-admin"
# The agent's identity as the Helm chart's ServiceAccount presents it (release fedplane in
# fedplane-system), so the chart's ClusterRoleBinding applies to the static token unchanged.
AGENT_NAMESPACE = "fedplane-system"
AGENT_SERVICE_ACCOUNT = "fedplane-agent"
AGENT_USER = f"system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}"
AGENT_GROUPS = ("system:serviceaccounts", f"system:serviceaccounts:{AGENT_NAMESPACE}")
# An authenticated user with no RBAC bindings at all.
NOBODY_USER = "fedplane-test-nobody"


class KubeAPIServerError(RuntimeError):
    pass


def build_binary(timeout: float = 3600.0) -> Path:
    """Run the build script (instant when cached); FEDPLANE_KUBE_APISERVER overrides the binary."""
    override = os.environ.get("FEDPLANE_KUBE_APISERVER")
    if override:
        return Path(override)
    if shutil.which("go") is None and not _cached_guess():
        raise KubeAPIServerError("kube-apiserver is not cached and 'go' is not installed to build it")
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise KubeAPIServerError(f"{BUILD_SCRIPT.name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    path = Path(done.stdout.strip().splitlines()[-1])
    if not path.exists():
        raise KubeAPIServerError(f"{BUILD_SCRIPT.name} printed {path}, which does not exist")
    return path


def _cached_guess() -> bool:
    root = Path(os.environ.get("FEDPLANE_CACHE", Path.home() / ".cache" / "fedplane"))
    return any(root.glob("kube-apiserver-*/kube-apiserver"))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass
class KubeAPIServer:
    """A running apiserver; `kubeconfig(...)` writes a kubeconfig for any token in the token file."""

    url: str
    ca_path: Path
    workdir: Path
    admin_token: str
    agent_token: str
    etcd: embedded.ServerProcess
    process: subprocess.Popen[bytes]
    log_path: Path
    tokens: dict[str, str] = field(default_factory=dict)  # user -> token

    @property
    def admin_kubeconfig_path(self) -> Path:
        return self.kubeconfig(ADMIN_USER)

    @property
    def agent_kubeconfig_path(self) -> Path:
        return self.kubeconfig(AGENT_USER)

    def kubeconfig(self, user: str, token: str | None = None) -> Path:
        """A kubeconfig authenticating as `user` (a static-token user, or any bearer token given)."""
        token = token or self.tokens[user]
        safe = "".join(c if c.isalnum() else "-" for c in user)
        path = self.workdir / f"kubeconfig-{safe}-{token[:6]}.yaml"
        config: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "test", "cluster": {"server": self.url, "certificate-authority": str(self.ca_path)}}
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def stop(self) -> None:
        """Kill the apiserver and etcd (process groups); safe to call twice."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.etcd.stop()

    def compact_etcd(self) -> int:
        """Compact etcd at its current revision: older watch resource versions now get 410 Gone."""
        etcdctl = str(Path(embedded.find_binary("etcd")).with_name("etcdctl"))
        endpoint = f"--endpoints=http://{self.etcd.address}"
        command = [etcdctl, endpoint, "endpoint", "status", "-w", "json"]
        status = subprocess.run(command, check=True, capture_output=True, text=True)
        revision = int(json.loads(status.stdout)[0]["Status"]["header"]["revision"])
        subprocess.run([etcdctl, endpoint, "compact", str(revision)], check=True, capture_output=True)
        return revision

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def start(binary: Path, workdir: Path | None = None, timeout: float = 90.0) -> KubeAPIServer:
    """Start etcd and kube-apiserver on free loopback ports; raises with the log tail on failure."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="fedplane-kube-"))
    workdir.mkdir(parents=True, exist_ok=True)
    certs = workdir / "certs"
    certs.mkdir(exist_ok=True)
    # Service-account token signing keys (the cryptography package is not a dependency).
    sa_key, sa_pub = workdir / "sa.key", workdir / "sa.pub"
    _openssl("genrsa", "-out", str(sa_key), "2048")
    _openssl("rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub))

    tokens = {user: secrets.token_hex(16) for user in (ADMIN_USER, AGENT_USER, NOBODY_USER)}
    token_file = workdir / "tokens.csv"
    token_file.write_text(
        f'{tokens[ADMIN_USER]},{ADMIN_USER},uid-admin,"system:masters"\n'
        f'{tokens[AGENT_USER]},{AGENT_USER},uid-agent,"{",".join(AGENT_GROUPS)}"\n'
        f"{tokens[NOBODY_USER]},{NOBODY_USER},uid-nobody\n"
    )
    token_file.chmod(0o600)

    etcd = embedded.start_etcd(workdir / "etcd")
    port = embedded.free_port()
    args = [
        str(binary),
        f"--etcd-servers=http://{etcd.address}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        # The apiserver self-signs a serving cert for 127.0.0.1 into --cert-dir.
        f"--cert-dir={certs}",
        f"--token-auth-file={token_file}",
        "--authorization-mode=RBAC",
        "--service-cluster-ip-range=10.96.0.0/24",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={sa_pub}",
        f"--service-account-signing-key-file={sa_key}",
        "--allow-privileged=true",
        # No controllers run: no default ServiceAccounts, no node-condition taints, no PVC finalizers.
        "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition,StorageObjectInUseProtection",
        # Jobs are watched straight from etcd, so a test can expire a watch by compacting etcd.
        "--watch-cache-sizes=jobs.batch#0",
        "--enable-priority-and-fairness=false",
        "--profiling=false",
        "--v=1",
    ]
    log_path = workdir / "kube-apiserver.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    server = KubeAPIServer(
        url=f"https://127.0.0.1:{port}",
        ca_path=certs / "apiserver.crt",
        workdir=workdir,
        admin_token=tokens[ADMIN_USER],
        agent_token=tokens[AGENT_USER],
        etcd=etcd,
        process=process,
        log_path=log_path,
        tokens=tokens,
    )
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: KubeAPIServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "not started"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise KubeAPIServerError(
                f"kube-apiserver exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        if server.ca_path.exists():
            try:
                context = ssl.create_default_context(cafile=str(server.ca_path))
                request = urllib.request.Request(
                    f"{server.url}/readyz", headers={"Authorization": f"Bearer {server.admin_token}"}
                )
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    if response.status == 200:
                        return
            except (OSError, ssl.SSLError, urllib.error.URLError) as exc:
                last = str(exc)
        time.sleep(0.2)
    raise KubeAPIServerError(f"kube-apiserver not ready within {timeout}s ({last}):\n{server.log_tail()}")


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
