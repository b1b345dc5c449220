"""Write the Helm chart's values.schema.json, its `config` sections derived from fedplane's config.

The hub's and the agent's `config` values become their YAML config files, so their schema is
made from the dataclasses the daemons load (fedplane.runtime.config, the Kubernetes backend's
config): every key, its type, its range and its comment. A key fedplane does not know, or a
number it would refuse, then fails at `helm install` as it would at the daemon's start, and a
new setting reaches the chart by running this again (tests/kube/test_helm.py fails while the
committed schema is stale). The rest of the values are described here by hand.

Usage: python tools/helm_schema.py   (writes deploy/helm/fedplane/values.schema.json)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any

from fedplane.agent.kubernetes_backend import MAX_CONCURRENT_REQUESTS, KubernetesBackendConfig
from fedplane.runtime import config as cfg

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "fedplane"
SCHEMA_PATH = CHART / "values.schema.json"

# Keys the chart sets itself: the ports match its Service and probes, the state directory its volume.
HUB_OWNED = {"listen", "metrics"}
AGENT_OWNED = {"metrics", "state_dir"}
# The agent in a cluster runs in it: in-cluster credentials, no kubeconfig.
BACKEND_OWNED = {"kubeconfig", "context", "in_cluster"}
# Values the daemons refuse anything else for (checked at start; here at install).
ENUMS: dict[tuple[type, str], tuple[str, ...]] = {
    (cfg.DisconnectConfig, "action"): cfg.DISCONNECT_ACTIONS,
    (cfg.GrantConfig, "role"): cfg.ROLES,
    (cfg.TelemetryConfig, "exporter"): ("otlp", "console", "none"),
    (KubernetesBackendConfig, "fluid_bytes"): ("cached", "total"),
}
# Further checks the daemons make at start, beyond the loader's ranges.
LABEL_VALUE = {"pattern": "^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"}
EXTRA: dict[tuple[type, str], dict[str, Any]] = {
    (KubernetesBackendConfig, "resync_seconds"): {"exclusiveMinimum": 0},
    (KubernetesBackendConfig, "watch_timeout_seconds"): {"exclusiveMinimum": 0},
    (KubernetesBackendConfig, "max_concurrent_requests"): {"minimum": 1, "maximum": MAX_CONCURRENT_REQUESTS},
    (KubernetesBackendConfig, "qps"): {"minimum": 0},
    (KubernetesBackendConfig, "burst"): {"minimum": 1},
    (KubernetesBackendConfig, "hub_id"): LABEL_VALUE,
    (cfg.AgentConfig, "hub_id"): LABEL_VALUE,
    (cfg.HubConfig, "hub_id"): LABEL_VALUE,
}
DNS_LABEL = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN = "^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
SECRET_KEY = "^[-._a-zA-Z0-9]+$"


def comments(cls: type) -> dict[str, str]:
    """Each field's description: the `#` comment lines right above it in the class's source."""
    found: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("# "))
            continue
        field = re.match(r"(\w+): ", text)
        if field and pending:
            found[field.group(1)] = " ".join(pending)
        pending = []
    return found


def _is_file_setting(name: str, hint: Any) -> bool:
    return hint is str and name.endswith("_file")


def file_settings(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of every `*_file` setting: the files the chart mounts from Secrets."""
    found = []
    for name, hint in typing.get_type_hints(cls).items():
        if _is_file_setting(name, hint):
            found.append(prefix + name)
        elif dataclasses.is_dataclass(hint) and isinstance(hint, type):
            found += file_settings(hint, f"{prefix}{name}.")
    return found


def type_schema(hint: Any) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return section(hint)
    if origin is list:
        return {"type": "array", "items": type_schema(typing.get_args(hint)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(typing.get_args(hint)[1])}
    if isinstance(hint, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and len(args) == 2:
            inner = type_schema(next(a for a in args if a is not type(None)))
            return {**inner, "type": [inner["type"], "null"]}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return {"type": simple[hint]} if hint in simple else {}


def section(cls: type, exclude: Collection[str] = ()) -> dict[str, Any]:
    """A config dataclass as a closed object: unknown keys fail, as they do in the daemon. The
    `*_file` settings are left out: the chart sets them from secretFiles."""
    docs = comments(cls)
    properties: dict[str, Any] = {}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, hint in typing.get_type_hints(cls).items():
        if name in exclude or _is_file_setting(name, hint):
            continue
        schema: dict[str, Any] = {}
        if name in docs:
            schema["description"] = docs[name]
        schema.update(type_schema(hint))
        if (cls, name) in ENUMS:
            schema["enum"] = list(ENUMS[cls, name])
        schema.update(EXTRA.get((cls, name), {}))
        limits = cfg._RANGES.get(name)  # the loader's own ranges, checked by setting name
        if limits is not None and schema.get("type") in ("number", "integer"):
            low, exclusive, high = limits
            schema["exclusiveMinimum" if exclusive else "minimum"] = low
            if high != math.inf:
                schema["maximum"] = high
        default = defaults[name]
        if isinstance(default, bool | int | float | str) and not (
            isinstance(default, float) and math.isinf(default)
        ):
            schema["default"] = default
        properties[name] = schema
    result: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    doc = inspect.getdoc(cls)
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses make one up from the fields
        result = {"description": " ".join(doc.split()), **result}
    return result


def secret_files(settings: list[str], purpose: str) -> dict[str, Any]:
    """`secretFiles`: setting -> the Secret key mounted as its file (null drops a default one)."""
    ref = {
        "type": ["object", "null"],
        "additionalProperties": False,
        "required": ["secret", "key"],
        "properties": {
            "secret": {"type": "string", "pattern": DNS_SUBDOMAIN, "description": "An existing Secret."},
            "key": {"type": "string", "pattern": SECRET_KEY, "description": "The key in it."},
        },
    }
    return {
        "description": f"The {purpose}'s files from existing Secrets: each config setting named here"
        " is set to the path where the chart mounts that Secret key (null removes a default).",
        "type": "object",
        "additionalProperties": False,
        "properties": {name: ref for name in settings},
    }


def image(repository: str) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "repository": {"type": "string", "minLength": 1, "default": repository},
            "tag": {"type": "string", "description": "Default: the chart's appVersion."},
            "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
        },
    }


