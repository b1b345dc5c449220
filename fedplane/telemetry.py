"""OpenTelemetry set-up and trace-context propagation across gRPC and NATS.

One trace follows a job: the client's submit (gRPC metadata), the hub's placement and
dispatch (the submit's context is stored with the job, since placement happens later in
another task), the NATS command (message headers), the agent's handling and the status
update back (headers again).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

TRACER_NAME = "fedplane"
_configured = False


def configure(
    service_name: str,
    exporter: str | None = None,
    endpoint: str | None = None,
    extra_exporter: SpanExporter | None = None,
) -> None:
    """Install the process's tracer provider once.

    exporter: "otlp" (endpoint or OTEL_EXPORTER_OTLP_ENDPOINT), "console", or "none"
    (default from FEDPLANE_TRACES_EXPORTER, else "none"). Later calls are no-ops, so in-process
    tests and the local federation share one provider.
    """
    global _configured
    if _configured:
        return
    _configured = True
    exporter = exporter or os.environ.get("FEDPLANE_TRACES_EXPORTER", "none")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter != "none":
        raise ValueError(f"unknown traces exporter {exporter!r} (use otlp, console or none)")
    if extra_exporter is not None:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider.add_span_processor(SimpleSpanProcessor(extra_exporter))
    trace.set_tracer_provider(provider)


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush()
        provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The current trace context as W3C headers (traceparent, tracestate)."""
    out: dict[str, str] = dict(carrier or {})
    propagate.inject(out)
    return out


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(carrier or {}))


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def trace_id_of(carrier: Mapping[str, str]) -> str:
    """The trace id in a stored W3C context, for log lines written outside any span."""
    ctx = trace.get_current_span(extract(carrier)).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def _untraced_streams() -> Any:
    """Leave long-lived watch streams untraced.

    One span per watch says nothing useful. The aio stream interceptors also log "Failed to
    detach context" whenever a stream is closed early (opentelemetry-python-contrib#2357).
    """
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.method_name("WatchJobs"))


def grpc_client_interceptors() -> list[Any]:
    """Interceptors that start a client span and put its context in the call's metadata."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(filter_=_untraced_streams()))  # type: ignore[no-untyped-call]


def grpc_server_interceptor() -> Any:
    """Server interceptor that continues the caller's trace from the call's metadata."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return aio_server_interceptor(filter_=_untraced_streams())  # type: ignore[no-untyped-call]
