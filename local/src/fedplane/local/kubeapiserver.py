"""A real kube-apiserver on its own etcd, envtest-style: the member clusters of the Kubernetes
tests and of `fedplane bench --backend kubernetes`.

No kubelet, scheduler or controllers run: whoever starts one creates the Nodes it needs and
plays the controllers it wants. The binary comes from tools/build_kube_apiserver.sh, cached
outside the repository (~/.cache/fedplane/kube-apiserver-<version>/), so only the first start
builds it.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedplane.local import servers as embedded

__all__ = [
    "ADMIN_USER",
    "AGENT_USER",
    "NOBODY_USER",
    "KubeAPIServer",
    "KubeAPIServerError",
    "build_binary",
    "launch",
    "start",
]

# The build script, when running from a checkout (an installed wheel has only the cache).
BUILD_SCRIPT = Path(__file__).resolve().parents[4] / "tools" / "build_kube_apiserver.sh"

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


def _cache_root() -> Path:
    return Path(os.environ.get("FEDPLANE_CACHE", Path.home() / ".cache" / "fedplane"))


def _cached() -> Path | None:
    found = sorted(_cache_root().glob("kube-apiserver-*/kube-apiserver"))
    return found[-1] if found else None


def build_binary(timeout: float = 3600.0) -> Path:
    """The binary: FEDPLANE_KUBE_APISERVER if set, else the build script's (instant when cached),
    else (outside a checkout) whatever build is in the cache."""
    override = os.environ.get("FEDPLANE_KUBE_APISERVER")
    if override:
        return Path(override)
    if not BUILD_SCRIPT.exists():
        cached = _cached()
        if cached is None:
            raise KubeAPIServerError(
                f"no kube-apiserver in {_cache_root()}: build it with tools/build_kube_apiserver.sh "
                "or set FEDPLANE_KUBE_APISERVER"
            )
        return cached
    if shutil.which("go") is None and _cached() is None:
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

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = "application/json"
    ) -> dict[str, Any]:
        """One JSON request as the admin user (blocking: call it from a thread in async code)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method.upper(),
            headers={"Authorization": f"Bearer {self.admin_token}", "Content-Type": content_type},
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.ssl_context()) as response:
                payload: dict[str, Any] = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise KubeAPIServerError(f"{method.upper()} {path}: HTTP {exc.code}: {detail}") from None
        return payload

    def create_node(
        self, name: str, allocatable: dict[str, str], labels: dict[str, str] | None = None
    ) -> None:
        """A Ready Node with this capacity (status through the status subresource, as a kubelet
        sets it): the only way nodes exist when no kubelet runs."""
        self.request(
            "post",
            "/api/v1/nodes",
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}}},
        )
        condition = {"type": "Ready", "status": "True", "reason": "KubeletReady"}
        self.request(
            "patch",
            f"/api/v1/nodes/{name}/status",
            {"status": {"capacity": allocatable, "allocatable": allocatable, "conditions": [condition]}},
            content_type="application/merge-patch+json",
        )

    @property
    def pids(self) -> dict[str, int]:
        """The apiserver's and its etcd's process ids (for CPU and memory figures)."""
        return {"kube-apiserver": self.process.pid, "etcd": self.etcd.process.pid}

    def terminate(self) -> None:
        """SIGTERM the apiserver without waiting: several then shut down at once (`stop` waits)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        """Kill the apiserver and etcd (process groups); safe to call twice."""
        if self.process.poll() is None:
            self.terminate()
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

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until /readyz answers 200 (call it from a thread in async code)."""
        _wait_ready(self, timeout)

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def start(
    binary: Path,
    workdir: Path | None = None,
    timeout: float = 90.0,
    extra_args: Sequence[str] = (),
    etcd_args: Sequence[str] = (),
) -> KubeAPIServer:
    """Start etcd and kube-apiserver on free loopback ports and wait until the apiserver is
    ready; raises with the log tail on failure."""
    server = launch(binary, workdir, extra_args, etcd_args)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


def launch(
    binary: Path,
    workdir: Path | None = None,
    extra_args: Sequence[str] = (),
    etcd_args: Sequence[str] = (),
) -> KubeAPIServer:
    """Start etcd (ready on return) and kube-apiserver (not yet ready: `wait_ready`), so that
    several can start at once. Call it from a thread that outlives the servers: they get
    SIGTERM when it ends (setpriv)."""
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

    etcd = embedded.start_etcd(workdir / "etcd", extra_args=etcd_args)
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
        "--enable-priority-and-fairness=false",
        "--profiling=false",
        "--v=1",
        *extra_args,
    ]
    log_path = workdir / "kube-apiserver.log"
    try:
        process = embedded.spawn_logged(args, log_path)
    except BaseException:
        etcd.stop()
        raise
    return KubeAPIServer(
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
                request = urllib.request.Request(
                    f"{server.url}/readyz", headers={"Authorization": f"Bearer {server.admin_token}"}
                )
                with urllib.request.urlopen(request, timeout=2, context=server.ssl_context()) as response:
                    if response.status == 200:
                        return
            except (OSError, ssl.SSLError, urllib.error.URLError) as exc:
                last = str(exc)
        time.sleep(0.2)
    raise KubeAPIServerError(f"kube-apiserver not ready within {timeout}s ({last}):\n{server.log_tail()}")
