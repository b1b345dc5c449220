"""Queue objects as YAML, to and from `QueueObjects`: what `fedplane apply -f` reads and
`fedplane queues -o yaml` prints (which `apply -f` takes back unchanged).

Kubernetes-style: one object per document, `kind` (Queue, Cohort, ResourceFlavor,
PriorityClass) and `name`, then its fields. Quantities are written as in Kubernetes ("8",
"500m", "64Gi"). Like job specs, only shape, types and units are checked here, naming the
file, document and field; whether the objects make a consistent tree is the hub's call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fedplane.client import fields
from fedplane.client.spec import exact_quantity
from fedplane.core import quantity
from fedplane.v1 import types_pb2 as pb

__all__ = [
    "KINDS",
    "ObjectsError",
    "dump_yaml",
    "kind_of",
    "load_files",
    "load_text",
    "objects_from_dicts",
    "objects_to_dicts",
]


E = TypeVar("E", bound=int)


# What a bad quantity's error shows as valid forms (quotas: whole CPUs and memory first).
_QUANTITY_EXAMPLES = "8, 500m, 64Gi"


class ObjectsError(ValueError):
    """A file that cannot be turned into queue objects; one line for humans."""


# Kind -> the QueueObjects field holding it.
KINDS: dict[str, str] = {
    "Queue": "queues",
    "Cohort": "cohorts",
    "ResourceFlavor": "flavors",
    "PriorityClass": "priority_classes",
}
# What `fedplane delete KIND NAME` takes for each kind, in any case.
_KIND_NAMES = {
    "queue": "Queue",
    "queues": "Queue",
    "cohort": "Cohort",
    "cohorts": "Cohort",
    "resourceflavor": "ResourceFlavor",
    "resourceflavors": "ResourceFlavor",
    "flavor": "ResourceFlavor",
    "flavors": "ResourceFlavor",
    "priorityclass": "PriorityClass",
    "priorityclasses": "PriorityClass",
}
_FIELDS = {
    "Queue": {
        "kind",
        "name",
        "cohort",
        "weight",
        "quotas",
        "strategy",
        "held",
        "when_can_borrow",
        "preemption",
    },
    "Cohort": {"kind", "name", "parent", "weight", "quotas"},
    "ResourceFlavor": {"kind", "name", "cluster_labels", "gpu_type", "node_labels"},
    "PriorityClass": {"kind", "name", "value", "may_preempt", "interruptible"},
}
_QUOTA_FIELDS = {"flavor", "resources"}
_RESOURCE_FIELDS = {"nominal", "borrowing_limit", "lending_limit"}
_PREEMPTION_FIELDS = {"within_queue", "reclaim_within_cohort", "fair_share", "max_per_minute"}
_STRATEGIES = {"StrictFIFO": pb.STRICT_FIFO, "BestEffortFIFO": pb.BEST_EFFORT_FIFO}
_WHEN_CAN_BORROW = {"Borrow": pb.FUNGIBILITY_BORROW, "TryNextFlavor": pb.FUNGIBILITY_TRY_NEXT_FLAVOR}
_WITHIN_QUEUE = {"LowerPriority": pb.WITHIN_QUEUE_LOWER_PRIORITY, "Never": pb.WITHIN_QUEUE_NEVER}
_RECLAIM = {
    "Never": pb.RECLAIM_NEVER,
    "LowerPriority": pb.RECLAIM_LOWER_PRIORITY,
    "Any": pb.RECLAIM_ANY,
}


def kind_of(text: str) -> str:
    """The kind `text` names ("queue", "Queue", "flavor", "priorityclass", ...); ValueError if none."""
    kind = _KIND_NAMES.get(text.lower().replace("-", "").replace("_", ""))
    if kind is None:
        raise ValueError(f"{text!r} is not a kind (one of: {', '.join(KINDS)})")
    return kind


# -- typed accessors ------------------------------------------------------------------------


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        fields.fail(path, f"expected a number, got {fields.type_name(value)} {value!r}")
    return float(value)


def _choice(value: object, path: str, choices: Mapping[str, E]) -> E:
    name = fields.string(value, path)
    if name not in choices:
        fields.fail(path, f"{name!r} is not one of: {', '.join(choices)}")
    return choices[name]


# -- YAML -> QueueObjects -------------------------------------------------------------------


def _quotas(value: object, path: str) -> list[pb.FlavorQuotas]:
    if not isinstance(value, list):
        fields.fail(path, f"expected a list of flavors, got {fields.type_name(value)}")
    out = []
    for i, item in enumerate(value):
        at = f"{path}[{i}]"
        data = fields.mapping(item, at, _QUOTA_FIELDS)
        if "flavor" not in data:
            fields.fail(f"{at}.flavor", "required field is missing")
        flavor = pb.FlavorQuotas(flavor=fields.string(data["flavor"], f"{at}.flavor"))
        for key, amounts in fields.mapping(data.get("resources", {}), f"{at}.resources").items():
            resource = quantity.canonical_name(key)
            where = f"{at}.resources.{key}"
            if resource in flavor.resources:
                fields.fail(where, f"resource {resource!r} is given twice")
            limits = fields.mapping(amounts, where, _RESOURCE_FIELDS)
            if "nominal" not in limits:
                fields.fail(f"{where}.nominal", "required field is missing")
            quota = flavor.resources[resource]
            for field in ("nominal", "borrowing_limit", "lending_limit"):
                if field in limits:
                    at_field = f"{where}.{field}"
                    amount = fields.quantity(resource, limits[field], at_field, examples=_QUANTITY_EXAMPLES)
                    setattr(quota, field, amount)
        out.append(flavor)
    return out


def _preemption(value: object, path: str) -> pb.QueuePreemption:
    data = fields.mapping(value, path, _PREEMPTION_FIELDS)
    out = pb.QueuePreemption()
    if "within_queue" in data:
        out.within_queue = _choice(data["within_queue"], f"{path}.within_queue", _WITHIN_QUEUE)
    if "reclaim_within_cohort" in data:
        out.reclaim_within_cohort = _choice(
            data["reclaim_within_cohort"], f"{path}.reclaim_within_cohort", _RECLAIM
        )
    if "fair_share" in data:
        out.fair_share = fields.boolean(data["fair_share"], f"{path}.fair_share")
    if "max_per_minute" in data:
        out.max_per_minute = _number(data["max_per_minute"], f"{path}.max_per_minute")
    return out


def _queue(data: Mapping[str, Any]) -> pb.Queue:
    queue = pb.Queue(name=data["name"])
    if "cohort" in data:
        queue.cohort = fields.string(data["cohort"], "cohort")
    if "weight" in data:
        queue.weight = _number(data["weight"], "weight")
    if "quotas" in data:
        queue.quotas.extend(_quotas(data["quotas"], "quotas"))
    if "strategy" in data:
        queue.strategy = _choice(data["strategy"], "strategy", _STRATEGIES)
    if "held" in data:
        queue.held = fields.boolean(data["held"], "held")
    if "when_can_borrow" in data:
        queue.when_can_borrow = _choice(data["when_can_borrow"], "when_can_borrow", _WHEN_CAN_BORROW)
    if "preemption" in data:
        queue.preemption.CopyFrom(_preemption(data["preemption"], "preemption"))
    return queue


def _cohort(data: Mapping[str, Any]) -> pb.Cohort:
    cohort = pb.Cohort(name=data["name"])
    if "parent" in data:
        cohort.parent = fields.string(data["parent"], "parent")
    if "weight" in data:
        cohort.weight = _number(data["weight"], "weight")
    if "quotas" in data:
        cohort.quotas.extend(_quotas(data["quotas"], "quotas"))
    return cohort


def _flavor(data: Mapping[str, Any]) -> pb.ResourceFlavor:
    flavor = pb.ResourceFlavor(name=data["name"])
    if "cluster_labels" in data:
        flavor.cluster_labels.update(
            fields.string_map(data["cluster_labels"], "cluster_labels", booleans=False)
        )
    if "gpu_type" in data:
        flavor.gpu_type = fields.string(data["gpu_type"], "gpu_type")
    if "node_labels" in data:
        flavor.node_labels.update(fields.string_map(data["node_labels"], "node_labels", booleans=False))
    return flavor


def _priority_class(data: Mapping[str, Any]) -> pb.PriorityClass:
    if "value" not in data:
        fields.fail("value", "required field is missing")
    cls = pb.PriorityClass(name=data["name"], value=fields.int32(data["value"], "value"))
    if "may_preempt" in data:
        cls.never_preempt = not fields.boolean(data["may_preempt"], "may_preempt")
    if "interruptible" in data:
        cls.interruptible = fields.boolean(data["interruptible"], "interruptible")
    return cls


_PARSERS = {"Queue": _queue, "Cohort": _cohort, "ResourceFlavor": _flavor, "PriorityClass": _priority_class}


def _document(data: object, into: pb.QueueObjects) -> tuple[str, str]:
    """Add one document's object to `into`; its (kind, name)."""
    doc = fields.mapping(data, "")
    if "kind" not in doc:
        fields.fail("kind", f"required field is missing (one of: {', '.join(KINDS)})")
    kind = fields.string(doc["kind"], "kind")
    if kind not in KINDS:
        fields.fail("kind", f"{kind!r} is not a kind (one of: {', '.join(KINDS)})")
    fields.mapping(doc, "", _FIELDS[kind])
    if "name" not in doc:
        fields.fail("name", "required field is missing")
    name = fields.string(doc["name"], "name")
    if not name:
        fields.fail("name", "must not be empty")
    getattr(into, KINDS[kind]).append(_PARSERS[kind](doc))
    return kind, name


