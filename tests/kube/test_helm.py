"""The Helm chart deploy/helm/fedplane, with the real helm and a real kube-apiserver.

It is linted strictly, rendered for each values file in its ci/ folder (and its defaults), and
what matters in the output is checked: the daemons' configs load with fedplane's own loaders and
name the files the pods mount, pods run as non-root on a read-only root filesystem, the agent's
RBAC is least privilege, the chart runs what the images install. Then every rendered object is
applied to the apiserver server-side as a dry run with strict field validation, so the apiserver's
own schemas and admission judge them (a misspelt field fails). Bad values are refused by the
schema with a line that names the value.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from fedplane.agent.kubernetes_backend import KubernetesBackendConfig
from fedplane.runtime.config import AgentConfig, HubConfig, load_agent, load_hub, unsecured
from tests import dockerfile
from tests.kube import helm
from tests.kube.apiserver import REPO, Admin, KubeAPIServer

sys.path.insert(0, str(REPO / "tools"))
import helm_schema

CI = helm.CHART / "ci"
CRD = Path(__file__).with_name("servicemonitor-crd.yaml")
# name -> values files: the defaults (the hub alone, secure), and each ci/ file.
VALUES = {"default": [], **{p.stem.removesuffix("-values"): [p] for p in sorted(CI.glob("*.yaml"))}}
Objects = list[dict[str, Any]]


def find(objects: Objects, kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (component is None or o["metadata"]["labels"]["app.kubernetes.io/component"] == component)
    ]


def one(objects: Objects, kind: str, component: str) -> dict[str, Any]:
    (found,) = find(objects, kind, component)
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, Objects]:
    return {name: helm.template(*files) for name, files in VALUES.items()}


def test_lint_is_clean_for_every_values_file() -> None:
    for name, files in VALUES.items():
        args = ["lint", "--strict", str(helm.CHART), "--kube-version", helm.KUBE_VERSION]
        done = helm.run(*args, *[a for f in files for a in ("--values", str(f))])
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
        assert "0 chart(s) failed" in done.stdout


def test_schema_is_generated_from_fedplane_config() -> None:
    committed = (helm.CHART / "values.schema.json").read_text()
    assert committed == helm_schema.render(), (
        "values.schema.json is stale (the config changed?); run: .venv/bin/python tools/helm_schema.py"
    )


def test_values_sets_render_what_they_promise(rendered: dict[str, Objects]) -> None:
    default, ha, agent, trial = (rendered[n] for n in ("default", "hub-ha", "agent", "trial"))
    hub = one(default, "Deployment", "hub")
    assert hub["spec"]["replicas"] == 2 and not find(default, "Deployment", "agent")
    # HA: three replicas, a PDB over exactly their pods, a ServiceMonitor on the metrics port.
    ha_hub = one(ha, "Deployment", "hub")
    assert ha_hub["spec"]["replicas"] == 3
    pdb = one(ha, "PodDisruptionBudget", "hub")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == ha_hub["spec"]["selector"]["matchLabels"]
    pod_labels = ha_hub["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = one(ha, "ServiceMonitor", "hub")
    service = one(ha, "Service", "hub")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 50051, "metrics": 9464}
    assert not find(default, "ServiceMonitor") and not find(trial, "PodDisruptionBudget")
    # A member cluster's install holds nothing of the hub.
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in agent} == {"agent"}
    assert one(agent, "Deployment", "agent")["spec"]["strategy"] == {"type": "Recreate"}
    assert one(agent, "Deployment", "agent")["spec"]["replicas"] == 1


def _pods(objects: Objects) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["labels"]["app.kubernetes.io/component"], d["spec"]["template"]["spec"])
        for d in find(objects, "Deployment")
    ]


@pytest.mark.parametrize("name", VALUES)
def test_pods_run_unprivileged_on_a_read_only_root(name: str, rendered: dict[str, Objects]) -> None:
    pods = _pods(rendered[name])
    assert pods
    for component, pod in pods:
        final = dockerfile.parse(dockerfile.DOCKER_DIR / f"{component}.Dockerfile")[-1]
        uid, gid = (int(n) for n in final.last("USER").args.split(":"))
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid), "the image's user"
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        # Writable only where an emptyDir (or the agent's claim) is mounted; the rest read-only.
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            if not mount.get("readOnly"):
                assert "emptyDir" in volume or "persistentVolumeClaim" in volume, mount
            else:
                assert "secret" in volume or "configMap" in volume, mount
        requests = container["resources"]["requests"]
        assert {"cpu", "memory"} <= requests.keys() and "memory" in container["resources"]["limits"]
        # What the pod runs is what the image runs: its entry point and the config it mounts.
        image_command = final.last("ENTRYPOINT").exec_form() + final.last("CMD").exec_form()
        assert container["command"] == image_command, (container["command"], image_command)
        assert container["livenessProbe"] and (component == "agent" or container["readinessProbe"])


def _config(objects: Objects, component: str, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    text = one(objects, "ConfigMap", component)["data"][f"{component}.yaml"]
    path = tmp_path / f"{component}.yaml"
    path.write_text(text)
    return path, yaml.safe_load(text)


def _file_settings(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            found |= _file_settings(value, f"{prefix}{key}.")
        elif key.endswith("_file") and value:
            found[prefix + key] = value
    return found


def _mounted_file(pod: dict[str, Any], path: str) -> bool:
    """Whether the pod mounts a Secret key at `path` (the volume projects that key there)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is not None and PurePosixPath(path).parent == PurePosixPath(mount["mountPath"]):
            return PurePosixPath(path).name in {item["path"] for item in secret["items"]}
    return False


