"""The core's job states are the wire's: the same numbers, the same names.

The core keeps its own table of states (fedplane.core.dispatch.S and NAMES) so that it imports
nothing from fedplane.v1; the hub stores and sends those numbers as JobState. This is where the
two are held together, so that they can never drift apart.
"""

from __future__ import annotations

from fedplane.core import dispatch as sm
from fedplane.v1 import types_pb2 as pb


def test_every_core_state_is_the_wires_by_number_and_name() -> None:
    wire = dict(pb.JobState.items())
    core = {name: value for name, value in vars(sm.S).items() if name.isupper()}
    assert core == wire
    assert dict(sm.NAMES) == {value: name for name, value in wire.items()}
    for name, value in wire.items():
        assert sm.state_name(value) == pb.JobState.Name(value) == name


def test_a_state_the_wire_does_not_name_is_named_alike() -> None:
    unknown = max(pb.JobState.values()) + 1
    assert unknown not in sm.NAMES
    assert sm.state_name(unknown) == f"JobState({unknown})"


def test_the_wire_enum_reads_the_cores_states() -> None:
    # What the hub writes into a JobStatus from the core is read back as the same state.
    for value in sm.NAMES:
        status = pb.JobStatus(state=value)  # type: ignore[arg-type]
        assert status.state == value and pb.JobStatus.FromString(status.SerializeToString()).state == value
