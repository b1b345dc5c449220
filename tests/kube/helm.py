"""The real helm binary on deploy/helm/fedplane, and server-side apply of what it renders.

helm is built from the Go module proxy by tools/build_go_tool.sh, cached outside the repository
(instant once built). Rendered objects are applied to the test apiserver the way `kubectl apply
--server-side` does, optionally as a dry run with strict field validation: the apiserver then
checks each object against its real schema (an unknown or misspelt field is an error) and
admission, without storing anything.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tests.kube.apiserver import REPO, Admin, KubeAPIServerError

CHART = REPO / "deploy" / "helm" / "fedplane"
BUILD_SCRIPT = REPO / "tools" / "build_go_tool.sh"
HELM_VERSION = os.environ.get("FEDPLANE_HELM_VERSION", "v3.22.0")
# A helm built with `go build` reports Kubernetes v1.20 (the version comes from release
# ldflags), below the chart's kubeVersion: render for the apiserver the tests run.
KUBE_VERSION = "v1.35.4"
FIELD_MANAGER = "fedplane-tests"


class HelmError(RuntimeError):
    pass


@functools.cache
def binary() -> Path:
    """The cached helm (FEDPLANE_HELM overrides it), built on first use."""
    override = os.environ.get("FEDPLANE_HELM")
    if override:
        return Path(override)
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "helm", "helm.sh/helm/v3/cmd/helm", HELM_VERSION],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if done.returncode != 0:
        raise KubeAPIServerError(f"building helm failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """helm with the test's Kubernetes version and no state of the user's (repositories, cache)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_") and k != "KUBECONFIG"}
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "fedplane-helm-home"
    env |= {f"HELM_{d}_HOME": str(scratch / d.lower()) for d in ("CACHE", "CONFIG", "DATA")}
    return subprocess.run(
        [str(binary()), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def template(
    *values_files: Path,
    release: str = "fedplane",
    namespace: str = "fedplane-system",
    set_values: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """The chart rendered with these values files (in order) and --set overrides."""
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    for path in values_files:
        args += ["--values", str(path)]
    for value in set_values:
        args += ["--set", value]
    done = run(*args)
    if done.returncode != 0:
        raise HelmError(done.stderr.strip())
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def apply(admin: Admin, objects: Iterable[dict[str, Any]], *, dry_run: bool) -> list[dict[str, Any]]:
    """Server-side apply each object (dryRun=All when dry_run), refusing unknown fields."""
    applied = []
    for body in objects:
        resource = admin.dynamic.resources.get(api_version=body["apiVersion"], kind=body["kind"])
        response = admin.dynamic.server_side_apply(  # type: ignore[no-untyped-call]
            resource,
            body=body,
            namespace=body["metadata"].get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
            dry_run="All" if dry_run else None,
            query_params=[("fieldValidation", "Strict")],
        )
        applied.append(response.to_dict())
    return applied


def install_crd(admin: Admin, path: Path, timeout: float = 30.0) -> None:
    """Create a CustomResourceDefinition (once per apiserver) and wait until it is served."""
    crd = yaml.safe_load(path.read_text())
    url = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
    apply(admin, [crd], dry_run=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conditions = (admin.get(url).get("status") or {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            admin.dynamic.resources.invalidate_cache()  # type: ignore[no-untyped-call]
            return
        time.sleep(0.1)
    raise KubeAPIServerError(f"{crd['metadata']['name']} not established within {timeout}s")