@pytest.mark.parametrize("name", VALUES)
def test_configs_load_and_match_the_pods(name: str, rendered: dict[str, Objects], tmp_path: Path) -> None:
    objects = rendered[name]
    for component, pod in _pods(objects):
        path, raw = _config(objects, component, tmp_path)
        (container,) = pod["containers"]
        assert container["command"][-1] == f"/etc/fedplane/config/{component}.yaml"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        config: HubConfig | AgentConfig
        if component == "hub":
            config = load_hub(path)
            assert int(config.listen.rpartition(":")[2]) == ports["grpc"]
        else:
            config = load_agent(path)
            assert config.state_dir == "/var/lib/fedplane"
            assert any(m["mountPath"] == config.state_dir for m in container["volumeMounts"])
            backend = {k: v for k, v in config.backend.items()} | {"hub_id": config.hub_id}
            assert KubernetesBackendConfig.from_mapping(backend).namespace
        assert int(config.metrics.listen.rpartition(":")[2]) == ports["metrics"]
        service = one(objects, "Service", component)
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports.keys()
        # Every file the config names is a Secret key the pod mounts there.
        for setting, file in _file_settings(raw).items():
            assert _mounted_file(pod, file), f"{name}: {component} {setting}: {file} is not mounted"
    if name == "default":  # secure by default, by the hub's own measure
        hub = load_hub(_config(objects, "hub", tmp_path)[0])
        assert unsecured(hub) == [] and not hub.insecure


# Resources the agent may touch, and how: the backend's needs (docs/agent-kubernetes.md, RBAC).
WORKLOAD_VERBS = {"create", "get", "list", "watch", "delete"}
AGENT_RULES = {
    ("", "nodes"): {"list", "watch"},
    ("", "pods"): {"list", "watch"},
    ("", "persistentvolumeclaims"): {"list", "watch"},
    ("data.fluid.io", "datasets"): {"list", "watch"},
    ("batch", "jobs"): WORKLOAD_VERBS,
    ("jobset.x-k8s.io", "jobsets"): WORKLOAD_VERBS,
    **{
        ("kubeflow.org", kind): WORKLOAD_VERBS
        for kind in ("pytorchjobs", "tfjobs", "xgboostjobs", "paddlejobs", "jaxjobs", "mpijobs")
    },
    ("trainer.kubeflow.org", "trainjobs"): WORKLOAD_VERBS,
    ("ray.io", "rayjobs"): WORKLOAD_VERBS,
}


def _grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def test_agent_rbac_is_least_privilege(rendered: dict[str, Objects]) -> None:
    full = _grants(one(rendered["agent"], "ClusterRole", "agent"))
    assert full == AGENT_RULES
    assert not any("*" in key or "*" in verbs for key, verbs in full.items())
    # A cluster running batch Jobs only, without Fluid, grants no more than those.
    trial = _grants(one(rendered["trial"], "ClusterRole", "agent"))
    assert trial == {k: v for k, v in AGENT_RULES.items() if k[0] in ("", "batch")}
    binding = one(rendered["agent"], "ClusterRoleBinding", "agent")
    account = one(rendered["agent"], "ServiceAccount", "agent")["metadata"]
    assert binding["roleRef"]["name"] == one(rendered["agent"], "ClusterRole", "agent")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    pod = one(rendered["agent"], "Deployment", "agent")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]
    hub_pod = one(rendered["default"], "Deployment", "hub")["spec"]["template"]["spec"]
    assert hub_pod["automountServiceAccountToken"] is False  # the hub has no business with the API


