"""A real federation for tests: etcd and nats-server processes, an in-process hub and agents."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fedplane.agent.daemon import Agent
from fedplane.agent.simulated import SimulatedBackend
from fedplane.client.sdk import FedplaneClient, FedplaneError, Tls
from fedplane.hub.server import HubServer
from fedplane.local import servers as embedded
from fedplane.runtime.config import AgentConfig, HubConfig, NodeShape
from fedplane.v1 import hub_pb2, hub_pb2_grpc
from fedplane.v1 import types_pb2 as pb


def sim_agent_config(
    name: str,
    nats_url: str,
    *,
    nodes: list[NodeShape],
    labels: dict[str, str] | None = None,
    taints: list[str] | None = None,
    datasets: dict[str, Any] | None = None,
    cost: float = 0.0,
    duration: float = 0.5,
    state_dir: str = "",
    failure_rate: float = 0.0,
) -> AgentConfig:
    backend = {
        "type": "simulated",
        "nodes": [vars(n) for n in nodes],
        "datasets": datasets or {},
        "default_duration_seconds": duration,
        "start_delay_seconds": 0.05,
        "failure_rate": failure_rate,
    }
    return AgentConfig(
        cluster=name,
        nats_url=nats_url,
        labels=labels or {},
        taints=taints or [],
        cost=cost,
        heartbeat_interval_seconds=0.3,
        inventory_interval_seconds=2.0,
        state_dir=state_dir,
        backend=backend,
    )


def hub_config(etcd: embedded.ServerProcess, nats: embedded.ServerProcess, **settings: Any) -> HubConfig:
    """A hub on these servers as the tests run it (clusters quickly unknown, a short batch
    window, jobs may name queues nobody defined), answering nats-server's auth callout when it
    runs one; `settings` on top."""
    config = HubConfig(
        listen="127.0.0.1:0",
        etcd_endpoint=etcd.address,
        nats_url=f"nats://{nats.address}",
        cluster_unknown_after_seconds=3.0,
        batch_window_seconds=0.01,
        **{"implicit_queues": True, **settings},
    )
    return nats.identities.hub_config(config) if nats.identities is not None else config


def cpu_nodes(count: int, cpu: str = "8", memory: str = "32Gi", name: str = "cpu") -> NodeShape:
    return NodeShape(name=name, count=count, resources={"cpu": cpu, "memory": memory})


def gpu_nodes(count: int, gpus: int = 8, gpu_type: str = "A100", name: str = "gpu") -> NodeShape:
    return NodeShape(
        name=name, count=count, resources={"cpu": "96", "memory": "768Gi", "gpu": gpus}, gpu_type=gpu_type
    )


@dataclass
class Federation:
    etcd: embedded.ServerProcess
    nats: embedded.ServerProcess
    tmp: Path
    hub_config: HubConfig
    hub: HubServer | None = None
    agents: dict[str, Agent] = field(default_factory=dict)
    channel: grpc.aio.Channel | None = None
    # How callers reach the hub: TLS trusting this CA, and a bearer token (None/"": plaintext).
    tls: Tls | None = None
    token: str = ""

    @property
    def target(self) -> str:
        assert self.hub is not None
        return f"127.0.0.1:{self.hub.port}"

    def client(self, **options: Any) -> FedplaneClient:
        """An SDK client as this federation's administrator."""
        return FedplaneClient(self.target, tls=self.tls, token=self.token, **options)

    def cli_flags(self) -> list[str]:
        """The CLI's global options to reach the hub as its administrator."""
        flags = ["--hub", self.target]
        if self.tls is not None:
            flags += ["--ca", self.tls.ca_file]
        if self.token:
            flags += ["--token", self.token]
        return flags

    def open_channel(
        self, interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None
    ) -> grpc.aio.Channel:
        """A gRPC channel to the hub, with TLS and the token when the hub asks for them."""
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, interceptors=interceptors)
        credentials = self.tls.credentials()
        if self.token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self.token)
            )
        return grpc.aio.secure_channel(self.target, credentials, interceptors=interceptors)

    @property
    def nats_url(self) -> str:
        return f"nats://{self.nats.address}"

    @property
    def jobs(self) -> hub_pb2_grpc.JobServiceStub:
        assert self.channel is not None
        return hub_pb2_grpc.JobServiceStub(self.channel)

    @property
    def clusters(self) -> hub_pb2_grpc.ClusterServiceStub:
        assert self.channel is not None
        return hub_pb2_grpc.ClusterServiceStub(self.channel)

    async def start_hub(self) -> HubServer:
        self.hub = await HubServer.start(self.hub_config)
        if self.channel is not None:
            await self.channel.close()
        self.channel = self.open_channel()
        return self.hub

    async def stop_hub(self) -> None:
        if self.hub is not None:
            await self.hub.stop(grace=0.1)
            self.hub = None

    def admissible(self, config: AgentConfig) -> AgentConfig:
        """`config` presenting the bootstrap token with a key of its own, as an agent joining
        this federation's NATS (with auth callout) must."""
        identities = self.nats.identities
        if identities is not None and not config.insecure:
            identities.agent_config(config)
            if not config.state_dir and not config.nats_seed_file:
                config.nats_seed_file = str(self.tmp / "agent-keys" / f"{config.cluster}.nk")
        return config

    async def start_agent(self, config: AgentConfig) -> Agent:
        self.admissible(config)
        agent = Agent(config, SimulatedBackend(config.simulated()))
        await agent.start()
        self.agents[config.cluster] = agent
        return agent

    async def stop_agent(self, name: str) -> None:
        agent = self.agents.pop(name)
        await agent.stop()

    async def close(self) -> None:
        for name in list(self.agents):
            await self.stop_agent(name)
        await self.stop_hub()
        if self.channel is not None:
            await self.channel.close()

    async def wait_clusters_ready(self, names: list[str], timeout: float = 15.0) -> None:
        async def ready() -> bool:
            listed = await self.clusters.ListClusters(hub_pb2.ListClustersRequest())
            healthy = {c.name for c in listed.clusters if c.health == pb.READY and c.nodes}
            return set(names) <= healthy

        await eventually(ready, timeout, f"clusters {names} ready")

    async def submit(self, spec: pb.JobSpec, key: str = "") -> pb.Job:
        response = await self.jobs.SubmitJob(hub_pb2.SubmitJobRequest(spec=spec, idempotency_key=key))
        job: pb.Job = response.job
        return job

    async def get(self, job_id: str) -> pb.Job:
        job: pb.Job = await self.jobs.GetJob(hub_pb2.GetJobRequest(job_id=job_id))
        return job

    async def wait_state(self, job_id: str, states: set[int], timeout: float = 20.0) -> pb.Job:
        job = pb.Job()

        async def reached() -> bool:
            nonlocal job
            job = await self.get(job_id)
            return job.status.state in states

        await eventually(reached, timeout, f"job {job_id} in {[pb.JobState.Name(s) for s in states]}")  # type: ignore[arg-type]
        return job


