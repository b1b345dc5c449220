"""`fedplane chaos`: a bounded random run that says what it did and which invariants held."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedplane.chaos import runner
from fedplane.chaos.invariants import Result
from fedplane.chaos.processes import Event
from fedplane.chaos.scenarios import Outcome
from fedplane.client.cli import app

FAULTS = {"kill -9", "SIGSTOP", "cut link"}


def fedplane(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedplane.client", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.chaos
@pytest.mark.timeout(150)
def test_a_short_random_run_prints_its_faults_and_every_invariant() -> None:
    result = fedplane(
        # Two clusters and no edge site: the edge faults have scenarios of their own.
        *("chaos", "--duration", "6", "--seed", "7", "--settle", "30", "--json"),
        *("--agents", "2", "--edge-agents", "0"),
        timeout=140,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads(result.stdout)
    assert report["ok"] is True
    faults = [e for e in report["timeline"] if e["action"] in FAULTS]
    assert faults, report["timeline"]
    assert {i["name"] for i in report["invariants"]} >= {
        "no accepted job lost",
        "no job running in two clusters at one time",
        "no state moving backwards",
        "at most one terminal state per job",
    }
    assert all(i["holds"] for i in report["invariants"])
    lost = next(i for i in report["invariants"] if i["name"] == "no accepted job lost")
    assert lost["counts"]["accepted"] == report["load"]["accepted"] > 0
    # The timeline went to stderr as it happened.
    assert "chaos:" in result.stderr and faults[0]["action"] in result.stderr


def test_bad_parameters_are_refused_before_anything_starts() -> None:
    result = CliRunner().invoke(app, ["chaos", "--duration", "0", "--agents", "1"])
    assert result.exit_code == 2
    assert "--duration: must be a positive number" in result.output
    assert "--agents: at least 2" in result.output


def test_a_broken_invariant_exits_1_and_shows_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = Result("no accepted job lost", {"accepted": 3, "lost": 1}, ("lost",), ["j9: accepted, but gone"])

    def fake_run(params: runner.ChaosParams, on_event: Any = None, keep: bool = False) -> Outcome:
        timeline = [Event(1.0, "kill -9", "hub-0")]
        load = {
            "submitted": 3,
            "accepted": 3,
            "found_on_retry": 0,
            "retried": 1,
            "rejected": 0,
            "unconfirmed": 0,
        }
        return Outcome("random", [broken], timeline, load, {}, {}, [], {}, 1.0, True, tmp_path)

    monkeypatch.setattr(runner, "run", fake_run)
    result = CliRunner().invoke(app, ["chaos", "--duration", "5"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "kill -9" in result.output and "hub-0" in result.output
    assert "j9: accepted, but gone" in result.output
    assert "invariants broken" in result.output