BAD_VALUES: dict[str, tuple[str, str]] = {
    # name: (values file, the line helm must print)
    "misspelt chart value": ("hub: {replica: 3}", "at '/hub': additional properties 'replica' not allowed"),
    "misspelt config key": (
        "hub: {config: {etcd_endpont: https://etcd:2379}}",
        "at '/hub/config': additional properties 'etcd_endpont' not allowed",
    ),
    "config out of range": (
        "hub: {config: {leader_lease_seconds: 0}}",
        "at '/hub/config/leader_lease_seconds': minimum: got 0, want 1",
    ),
    "chart-owned key": (
        "hub: {config: {listen: '0.0.0.0:1'}}",
        "at '/hub/config': additional properties 'listen' not allowed",
    ),
    "unknown file setting": (
        "hub: {secretFiles: {tls.cert: {secret: s, key: k}}}",
        "at '/hub/secretFiles': additional properties 'tls.cert' not allowed",
    ),
    "bad enum": (
        "hub: {config: {disconnect: {action: explode}}}",
        "at '/hub/config/disconnect/action': value must be one of 'requeue', 'wait', 'fail'",
    ),
    "agent without its cluster": (
        "agent: {enabled: true, config: {nats_url: 'tls://nats:4222'}}",
        "agent.config.cluster: the member cluster's name in the federation is required",
    ),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_are_refused_with_a_clear_line(case: str, tmp_path: Path) -> None:
    text, message = BAD_VALUES[case]
    values = tmp_path / "bad-values.yaml"
    values.write_text(text + "\n")
    with pytest.raises(helm.HelmError) as refused:
        helm.template(values)
    assert message in str(refused.value), str(refused.value)


@pytest.fixture(scope="module")
def servicemonitor_crd(admin: Admin) -> None:
    helm.install_crd(admin, CRD)


@pytest.mark.parametrize("name", VALUES)
def test_server_side_dry_run_accepts_every_object(
    name: str, servicemonitor_crd: None, admin: Admin, namespace: str
) -> None:
    objects = helm.template(*VALUES[name], namespace=namespace)
    applied = helm.apply(admin, objects, dry_run=True)
    assert [(a["kind"], a["metadata"]["name"]) for a in applied] == [
        (o["kind"], o["metadata"]["name"]) for o in objects
    ]
    # A dry run stores nothing.
    for obj in find(objects, "Deployment"):
        with pytest.raises(ApiException) as missing:
            admin.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{obj['metadata']['name']}")
        assert missing.value.status == 404


# A change, and what the apiserver's refusal must name. (Server-side apply reports an unknown
# field as a 500, "failed to create typed patch object": refused all the same.)
def test_helm_install_dry_run_says_what_it_needs(kube: KubeAPIServer, namespace: str) -> None:
    """helm's own server-side dry run (against the apiserver's version) succeeds, and its notes
    name every Secret key the release mounts."""
    done = helm.run(
        "install", "fedplane", str(helm.CHART), "--namespace", namespace,
        "--dry-run=server", "--kubeconfig", str(kube.admin_kubeconfig_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    notes = done.stdout.partition("NOTES:")[2]
    defaults = yaml.safe_load((helm.CHART / "values.yaml").read_text())["hub"]["secretFiles"]
    for setting, ref in defaults.items():
        assert f"needs Secret {ref['secret']} (key {ref['key']}) for {setting}" in notes, notes


BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "a misspelt field": (
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readOnlyRootFs=True),
        'containers[name=\\"hub\\"].readOnlyRootFs: field not declared in schema',
    ),
    "an invalid value": (
        lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser=-1),
        "spec.template.spec.securityContext.runAsUser: Invalid value: -1",
    ),
}


@pytest.mark.parametrize("change", BROKEN)
def test_the_dry_run_catches_what_the_apiserver_refuses(change: str, admin: Admin, namespace: str) -> None:
    """The dry run above can fail: the same objects, broken, are refused."""
    objects = helm.template(namespace=namespace)
    deployment = one(objects, "Deployment", "hub")
    mutate, message = BROKEN[change]
    mutate(deployment)
    with pytest.raises(ApiException) as refused:
        helm.apply(admin, [deployment], dry_run=True)
    assert message in str(refused.value.body), refused.value.body
