"""`fedplane up`: the local federation runs jobs, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

JOB = """
name: quick
podSets: [{name: main, count: 1, requests: {cpu: "1"}}]
workload:
  apiVersion: batch/v1
  kind: Job
  metadata: {name: quick, annotations: {fedplane.io/simulated-duration: "0.5s"}}
"""


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_up_runs_jobs_then_ctrl_c_stops_everything(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "quick.yaml").write_text(JOB)
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedplane.client",
            "up",
            "--jobs",
            str(jobs),
            "--data-dir",
            str(data),
            "--keep-running",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.stdout is not None
    output = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode(errors="replace")
        if not line:
            break
        output.append(line)
        if "federation still running" in line:
            break
    text = "".join(output)
    assert "federation still running" in text, text[-3000:]
    assert "SUCCEEDED" in text and "Where each job ran" in text
    assert processes_mentioning(str(data)), "etcd and nats-server should be running from the data dir"

    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest.decode(errors="replace")[-2000:]
    assert "federation stopped" in rest.decode(errors="replace")
    assert processes_mentioning(str(data)) == []
