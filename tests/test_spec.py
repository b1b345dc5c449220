"""The YAML job-spec loader: field mapping, defaults, round trips and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fedplane.client.spec import (
    SpecError,
    default_manifest,
    dump_yaml,
    format_duration,
    load_file,
    load_text,
    parse_duration,
    spec_to_dict,
)
from fedplane.core import quantity
from fedplane.v1 import types_pb2 as pb

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

FULL = """
name: train-resnet
queue: research
labels: {team: vision, tier: 1}
priority: 10
maxRunTime: 1h30m
podSets:
  - name: workers
    count: 4
    minCount: 3
    gpuType: A100
    requests: {cpu: "8", memory: 64Gi, gpu: 1, ephemeral-storage: 100G}
  - name: ps
    requests: {cpu: 500m}
constraints:
  clusterSelector: {region: eu-west}
  tolerations: [{key: edge, operator: Exists, effect: NoSchedule}, {key: a, value: "b"}]
  preferredGroups:
    - clusters: [onprem-gpu, other]
    - matchLabels: {tier: cloud}
  strictGroups: true
datasets:
  - {id: imagenet, size: 150Gi, required: false}
  - {id: labels, size: 1000, required: true}
workload:
  apiVersion: batch/v1
  kind: Job
  metadata: {name: train-resnet, annotations: {fedplane.io/simulated-duration: "20s"}}
  spec: {parallelism: 4, completions: 4, backoffLimit: 0, ratio: 0.5}
