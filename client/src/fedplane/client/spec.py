"""Job specs as YAML files, to and from `JobSpec`.

The loader checks only shape, types and units, and names the exact file, document and field of
every problem; whether a spec makes sense (counts > 0, unique names, ...) is the hub's call, so a
single rule set applies to every client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from fedplane.client import fields
from fedplane.core import quantity
from fedplane.v1 import types_pb2 as pb

__all__ = [
    "SpecError",
    "default_manifest",
    "dump_yaml",
    "exact_quantity",
    "format_duration",
    "is_queue_object",
    "load_file",
    "load_text",
    "parse_duration",
    "spec_from_dict",
    "spec_to_dict",
]

T = TypeVar("T")

DEFAULT_QUEUE = "default"
# The `kind`s of queue objects: documents a job spec file may hold, which are not specs.
QUEUE_OBJECT_KINDS = frozenset({"Queue", "Cohort", "ResourceFlavor", "PriorityClass"})
DEFAULT_IMAGE = "busybox"

_TOP_KEYS = {
    "name",
    "queue",
    "labels",
    "priority",
    "priorityClass",
    "maxRunTime",
    "minRunTime",
    "failOnPreemption",
    "podSets",
    "constraints",
    "datasets",
    "workload",
    "disconnect",
}
_POD_SET_KEYS = {"name", "count", "minCount", "gpuType", "requests"}
_CONSTRAINT_KEYS = {"clusterSelector", "tolerations", "preferredGroups", "strictGroups"}
_TOLERATION_KEYS = {"key", "operator", "value", "effect"}
_GROUP_KEYS = {"clusters", "matchLabels"}
_DATASET_KEYS = {"id", "size", "required"}
_DISCONNECT_KEYS = {"action", "requeueAfter"}
_DISCONNECT_ACTIONS = {
    "requeue": pb.DISCONNECT_REQUEUE,
    "wait": pb.DISCONNECT_WAIT,
    "fail": pb.DISCONNECT_FAIL,
}

_BYTE_SUFFIXES = [
    *[("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)],
    *[("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)],
]
_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(d|h|m|s))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(d|h|m|s)")


# Past Python's recursion limit; the hub allows 100 levels in a workload (docs/security.md).
_TOO_DEEP = "nested too deeply to read (a workload may nest at most 100 levels)"


# What a bad quantity's error shows as valid forms.
_QUANTITY_EXAMPLES = "500m, 4Gi, 2"


class SpecError(ValueError):
    """A spec file that cannot be turned into a JobSpec; the message is one line for humans."""


# -- typed accessors: each takes the value and its field path -------------------------------


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        fields.fail(path, f"expected a list, got {fields.type_name(value)}")
    return value


def _string_list(value: object, path: str) -> list[str]:
    return [fields.string(item, fields.join(path, i)) for i, item in enumerate(_list(value, path))]


def _items(value: object, path: str, convert: Callable[[Any, str], T]) -> list[T]:
    return [convert(item, fields.join(path, i)) for i, item in enumerate(_list(value, path))]


# -- durations ---------------------------------------------------------------------------------


def parse_duration(value: str | int) -> int:
    """Seconds from an int or a Go-style duration ("90s", "1h30m", "2d"), rounded up."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is not a duration (must not be negative)")
        return value
    text = value.strip()
    if text.isdigit():
        return int(text)
    if not _DURATION.match(text):
        raise ValueError(f"{value!r} is not a duration (examples: 90s, 30m, 1h30m, or seconds)")
    total = sum((Decimal(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text)), Decimal(0))
    return int(total.to_integral_value(rounding="ROUND_CEILING"))


def format_duration(seconds: int) -> str:
    """The shortest "1h30m"-style form; parse_duration(format_duration(n)) == n."""
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)


# -- YAML -> JobSpec ---------------------------------------------------------------------------


def _requests(value: object, path: str) -> dict[str, int]:
    result: dict[str, int] = {}
    for key, amount in fields.mapping(value, path).items():
        name = quantity.canonical_name(key)
        if name in result:
            fields.fail(fields.join(path, key), f"duplicate resource {name!r}")
        result[name] = fields.quantity(name, amount, fields.join(path, key), examples=_QUANTITY_EXAMPLES)
    return result


def _pod_set(value: object, path: str, index: int) -> pb.PodSet:
    data = fields.mapping(value, path, _POD_SET_KEYS)
    default_name = "main" if index == 0 else f"main-{index}"
    pod_set = pb.PodSet(name=fields.string(data.get("name", default_name), fields.join(path, "name")))
    pod_set.count = fields.int32(data.get("count", 1), fields.join(path, "count"))
    if "minCount" in data:
        pod_set.min_count = fields.int32(data["minCount"], fields.join(path, "minCount"))
    if "gpuType" in data:
        pod_set.gpu_type = fields.string(data["gpuType"], fields.join(path, "gpuType"))
    if "requests" in data:
        pod_set.requests.quantities.update(_requests(data["requests"], fields.join(path, "requests")))
    return pod_set