async def connects(target: str, tls: Tls | None = None, token: str = "") -> bool:
    """Whether a client over `tls` (None: plaintext) gets an answer from the hub at `target`; a
    connection the TLS handshake refuses is UNAVAILABLE, and any other error fails the test."""
    async with FedplaneClient(target, tls=tls, token=token, timeout=5, retry_attempts=1) as client:
        try:
            await client.clusters()
        except FedplaneError as exc:
            assert exc.code == grpc.StatusCode.UNAVAILABLE, exc
            return False
    return True


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_spec(
    name: str,
    *,
    cpu: str = "1",
    count: int = 1,
    min_count: int = 0,
    gpus: int = 0,
    gpu_type: str = "",
    duration: str = "0.5s",
    datasets: list[pb.DatasetRef] | None = None,
    queue: str = "default",
    selector: dict[str, str] | None = None,
    tolerations: list[pb.Toleration] | None = None,
    priority: int = 0,
    labels: dict[str, str] | None = None,
    max_run_seconds: int = 0,
) -> pb.JobSpec:
    from fedplane.core import quantity

    requests = {"cpu": quantity.parse("cpu", cpu)}
    if gpus:
        requests[quantity.GPU] = gpus
    pod_set = pb.PodSet(name="main", count=count, min_count=min_count, gpu_type=gpu_type)
    pod_set.requests.quantities.update(requests)
    manifest = json.dumps(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "annotations": {"fedplane.io/simulated-duration": duration}},
        }
    )
    spec = pb.JobSpec(
        name=name,
        queue=queue,
        priority=priority,
        labels=labels or {},
        pod_sets=[pod_set],
        datasets=datasets or [],
        workload=pb.Workload(manifest_json=manifest),
        max_run_seconds=max_run_seconds,
    )
    spec.constraints.cluster_selector.update(selector or {})
    spec.constraints.tolerations.extend(tolerations or [])
    return spec
