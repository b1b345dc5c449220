"""`fedplane up`: the local federation runs jobs, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedplane.client import context
from tests.federation import connects

pytestmark = pytest.mark.e2e

JOB = """
name: quick
queue: team
podSets: [{name: main, count: 1, requests: {cpu: "1"}}]
workload:
  apiVersion: batch/v1
  kind: Job
  metadata: {name: quick, annotations: {fedplane.io/simulated-duration: "0.5s"}}
"""

# Beside the jobs, `up` applies their queues (queues.yaml) as an administrator would.
QUEUES = """
kind: ResourceFlavor
name: cpu
---
kind: Queue
name: team
quotas: [{flavor: cpu, resources: {cpu: {nominal: "4"}}}]
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
    # 50051 taken (by this test, or by whatever already has it): `up` serves elsewhere, and the
    # CLI still finds it without flags, through the context file it writes.
    taken = socket.socket()
    with contextlib.suppress(OSError):
        taken.bind(("127.0.0.1", 50051))
        taken.listen()
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "quick.yaml").write_text(JOB)
    (jobs / "queues.yaml").write_text(QUEUES)
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
        # Its context file goes to a config directory of its own, not the other tests'.
        env={**os.environ, "COLUMNS": "200", "XDG_CONFIG_HOME": str(tmp_path / "config")},
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

    # Secure by default, and still no flags: the CLI finds the context `up` wrote.
    cli = [sys.executable, "-m", "fedplane.client"]
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    listed = subprocess.run(
        [*cli, "clusters", "-o", "json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0 and "gpu-eu" in listed.stdout, listed.stderr
    queues = subprocess.run(
        [*cli, "queues", "-o", "yaml"], env=env, capture_output=True, text=True, timeout=60
    )
    assert queues.returncode == 0 and "name: team" in queues.stdout, queues.stderr
    default_context = tmp_path / "config" / "fedplane" / "context.yaml"
    admin = context.load(default_context)
    assert admin.ca_file and admin.token
    assert admin.hub.startswith("127.0.0.1:") and admin.hub != "127.0.0.1:50051"
    tokenless = tmp_path / "tokenless.yaml"
    context.write(tokenless, admin.hub, ca_file=admin.ca_file)
    refused = subprocess.run(
        [*cli, "--context", str(tokenless), "clusters"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
    assert asyncio.run(connects(admin.hub, token=admin.token)) is False, "the hub must not answer plaintext"

    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest.decode(errors="replace")[-2000:]
    assert "federation stopped" in rest.decode(errors="replace")
    assert processes_mentioning(str(data)) == []
    taken.close()
    # Gone with the federation: the CLI goes back to its default hub, not to a port now closed.
    assert not default_context.exists()