def _toleration(value: object, path: str) -> pb.Toleration:
    data = fields.mapping(value, path, _TOLERATION_KEYS)
    return pb.Toleration(**{k: fields.label_value(v, fields.join(path, k)) for k, v in data.items()})


def _group(value: object, path: str) -> pb.ClusterGroup:
    data = fields.mapping(value, path, _GROUP_KEYS)
    group = pb.ClusterGroup()
    if "clusters" in data:
        group.clusters.extend(_string_list(data["clusters"], fields.join(path, "clusters")))
    if "matchLabels" in data:
        group.match_labels.update(fields.string_map(data["matchLabels"], fields.join(path, "matchLabels")))
    return group


def _constraints(value: object, path: str) -> pb.ClusterConstraints:
    data = fields.mapping(value, path, _CONSTRAINT_KEYS)
    result = pb.ClusterConstraints()
    if "clusterSelector" in data:
        result.cluster_selector.update(
            fields.string_map(data["clusterSelector"], fields.join(path, "clusterSelector"))
        )
    if "tolerations" in data:
        result.tolerations.extend(_items(data["tolerations"], fields.join(path, "tolerations"), _toleration))
    if "preferredGroups" in data:
        result.preferred_groups.extend(
            _items(data["preferredGroups"], fields.join(path, "preferredGroups"), _group)
        )
    if "strictGroups" in data:
        result.strict_groups = fields.boolean(data["strictGroups"], fields.join(path, "strictGroups"))
    return result


def _dataset(value: object, path: str) -> pb.DatasetRef:
    data = fields.mapping(value, path, _DATASET_KEYS)
    if "id" not in data:
        fields.fail(fields.join(path, "id"), "required field is missing")
    ref = pb.DatasetRef(id=fields.string(data["id"], fields.join(path, "id")))
    if "size" in data:
        ref.size_bytes = fields.quantity(
            "storage", data["size"], fields.join(path, "size"), examples=_QUANTITY_EXAMPLES
        )
    if "required" in data:
        ref.required = fields.boolean(data["required"], fields.join(path, "required"))
    return ref


def _seconds(value: object, path: str) -> float:
    """A duration ("5m", "1h30m"), or seconds as a number (fractions allowed here)."""
    if isinstance(value, float) and not isinstance(value, bool):
        if not value >= 0 or value == float("inf"):
            fields.fail(path, f"{value!r} is not a duration (must be a finite number, not negative)")
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        fields.fail(path, f"{value!r} is not a duration (examples: 90s, 30m, 1h30m)")
    try:
        return float(parse_duration(value))
    except ValueError as exc:
        fields.fail(path, str(exc))


def _disconnect(value: object, path: str) -> pb.DisconnectPolicy:
    data = fields.mapping(value, path, _DISCONNECT_KEYS)
    policy = pb.DisconnectPolicy()
    if "action" in data:
        action = fields.string(data["action"], fields.join(path, "action"))
        if action not in _DISCONNECT_ACTIONS:
            fields.fail(
                fields.join(path, "action"), f"{action!r} is not one of: {', '.join(_DISCONNECT_ACTIONS)}"
            )
        policy.action = _DISCONNECT_ACTIONS[action]
    if "requeueAfter" in data:
        policy.requeue_after_seconds = _seconds(data["requeueAfter"], fields.join(path, "requeueAfter"))
    return policy


def _manifest_json(value: object, path: str) -> str:
    fields.mapping(value, path)

    def reject(obj: object) -> NoReturn:
        fields.fail(path, f"{obj!r} ({type(obj).__name__}) cannot be represented as JSON; quote it")

    return json.dumps(value, default=reject, separators=(",", ":"))


