"""What the agent keeps in its state directory comes back after a restart, and nothing else."""

from __future__ import annotations

from pathlib import Path

from fedplane.agent.state import AgentState, Limits


def test_generations_limits_and_contact_survive_a_restart(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "state")
    state.hold("j-1", 3)
    state.set_limits(("j-1", 3), Limits(max_run_seconds=60, fence_after_seconds=840.5))
    state.set_limits(("j-2", 1), Limits(fence_after_seconds=30))
    state.clock_started(("j-1", 3), 1_000.0)
    state.clock_started(("j-1", 3), 2_000.0)  # a clock starts once
    state.contact(1_234.5)

    again = AgentState(tmp_path / "state")
    assert again.generations == {"j-1": 3}
    assert again.limits == {
        ("j-1", 3): Limits(max_run_seconds=60, fence_after_seconds=840.5, running_since=1_000.0),
        ("j-2", 1): Limits(fence_after_seconds=30),
    }
    assert again.last_contact == 1_234.5
    assert sorted(again.fence_limits()) == [(("j-1", 3), 840.5), (("j-2", 1), 30)]


def test_a_workload_that_ended_is_forgotten_on_disk_too(tmp_path: Path) -> None:
    state = AgentState(tmp_path)
    state.set_limits(("j-1", 1), Limits(max_run_seconds=60))
    state.set_limits(("j-2", 1), Limits(max_run_seconds=60))
    state.forget([("j-1", 1), ("j-9", 1)])
    assert set(AgentState(tmp_path).limits) == {("j-2", 1)}


def test_without_a_state_directory_nothing_is_written(tmp_path: Path) -> None:
    state = AgentState(None)
    state.hold("j-1", 1)
    state.set_limits(("j-1", 1), Limits(fence_after_seconds=10))
    state.contact(5.0)
    assert state.generations == {"j-1": 1} and state.last_contact == 5.0
    assert list(tmp_path.iterdir()) == []
    assert AgentState(None).last_contact is None


def test_generations_written_by_earlier_agents_are_read(tmp_path: Path) -> None:
    (tmp_path / "generations.json").write_text('{"j-1": 2}')
    state = AgentState(tmp_path)
    assert state.generations == {"j-1": 2}
    assert state.limits == {} and state.last_contact is None


def test_each_change_appends_one_line_and_the_journal_is_compacted_when_mostly_dead(tmp_path: Path) -> None:
    state = AgentState(tmp_path)
    journal = tmp_path / "state.log"
    state.hold("j-0", 1)
    before = len(journal.read_text().splitlines())
    state.hold("j-1", 1)
    state.set_limits(("j-1", 1), Limits(fence_after_seconds=10))
    assert len(journal.read_text().splitlines()) == before + 2  # appended, not rewritten

    for i in range(3000):  # workloads come and go; only their ends' records stay
        state.set_limits((f"w-{i}", 1), Limits(max_run_seconds=5))
        state.forget([(f"w-{i}", 1)])
    lines = len(journal.read_text().splitlines())
    assert lines <= 4 * 3 + 1024 + 1
    again = AgentState(tmp_path)
    assert again.generations == {"j-0": 1, "j-1": 1}
    assert again.limits == {("j-1", 1): Limits(fence_after_seconds=10)}


def test_a_line_torn_by_a_crash_is_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    state = AgentState(tmp_path)
    state.hold("j-1", 2)
    state.contact(7.0)
    with (tmp_path / "state.log").open("a") as journal:
        journal.write('{"hold":["j-2",')  # killed mid-write
    again = AgentState(tmp_path)
    assert again.generations == {"j-1": 2} and again.last_contact == 7.0
    # The earlier agents' files are folded in once, then gone.
    assert not (tmp_path / "generations.json").exists()