def _objects(documents: Iterable[tuple[str, object]]) -> pb.QueueObjects:
    """Queue objects from (label, parsed YAML document) pairs; errors name the label."""
    objects = pb.QueueObjects()
    seen: dict[tuple[str, str], str] = {}
    for where, data in documents:
        if data is None:
            continue
        try:
            key = _document(data, objects)
        except fields.FieldError as exc:
            raise ObjectsError(f"{where}{' ' + exc.path if exc.path else ''}: {exc.message}") from None
        except RecursionError:
            raise ObjectsError(f"{where}: nested too deeply to read") from None
        if key in seen:
            raise ObjectsError(f"{where}: {key[0]} {key[1]} is already given in {seen[key]}")
        seen[key] = where
    return objects


def objects_from_dicts(documents: Iterable[object], source: str = "<string>") -> pb.QueueObjects:
    """Queue objects from parsed YAML documents (None documents skipped); errors name the
    document as `source[index]`."""
    return _objects((f"{source}[{i}]", doc) for i, doc in enumerate(documents))


def _documents(text: str, source: str) -> list[object]:
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ObjectsError(f"{source}: invalid YAML{at}: {problem}") from None
    except RecursionError:
        raise ObjectsError(f"{source}: nested too deeply to read") from None


def load_text(text: str, source: str = "<string>") -> pb.QueueObjects:
    return objects_from_dicts(_documents(text, source), source)