def _whole_seconds(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        fields.fail(path, f"{value!r} is not a duration (examples: 90s, 30m, 1h30m)")
    try:
        return parse_duration(value)
    except ValueError as exc:
        fields.fail(path, str(exc))


def spec_from_dict(data: object, path: str = "") -> pb.JobSpec:
    """Convert one parsed YAML document; errors carry the field path (without file context)."""
    doc = fields.mapping(data, path, _TOP_KEYS)
    if "name" not in doc:
        fields.fail(fields.join(path, "name"), "required field is missing")
    spec = pb.JobSpec(name=fields.string(doc["name"], fields.join(path, "name")))
    if not spec.name:
        fields.fail(fields.join(path, "name"), "must not be empty")
    spec.queue = fields.string(doc.get("queue", DEFAULT_QUEUE), fields.join(path, "queue"))
    if "labels" in doc:
        spec.labels.update(fields.string_map(doc["labels"], fields.join(path, "labels")))
    if "priority" in doc:
        spec.priority = fields.int32(doc["priority"], fields.join(path, "priority"))
    if "priorityClass" in doc:
        spec.priority_class = fields.string(doc["priorityClass"], fields.join(path, "priorityClass"))
    if "maxRunTime" in doc:
        spec.max_run_seconds = _whole_seconds(doc["maxRunTime"], fields.join(path, "maxRunTime"))
    if "minRunTime" in doc:
        spec.min_run_seconds = _whole_seconds(doc["minRunTime"], fields.join(path, "minRunTime"))
    if "failOnPreemption" in doc:
        spec.fail_on_preemption = fields.boolean(
            doc["failOnPreemption"], fields.join(path, "failOnPreemption")
        )
    if "podSets" in doc:
        pod_sets_path = fields.join(path, "podSets")
        for i, item in enumerate(_list(doc["podSets"], pod_sets_path)):
            spec.pod_sets.append(_pod_set(item, fields.join(pod_sets_path, i), i))
    if "constraints" in doc:
        spec.constraints.CopyFrom(_constraints(doc["constraints"], fields.join(path, "constraints")))
    if "datasets" in doc:
        spec.datasets.extend(_items(doc["datasets"], fields.join(path, "datasets"), _dataset))
    if "disconnect" in doc:
        spec.disconnect.CopyFrom(_disconnect(doc["disconnect"], fields.join(path, "disconnect")))
    if "workload" in doc:
        spec.workload.manifest_json = _manifest_json(doc["workload"], fields.join(path, "workload"))
    else:
        spec.workload.manifest_json = json.dumps(default_manifest(spec), separators=(",", ":"))
    return spec


def is_queue_object(document: object) -> bool:
    """Whether a YAML document is a queue object (objects.py: `fedplane apply -f`), which a
    file may hold beside job specs."""
    return isinstance(document, Mapping) and document.get("kind") in QUEUE_OBJECT_KINDS


def load_text(text: str, source: str = "<string>") -> list[pb.JobSpec]:
    """Every spec in a (possibly multi-document) YAML text; empty documents and queue objects
    are skipped (a file of queue objects only has no specs, and is no error)."""
    specs: list[pb.JobSpec] = []
    queue_objects = 0
    docs = yaml.safe_load_all(text)
    index = 0
    while True:
        try:
            doc = next(docs)
        except StopIteration:
            break
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise SpecError(f"{source}[{index}]: invalid YAML{at}: {problem}") from None
        except RecursionError:
            raise SpecError(f"{source}[{index}]: {_TOO_DEEP}") from None
        if is_queue_object(doc):
            queue_objects += 1
        elif doc is not None:
            try:
                specs.append(spec_from_dict(doc))
            except fields.FieldError as exc:
                where = f" {exc.path}" if exc.path else ""
                raise SpecError(f"{source}[{index}]{where}: {exc.message}") from None
            except RecursionError:
                raise SpecError(f"{source}[{index}]: {_TOO_DEEP}") from None
        index += 1
    if not specs and not queue_objects:
        raise SpecError(f"{source}: no job specs found")
    return specs


def load_file(path: str | Path) -> list[pb.JobSpec]:
    """Specs from a file; unreadable files are SpecErrors too, so callers catch one type."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from None
    return load_text(text, str(path))


# -- JobSpec -> YAML ---------------------------------------------------------------------------


def exact_quantity(resource: str, amount: int) -> str | int:
    """Like quantity.format_quantity, but never rounds, so a dump loads back to the same value."""
    if resource == quantity.CPU:
        return str(amount // 1000) if amount % 1000 == 0 else f"{amount}m"
    if resource == quantity.MEMORY or resource.endswith("storage"):
        # The shortest exact form, binary suffixes first on ties: 64Gi, 100G, 1500.
        forms = [str(amount)]
        for suffix, size in _BYTE_SUFFIXES:
            if amount and amount % size == 0:
                forms.append(f"{amount // size}{suffix}")
        return min(forms, key=len)
    return amount


def _short_name(resource: str) -> str:
    return "gpu" if resource == quantity.GPU else resource


def _k8s_quantity(resource: str, amount: int) -> str:
    value = exact_quantity(resource, amount)
    return value if isinstance(value, str) else str(value)


def spec_to_dict(spec: pb.JobSpec) -> dict[str, Any]:
    """The YAML form of a spec, omitting defaults; `spec_from_dict` reverses it exactly."""
    out: dict[str, Any] = {"name": spec.name, "queue": spec.queue or DEFAULT_QUEUE}
    if spec.labels:
        out["labels"] = dict(spec.labels)
    if spec.priority:
        out["priority"] = spec.priority
    if spec.priority_class:
        out["priorityClass"] = spec.priority_class
    if spec.max_run_seconds:
        out["maxRunTime"] = format_duration(spec.max_run_seconds)
    if spec.min_run_seconds:
        out["minRunTime"] = format_duration(spec.min_run_seconds)
    if spec.fail_on_preemption:
        out["failOnPreemption"] = True
    if spec.pod_sets:
        pod_sets = []
        for ps in spec.pod_sets:
            item: dict[str, Any] = {"name": ps.name, "count": ps.count}
            if ps.min_count:
                item["minCount"] = ps.min_count
            if ps.gpu_type:
                item["gpuType"] = ps.gpu_type
            if ps.requests.quantities:
                item["requests"] = {
                    _short_name(k): exact_quantity(k, v) for k, v in sorted(ps.requests.quantities.items())
                }
            pod_sets.append(item)
        out["podSets"] = pod_sets
    c = spec.constraints
    constraints: dict[str, Any] = {}
    if c.cluster_selector:
        constraints["clusterSelector"] = dict(c.cluster_selector)
    if c.tolerations:
        constraints["tolerations"] = [
            {f: getattr(t, f) for f in ("key", "operator", "value", "effect") if getattr(t, f)}
            for t in c.tolerations
        ]
    if c.preferred_groups:
        groups = []
        for g in c.preferred_groups:
            group: dict[str, Any] = {}
            if g.clusters:
                group["clusters"] = list(g.clusters)
            if g.match_labels:
                group["matchLabels"] = dict(g.match_labels)
            groups.append(group)
        constraints["preferredGroups"] = groups
    if c.strict_groups:
        constraints["strictGroups"] = True
    if constraints:
        out["constraints"] = constraints
    if spec.datasets:
        datasets = []
        for d in spec.datasets:
            ref: dict[str, Any] = {"id": d.id}
            if d.size_bytes:
                ref["size"] = exact_quantity(quantity.MEMORY, d.size_bytes)
            if d.required:
                ref["required"] = True
            datasets.append(ref)
        out["datasets"] = datasets
    if spec.HasField("disconnect"):
        out["disconnect"] = _disconnect_to_dict(spec.disconnect)
    if spec.workload.manifest_json:
        out["workload"] = json.loads(spec.workload.manifest_json)
    return out


def _disconnect_to_dict(policy: pb.DisconnectPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = {number: name for name, number in _DISCONNECT_ACTIONS.items()}
    if policy.action in names:
        out["action"] = names[policy.action]
    after = policy.requeue_after_seconds
    if after:
        out["requeueAfter"] = format_duration(int(after)) if after == int(after) else after
    return out


def dump_yaml(specs: pb.JobSpec | list[pb.JobSpec]) -> str:
    """YAML text for one spec or a multi-document file of several."""
    items = [specs] if isinstance(specs, pb.JobSpec) else specs
    return yaml.safe_dump_all(
        [spec_to_dict(s) for s in items], sort_keys=False, default_flow_style=False, allow_unicode=True
    )


# -- the manifest generated when a spec has no workload -------------------------------------------


def _job_manifest(name: str, pod_set: pb.PodSet | None) -> dict[str, Any]:
    count = pod_set.count if pod_set is not None else 1
    container: dict[str, Any] = {"name": "main", "image": DEFAULT_IMAGE}
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if pod_set is not None and pod_set.requests.quantities:
        requests = {k: _k8s_quantity(k, v) for k, v in sorted(pod_set.requests.quantities.items())}
        resources: dict[str, Any] = {"requests": requests}
        # Extended resources (GPUs) must have limits equal to requests in Kubernetes.
        extended = {k: v for k, v in requests.items() if k not in (quantity.CPU, quantity.MEMORY)}
        extended = {k: v for k, v in extended.items() if not k.endswith("storage")}
        if extended:
            resources["limits"] = extended
        container["resources"] = resources
    if pod_set is not None and pod_set.gpu_type:
        pod_spec["nodeSelector"] = {quantity.GPU_PRODUCT_LABEL: pod_set.gpu_type}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "parallelism": count,
            "completions": count,
            "backoffLimit": 0,
            "template": {"spec": pod_spec},
        },
    }


def default_manifest(spec: pb.JobSpec) -> dict[str, Any]:
    """A minimal batch/v1 Job so simple specs need no Kubernetes YAML.

    One pod set gives one Job; several give a v1 List of Jobs named `<job>-<pod set>`, because a
    Job has a single pod template.
    """
    if len(spec.pod_sets) <= 1:
        return _job_manifest(spec.name, spec.pod_sets[0] if spec.pod_sets else None)
    return {
        "apiVersion": "v1",
        "kind": "List",
        "items": [_job_manifest(f"{spec.name}-{ps.name}", ps) for ps in spec.pod_sets],
    }
