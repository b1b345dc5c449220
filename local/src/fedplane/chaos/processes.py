"""The chaos harness: etcd, nats-server, hub replicas and agents, each a separate process on
loopback, that can be killed, paused, restarted and cut off.

Hubs run as `python -m fedplane.hub --config F` and agents as `python -m fedplane.agent
--config F`, as an operator runs them; every agent has its own state directory and keeps a
ledger (the simulated backend's record of what really ran where). Edge agents reach NATS
through a `CutLink` (fedplane.local.link), a loopback TCP proxy the harness cuts and restores.
A daemon that exits on its own is started again by a supervisor, as a Kubernetes restart
policy would, and the restart is recorded: chaos must not end a run because a daemon chose to
exit on a fatal error, but the timeline says that it did.

Every child gets SIGTERM if this process dies (setpriv --pdeathsig, see fedplane.local.servers)
and is stopped as a process group, so no run leaves a process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from fedplane.client.sdk import FedplaneClient, FedplaneError
from fedplane.local import servers as embedded
from fedplane.local.link import CutLink
from fedplane.v1 import hub_pb2, hub_pb2_grpc
from fedplane.v1 import types_pb2 as pb

EDGE_LABEL = "fedplane.io/edge"
STARTUP_TIMEOUT = 60.0
STOP_GRACE = 5.0


class HarnessError(RuntimeError):
    """The harness could not start or drive the federation; printable on one line."""


@dataclass(frozen=True)
class Timings:
    """Short thresholds, so that a fault is detected and healed within seconds."""

    heartbeat: float = 0.5
    unknown_after: float = 2.0
    lost_after: float = 5.0
    lease: float = 2.0
    requeue_after: float = 1.0
    gc_interval: float = 2.0


@dataclass(frozen=True)
class Settings:
    hubs: int = 1
    agents: int = 3
    # Agents that reach NATS through a CutLink and are labelled as edge clusters.
    edge_agents: int = 0
    nodes: int = 4
    node_cpu: int = 8
    timings: Timings = Timings()
    prefix: str = "/fedplane"
    seed: int = 0


@dataclass
class Daemon:
    """A hub or agent process, restartable with the same config."""

    name: str
    kind: str  # "hub" or "agent"
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    # Set while the harness means the process to be down (killed, not yet restarted).
    held_down: bool = False
    starts: int = 0

    def start(self) -> None:
        self.process = embedded.spawn_logged(
            [sys.executable, "-m", f"fedplane.{self.kind}", "--config", str(self.config_path)],
            self.log_path,
            _child_env(),
        )
        self.held_down = False
        self.paused = False
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    async def kill(self) -> None:
        """kill -9, as in a crash; the supervisor leaves it down until `start`."""
        self.held_down = True
        self.signal(signal.SIGKILL)
        await self._reaped(10.0)
        self.paused = False

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False

    async def stop(self, grace: float = STOP_GRACE) -> None:
        self.held_down = True
        if not self.running:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        if not await self._reaped(grace):
            self.signal(signal.SIGKILL)
            await self._reaped(10.0)

    async def _reaped(self, within: float) -> bool:
        deadline = time.monotonic() + within
        while self.process is not None and self.process.poll() is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []


def _child_env() -> dict[str, str]:
    """This environment without overrides that would change the daemons' configs behind the run."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FEDPLANE_HUB_", "FEDPLANE_AGENT_", "FEDPLANE_LOG_", "OTEL_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Event:
    """One line of the timeline: a fault injected, healed, or a daemon restarted by the supervisor."""

    at: float  # seconds since the harness started
    action: str
    target: str
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"at": round(self.at, 2), "action": self.action, "target": self.target, "detail": self.detail}


