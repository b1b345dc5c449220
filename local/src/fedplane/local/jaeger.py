"""Jaeger v2 beside a local federation or a test: its traces in a real backend, on loopback.

Jaeger v2 is an OpenTelemetry Collector distribution, and PyPI does not ship it:
tools/build_go_tool.sh builds it once from the Go module proxy and caches it. It runs here with
a configuration of our own rather than its all-in-one default, which opens ports nothing here
uses (Jaeger and Zipkin receivers, remote sampling, health check, expvar, its own metrics):
in-memory storage, the OTLP gRPC receiver, and the query service (UI and HTTP API, gRPC API),
every port on loopback. Its spans are gone when it stops. A binary built from the Go module
proxy carries no UI assets (Jaeger's UI is built with npm and embedded by its release build):
its UI is a placeholder page, and a trace is read through the HTTP API (`api_url`).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedplane.local import servers as embedded

# The Go module version tools/build_go_tool.sh builds (Jaeger v2 is released from the v1 module).
JAEGER_VERSION = "v1.76.0"
JAEGER_PACKAGE = "github.com/jaegertracing/jaeger/cmd/jaeger"
BUILD_COMMAND = f"tools/build_go_tool.sh jaeger {JAEGER_PACKAGE} {JAEGER_VERSION}"


def build_path() -> Path:
    """Where tools/build_go_tool.sh caches the jaeger binary (it may not be there)."""
    cache = os.environ.get("FEDPLANE_CACHE") or str(Path.home() / ".cache" / "fedplane")
    return Path(cache) / f"jaeger-{JAEGER_VERSION}" / "jaeger"


def find_jaeger() -> str | None:
    """FEDPLANE_JAEGER (a path), else the cached build, else None."""
    explicit = os.environ.get("FEDPLANE_JAEGER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise embedded.EmbeddedError(f"FEDPLANE_JAEGER={explicit} is not an executable file")
        return explicit
    built = build_path()
    return str(built) if os.access(built, os.X_OK) else None


def config(
    host: str, otlp_port: int, query_port: int, query_grpc_port: int, max_traces: int
) -> dict[str, Any]:
    """Jaeger's configuration (the OpenTelemetry Collector's format): only what is named here runs."""
    return {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query"],
            "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["jaeger_storage_exporter"]}},
            # No metrics of its own: the collector would serve them on :8888, every interface.
            "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
        },
        "extensions": {
            "jaeger_storage": {"backends": {"in_memory": {"memory": {"max_traces": max_traces}}}},
            "jaeger_query": {
                "storage": {"traces": "in_memory"},
                # Else it traces its own queries, to an OTLP endpoint on localhost:4317 by default
                # (and spends seconds at exit trying to reach it).
                "enable_tracing": False,
                "http": {"endpoint": f"{host}:{query_port}"},
                "grpc": {"endpoint": f"{host}:{query_grpc_port}"},
            },
        },
        # Only the gRPC protocol: without an `http` entry the receiver opens no OTLP/HTTP port.
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"{host}:{otlp_port}"}}}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "in_memory"}},
    }


@dataclass(frozen=True)
class Span:
    """A span as Jaeger's query API returns it: enough to follow a trace across processes."""

    span_id: str
    parent_id: str  # "" for the trace's root
    name: str
    service: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Jaeger:
    """A running Jaeger: OTLP gRPC in on `otlp_port`, UI and query API on `query_port`."""

    server: embedded.ServerProcess  # its port: the query service's HTTP port
    otlp_port: int
    query_grpc_port: int

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def query_port(self) -> int:
        return self.server.port

    @property
    def otlp_endpoint(self) -> str:
        """What the OTLP exporter takes (telemetry: exporter otlp, endpoint)."""
        return f"http://{self.host}:{self.otlp_port}"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.query_port}"

    def trace_url(self, trace_id: str) -> str:
        """The trace's page in Jaeger's UI (where the binary has its UI)."""
        return f"{self.ui_url}/trace/{trace_id}"

    def api_url(self, trace_id: str) -> str:
        """The trace as JSON, from Jaeger's HTTP query API."""
        return f"{self.ui_url}/api/traces/{trace_id}"

    def spans(self, trace_id: str, timeout: float = 5.0) -> list[Span]:
        """The spans of a trace Jaeger holds so far, through its HTTP query API ([] if none).

        Blocking: from asyncio, call it in a thread."""
        try:
            with urllib.request.urlopen(self.api_url(trace_id), timeout=timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise
        spans: list[Span] = []
        for found in body.get("data") or []:
            services = {key: p.get("serviceName", "") for key, p in (found.get("processes") or {}).items()}
            for span in found.get("spans") or []:
                parents = [r for r in span.get("references") or [] if r.get("refType") == "CHILD_OF"]
                spans.append(
                    Span(
                        span_id=span["spanID"],
                        parent_id=parents[0]["spanID"] if parents else "",
                        name=span["operationName"],
                        service=services.get(span.get("processID", ""), ""),
                        attributes={t["key"]: t.get("value") for t in span.get("tags") or []},
                    )
                )
        return spans

    def stop(self) -> None:
        self.server.stop()


def start_jaeger(
    data_dir: Path, host: str = "127.0.0.1", timeout: float = 30.0, max_traces: int = 100_000
) -> Jaeger:
    """Start Jaeger on free ports of `host` (config and log in `data_dir`); returns once its OTLP
    receiver and query API both answer."""
    binary = find_jaeger()
    if binary is None:
        raise embedded.EmbeddedError(
            f"jaeger not found at {build_path()}: build it once with {BUILD_COMMAND} (needs Go,"
            " about 8 minutes on 2 cores), or set FEDPLANE_JAEGER to a jaeger v2 binary"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    otlp_port, query_port, query_grpc_port = (embedded.free_port(host) for _ in range(3))
    config_path = data_dir / "jaeger.yaml"
    config_path.write_text(yaml.safe_dump(config(host, otlp_port, query_port, query_grpc_port, max_traces)))
    log_path = data_dir / "jaeger.log"
    # Its Go SDK reads OTEL_* (where to send its own traces): none of this process's settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process = embedded.spawn_logged([binary, "--config", str(config_path)], log_path, env)
    jaeger = Jaeger(
        embedded.ServerProcess("jaeger", process, host, query_port, data_dir, log_path),
        otlp_port,
        query_grpc_port,
    )
    deadline = time.monotonic() + timeout
    try:
        for port in (otlp_port, query_port):
            embedded.wait_listening(jaeger.server, port, deadline)
    except BaseException:
        jaeger.stop()
        raise
    return jaeger
