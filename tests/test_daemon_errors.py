"""Daemons that cannot start say why in one line and exit 2, with no traceback."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedplane.local import servers as embedded


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedplane.client", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_misspelt_agent_setting_is_named(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text("cluster: edge\nheartbeat_interval_secs: 3\n")
    line = one_error_line(run("agent", "--config", "agent.yaml", cwd=tmp_path))
    assert "agent.yaml: heartbeat_interval_secs: unknown setting" in line


def test_a_bad_simulated_backend_setting_is_named(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text("cluster: edge\nbackend: {type: simulated, nodez: []}\n")
    line = one_error_line(run("agent", "--config", "agent.yaml", cwd=tmp_path))
    assert "backend.nodez: unknown setting" in line


# Settings the loader takes but the agent cannot use: each is one line naming the file and the
# setting, exit 2, through either entry point (`fedplane agent` and the agent distribution's own).
AGENT_MISTAKES = [
    pytest.param(
        "fedplane.client",
        "cluster: GPU_EU\n",
        "agent.yaml: cluster: 'GPU_EU' must be a DNS label",
        id="cluster",
    ),
    pytest.param(
        "fedplane.agent",
        "cluster: edge\nbackend: {type: slurm}\n",
        "agent.yaml: backend.type: unknown backend 'slurm' (use simulated or kubernetes)",
        id="backend-type",
    ),
    pytest.param(
        "fedplane.client",
        "cluster: edge\nbackend: {type: simulated, nodes: [{name: big, resources: {memory: lots}}]}\n",
        "agent.yaml: backend.nodes[0] (big): memory: 'lots' is not a quantity",
        id="quantity",
    ),
    pytest.param(
        "fedplane.agent",
        "cluster: edge\ntaints: [edge=true:Sometimes]\n",
        "agent.yaml: taints[0]: invalid taint",
        id="taint",
    ),
]


@pytest.mark.parametrize(("module", "config", "expected"), AGENT_MISTAKES)
def test_an_agent_setting_it_cannot_use_is_one_line(
    tmp_path: Path, module: str, config: str, expected: str
) -> None:
    (tmp_path / "agent.yaml").write_text(config)
    args = ("agent", "--config", "agent.yaml") if module == "fedplane.client" else ("--config", "agent.yaml")
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    # Nothing else on stderr: no traceback, and no log line before the refusal.
    (line,) = result.stderr.splitlines()
    prefix = "error: " if module == "fedplane.client" else "fedplane-agent: "
    assert line.startswith(prefix + expected), line


def test_an_agent_without_nats_says_where_it_tries_and_keeps_saying_it(tmp_path: Path) -> None:
    port = embedded.free_port()  # nothing listens there
    (tmp_path / "agent.yaml").write_text(
        f"cluster: edge\nnats_url: nats://trial:secret@127.0.0.1:{port}\ninsecure: true\n"
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "fedplane.agent", "--config", "agent.yaml"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stderr is not None
        said: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while len(said) < 2 and time.monotonic() < deadline:
            line = agent.stderr.readline()
            assert line, f"the agent exited ({agent.wait()}) while NATS was down"
            if "cannot reach NATS; retrying" in line:
                said.append(json.loads(line))
        assert len(said) == 2, "the agent went quiet while NATS was down"
        for event in said:
            assert event["server"] == f"nats://127.0.0.1:{port}"  # its address, not its password
            assert event["level"] == "warning" and "Connect call failed" in event["error"]
        assert said[1]["attempts"] > said[0]["attempts"]
    finally:
        agent.terminate()
        agent.wait(30)


def test_a_hub_without_etcd_says_so(tmp_path: Path) -> None:
    port = embedded.free_port()  # nothing listens there
    (tmp_path / "hub.yaml").write_text(
        f"etcd_endpoint: 127.0.0.1:{port}\nlisten: 127.0.0.1:0\ninsecure: true\n"
    )
    line = one_error_line(run("hub", "--config", "hub.yaml", cwd=tmp_path))
    assert f"cannot reach etcd at 127.0.0.1:{port}" in line


def test_a_hub_without_security_refuses_to_start_unless_told_insecure(tmp_path: Path) -> None:
    port = embedded.free_port()  # nothing listens there: the refusal comes before any connection
    (tmp_path / "hub.yaml").write_text(f"etcd_endpoint: 127.0.0.1:{port}\nlisten: 127.0.0.1:0\n")
    line = one_error_line(run("hub", "--config", "hub.yaml", cwd=tmp_path))
    assert line.startswith("fedplane-hub: not secure:") or "not secure:" in line
    for missing in ("(tls)", "(auth)", "(nats_auth)", "(etcd_tls)"):
        assert missing in line
    assert "insecure: true" in line


def test_out_of_range_settings_are_refused_at_start_all_at_once(tmp_path: Path) -> None:
    # Zero transaction ops or a zero heartbeat timeout would only fail later, at the first write
    # or by marking every cluster unready: the hub refuses them before it connects anywhere.
    (tmp_path / "hub.yaml").write_text(
        "etcd_max_txn_ops: 0\ncluster_unknown_after_seconds: 0\n"
        "weights: {cost: -1}\nbatch_window_seconds: 0\ntelemetry: {exporter: jaeger}\n"
    )
    line = one_error_line(run("hub", "--config", "hub.yaml", cwd=tmp_path))
    assert "etcd_max_txn_ops: 0 is out of range; it must be at least 3" in line
    assert "telemetry.exporter: 'jaeger' is not one of otlp, console, none" in line
    assert "cluster_unknown_after_seconds: 0.0 is out of range; it must be above 0" in line
    assert "weights.cost: -1.0 is out of range" in line
    assert "batch_window_seconds" not in line  # 0 is a valid window


def test_an_out_of_range_environment_override_is_named(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text("cluster: edge\n")
    result = subprocess.run(
        [sys.executable, "-m", "fedplane.client", "agent", "--config", "agent.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "FEDPLANE_AGENT_HEARTBEAT_INTERVAL_SECONDS": "-5"},
    )
    line = one_error_line(result)
    assert "FEDPLANE_AGENT_HEARTBEAT_INTERVAL_SECONDS: -5.0 is out of range; it must be above 0" in line


def test_a_hub_on_a_taken_port_says_so(tmp_path: Path) -> None:
    # gRPC sets SO_REUSEPORT by default, which would let a second hub share the first's port.
    etcd = embedded.start_etcd(tmp_path / "etcd")
    nats = embedded.start_nats(tmp_path / "nats")
    try:
        port = embedded.free_port()
        config = (
            f"etcd_endpoint: {etcd.address}\nnats_url: nats://{nats.address}\nlisten: 127.0.0.1:{port}\n"
            "insecure: true\n"
        )
        (tmp_path / "hub.yaml").write_text(config)
        with running_hub(tmp_path, port):
            line = one_error_line(run("hub", "--config", "hub.yaml", cwd=tmp_path))
            assert f"cannot listen on 127.0.0.1:{port}" in line
    finally:
        nats.stop()
        etcd.stop()


@contextlib.contextmanager
def running_hub(cwd: Path, port: int) -> Iterator[subprocess.Popen[str]]:
    """`fedplane hub --config hub.yaml` in `cwd`, once it listens on `port`; stopped on exit."""
    hub = subprocess.Popen(
        [sys.executable, "-m", "fedplane.client", "hub", "--config", "hub.yaml"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):
            assert hub.poll() is None, hub.stderr.read() if hub.stderr else ""
            assert time.monotonic() < deadline, "the hub did not start listening"
            time.sleep(0.1)
        yield hub
    finally:
        hub.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            hub.wait(30)
        if hub.poll() is None:
            hub.kill()
            hub.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
