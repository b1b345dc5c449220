"""The first run docs/operations.md shows ("A first run, process by process"), command by
command as a new operator pastes it: etcd, nats-server, a hub and an agent as separate
processes with the configs of examples/config/, then the CLI submits a job that succeeds.

The commands are read from the document itself, so the two cannot drift apart. Only what the
document says to change when a port is taken is changed: the ports on etcd's and
nats-server's command lines, the hub's and the agent's addresses through their environment
overrides, the CLI's through FEDPLANE_HUB; and the data directory is the test's own.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedplane.local import servers as embedded

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
TRIAL_DIR = "/tmp/fedplane-trial"
ETCD = "~/.cache/fedplane/etcd-v3.6.16/etcd"
SUBMIT = ".venv/bin/fedplane submit examples/config/hello.yaml --wait"
STOP = "kill $(jobs -p)"


def documented_commands(document: str = "docs/operations.md") -> list[str]:
    """The commands of the document's first run (its bash block that starts by making
    TRIAL_DIR), continuation lines joined, comments gone."""
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / document).read_text(), re.DOTALL)
    found = [block for block in blocks if block.startswith(f"mkdir -p {TRIAL_DIR}")]
    assert len(found) == 1, f"{document}: no first run, or more than one"
    commands = []
    for line in found[0].replace("\\\n", " ").splitlines():
        command = re.sub(r"\s+#\s.*$", "", line).strip()
        if command and not command.startswith("#"):
            commands.append(" ".join(command.split()))
    return commands


def test_the_readme_and_the_operations_guide_show_the_same_first_run() -> None:
    commands = documented_commands()
    assert documented_commands("README.md") == commands
    daemons = [c.split()[0] for c in commands if c.endswith("&")]
    assert daemons == [ETCD, ".venv/bin/nats-server", ".venv/bin/fedplane-hub", ".venv/bin/fedplane-agent"]
    assert commands[-2:] == [SUBMIT, STOP]


def test_a_first_run_as_documented(tmp_path: Path) -> None:
    etcd_binary = embedded.etcd_build_path()
    assert etcd_binary.exists(), f"{etcd_binary}: missing; tools/build_etcd.sh builds it (docs/operations.md)"
    trial = tmp_path / "trial"
    etcd, peer, nats, hub = (embedded.free_port() for _ in range(4))
    replacements = {
        ETCD: str(etcd_binary),
        ".venv/bin/": f"{Path(sys.executable).parent}/",
        TRIAL_DIR: str(trial),
        "127.0.0.1:2379": f"127.0.0.1:{etcd}",
        "127.0.0.1:2380": f"127.0.0.1:{peer}",
        "-p 4222": f"-p {nats}",
    }
    env = {
        **os.environ,
        "FEDPLANE_HUB_LISTEN": f"127.0.0.1:{hub}",
        "FEDPLANE_HUB_ETCD_ENDPOINT": f"127.0.0.1:{etcd}",
        "FEDPLANE_HUB_NATS_URL": f"nats://127.0.0.1:{nats}",
        "FEDPLANE_AGENT_NATS_URL": f"nats://127.0.0.1:{nats}",
        "FEDPLANE_AGENT_STATE_DIR": str(trial / "agent-local-sim"),
        "FEDPLANE_HUB": f"127.0.0.1:{hub}",
    }
    daemons: list[subprocess.Popen[bytes]] = []
    outputs: dict[str, str] = {}

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(trial.glob("*.log")))

    try:
        for documented in documented_commands():
            if documented == STOP:  # what it does: SIGTERM to each background job, below
                break
            command = documented
            for old, new in replacements.items():
                command = command.replace(old, new)
            if command.endswith("&"):
                # In a session of its own, as a shell's background job is, so that it is stopped whole.
                daemons.append(
                    subprocess.Popen(
                        ["bash", "-c", "exec " + command.removesuffix("&")],
                        cwd=ROOT,
                        env=env,
                        start_new_session=True,
                    )
                )
                continue
            try:
                result = subprocess.run(
                    ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=45
                )
            except subprocess.TimeoutExpired:
                pytest.fail(f"{documented}: still running after 45 s\n{logs()}")
            assert result.returncode == 0, f"{documented}\n{result.stdout}{result.stderr}\n{logs()}"
            outputs[documented] = result.stdout
        assert re.search(r"hello\s.*SUCCEEDED\s.*local-sim", outputs[SUBMIT]), outputs[SUBMIT]
        assert all(d.poll() is None for d in daemons), logs()
    finally:
        for daemon in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGTERM)
        codes = []
        for daemon in daemons:
            try:
                codes.append(daemon.wait(20))
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                codes.append(daemon.wait(10))
    # `kill $(jobs -p)` stops them cleanly: the hub and the agent exit 0 on SIGTERM.
    assert codes[2:] == [0, 0], logs()
    hub_log = (trial / "hub.log").read_text()
    assert hub_log.count("INSECURE: ") == 4 and "Traceback" not in hub_log + (trial / "agent.log").read_text()
