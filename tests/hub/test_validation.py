"""Job spec validation: every problem is reported, each naming its field path."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from fedplane.hub.validation import (
    MAX_LABELS,
    MAX_MANIFEST_DEPTH,
    MAX_POD_SETS,
    MAX_PODS,
    MAX_SPEC_BYTES,
    validate_spec,
)
from fedplane.v1 import types_pb2 as pb

NAME_PART_RULE = (
    "name part must consist of letters, digits, '-', '_' or '.', and start and end with a letter or digit"
)
LABEL_VALUE_RULE = (
    "must be empty or letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
)
MANIFEST = json.dumps({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}})


def valid_spec() -> pb.JobSpec:
    """A spec using every section, with each value valid."""
    return pb.JobSpec(
        name="train-resnet",
        queue="research",
        labels={"team": "vision", "app.kubernetes.io/name": "resnet-50", "empty": ""},
        priority=5,
        pod_sets=[
            pb.PodSet(
                name="launcher", count=1, requests=pb.Resources(quantities={"cpu": 500, "memory": 2**30})
            ),
            pb.PodSet(
                name="worker",
                count=4,
                min_count=2,
                requests=pb.Resources(quantities={"cpu": 4000, "nvidia.com/gpu": 1}),
                gpu_type="A100",
            ),
        ],
        constraints=pb.ClusterConstraints(
            cluster_selector={"region": "eu-west"},
            tolerations=[
                pb.Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
                pb.Toleration(key="dedicated", value="ml"),
                pb.Toleration(operator="Exists"),
            ],
            preferred_groups=[
                pb.ClusterGroup(clusters=["east"]),
                pb.ClusterGroup(match_labels={"tier": "gold"}),
            ],
            strict_groups=True,
        ),
        datasets=[
            pb.DatasetRef(id="imagenet", size_bytes=150 * 2**30, required=True),
            pb.DatasetRef(id="checkpoints", size_bytes=0),
        ],
        workload=pb.Workload(manifest_json=MANIFEST),
        max_run_seconds=3600,
    )


def test_a_valid_spec_has_no_problems() -> None:
    assert validate_spec(valid_spec()) == []


def test_a_minimal_spec_is_valid() -> None:
    spec = pb.JobSpec(
        name="a", pod_sets=[pb.PodSet(name="main", count=1, requests=pb.Resources(quantities={"cpu": 1}))]
    )
    assert validate_spec(spec) == []


Mutation = Callable[[pb.JobSpec], object]


def _set(path: str, value: object) -> Mutation:
    """A mutation setting a dotted attribute path (with [i] indexes) to value."""

    def apply(spec: pb.JobSpec) -> None:
        target: Any = spec  # whatever the path walks through
        parts = path.replace("[", ".").replace("]", "").split(".")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        setattr(target, parts[-1], value)

    return apply


def _manifest(doc: object) -> Mutation:
    return _set("workload.manifest_json", doc if isinstance(doc, str) else json.dumps(doc))


INVALID: list[tuple[str, Mutation, str]] = [
    ("empty name", _set("name", ""), "spec.name: required"),
    (
        "uppercase name",
        _set("name", "Train_ResNet"),
        "spec.name: 'Train_ResNet' must be at most 63 lowercase letters, digits and '-'",
    ),
    (
        "name ending in -",
        _set("name", "train-"),
        "spec.name: 'train-' must be at most 63 lowercase letters, digits and '-'",
    ),
    (
        "name too long",
        _set("name", "a" * 64),
        f"spec.name: '{'a' * 64}' must be at most 63 lowercase letters, digits and '-'",
    ),
    (
        "bad queue",
        _set("queue", "Q!"),
        "spec.queue: 'Q!' must be at most 63 lowercase letters, digits and '-'",
    ),
    ("no pod sets", lambda s: s.ClearField("pod_sets"), "spec.pod_sets: at least one pod set is required"),
    ("empty pod set name", _set("pod_sets[1].name", ""), "spec.pod_sets[1].name: required"),
    (
        "bad pod set name",
        _set("pod_sets[0].name", "Launcher"),
        "spec.pod_sets[0].name: 'Launcher' must be lowercase letters, digits and '-'",
    ),
    (
        "duplicate pod set names",
        _set("pod_sets[1].name", "launcher"),
        "spec.pod_sets[1].name: pod set 'launcher' appears twice",
    ),
    (
        "zero count",
        _set("pod_sets[0].count", 0),
        f"spec.pod_sets[0].count: must be between 1 and {MAX_PODS} (got 0)",
    ),
    (
        "negative count",
        _set("pod_sets[0].count", -3),
        f"spec.pod_sets[0].count: must be between 1 and {MAX_PODS} (got -3)",
    ),
    (
        "too many pods",
        _set("pod_sets[0].count", MAX_PODS + 1),
        f"spec.pod_sets[0].count: must be between 1 and {MAX_PODS} (got {MAX_PODS + 1})",
    ),
    (
        "min_count above count",
        _set("pod_sets[1].min_count", 5),
        "spec.pod_sets[1].min_count: must be between 0 and count 4 (got 5)",
    ),
    (
        "negative min_count",
        _set("pod_sets[1].min_count", -1),
        "spec.pod_sets[1].min_count: must be between 0 and count 4 (got -1)",
    ),
    (
        "negative request",
        lambda s: s.pod_sets[0].requests.quantities.update({"memory": -1}),
        "spec.pod_sets[0].requests.memory: must not be negative (got -1)",
    ),
    (
        "no requests",
        lambda s: s.pod_sets[0].ClearField("requests"),
        "spec.pod_sets[0].requests: at least one resource must be requested (e.g. cpu)",
    ),
    (
        "only zero requests",
        lambda s: s.pod_sets[0].requests.quantities.update({"cpu": 0, "memory": 0}),
        "spec.pod_sets[0].requests: at least one resource must be requested (e.g. cpu)",
    ),
    (
        "bad resource name",
        lambda s: s.pod_sets[0].requests.quantities.update({"GPU!": 1}),
        "spec.pod_sets[0].requests.GPU!: not a valid resource name",
    ),
    (
        "gpu_type without a gpu request",
        _set("pod_sets[0].gpu_type", "H100"),
        "spec.pod_sets[0].gpu_type: 'H100' is set but no nvidia.com/gpu is requested",
    ),
    (
        "gpu_type with a zero gpu request",
        lambda s: s.pod_sets[1].requests.quantities.update({"nvidia.com/gpu": 0}),
        "spec.pod_sets[1].gpu_type: 'A100' is set but no nvidia.com/gpu is requested",
    ),
    (
        "bad toleration operator",
        _set("constraints.tolerations[1].operator", "In"),
        "spec.constraints.tolerations[1].operator: 'In' must be Equal or Exists",
    ),
    (
        "Exists with a value",
        _set("constraints.tolerations[0].value", "present"),
        "spec.constraints.tolerations[0].value: must be empty when operator is Exists",
    ),
    (
        "Equal without a key",
        _set("constraints.tolerations[1].key", ""),
        "spec.constraints.tolerations[1].key: required unless operator is Exists",
    ),
    (
        "bad toleration effect",
        _set("constraints.tolerations[0].effect", "Sometimes"),
        "spec.constraints.tolerations[0].effect: 'Sometimes' must be one of "
        "NoExecute, NoSchedule, PreferNoSchedule",
    ),
    (
        "empty preferred group",
        lambda s: s.constraints.preferred_groups.add(),
        "spec.constraints.preferred_groups[2]: name clusters or match_labels",
    ),
    (
        "bad label key",
        lambda s: s.labels.update({"bad key": "x"}),
        f"spec.labels.bad key: not a valid label key: {NAME_PART_RULE}",
    ),
    (
        "bad label value",
        lambda s: s.labels.update({"team": "computer vision"}),
        f"spec.labels.team: 'computer vision' is not a valid label value: {LABEL_VALUE_RULE}",
    ),
    (
        "label value too long",
        lambda s: s.labels.update({"team": "v" * 64}),
        f"spec.labels.team: '{'v' * 64}' is not a valid label value: must be no more than 63 characters",
    ),
    (
        "bad selector value",
        lambda s: s.constraints.cluster_selector.update({"region": "-eu"}),
        f"spec.constraints.cluster_selector.region: '-eu' is not a valid label value: {LABEL_VALUE_RULE}",
    ),
    (
        "bad group label key",
        lambda s: s.constraints.preferred_groups[1].match_labels.update({"Tier/x/y": "gold"}),
        "spec.constraints.preferred_groups[1].match_labels.Tier/x/y: not a valid label key: a qualified"
        " name has at most one '/' (an optional DNS subdomain prefix, '/', a name)",
    ),
    (
        "duplicate dataset ids",
        _set("datasets[1].id", "imagenet"),
        "spec.datasets[1].id: dataset 'imagenet' listed twice",
    ),
    ("empty dataset id", _set("datasets[0].id", ""), "spec.datasets[0].id: required"),
    (
        "negative dataset size",
        _set("datasets[0].size_bytes", -1),
        "spec.datasets[0].size_bytes: must not be negative (got -1)",
    ),
    (
        "negative max run time",
        _set("max_run_seconds", -5),
        "spec.max_run_seconds: must not be negative (got -5)",
    ),
    (
        "manifest not JSON",
        _manifest("{kind: Job}"),
        "spec.workload.manifest_json: not valid JSON "
        "(Expecting property name enclosed in double quotes at line 1)",
    ),
    (
        "manifest not an object",
        _manifest(["Job"]),
        "spec.workload.manifest_json: must be a JSON object (a Kubernetes manifest)",
    ),
    (
        "manifest without kind",
        _manifest({"apiVersion": "batch/v1"}),
        "spec.workload.manifest_json.kind: required",
    ),
    (
        "manifest with empty kind",
        _manifest({"apiVersion": "v1", "kind": ""}),
        "spec.workload.manifest_json.kind: required",
    ),
    (
        "manifest with kind not a string",
        _manifest({"apiVersion": "v1", "kind": 7}),
        "spec.workload.manifest_json.kind: required",
    ),
    (
        "manifest without apiVersion",
        _manifest({"kind": "Job"}),
        "spec.workload.manifest_json.apiVersion: required",
    ),
    (
        "label key name part over 63 characters",
        lambda s: s.labels.update({"example.com/" + "k" * 64: "x"}),
        f"spec.labels.example.com/{'k' * 64}: not a valid label key: name part must be no more than 63"
        " characters",
    ),
    (
        "label key prefix over 253 characters",
        lambda s: s.labels.update({"p" * 254 + "/k": "x"}),
        f"spec.labels.{'p' * 80}...: not a valid label key: prefix part must be no more than 253 characters",
    ),
    (
        "label key with an empty prefix",
        lambda s: s.labels.update({"/k": "x"}),
        "spec.labels./k: not a valid label key: prefix part must not be empty",
    ),
    (
        "label key with an uppercase prefix",
        lambda s: s.labels.update({"Example.com/k": "x"}),
        "spec.labels.Example.com/k: not a valid label key: prefix part must be a DNS subdomain (lowercase"
        " letters, digits, '-' and '.')",
    ),
    (
        "name with a trailing newline",
        _set("name", "train\n"),
        "spec.name: 'train\\n' must be at most 63 lowercase letters, digits and '-'",
    ),
    (
        "too many pod sets",
        lambda s: s.pod_sets.extend(
            pb.PodSet(name=f"p{i}", count=1, requests=pb.Resources(quantities={"cpu": 1})) for i in range(7)
        ),
        f"spec.pod_sets: 9 pod sets; at most {MAX_POD_SETS} allowed",
    ),
    (
        "too many labels",
        lambda s: s.labels.update({f"l{i}": "x" for i in range(MAX_LABELS)}),
        f"spec.labels: {MAX_LABELS + 3} labels; at most {MAX_LABELS} allowed",
    ),
    (
        "bad toleration key",
        _set("constraints.tolerations[1].key", "bad key"),
        "spec.constraints.tolerations[1].key: 'bad key' is not a valid taint key: name part must consist"
        " of letters, digits, '-', '_' or '.', and start and end with a letter or digit",
    ),
    (
        "toleration value too long",
        _set("constraints.tolerations[1].value", "v" * 64),
        f"spec.constraints.tolerations[1].value: '{'v' * 64}' is not a valid taint value: must be no more"
        " than 63 characters",
    ),
    (
        "bad cluster name in a group",
        lambda s: s.constraints.preferred_groups[0].clusters.append("East_1"),
        "spec.constraints.preferred_groups[0].clusters[1]: 'East_1' is not a cluster name (a DNS label)",
    ),
    (
        "gpu_type not a label value",
        _set("pod_sets[1].gpu_type", "A100 80GB"),
        "spec.pod_sets[1].gpu_type: 'A100 80GB' is not a valid label value: must be empty or letters,"
        " digits, '-', '_' or '.', starting and ending with a letter or digit",
    ),
    (
        "manifest nested thousands deep",
        _manifest('{"apiVersion": "v1", "kind": "Job", "x": ' + "[" * 5000 + "]" * 5000 + "}"),
        f"spec.workload.manifest_json: nested more than {MAX_MANIFEST_DEPTH} levels deep",
    ),
    (
        "manifest nested just past the limit",
        _manifest(
            '{"apiVersion": "v1", "kind": "Job", "x": '
            + "[" * MAX_MANIFEST_DEPTH
            + "]" * MAX_MANIFEST_DEPTH
            + "}"
        ),
        f"spec.workload.manifest_json: nested more than {MAX_MANIFEST_DEPTH} levels deep",
    ),
    (
        "manifest with an integer too long to convert",
        _manifest('{"apiVersion": "v1", "kind": "Job", "x": ' + "9" * 5000 + "}"),
        "spec.workload.manifest_json: not valid JSON (Exceeds the limit (4300 digits) for integer string"
        " conversion: value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit)",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "problem"), [(m, p) for _, m, p in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_each_problem_is_reported_with_its_field_path(mutate: Mutation, problem: str) -> None:
    spec = valid_spec()
    mutate(spec)
    assert validate_spec(spec) == [problem]


def test_oversize_spec_is_refused() -> None:
    spec = valid_spec()
    spec.workload.manifest_json = json.dumps(
        {"apiVersion": "v1", "kind": "Job", "data": "x" * MAX_SPEC_BYTES}
    )
    assert validate_spec(spec) == [
        f"spec: spec is {spec.ByteSize()} bytes, more than the {MAX_SPEC_BYTES} allowed",
    ]
    # Just under the limit is fine.
    spec.workload.manifest_json = ""
    room = MAX_SPEC_BYTES - spec.ByteSize() - 100
    spec.workload.manifest_json = json.dumps({"apiVersion": "v1", "kind": "Job", "data": "x" * room})
    assert spec.ByteSize() <= MAX_SPEC_BYTES
    assert validate_spec(spec) == []


def test_no_manifest_is_allowed() -> None:
    spec = valid_spec()
    spec.ClearField("workload")
    assert validate_spec(spec) == []


def test_multiple_problems_are_reported_together_in_field_order() -> None:
    spec = valid_spec()
    spec.name = ""
    spec.pod_sets[0].count = 0
    spec.pod_sets[1].min_count = 9
    spec.constraints.tolerations[1].operator = "In"
    spec.datasets[0].size_bytes = -1
    spec.workload.manifest_json = "{}"
    assert validate_spec(spec) == [
        "spec.name: required",
        f"spec.pod_sets[0].count: must be between 1 and {MAX_PODS} (got 0)",
        "spec.pod_sets[1].min_count: must be between 0 and count 4 (got 9)",
        "spec.constraints.tolerations[1].operator: 'In' must be Equal or Exists",
        "spec.datasets[0].size_bytes: must not be negative (got -1)",
        "spec.workload.manifest_json.apiVersion: required",
        "spec.workload.manifest_json.kind: required",
    ]


def test_one_pod_set_can_have_several_problems() -> None:
    spec = valid_spec()
    spec.pod_sets[1].count = 0
    spec.pod_sets[1].requests.quantities["nvidia.com/gpu"] = -1
    assert validate_spec(spec) == [
        f"spec.pod_sets[1].count: must be between 1 and {MAX_PODS} (got 0)",
        "spec.pod_sets[1].min_count: must be between 0 and count 0 (got 2)",
        "spec.pod_sets[1].requests.nvidia.com/gpu: must not be negative (got -1)",
        "spec.pod_sets[1].gpu_type: 'A100' is set but no nvidia.com/gpu is requested",
    ]


def test_the_path_prefix_names_where_the_spec_came_from() -> None:
    spec = valid_spec()
    spec.name = ""
    assert validate_spec(spec, "jobs[3].spec") == ["jobs[3].spec.name: required"]
    spec.name = "ok"
    spec.workload.manifest_json = json.dumps(
        {"apiVersion": "v1", "kind": "Job", "data": "x" * MAX_SPEC_BYTES}
    )
    assert validate_spec(spec, "jobs[3].spec")[0].startswith("jobs[3].spec: spec is ")


def test_a_manifest_at_the_depth_limit_and_with_many_brackets_is_valid() -> None:
    spec = valid_spec()
    depth = MAX_MANIFEST_DEPTH - 1  # the manifest object itself is the first level
    spec.workload.manifest_json = json.dumps(
        {"apiVersion": "v1", "kind": "Job", "deep": json.loads("[" * depth + "]" * depth), "wide": [[]] * 500}
    )
    assert validate_spec(spec) == []


def test_kubernetes_label_keys_at_the_limits_are_valid() -> None:
    spec = valid_spec()
    prefix = ".".join(["p" * 63] * 4)[:253].rstrip(".")
    spec.labels.update({f"{prefix}/{'n' * 63}": "v" * 63, "A_b.c-D": "", "x": "Y_z.1-2"})
    assert validate_spec(spec) == []
