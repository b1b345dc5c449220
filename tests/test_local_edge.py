"""`fedplane up --edge`: an edge cluster behind a NATS leaf node, whose link SIGUSR1 cuts and restores."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedplane.client import context
from fedplane.client.sdk import FedplaneClient, Tls
from fedplane.v1 import types_pb2 as pb
from tests.test_local_federation import JOB, processes_mentioning

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]


def read_until(proc: subprocess.Popen[bytes], text: str, output: list[str], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode(errors="replace")
        if not line:
            break
        output.append(line)
        if text in line:
            return line
    raise AssertionError(f"no {text!r} in the output:\n" + "".join(output)[-3000:])


async def clusters(target: str, context_file: Path) -> dict[str, pb.Cluster]:
    """The clusters, asked as `fedplane up`'s administrator (TLS and its token)."""
    admin = context.load(context_file)
    async with FedplaneClient(target, tls=Tls(ca_file=admin.ca_file), token=admin.token) as client:
        return {c.name: c for c in await client.clusters()}


def test_up_runs_an_edge_cluster_behind_a_leaf_node_and_cuts_its_link_on_sigusr1(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "quick.yaml").write_text(JOB)
    data = tmp_path / "data"
    command = [sys.executable, "-m", "fedplane.client", "up", "--jobs", str(jobs), "--data-dir", str(data)]
    proc = subprocess.Popen(
        [*command, "--keep-running", "--edge", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Its context file goes to a config directory of its own, not the other tests'.
        env={**os.environ, "COLUMNS": "250", "XDG_CONFIG_HOME": str(tmp_path / "config")},
    )
    output: list[str] = []
    try:
        hub_line = read_until(proc, "fedplane up", output, 60)
        target = re.search(r"hub (127\.0\.0\.1:\d+)", hub_line)
        edge_line = read_until(proc, "edge site", output, 30)
        assert "edge site (edge-lab): leaf NATS 127.0.0.1:" in edge_line
        read_until(proc, "federation still running", output, 90)
        assert target is not None
        assert processes_mentioning(str(data / "leaf")), "the leaf nats-server runs from the data dir"

        found = asyncio.run(clusters(target.group(1), data / "security" / "context.yaml"))
        assert found["edge-lab"].labels["fedplane.io/edge"] == "true"
        assert found["edge-lab"].health == pb.READY  # its heartbeats cross the leaf node
        assert "fedplane.io/edge" not in found["gpu-eu"].labels

        proc.send_signal(signal.SIGUSR1)
        read_until(proc, "edge link cut", output, 10)
        proc.send_signal(signal.SIGUSR1)
        read_until(proc, "edge link restored", output, 10)
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest.decode(errors="replace")[-2000:]
    assert processes_mentioning(str(data)) == []
