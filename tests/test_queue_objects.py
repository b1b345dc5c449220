"""Queue objects as YAML, offline: `fedplane apply -f` files to QueueObjects and back, the errors
that name file, document and field, the example queues, and the job spec's queue fields."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from fedplane.client import display
from fedplane.client.cli import app
from fedplane.client.objects import ObjectsError, dump_yaml, kind_of, load_files, load_text
from fedplane.client.spec import load_file
from fedplane.client.spec import load_text as load_specs
from fedplane.core.quota import check_config
from fedplane.hub.queuebook import config_core
from fedplane.local.federation import CLUSTERS
from fedplane.v1 import types_pb2 as pb

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GPU = "nvidia.com/gpu"

QUEUE = """
kind: Queue
name: team-a
cohort: ml
weight: 2.5
strategy: StrictFIFO
when_can_borrow: TryNextFlavor
held: true
preemption: {within_queue: Never, reclaim_within_cohort: Any, fair_share: true, max_per_minute: 10}
quotas:
  - flavor: gpu-h100
    resources:
      nvidia.com/gpu: {nominal: 16, borrowing_limit: 8, lending_limit: 4}
      cpu: {nominal: "256"}
  - flavor: cpu
    resources:
      gpu: {nominal: 0}
      memory: {nominal: 64Gi, lending_limit: 500M}
      cpu: {nominal: 500m}