# Kubernetes objects passed through as they are (the apiserver validates them).
K8S_OBJECT = {"type": "object"}
K8S_LIST = {"type": "array", "items": {"type": "object"}}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def pod_values() -> dict[str, Any]:
    """What both the hub's and the agent's pods take."""
    return {
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"requests": STRING_MAP, "limits": STRING_MAP},
            "description": "Requests and limits of the container (cpu, memory).",
        },
        "podAnnotations": STRING_MAP,
        "podLabels": STRING_MAP,
        "nodeSelector": STRING_MAP,
        "tolerations": K8S_LIST,
        "affinity": K8S_OBJECT,
        "priorityClassName": {"type": "string"},
        "extraEnv": {**K8S_LIST, "description": "Extra environment variables (EnvVar objects)."},
    }


def hub_values() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "enabled": {"type": "boolean", "description": "Install the hub."},
            "replicas": {
                "type": "integer",
                "minimum": 1,
                "description": "Hub replicas: one leads under an etcd lease, the others serve"
                " and take over (2 or 3 for high availability).",
            },
            "image": image("fedplane-hub"),
            "service": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "gRPC."},
                    "annotations": STRING_MAP,
                },
            },
            "config": {
                **section(cfg.HubConfig, HUB_OWNED),
                "description": "hub.yaml (docs/operations.md); listen and metrics are set by the"
                " chart, the *_file settings by secretFiles.",
            },
            "secretFiles": secret_files(file_settings(cfg.HubConfig), "hub"),
            "podDisruptionBudget": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "enabled": {"type": "boolean"},
                    "maxUnavailable": {"type": "integer", "minimum": 0},
                },
            },
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            "topologySpreadConstraints": K8S_LIST,
            **pod_values(),
        },
    }


def agent_values() -> dict[str, Any]:
    backend = section(KubernetesBackendConfig, BACKEND_OWNED)
    backend["properties"] = {
        "type": {"const": "kubernetes", "description": "The chart runs the Kubernetes backend."},
        **backend["properties"],
    }
    backend.pop("description", None)
    config = section(cfg.AgentConfig, AGENT_OWNED)
    config["properties"]["cluster"]["pattern"] = DNS_LABEL.replace("^", "^(", 1).replace("$", ")?$")
    config["properties"]["backend"] = {
        "description": "The Kubernetes backend (docs/agent-kubernetes.md); type is kubernetes.",
        **backend,
    }
    config["description"] = (
        "agent.yaml (docs/operations.md); state_dir and metrics are set by the chart, the *_file"
        " settings by secretFiles. cluster is required."
    )
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "enabled": {"type": "boolean", "description": "Install the agent of this member cluster."},
            "image": image("fedplane-agent"),
            "config": config,
            "secretFiles": secret_files(file_settings(cfg.AgentConfig), "agent"),
            "rbac": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "create": {"type": "boolean", "description": "The ClusterRole and its binding."},
                    "fluidDatasets": {
                        "type": "boolean",
                        "description": "List and watch Fluid Datasets (data.fluid.io).",
                    },
                    "workloads": {
                        "type": "array",
                        "uniqueItems": True,
                        "items": {"enum": ["jobsets", "kubeflow", "trainjobs", "rayjobs"]},
                        "description": "Workload kinds besides batch Jobs the agent may create:"
                        " list only the operators this cluster runs.",
                    },
                },
            },
            "serviceAccount": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "create": {"type": "boolean"},
                    "name": {"type": "string", "description": "Default: <fullname>-agent."},
                    "annotations": STRING_MAP,
                },
            },
            "stateVolumeClaim": {
                "type": "string",
                "description": "A PersistentVolumeClaim for state_dir (unsent status updates and"
                " the agent's NATS key survive rescheduling); empty: an emptyDir.",
            },
            **pod_values(),
        },
    }


def schema() -> dict[str, Any]:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Fedplane chart values",
        "description": "Generated by tools/helm_schema.py from fedplane's config; do not edit.",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "global": {"type": "object"},
            "nameOverride": {"type": "string"},
            "fullnameOverride": {"type": "string"},
            "commonLabels": STRING_MAP,
            "imagePullSecrets": K8S_LIST,
            "metrics": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "port": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 65535,
                        "description": "Prometheus metrics port (named metrics) of hub and agent.",
                    },
                    "serviceMonitor": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "enabled": {
                                "type": "boolean",
                                "description": "A ServiceMonitor (monitoring.coreos.com/v1) per"
                                " component; needs the Prometheus Operator's CRDs.",
                            },
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "labels": {
                                **STRING_MAP,
                                "description": "Labels your Prometheus selects ServiceMonitors by.",
                            },
                        },
                    },
                },
            },
            "hub": hub_values(),
            "agent": agent_values(),
        },
    }


def render() -> str:
    return json.dumps(schema(), indent=2) + "\n"


def main() -> None:
    SCHEMA_PATH.write_text(render())
    print(SCHEMA_PATH)


if __name__ == "__main__":
    main()