"""


def load_one(text: str) -> pb.JobSpec:
    specs = load_text(text, "t.yaml")
    assert len(specs) == 1
    return specs[0]


def error_of(text: str, source: str = "t.yaml") -> str:
    with pytest.raises(SpecError) as info:
        load_text(text, source)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_full_spec_maps_every_field() -> None:
    spec = load_one(FULL)
    assert spec.name == "train-resnet"
    assert spec.queue == "research"
    assert dict(spec.labels) == {"team": "vision", "tier": "1"}
    assert spec.priority == 10
    assert spec.max_run_seconds == 5400

    workers, ps = spec.pod_sets
    assert (workers.name, workers.count, workers.min_count, workers.gpu_type) == ("workers", 4, 3, "A100")
    assert dict(workers.requests.quantities) == {
        quantity.CPU: 8000,
        quantity.MEMORY: 64 * 2**30,
        quantity.GPU: 1,
        "ephemeral-storage": 100 * 10**9,
    }
    assert (ps.name, ps.count, ps.min_count, ps.gpu_type) == ("ps", 1, 0, "")
    assert dict(ps.requests.quantities) == {quantity.CPU: 500}

    c = spec.constraints
    assert dict(c.cluster_selector) == {"region": "eu-west"}
    assert [(t.key, t.operator, t.value, t.effect) for t in c.tolerations] == [
        ("edge", "Exists", "", "NoSchedule"),
        ("a", "", "b", ""),
    ]
    assert list(c.preferred_groups[0].clusters) == ["onprem-gpu", "other"]
    assert dict(c.preferred_groups[1].match_labels) == {"tier": "cloud"}
    assert c.strict_groups is True

    assert [(d.id, d.size_bytes, d.required) for d in spec.datasets] == [
        ("imagenet", 150 * 2**30, False),
        ("labels", 1000, True),
    ]
    manifest = json.loads(spec.workload.manifest_json)
    assert manifest["metadata"]["annotations"] == {"fedplane.io/simulated-duration": "20s"}
    assert manifest["spec"]["parallelism"] == 4
    assert isinstance(manifest["spec"]["parallelism"], int)
    assert '"parallelism":4' in spec.workload.manifest_json
    assert manifest["spec"]["ratio"] == 0.5


def test_round_trip_through_yaml_is_exact() -> None:
    spec = load_one(FULL)
    again = load_one(dump_yaml(spec))
    assert again == spec
    # The dict form is the documented YAML shape, not protobuf's JSON mapping.
    data = spec_to_dict(spec)
    assert data["maxRunTime"] == "1h30m"
    assert data["podSets"][0]["requests"] == {
        "cpu": "8",
        "ephemeral-storage": "100G",
        "memory": "64Gi",
        "gpu": 1,
    }
    assert data["constraints"]["strictGroups"] is True
    assert data["datasets"][0] == {"id": "imagenet", "size": "150Gi"}


def test_round_trip_of_several_specs() -> None:
    specs = load_text(FULL + "\n---\nname: other\n", "t.yaml")
    assert load_text(dump_yaml(specs)) == specs


def test_defaults() -> None:
    spec = load_one("name: tiny\n")
    assert spec.queue == "default"
    assert not spec.labels and spec.priority == 0 and spec.max_run_seconds == 0
    assert not spec.pod_sets and not spec.datasets
    assert spec.constraints == pb.ClusterConstraints()
    # A pod set without fields is one pod named main; later unnamed sets get distinct names.
    spec = load_one("name: x\npodSets: [{}, {count: 2}]\n")
    assert [(p.name, p.count, p.min_count) for p in spec.pod_sets] == [("main", 1, 0), ("main-1", 2, 0)]
    assert not spec.pod_sets[0].requests.quantities


def test_generated_manifest_for_one_pod_set() -> None:
    spec = load_one(
        "name: crunch\npodSets: [{count: 3, gpuType: T4, requests: {cpu: 1500m, memory: 2Gi, gpu: 1}}]"
    )
    manifest = json.loads(spec.workload.manifest_json)
    assert manifest == default_manifest(spec)
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    assert manifest["metadata"]["name"] == "crunch"
    assert manifest["spec"]["parallelism"] == 3 and manifest["spec"]["completions"] == 3
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "main" and container["image"] == "busybox"
    assert container["resources"]["requests"] == {"cpu": "1500m", "memory": "2Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == {quantity.GPU_PRODUCT_LABEL: "T4"}
    assert pod["restartPolicy"] == "Never"


def test_generated_manifest_without_pod_sets_and_with_several() -> None:
    single = json.loads(load_one("name: bare").workload.manifest_json)
    assert single["spec"]["parallelism"] == 1
    assert "resources" not in single["spec"]["template"]["spec"]["containers"][0]

    spec = load_one("name: mix\npodSets: [{name: a, count: 2}, {name: b, requests: {cpu: 1}}]")
    manifest = json.loads(spec.workload.manifest_json)
    assert manifest["kind"] == "List"
    assert [item["metadata"]["name"] for item in manifest["items"]] == ["mix-a", "mix-b"]
    assert [item["spec"]["completions"] for item in manifest["items"]] == [2, 1]


def test_multi_document_file_skips_empty_documents(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text("---\nname: a\n---\n# only a comment\n---\nname: b\nqueue: q\n---\n")
    specs = load_file(path)
    assert [(s.name, s.queue) for s in specs] == [("a", "default"), ("b", "q")]


def test_error_index_counts_every_document() -> None:
    # Empty documents still count, so the index matches what an editor shows.
    message = error_of("name: a\n---\n---\nname: b\nbogus: 1\n")
    assert message.startswith("t.yaml[2] bogus: unknown field")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: x\npodSets: [{requests: {cpu: abc}}]",
            "t.yaml[0] podSets[0].requests.cpu: 'abc' is not a quantity",
        ),
        (
            "name: x\npodSets: [{requests: {memory: 1Zi}}]",
            "t.yaml[0] podSets[0].requests.memory: '1Zi' is not a",
        ),
        (
            "name: x\npodSets: [{requests: {gpu: true}}]",
            "t.yaml[0] podSets[0].requests.gpu: True is not a quantity",
        ),
        (
            "name: x\npodSets: [{requests: {gpu: 1, nvidia.com/gpu: 1}}]",
            "podSets[0].requests.nvidia.com/gpu: duplicate",
        ),
        ("name: x\npodSets: [{}, {cuont: 2}]", "t.yaml[0] podSets[1].cuont: unknown field"),
        (
            "name: x\npodSets: [{count: '4'}]",
            "t.yaml[0] podSets[0].count: expected an integer, got a string '4'",
        ),
        ("name: x\npodSets: [{count: 1.5}]", "t.yaml[0] podSets[0].count: expected an integer"),
        ("name: x\npodSets: [{count: 9999999999}]", "t.yaml[0] podSets[0].count: 9999999999 is out of range"),
        ("name: x\npodSets: [{minCount: true}]", "t.yaml[0] podSets[0].minCount: expected an integer"),
        ("name: x\npodSets: [{gpuType: 100}]", "t.yaml[0] podSets[0].gpuType: expected a string"),
        (
            "name: x\npodSets: [{requests: [cpu]}]",
            "t.yaml[0] podSets[0].requests: expected a mapping, got a list",
        ),
        ("name: x\npodSets: {a: 1}", "t.yaml[0] podSets: expected a list, got a mapping"),
        ("name: x\npodSets: [3]", "t.yaml[0] podSets[0]: expected a mapping, got an integer"),
        ("queue: q", "t.yaml[0] name: required field is missing"),
        ("name: ''", "t.yaml[0] name: must not be empty"),
        ("name: [a]", "t.yaml[0] name: expected a string, got a list"),
        ("name: x\nqueue: 3", "t.yaml[0] queue: expected a string"),
        ("name: x\npriority: high", "t.yaml[0] priority: expected an integer, got a string 'high'"),
        ("name: x\nmaxRunTime: 2 hours", "t.yaml[0] maxRunTime: '2 hours' is not a duration"),
        ("name: x\nmaxRunTime: -5", "t.yaml[0] maxRunTime: -5 is not a duration"),
        ("name: x\nmaxRunTime: [1]", "t.yaml[0] maxRunTime: [1] is not a duration"),
        ("name: x\nlabels: [a]", "t.yaml[0] labels: expected a mapping, got a list"),
        ("name: x\nlabels: {a: {b: c}}", "t.yaml[0] labels.a: expected a string, got a mapping"),
        ("name: x\nlabels: {1: a}", "t.yaml[0] labels: keys must be strings, got 1"),
        ("name: x\nconstraints: {selector: {}}", "t.yaml[0] constraints.selector: unknown field"),
        (
            "name: x\nconstraints: {clusterSelector: []}",
            "t.yaml[0] constraints.clusterSelector: expected a mapping",
        ),
        (
            "name: x\nconstraints: {tolerations: {key: a}}",
            "t.yaml[0] constraints.tolerations: expected a list",
        ),
        (
            "name: x\nconstraints: {tolerations: [{key: a, op: b}]}",
            "constraints.tolerations[0].op: unknown field",
        ),
        (
            "name: x\nconstraints: {preferredGroups: [{clusters: a}]}",
            "constraints.preferredGroups[0].clusters: expected a",
        ),
        (
            "name: x\nconstraints: {preferredGroups: [{clusters: [1]}]}",
            "preferredGroups[0].clusters[0]: expected a string",
        ),
        (
            "name: x\nconstraints: {preferredGroups: [{labels: {}}]}",
            "preferredGroups[0].labels: unknown field",
        ),
        (
            "name: x\nconstraints: {strictGroups: 'yes please'}",
            "t.yaml[0] constraints.strictGroups: expected true or false",
        ),
        ("name: x\ndatasets: [{size: 1Gi}]", "t.yaml[0] datasets[0].id: required field is missing"),
        ("name: x\ndatasets: [{id: d, size: big}]", "t.yaml[0] datasets[0].size: 'big' is not a quantity"),
        (
            "name: x\ndatasets: [{id: d, required: 1}]",
            "t.yaml[0] datasets[0].required: expected true or false",
        ),
        ("name: x\ndatasets: [{id: d, sizeBytes: 1}]", "t.yaml[0] datasets[0].sizeBytes: unknown field"),
        ("name: x\nworkload: 'kind: Job'", "t.yaml[0] workload: expected a mapping, got a string"),
        (
            "name: x\nworkload: {metadata: {created: 2026-01-02}}",
            "t.yaml[0] workload: datetime.date(2026, 1, 2)",
        ),
        ("- name: x", "t.yaml[0]: expected a mapping, got a list"),
        ("just text", "t.yaml[0]: expected a mapping, got a string"),
        ("name: a\n---\nname: [b", "t.yaml[1]: invalid YAML at line 3"),
        ("name: a\n  bad: indent", "t.yaml[0]: invalid YAML at line 2"),
        ("", "t.yaml: no job specs found"),
    ],
)
def test_errors_name_file_document_and_field(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_unknown_top_level_key_lists_the_valid_ones() -> None:
    message = error_of("name: x\npodsets: []")
    assert message.startswith("t.yaml[0] podsets: unknown field (expected one of: constraints, datasets,")
    assert "podSets" in message


def test_file_errors_are_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"missing\.yaml: no such file"):
        load_file(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        load_file(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npodSets: [{requests: {cpu: abc}}]\n")
    with pytest.raises(SpecError) as info:
        load_file(bad)
    assert (
        str(info.value)
        == f"{bad}[0] podSets[0].requests.cpu: 'abc' is not a quantity (examples: 500m, 4Gi, 2)"
    )
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SpecError, match="cannot read"):
        load_file(binary)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90),
        ("90", 90),
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1d", 86400),
        ("1.5m", 90),
    ],
)
def test_parse_duration(value: str | int, seconds: int) -> None:
    assert parse_duration(value) == seconds


@given(st.integers(min_value=0, max_value=10**9))
def test_format_duration_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(
    cpu=st.integers(min_value=0, max_value=10**9),
    memory=st.integers(min_value=0, max_value=2**60),
    gpu=st.integers(min_value=0, max_value=10**6),
)
def test_quantities_round_trip_exactly(cpu: int, memory: int, gpu: int) -> None:
    spec = pb.JobSpec(name="q", queue="default")
    ps = spec.pod_sets.add(name="main", count=1)
    ps.requests.quantities.update({quantity.CPU: cpu, quantity.MEMORY: memory, quantity.GPU: gpu})
    spec.datasets.add(id="d", size_bytes=memory)
    spec.workload.manifest_json = "{}"
    assert load_one(dump_yaml(spec)) == spec


def test_every_example_loads() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert len(files) >= 6
    names = []
    for path in files:
        for spec in load_file(path):
            names.append(spec.name)
            manifest = json.loads(spec.workload.manifest_json)
            assert manifest["kind"] == "Job"
            duration = manifest["metadata"]["annotations"]["fedplane.io/simulated-duration"]
            assert 3 <= parse_duration(duration) <= 15, path
            assert spec.pod_sets, path
            # The examples double as documentation: they must survive a round trip.
            assert load_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False)) == [spec]
    assert len(names) == len(set(names)), "example job names must be unique"


def test_examples_cover_the_documented_scenarios() -> None:
    specs = {s.name: s for path in EXAMPLES.glob("*.yaml") for s in load_file(path)}
    gpu = [s for s in specs.values() if any(p.gpu_type == "A100" for p in s.pod_sets)]
    assert any(p.min_count == p.count > 1 for s in gpu for p in s.pod_sets)
    assert any(d.id == "imagenet" for s in gpu for d in s.datasets)
    edge = [s for s in specs.values() if any(t.key == "edge" for t in s.constraints.tolerations)]
    assert any(d.id == "camera-feed" and d.required for s in edge for d in s.datasets)
    assert any(
        s.constraints.preferred_groups and "cpu-us" in s.constraints.preferred_groups[0].clusters
        for s in specs.values()
    )
    assert any(d.required and d.id == "logs-2026" for s in specs.values() for d in s.datasets)
    assert any(len(load_file(p)) > 2 for p in EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("depth", [500, 5000])
def test_a_workload_nested_thousands_deep_is_a_spec_error_not_a_crash(depth: int) -> None:
    text = "name: deep\nworkload: {apiVersion: v1, kind: Job, x: " + "[" * depth + "]" * depth + "}\n"
    with pytest.raises(SpecError, match=r"^<string>\[0\]: nested too deeply to read"):
        load_text(text)