"""


def test_a_queue_document_maps_to_every_field() -> None:
    [queue] = load_text(QUEUE).queues
    assert (queue.name, queue.cohort, queue.weight, queue.held) == ("team-a", "ml", 2.5, True)
    assert queue.strategy == pb.STRICT_FIFO and queue.when_can_borrow == pb.FUNGIBILITY_TRY_NEXT_FLAVOR
    assert queue.preemption == pb.QueuePreemption(
        within_queue=pb.WITHIN_QUEUE_NEVER,
        reclaim_within_cohort=pb.RECLAIM_ANY,
        fair_share=True,
        max_per_minute=10,
    )
    h100, cpu = queue.quotas
    assert h100.flavor == "gpu-h100"
    gpu = h100.resources[GPU]
    assert (gpu.nominal, gpu.borrowing_limit, gpu.lending_limit) == (16, 8, 4)
    assert h100.resources["cpu"].nominal == 256_000 and not h100.resources["cpu"].HasField("borrowing_limit")
    assert cpu.resources["cpu"].nominal == 500  # millicores
    assert (
        cpu.resources["memory"].nominal == 64 * 2**30 and cpu.resources["memory"].lending_limit == 500 * 10**6
    )
    assert GPU in cpu.resources  # "gpu" is nvidia.com/gpu, as in job specs


def test_the_other_kinds_and_their_defaults() -> None:
    objects = load_text(
        "kind: Cohort\nname: ml\nparent: org\nweight: 0\n---\n"
        "kind: ResourceFlavor\nname: gpu-a100\ngpu_type: A100\ncluster_labels: {tier: onprem, zone: 1}\n---\n"
        "kind: PriorityClass\nname: spot\nvalue: -5\nmay_preempt: false\ninterruptible: true\n---\n"
        "kind: PriorityClass\nname: normal\nvalue: 100\n---\n"
        "kind: Queue\nname: plain\n"
    )
    [cohort] = objects.cohorts
    assert cohort.parent == "org" and cohort.HasField("weight") and cohort.weight == 0
    [flavor] = objects.flavors
    assert flavor.gpu_type == "A100" and dict(flavor.cluster_labels) == {"tier": "onprem", "zone": "1"}
    spot, normal = objects.priority_classes
    assert (spot.value, spot.never_preempt, spot.interruptible) == (-5, True, True)
    assert (normal.value, normal.never_preempt, normal.interruptible) == (100, False, False)
    [plain] = objects.queues
    assert plain == pb.Queue(name="plain")  # every field left to the hub's defaults
    assert not plain.HasField("weight")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Queue\nname: a\ncohrot: ml\n", "f.yaml[0] cohrot: unknown field (expected one of: cohort, "),
        ("kind: Queue\nname: a\n---\nkind: Widget\nname: b\n", "f.yaml[1] kind: 'Widget' is not a kind"),
        ("name: a\n", "f.yaml[0] kind: required field is missing"),
        ("kind: Cohort\n", "f.yaml[0] name: required field is missing"),
        (
            "kind: Queue\nname: a\nstrategy: FIFO\n",
            "strategy: 'FIFO' is not one of: StrictFIFO, BestEffortFIFO",
        ),
        (
            "kind: Queue\nname: a\nquotas: [{flavor: cpu, resources: {cpu: {nominal: lots}}}]\n",
            "f.yaml[0] quotas[0].resources.cpu.nominal: 'lots' is not a quantity",
        ),
        (
            "kind: Queue\nname: a\nquotas: [{flavor: cpu, resources: {cpu: {nominl: 1}}}]\n",
            "quotas[0].resources.cpu.nominl: unknown field",
        ),
        (
            "kind: Queue\nname: a\nquotas: [{flavor: cpu, resources: {gpu: {nominal: 1}, "
            "nvidia.com/gpu: {nominal: 2}}}]\n",
            "resource 'nvidia.com/gpu' is given twice",
        ),
        (
            "kind: Queue\nname: a\npreemption: {within_queue: Any}\n",
            "preemption.within_queue: 'Any' is not one of",
        ),
        ("kind: PriorityClass\nname: p\nvalue: high\n", "f.yaml[0] value: expected an integer"),
        (
            "kind: Queue\nname: a\n---\nkind: Queue\nname: a\n",
            "f.yaml[1]: Queue a is already given in f.yaml[0]",
        ),
        ("kind: Queue\nname: [a\n", "f.yaml: invalid YAML at line 3, column 1: expected ',' or ']'"),
        ("- kind: Queue\n", "f.yaml[0]: expected a mapping, got a list"),
    ],
)
def test_a_bad_document_names_the_file_document_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(text)
    with pytest.raises(ObjectsError) as caught:
        load_files([path])
    assert message in str(caught.value).replace(f"{tmp_path}/", "")


def test_an_object_given_in_two_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("kind: Queue\nname: q\n")
    (tmp_path / "b.yaml").write_text("kind: Cohort\nname: q\n---\nkind: Queue\nname: q\n")
    with pytest.raises(ObjectsError, match=r"b.yaml\[1\]: Queue q is already given in .*a.yaml\[0\]"):
        load_files([tmp_path / "a.yaml", tmp_path / "b.yaml"])


def test_kinds_are_named_as_people_type_them() -> None:
    assert [
        kind_of(k) for k in ("queue", "Queue", "cohort", "flavor", "resource-flavor", "PriorityClass")
    ] == [
        "Queue",
        "Queue",
        "Cohort",
        "ResourceFlavor",
        "ResourceFlavor",
        "PriorityClass",
    ]
    with pytest.raises(ValueError, match="not a kind"):
        kind_of("job")


# ------------------------------------------------------------------ round trips

_names = st.sampled_from(["a", "b", "c"])
_cpu = st.integers(0, 10**9)
_optional = st.none() | _cpu


@st.composite
def _quotas(draw: st.DrawFn) -> list[pb.FlavorQuotas]:
    out = []
    for flavor in draw(st.lists(st.sampled_from(["cpu", "gpu-h100"]), unique=True, max_size=2)):
        quotas = pb.FlavorQuotas(flavor=flavor)
        for resource in draw(st.sets(st.sampled_from(["cpu", "memory", GPU, "example.com/fpga"]))):
            quota = quotas.resources[resource]
            quota.nominal = draw(_cpu)
            for field in ("borrowing_limit", "lending_limit"):
                value = draw(_optional)
                if value is not None:
                    setattr(quota, field, value)
        out.append(quotas)
    return out


_weight = st.none() | st.sampled_from([0.0, 0.25, 1.0, 7.0])


@st.composite
def queue_objects(draw: st.DrawFn) -> pb.QueueObjects:
    objects = pb.QueueObjects()
    for name in draw(st.sets(_names)):
        queue = objects.queues.add(
            name=name,
            cohort=draw(st.sampled_from(["", "org"])),
            quotas=draw(_quotas()),
            strategy=draw(st.sampled_from(pb.QueueingStrategy.values())),
            held=draw(st.booleans()),
            when_can_borrow=draw(st.sampled_from(pb.FlavorFungibility.values())),
        )
        preemption = pb.QueuePreemption(
            within_queue=draw(st.sampled_from(pb.PreemptWithinQueue.values())),
            reclaim_within_cohort=draw(st.sampled_from(pb.ReclaimWithinCohort.values())),
            fair_share=draw(st.booleans()),
            max_per_minute=draw(st.sampled_from([0.0, 0.5, 10.0])),
        )
        if preemption != pb.QueuePreemption():  # all defaults is no preemption block in YAML
            queue.preemption.CopyFrom(preemption)
        weight = draw(_weight)
        if weight is not None:
            queue.weight = weight
    for name in draw(st.sets(_names)):
        cohort = objects.cohorts.add(
            name=name, parent=draw(st.sampled_from(["", "org"])), quotas=draw(_quotas())
        )
        weight = draw(_weight)
        if weight is not None:
            cohort.weight = weight
    for name in draw(st.sets(_names)):
        objects.flavors.add(
            name=name,
            gpu_type=draw(st.sampled_from(["", "H100"])),
            cluster_labels=draw(
                st.dictionaries(st.sampled_from(["tier", "zone"]), st.sampled_from(["a", "1"]))
            ),
        )
    for name in draw(st.sets(_names)):
        objects.priority_classes.add(
            name=name,
            value=draw(st.integers(-(2**31), 2**31 - 1)),
            never_preempt=draw(st.booleans()),
            interruptible=draw(st.booleans()),
        )
    return objects


@settings(max_examples=60, deadline=None)
@given(queue_objects())
def test_dumped_objects_load_back_exactly(objects: pb.QueueObjects) -> None:
    assert load_text(dump_yaml(objects)) == objects


def test_the_example_queues_round_trip_make_a_consistent_tree_and_hold_every_example_job() -> None:
    objects = load_files([EXAMPLES / "queues.yaml"])
    assert load_text(dump_yaml(objects)) == objects
    assert check_config(config_core(objects)) == []
    queues = {q.name for q in objects.queues}
    named = {s.queue for path in EXAMPLES.glob("*.yaml") for s in load_file(path)}
    assert named and named <= queues
    assert {c.name for c in objects.priority_classes} == {"guaranteed", "normal", "interruptible"}
    values = {c.name: (c.value, c.interruptible) for c in objects.priority_classes}
    assert values == {"guaranteed": (1000, False), "normal": (100, False), "interruptible": (0, True)}
    roots = [c.name for c in objects.cohorts if not c.parent]
    departments = [c.name for c in objects.cohorts if c.parent == "org"]
    assert roots == ["org"] and len(departments) == 2
    products = {node.get("gpu_type") for c in CLUSTERS for node in c["backend"]["nodes"]}
    a100 = next(f for f in objects.flavors if f.name == "gpu-a100")
    assert a100.gpu_type in products  # the simulated gpu-eu's A100s
    assert {f.name for f in objects.flavors} >= {"cpu", "gpu-a100", "gpu-h100"}


# ------------------------------------------------------------------ the CLI, offline

runner = CliRunner()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _invoke(*args: str) -> Any:
    return runner.invoke(app, ["--hub", f"127.0.0.1:{_closed_port()}", *args])


def test_apply_of_a_bad_file_fails_before_reaching_any_hub(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Queue\nname: a\nweigth: 2\n")
    result = _invoke("apply", "-f", str(EXAMPLES / "queues.yaml"), "-f", str(bad))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {bad}[0] weigth: unknown field (expected one of: cohort, held, kind, name, preemption,"
        " quotas, strategy, weight, when_can_borrow)"
    )  # nothing was sent: with a good file, the unreachable hub would be the error


def test_a_queue_file_is_not_submitted_as_jobs_and_deleting_needs_a_kind() -> None:
    result = _invoke("submit", str(EXAMPLES / "queues.yaml"))
    assert result.exit_code == 2 and "fedplane apply -f" in result.stderr
    result = _invoke("delete", "widget", "x")
    assert result.exit_code == 2 and "'widget' is not a kind" in result.stderr
    assert _invoke("apply", "-f", str(EXAMPLES / "queues.yaml")).stderr.startswith(
        "error: cannot reach the hub"
    )


def test_job_specs_take_a_priority_class_a_minimum_run_time_and_fail_on_preemption() -> None:
    [spec] = load_specs(
        "name: j\npriorityClass: guaranteed\nminRunTime: 10m\nfailOnPreemption: true\n"
        "podSets: [{requests: {cpu: 1}}]\n"
    )
    assert (spec.priority_class, spec.min_run_seconds, spec.fail_on_preemption) == ("guaranteed", 600, True)
    from fedplane.client.spec import dump_yaml as dump_specs

    assert load_specs(dump_specs(spec)) == [spec]
    with pytest.raises(ValueError, match="minRunTime: 'soon' is not a duration"):
        load_specs("name: j\nminRunTime: soon\n")


def test_the_queue_table_shows_the_tree_indented_with_usage_against_quota() -> None:
    usage = pb.QueueResourceUsage(flavor="gpu-a100", resource=GPU, nominal=16, usage=20, borrowed=4)
    view = pb.QueueView(
        rows=[
            pb.QueueViewRow(name="team-b", kind="queue", parent="ml", weight=1),
            pb.QueueViewRow(name="team-a", kind="queue", parent="ml", weight=2, resources=[usage], held=True),
            pb.QueueViewRow(name="ml", kind="cohort", parent="org", weight=1),
            pb.QueueViewRow(name="org", kind="cohort", weight=1),
            pb.QueueViewRow(name="solo", kind="queue", parent="gone", pending=3, weight=1),
        ]
    )
    console = Console(record=True, width=150)
    console.print(display.queue_view_table(view))
    text = console.export_text()
    names = [line.split("│")[1][1:].rstrip() for line in text.splitlines() if line.startswith("│")]
    # Under its parent, cohorts first, then by name; a row whose parent is not shown is a root.
    assert names == ["org", "  ml", "    team-a", "    team-b", "solo"]
    assert "gpu-a100 gpu 20/16 +4 borrowed" in text and "HELD" in text
