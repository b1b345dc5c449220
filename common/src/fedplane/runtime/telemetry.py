"""OpenTelemetry set-up and trace-context propagation across gRPC and NATS.

One trace follows a job: the client's submit (gRPC metadata), the hub's placement and
dispatch (the submit's context is stored with the job, since placement happens later in
another task), the NATS command, the agent's handling and the status update back. On NATS each
command and status update carries its own context in the payload (a message batches many), and
the message's headers carry its first item's, for tools that read only headers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

TRACER_NAME = "fedplane"
# The span attributes naming a job and a cluster: a tracing backend finds a job's spans by them
# (in Jaeger's search: tag fedplane.job_id=<job id>).
JOB_ID = "fedplane.job_id"
CLUSTER = "fedplane.cluster"
_configured = False
# Whether per-job spans are made: only once configure() has somewhere to send them.
_recording = False
_tracer: trace.Tracer | None = None
# The trace and span ids of the job being handled when no span is made for it (see child_span).
_passthrough_ids: ContextVar[tuple[str, str]] = ContextVar("fedplane_trace_ids", default=("", ""))


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
    global _configured, _recording
    if _configured:
        return
    _configured = True
    exporter = exporter or os.environ.get("FEDPLANE_TRACES_EXPORTER", "none")
    _recording = exporter != "none" or extra_exporter is not None
    trace.set_tracer_provider(make_provider(service_name, exporter, endpoint, extra_exporter))


def make_provider(
    service_name: str,
    exporter: str = "none",
    endpoint: str | None = None,
    extra_exporter: SpanExporter | None = None,
) -> TracerProvider:
    """A tracer provider exporting as `configure` says, not installed: for a program (or a test)
    that traces its own calls beside a provider already in place."""
    # With nowhere to send spans, sample none: trace ids still propagate (and reach the logs),
    # but no span records attributes or events, which costs real CPU per job at high rates.
    sampler = ALWAYS_OFF if exporter == "none" and extra_exporter is None else None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=sampler)
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
    return provider


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush()
        provider.shutdown()


def tracer() -> trace.Tracer:
    # get_tracer() costs microseconds per call; the proxy it returns follows the provider set later.
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(TRACER_NAME)
    return _tracer


def recording() -> bool:
    return _recording


@contextlib.contextmanager
def child_span(
    name: str,
    parent: Mapping[str, str] | None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, str | int | float] | None = None,
) -> Iterator[dict[str, str]]:
    """A span continuing `parent` (W3C headers); yields the headers that continue it in turn.

    When spans go nowhere no span is made: the parent's headers pass through unchanged, so
    the trace id still reaches the next hop and this hop's log lines, at no cost per job.
    """
    if not _recording:
        token = _passthrough_ids.set(ids_of(parent or {}))
        try:
            yield dict(parent or {})
        finally:
            _passthrough_ids.reset(token)
        return
    with tracer().start_as_current_span(name, context=extract(parent), kind=kind, attributes=attributes):
        yield inject()


def inject(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The current trace context as W3C headers (traceparent, tracestate)."""
    out: dict[str, str] = dict(carrier or {})
    propagate.inject(out)
    return out


def inject_span(span: trace.Span) -> dict[str, str]:
    """The W3C headers that make `span` the parent on the other side."""
    out: dict[str, str] = {}
    propagate.inject(out, context=trace.set_span_in_context(span))
    return out


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(carrier or {}))


def current_ids() -> tuple[str, str]:
    """The trace and span ids of the current span (hex, as W3C writes them), else of the job
    being handled without a span (see child_span), else empty."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
    return _passthrough_ids.get()


def current_trace_id() -> str:
    return current_ids()[0]


def ids_of(carrier: Mapping[str, str]) -> tuple[str, str]:
    """The trace and span ids in a W3C context (traceparent "00-<trace id>-<span id>-<flags>"),
    if valid; empty otherwise."""
    parts = carrier.get("traceparent", "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1].strip("0") and len(parts[2]) == 16:
        return parts[1], parts[2]
    return "", ""


def trace_id_of(carrier: Mapping[str, str]) -> str:
    """The trace id in a W3C context, if valid: where to find the job's trace."""
    return ids_of(carrier)[0]


def log_ids(carrier: Mapping[str, str]) -> dict[str, str]:
    """`trace_id` and `span_id` for a log line about the work `carrier` continues (none if invalid)."""
    trace_id, span_id = ids_of(carrier)
    return {"trace_id": trace_id, "span_id": span_id} if trace_id else {}


def grpc_client_interceptors(tracer_provider: TracerProvider | None = None) -> list[Any]:
    """Interceptors that start a client span and put its context in the call's metadata.

    `tracer_provider`: where the spans go (default: the process's, see configure)."""
    from fedplane.runtime import grpctracing

    return grpctracing.client_interceptors(tracer_provider)


def grpc_server_interceptor() -> Any:
    """Server interceptor that continues the caller's trace from the call's metadata."""
    from fedplane.runtime import grpctracing

    return grpctracing.server_interceptor()
