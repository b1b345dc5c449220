"""A job spec's `disconnect` block in YAML: what happens to the job when its cluster is lost."""

from __future__ import annotations

import pytest

from fedplane.client.spec import SpecError, dump_yaml, load_text
from fedplane.v1 import types_pb2 as pb

BASE = "name: j\npodSets: [{requests: {cpu: 1}}]\n"


def load(block: str) -> pb.JobSpec:
    (spec,) = load_text(BASE + block, "t.yaml")
    return spec


@pytest.mark.parametrize(
    ("block", "action", "after"),
    [
        ("disconnect: {action: requeue, requeueAfter: 5m}", pb.DISCONNECT_REQUEUE, 300.0),
        ("disconnect: {action: wait}", pb.DISCONNECT_WAIT, 0.0),
        ("disconnect: {action: fail, requeueAfter: 90}", pb.DISCONNECT_FAIL, 90.0),
        ("disconnect: {action: requeue, requeueAfter: 0.5}", pb.DISCONNECT_REQUEUE, 0.5),
        ("disconnect: {requeueAfter: 1h30m}", pb.DISCONNECT_ACTION_UNSPECIFIED, 5400.0),
    ],
)
def test_the_block_maps_to_the_jobs_policy(block: str, action: int, after: float) -> None:
    spec = load(block)
    assert spec.HasField("disconnect")
    assert (spec.disconnect.action, spec.disconnect.requeue_after_seconds) == (action, after)
    # It survives a round trip through YAML.
    assert load_text(dump_yaml(spec)) == [spec]


def test_without_the_block_the_job_has_no_policy_of_its_own() -> None:
    spec = load("")
    assert not spec.HasField("disconnect")
    assert "disconnect" not in dump_yaml(spec)


@pytest.mark.parametrize(
    ("block", "error"),
    [
        (
            "disconnect: {action: evict}",
            "t.yaml[0] disconnect.action: 'evict' is not one of: requeue, wait, fail",
        ),
        ("disconnect: {action: 3}", "t.yaml[0] disconnect.action: expected a string, got an integer 3"),
        (
            "disconnect: {requeueAfter: -5}",
            "t.yaml[0] disconnect.requeueAfter: -5 is not a duration (must not be negative)",
        ),
        (
            "disconnect: {requeueAfter: -0.5}",
            "t.yaml[0] disconnect.requeueAfter: -0.5 is not a duration"
            " (must be a finite number, not negative)",
        ),
        (
            "disconnect: {requeueAfter: .nan}",
            "t.yaml[0] disconnect.requeueAfter: nan is not a duration"
            " (must be a finite number, not negative)",
        ),
        (
            "disconnect: {requeueAfter: soon}",
            "t.yaml[0] disconnect.requeueAfter: 'soon' is not a duration"
            " (examples: 90s, 30m, 1h30m, or seconds)",
        ),
        (
            "disconnect: {action: wait, after: 5m}",
            "t.yaml[0] disconnect.after: unknown field (expected one of: action, requeueAfter)",
        ),
        ("disconnect: requeue", "t.yaml[0] disconnect: expected a mapping, got a string"),
    ],
)
def test_errors_name_the_field(block: str, error: str) -> None:
    with pytest.raises(SpecError) as info:
        load_text(BASE + block, "t.yaml")
    assert str(info.value) == error