def load_files(paths: Sequence[str | Path]) -> pb.QueueObjects:
    """Every object of every file, together; an object given twice (in any files) is an error,
    and so are files without any object."""
    documents: list[tuple[str, object]] = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ObjectsError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ObjectsError(f"{path}: is a directory, not a YAML file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ObjectsError(f"{path}: cannot read: {exc}") from None
        documents += [(f"{path}[{i}]", doc) for i, doc in enumerate(_documents(text, str(path)))]
    objects = _objects(documents)
    if not any(getattr(objects, field) for field in KINDS.values()):
        raise ObjectsError(f"{', '.join(str(p) for p in paths)}: no queue objects found")
    return objects


# -- QueueObjects -> YAML -------------------------------------------------------------------


def _amount(resource: str, amount: int) -> str | int:
    return exact_quantity(resource, amount)


def _quotas_out(quotas: Iterable[pb.FlavorQuotas]) -> list[dict[str, Any]]:
    out = []
    for flavor in quotas:
        resources: dict[str, Any] = {}
        for resource, quota in sorted(flavor.resources.items()):
            entry: dict[str, Any] = {"nominal": _amount(resource, quota.nominal)}
            if quota.HasField("borrowing_limit"):
                entry["borrowing_limit"] = _amount(resource, quota.borrowing_limit)
            if quota.HasField("lending_limit"):
                entry["lending_limit"] = _amount(resource, quota.lending_limit)
            resources[resource] = entry
        out.append({"flavor": flavor.flavor, "resources": resources})
    return out


def _named(out: dict[str, Any], field: str, choices: Mapping[str, int], value: int) -> None:
    """Set `field` to the name of `value` (left out when UNSPECIFIED, the default)."""
    name = next((name for name, number in choices.items() if number == value), None)
    if name is not None:
        out[field] = name


def _weight(value: float) -> int | float:
    return int(value) if math.isfinite(value) and value == int(value) else value


def _queue_out(queue: pb.Queue) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "Queue", "name": queue.name}
    if queue.cohort:
        out["cohort"] = queue.cohort
    if queue.HasField("weight"):
        out["weight"] = _weight(queue.weight)
    if queue.quotas:
        out["quotas"] = _quotas_out(queue.quotas)
    _named(out, "strategy", _STRATEGIES, queue.strategy)
    _named(out, "when_can_borrow", _WHEN_CAN_BORROW, queue.when_can_borrow)
    if queue.held:
        out["held"] = True
    p = queue.preemption
    preemption: dict[str, Any] = {}
    _named(preemption, "within_queue", _WITHIN_QUEUE, p.within_queue)
    _named(preemption, "reclaim_within_cohort", _RECLAIM, p.reclaim_within_cohort)
    if p.fair_share:
        preemption["fair_share"] = True
    if p.max_per_minute:
        preemption["max_per_minute"] = _weight(p.max_per_minute)
    if preemption:
        out["preemption"] = preemption
    return out


