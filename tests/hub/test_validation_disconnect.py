"""A job's disconnect policy is checked where specs enter: every problem names its field."""

from __future__ import annotations

import math

import pytest

from fedplane.hub.validation import validate_spec
from fedplane.v1 import types_pb2 as pb
from tests.hub.test_validation import valid_spec


def with_policy(action: int, after: float) -> pb.JobSpec:
    spec = valid_spec()
    spec.disconnect.action = action  # type: ignore[assignment]
    spec.disconnect.requeue_after_seconds = after
    return spec


@pytest.mark.parametrize(
    ("action", "after"),
    [
        (pb.DISCONNECT_REQUEUE, 0.0),
        (pb.DISCONNECT_REQUEUE, 300.0),
        (pb.DISCONNECT_WAIT, 0.0),
        (pb.DISCONNECT_FAIL, 0.5),
        (pb.DISCONNECT_ACTION_UNSPECIFIED, 120.0),  # the default's action, after 120 s
    ],
)
def test_valid_policies(action: int, after: float) -> None:
    assert validate_spec(with_policy(action, after)) == []


@pytest.mark.parametrize(
    ("action", "after", "problems"),
    [
        (
            pb.DISCONNECT_REQUEUE,
            -1.0,
            ["spec.disconnect.requeue_after_seconds: must not be negative (got -1)"],
        ),
        (
            pb.DISCONNECT_FAIL,
            math.nan,
            ["spec.disconnect.requeue_after_seconds: must be a finite number of seconds (got nan)"],
        ),
        (
            pb.DISCONNECT_REQUEUE,
            math.inf,
            ["spec.disconnect.requeue_after_seconds: must be a finite number of seconds (got inf)"],
        ),
        (
            7,  # a value from a newer client
            0.0,
            ["spec.disconnect.action: 7 is not a DisconnectAction (REQUEUE, WAIT or FAIL)"],
        ),
        (
            9,
            -5.0,
            [
                "spec.disconnect.action: 9 is not a DisconnectAction (REQUEUE, WAIT or FAIL)",
                "spec.disconnect.requeue_after_seconds: must not be negative (got -5)",
            ],
        ),
    ],
)
def test_invalid_policies_name_the_field(action: int, after: float, problems: list[str]) -> None:
    assert validate_spec(with_policy(action, after)) == problems