@dataclass
class Harness:
    root: Path
    settings: Settings = field(default_factory=Settings)
    etcd: embedded.ServerProcess | None = None
    nats: embedded.ServerProcess | None = None
    hubs: dict[str, Daemon] = field(default_factory=dict)
    agents: dict[str, Daemon] = field(default_factory=dict)
    hub_addresses: dict[str, str] = field(default_factory=dict)
    # Edge agents' links to the hub's NATS, and their sites' leaf nats-servers, by agent.
    links: dict[str, CutLink] = field(default_factory=dict)
    leaves: dict[str, embedded.ServerProcess] = field(default_factory=dict)
    ledgers: dict[str, Path] = field(default_factory=dict)
    cut_links: set[str] = field(default_factory=set)
    timeline: list[Event] = field(default_factory=list)
    # Whether the hubs answer GetHubStatus (leader election): known after start.
    ha: bool = False
    started_at: float = field(default_factory=time.monotonic)
    _supervisor: asyncio.Task[None] | None = None
    _on_event: Callable[[Event], None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def etcd_endpoint(self) -> str:
        assert self.etcd is not None
        return self.etcd.address

    @property
    def nats_url(self) -> str:
        assert self.nats is not None
        return f"nats://{self.nats.address}"

    def agent_names(self) -> list[str]:
        return list(self.agents)

    def edge_names(self) -> list[str]:
        return list(self.links)

    def record(self, action: str, target: str, detail: str = "") -> Event:
        event = Event(time.monotonic() - self.started_at, action, target, detail)
        self.timeline.append(event)
        if self._on_event is not None:
            self._on_event(event)
        return event

    async def start(
        self, on_event: Callable[[Event], None] | None = None, *, require_ha: bool = False
    ) -> None:
        """Start every process and wait until each cluster is ready on the hubs.

        The first hub starts alone; the other replicas only once it answers GetHubStatus, since
        replicas without leader election would all dispatch. Without it the run keeps one hub,
        or fails if `require_ha`.
        """
        self._on_event = on_event
        if (self.root / "etcd").exists():
            # The checks read etcd's whole history: it must be this run's alone.
            raise HarnessError(f"{self.root} already holds a federation's data; use a fresh directory")
        self.root.mkdir(parents=True, exist_ok=True)
        # servers.start_* wait for the port by polling with sleeps: off the event loop.
        self.etcd = await asyncio.to_thread(embedded.start_etcd, self.root / "etcd")
        leafnodes = 0 if self.settings.edge_agents else None
        self.nats = await asyncio.to_thread(
            lambda: embedded.start_nats(self.root / "nats", leafnode_port=leafnodes)
        )
        for i in range(self.settings.hubs):
            self._add_hub(f"hub-{i}")
        for i in range(self.settings.agents):
            self._add_agent(f"c{i}", edge=False, seed=i)
        for i in range(self.settings.edge_agents):
            await self._add_edge_site(f"edge{i}")
            self._add_agent(f"edge{i}", edge=True, seed=100 + i)
        first, *others = self.hubs
        for daemon in [self.hubs[first], *self.agents.values()]:
            daemon.start()
        await self.wait_ready(STARTUP_TIMEOUT)
        self.ha = await self._probe_ha()
        if others and not self.ha:
            if require_ha:
                raise HarnessError(
                    "hub replicas need leader election, and the hub does not answer GetHubStatus"
                )
            for name in others:
                del self.hubs[name], self.hub_addresses[name]
            self.record("note", "hubs", "no leader election in this hub: running one replica")
        for name in others if self.ha else []:
            self.hubs[name].start()
        await self._wait_answering(STARTUP_TIMEOUT)
        self.record("start", "federation", f"{len(self.hubs)} hubs, {len(self.agents)} agents")
        self._supervisor = asyncio.create_task(self._supervise(), name="chaos-supervisor")

    async def _wait_answering(self, within: float) -> None:
        """Until every replica answers GetHubStatus (the first one already serves without it)."""
        deadline = time.monotonic() + within
        for name, daemon in self.hubs.items() if self.ha else ():
            while True:
                if not daemon.running:
                    raise HarnessError(f"{name} exited at start: {_tail(daemon)}")
                if await self.hub_status(name) is not None:
                    break
                if time.monotonic() > deadline:
                    raise HarnessError(f"{name} did not answer within {within:.0f}s")
                await asyncio.sleep(0.2)

    def _add_hub(self, name: str) -> None:
        t = self.settings.timings
        port = embedded.free_port()
        address = f"127.0.0.1:{port}"
        config = {
            "listen": address,
            "replica_id": name,
            # A chaos run exercises faults, not credentials: its own loopback servers, no auth.
            "insecure": True,
            "implicit_queues": True,
            "etcd_endpoint": self.etcd_endpoint,
            "etcd_prefix": self.settings.prefix,
            "nats_url": self.nats_url,
            "leader_lease_seconds": t.lease,
            "cluster_unknown_after_seconds": t.unknown_after,
            "cluster_lost_after_seconds": t.lost_after,
            "edge_cluster_unknown_after_seconds": t.unknown_after,
            "edge_cluster_lost_after_seconds": t.lost_after,
            "disconnect": {"action": "requeue", "requeue_after_seconds": t.requeue_after},
            "batch_window_seconds": 0.01,
            # The whole history stays in etcd for the checks.
            "finished_job_retention_seconds": 0,
            "telemetry": {"exporter": "none", "log_level": "info", "log_format": "json"},
        }
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.hubs[name] = Daemon(name, "hub", path, self.root / f"{name}.log")
        self.hub_addresses[name] = address

    async def _add_edge_site(self, name: str) -> None:
        """A leaf nats-server for the edge agent `name`, linked to the hub's through a CutLink."""
        assert self.nats is not None
        link = await CutLink(self.nats.host, self.nats.leafnode_port).start()
        self.links[name] = link
        self.leaves[name] = await asyncio.to_thread(
            embedded.start_nats_leaf, self.root / f"leaf-{name}", link.address
        )

    def _add_agent(self, name: str, *, edge: bool, seed: int) -> None:
        t = self.settings.timings
        nats_url = self.nats_url
        labels = {"fedplane.io/chaos": "true"}
        if edge:
            nats_url = f"nats://{self.leaves[name].address}"
            labels[EDGE_LABEL] = "true"
        home = self.root / "agents" / name
        ledger = home / "ledger.jsonl"
        self.ledgers[name] = ledger
        config = {
            "cluster": name,
            "nats_url": nats_url,
            "labels": labels,
            "heartbeat_interval_seconds": t.heartbeat,
            "inventory_interval_seconds": 2.0,
            "state_dir": str(home / "state"),
            "gc_interval_seconds": t.gc_interval,
            "backend": {
                "type": "simulated",
                "nodes": [
                    {
                        "name": "n",
                        "count": self.settings.nodes,
                        "resources": {"cpu": self.settings.node_cpu, "memory": "64Gi"},
                    }
                ],
                "start_delay_seconds": 0.05,
                "default_duration_seconds": 1.0,
                "seed": self.settings.seed * 1000 + seed,
                "ledger_path": str(ledger),
            },
            "telemetry": {"exporter": "none", "log_level": "info", "log_format": "json"},
        }
        home.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.agents[name] = Daemon(name, "agent", path, self.root / f"{name}.log")

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await asyncio.gather(*(d.stop() for d in [*self.agents.values(), *self.hubs.values()]))
        for link in self.links.values():
            with contextlib.suppress(Exception):
                await link.close()
        for server in (*self.leaves.values(), self.nats, self.etcd):
            if server is not None:
                await asyncio.to_thread(server.stop)

    async def _supervise(self) -> None:
        """Start again, after a short pause, any daemon that exited without the harness asking."""
        while True:
            await asyncio.sleep(0.25)
            for daemon in [*self.hubs.values(), *self.agents.values()]:
                if daemon.held_down or daemon.running or daemon.process is None:
                    continue
                code = daemon.process.returncode
                self.record("exited", daemon.name, f"exit code {code}; restarted by the supervisor")
                await asyncio.sleep(0.5)
                if not daemon.held_down:
                    daemon.start()

    # -- state ------------------------------------------------------------------------------------

    async def wait_ready(self, within: float, names: list[str] | None = None) -> None:
        """Until some hub lists every (named) cluster READY with its nodes."""
        wanted = set(names if names is not None else self.agents)
        deadline = time.monotonic() + within
        last = ""
        while time.monotonic() < deadline:
            for name, daemon in self.hubs.items():
                if not daemon.running and daemon.process is not None and not daemon.held_down:
                    raise HarnessError(f"{name} exited at start: {_tail(daemon)}")
                if not daemon.running or daemon.paused:
                    continue
                try:
                    async with self.client(name) as client:
                        clusters = await client.clusters()
                except FedplaneError as exc:
                    last = str(exc)
                    continue
                ready = {c.name for c in clusters if c.health == pb.READY and c.nodes}
                if wanted <= ready:
                    return
                last = f"ready: {sorted(ready)}"
            await asyncio.sleep(0.2)
        raise HarnessError(f"clusters {sorted(wanted)} not ready within {within:.0f}s ({last})")

    def client(self, hub: str, timeout: float = 3.0) -> FedplaneClient:
        return FedplaneClient(self.hub_addresses[hub], interceptors=[], timeout=timeout, retry_attempts=1)

    async def hub_status(self, hub: str, within: float = 2.0) -> hub_pb2.HubStatus | None:
        """GetHubStatus from one replica; None if it does not answer (or has no leader election)."""
        if not self.hubs[hub].running or self.hubs[hub].paused:
            return None
        async with grpc.aio.insecure_channel(self.hub_addresses[hub]) as channel:
            stub = hub_pb2_grpc.HubServiceStub(channel)
            try:
                status: hub_pb2.HubStatus = await stub.GetHubStatus(
                    hub_pb2.GetHubStatusRequest(), timeout=within
                )
            except grpc.aio.AioRpcError:
                return None
            return status

    async def _probe_ha(self) -> bool:
        """Whether the first hub answers GetHubStatus (it serves by now: it listed the clusters)."""
        return await self.hub_status(next(iter(self.hubs))) is not None

    async def leader(self, within: float = 10.0) -> str:
        """The replica that leads, as the replicas say (the only one, without leader election)."""
        if not self.ha:
            running = [n for n, d in self.hubs.items() if d.running]
            if not running:
                raise HarnessError("no hub is running")
            return running[0]
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for name in self.hubs:
                status = await self.hub_status(name)
                if status is not None and status.leader in self.hubs:
                    return status.leader
            await asyncio.sleep(0.1)
        raise HarnessError(f"no hub replica leads after {within:.0f}s")

    async def wait_leader_other_than(self, old: str, within: float) -> tuple[str, float]:
        """The replica that took over from `old`, and how long since this call it took."""
        started = time.monotonic()
        deadline = started + within
        while time.monotonic() < deadline:
            for name in self.hubs:
                if name == old:
                    continue
                status = await self.hub_status(name)
                if status is not None and status.leader and status.leader != old:
                    return status.leader, time.monotonic() - started
            await asyncio.sleep(0.05)
        raise HarnessError(f"no replica took over from {old} within {within:.0f}s")

    def down_clusters(self) -> set[str]:
        """Clusters whose agent is down or cut off now."""
        down = {n for n, d in self.agents.items() if not d.running or d.paused}
        return down | self.cut_links

    # -- faults -----------------------------------------------------------------------------------

    async def kill_hub(self, name: str) -> None:
        self.record("kill -9", name)
        await self.hubs[name].kill()

    def start_hub(self, name: str) -> None:
        self.record("start", name)
        self.hubs[name].start()

    async def kill_agent(self, name: str, detail: str = "") -> None:
        self.record("kill -9", name, detail)
        await self.agents[name].kill()

    def start_agent(self, name: str) -> None:
        self.record("start", name)
        self.agents[name].start()

    def pause_hub(self, name: str) -> None:
        self.record("SIGSTOP", name)
        self.hubs[name].pause()

    def resume_hub(self, name: str) -> None:
        self.record("SIGCONT", name)
        self.hubs[name].resume()

    async def restart_nats(self, down_for: float) -> None:
        """kill -9 nats-server, and start it again on the same port and data after `down_for`."""
        assert self.nats is not None
        old = self.nats
        self.record("kill -9", "nats-server")
        await asyncio.to_thread(old.kill)
        await asyncio.sleep(down_for)
        leafnodes = old.leafnode_port or None
        self.nats = await asyncio.to_thread(
            lambda: embedded.start_nats(old.data_dir, old.host, old.port, leafnode_port=leafnodes)
        )
        self.record("start", "nats-server", f"after {down_for:.1f}s")

    async def restart_etcd(self, down_for: float) -> None:
        """kill -9 etcd, and start it again on the same port and data dir after `down_for`."""
        assert self.etcd is not None
        old = self.etcd
        self.record("kill -9", "etcd")
        await asyncio.to_thread(old.kill)
        await asyncio.sleep(down_for)
        self.etcd = await asyncio.to_thread(embedded.start_etcd, old.data_dir, old.host, old.port)
        self.record("start", "etcd", f"after {down_for:.1f}s")

    async def cut(self, name: str) -> None:
        """Cut the link between an edge site's leaf nats-server and the hub's."""
        self.record("cut link", name)
        await self.links[name].cut()
        self.cut_links.add(name)

    async def restore(self, name: str) -> None:
        self.record("restore link", name)
        await self.links[name].restore()
        self.cut_links.discard(name)


def _tail(daemon: Daemon) -> str:
    lines = [line for line in daemon.log_lines() if line.strip()]
    return lines[-1][:400] if lines else "no output"