def _cohort_out(cohort: pb.Cohort) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "Cohort", "name": cohort.name}
    if cohort.parent:
        out["parent"] = cohort.parent
    if cohort.HasField("weight"):
        out["weight"] = _weight(cohort.weight)
    if cohort.quotas:
        out["quotas"] = _quotas_out(cohort.quotas)
    return out


def _flavor_out(flavor: pb.ResourceFlavor) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "ResourceFlavor", "name": flavor.name}
    if flavor.cluster_labels:
        out["cluster_labels"] = dict(sorted(flavor.cluster_labels.items()))
    if flavor.gpu_type:
        out["gpu_type"] = flavor.gpu_type
    if flavor.node_labels:
        out["node_labels"] = dict(sorted(flavor.node_labels.items()))
    return out


def _priority_class_out(cls: pb.PriorityClass) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "PriorityClass", "name": cls.name, "value": cls.value}
    if cls.never_preempt:
        out["may_preempt"] = False
    if cls.interruptible:
        out["interruptible"] = True
    return out


def objects_to_dicts(objects: pb.QueueObjects) -> list[dict[str, Any]]:
    """One document per object, flavors and priority classes first, then cohorts, then queues
    (the order a reader builds the tree in); `objects_from_dicts` reverses it exactly."""
    return [
        *(_flavor_out(f) for f in objects.flavors),
        *(_priority_class_out(c) for c in objects.priority_classes),
        *(_cohort_out(c) for c in objects.cohorts),
        *(_queue_out(q) for q in objects.queues),
    ]


def dump_yaml(objects: pb.QueueObjects) -> str:
    return yaml.safe_dump_all(
        objects_to_dicts(objects), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
