"""Daemons that cannot start say why in one line and exit 2, with no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedplane import embedded


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedplane", *args], capture_output=True, text=True, timeout=60, cwd=cwd
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


def test_a_hub_without_etcd_says_so(tmp_path: Path) -> None:
    port = embedded.free_port()  # nothing listens there
    (tmp_path / "hub.yaml").write_text(f"etcd_endpoint: 127.0.0.1:{port}\nlisten: 127.0.0.1:0\n")
    line = one_error_line(run("hub", "--config", "hub.yaml", cwd=tmp_path))
    assert f"cannot reach etcd at 127.0.0.1:{port}" in line
