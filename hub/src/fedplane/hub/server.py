"""Run the hub: the Hub plus its gRPC server with health checking and reflection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from fedplane.hub import decoding
from fedplane.hub.gatekeeper import AuthInterceptor
from fedplane.hub.hub import Hub
from fedplane.hub.identity import Authenticator, ConfigFileError
from fedplane.hub.service import ClusterService, HubService, JobService, QueueService
from fedplane.runtime import entry, gcpolicy, logs, tasks, telemetry
from fedplane.runtime.config import ConfigError, HubConfig, StartupError, TlsConfig, load_hub, unsecured
from fedplane.runtime.metrics import MetricsServer, parse_listen
from fedplane.v1 import hub_pb2, hub_pb2_grpc

log = logs.get("fedplane.hub")
SERVICE_NAMES = [
    hub_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    hub_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name,
    hub_pb2.DESCRIPTOR.services_by_name["HubService"].full_name,
    hub_pb2.DESCRIPTOR.services_by_name["QueueService"].full_name,
]


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """The gRPC port's TLS credentials (None: plaintext), read from the configured PEM files."""
    if not tls.cert_file:
        return None
    key = Path(tls.key_file).read_bytes()
    chain = Path(tls.cert_file).read_bytes()
    client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=tls.require_client_cert
    )


class HubServer:
    """A started hub and its gRPC server; `port` is the bound port (useful with port 0)."""

    def __init__(
        self,
        hub: Hub,
        server: grpc.aio.Server,
        port: int,
        health: HealthServicer,
        metrics: MetricsServer | None = None,
    ) -> None:
        self.hub = hub
        self.server = server
        self.port = port
        self.health = health
        # The Prometheus endpoint (metrics.listen), if any.
        self.metrics = metrics

    @classmethod
    async def start(cls, config: HubConfig) -> HubServer:
        try:  # before connecting anywhere: a missing file is a one-line refusal
            credentials = server_credentials(config.tls)
        except OSError as exc:
            raise StartupError(f"tls: cannot read {exc.filename}: {exc.strerror}") from exc
        try:
            authenticator = Authenticator.of(config.auth, config.tls.require_client_cert)
        except ConfigFileError as exc:
            raise StartupError(str(exc)) from None
        if config.metrics.listen:
            parse_listen(config.metrics.listen)  # a malformed address, before connecting anywhere
        hub = await Hub.start(config)
        # No SO_REUSEPORT (gRPC turns it on by default): a second hub on the same port must fail
        # to start, not silently share the port and half the calls.
        # A request over max_request_bytes is refused by gRPC (RESOURCE_EXHAUSTED) before it is read.
        server = grpc.aio.server(
            # Authentication after telemetry, so that refused calls are traced too.
            interceptors=[telemetry.grpc_server_interceptor(), AuthInterceptor(authenticator)],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", config.max_request_bytes),
            ],
        )
        # Every method refuses a request that does not parse or exceeds the input limits with
        # INVALID_ARGUMENT, before its servicer runs (decoding.py).
        decoding.register(hub_pb2_grpc.add_JobServiceServicer_to_server, JobService(hub), server)
        decoding.register(hub_pb2_grpc.add_ClusterServiceServicer_to_server, ClusterService(hub), server)
        decoding.register(hub_pb2_grpc.add_HubServiceServicer_to_server, HubService(hub), server)
        decoding.register(hub_pb2_grpc.add_QueueServiceServicer_to_server, QueueService(hub), server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            [*SERVICE_NAMES, reflection.SERVICE_NAME, "grpc.health.v1.Health"], server
        )
        try:
            if credentials is None:
                port = server.add_insecure_port(config.listen)
            else:
                port = server.add_secure_port(config.listen, credentials)
        except RuntimeError as exc:
            port = 0
            why = str(exc)
        else:
            why = "the address is in use or invalid"
        if port == 0:
            await hub.stop()
            raise StartupError(f"cannot listen on {config.listen}: {why}")
        metrics = None
        if config.metrics.listen:
            try:
                metrics = await hub.metrics.serve(config.metrics.listen)
            except StartupError:
                await hub.stop()
                await server.stop(None)
                raise
        await server.start()
        for name in ["", *SERVICE_NAMES]:
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "hub serving",
            listen=config.listen,
            port=port,
            hub_id=config.hub_id,
            tls="mutual" if config.tls.require_client_cert else "on" if credentials else "off",
            auth="on" if authenticator else "off (every caller may do everything)",
        )
        return cls(hub, server, port, health, metrics)

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.hub.stop()
        await self.server.stop(grace)
        if self.metrics is not None:
            await self.metrics.stop()


async def serve(config: HubConfig) -> None:
    server = await HubServer.start(config)
    gcpolicy.settle()  # the jobs recovered from etcd stay for as long as they are held
    await tasks.stop_event().wait()
    log.info("hub stopping")
    await server.stop()


def main(config_path: str | None) -> None:
    config = load_hub(config_path)
    logs.configure(config.telemetry.log_level, config.telemetry.log_format)
    missing = unsecured(config)
    if missing and not config.insecure:
        raise ConfigError(
            f"not secure: {'; '.join(missing)} not configured. Configure them (docs/security.md), or"
            " set insecure: true for a development setup"
        )
    for what in missing:
        log.warning(f"INSECURE: {what} is off (insecure: true); do not run this in production")
    gcpolicy.for_daemon()
    telemetry.configure("fedplane-hub", config.telemetry.exporter, config.telemetry.endpoint or None)
    try:
        asyncio.run(serve(config))
    finally:
        telemetry.shutdown()


def cli() -> None:
    """`fedplane-hub [--config FILE]`: the hub alone, as the hub distribution installs it."""
    entry.run_daemon("fedplane-hub", main, config_required=False)
