"""Tracing of the hub's gRPC calls: the upstream interceptors for unary calls, this module's own
for the watch streams (see _ServerTracing for why)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from fedplane.runtime import telemetry

# Server-streaming methods traced by _ServerTracing rather than by the upstream interceptors.
_OWN_STREAMS = frozenset({"WatchJobs"})


def _method_name(method: str | bytes) -> str:
    # grpc.aio gives the client's method as bytes (grpc/grpc#31092).
    text = method.decode() if isinstance(method, bytes) else method
    return text.rpartition("/")[2]


def _untraced_streams() -> Any:
    """The upstream interceptors leave the watch streams to this module's own."""
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.method_name(*_OWN_STREAMS))


class _StreamContext(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Puts the caller's trace context in a watch's metadata, so the server's span of the watch
    joins the caller's trace. No client span: one per watch would stay open as long as it."""

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details = client_call_details
        if _method_name(details.method) in _OWN_STREAMS:
            carrier = telemetry.inject()
            if carrier:
                metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
                for key, value in carrier.items():
                    metadata.add(key, value)
                details = grpc.aio.ClientCallDetails(
                    details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
                )
        return await continuation(details, request)


def client_interceptors(tracer_provider: TracerProvider | None = None) -> list[Any]:
    """Interceptors that start a client span and put its context in the call's metadata.

    `tracer_provider`: where the spans go (default: the process's, see configure)."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    upstream = aio_client_interceptors(tracer_provider=tracer_provider, filter_=_untraced_streams())  # type: ignore[no-untyped-call]
    return [*upstream, _StreamContext()]


class _ServerTracing(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The upstream interceptor for unary calls, and a span of this module's own per watch.

    The upstream aio stream interceptor keeps its span current across the stream's yields; a
    watch the client closes early is then finalized in another context, and opentelemetry logs
    "Failed to detach context" with a traceback (opentelemetry-python-contrib#2357). Here the
    span is current only while the servicer makes its next message, never across a yield, and
    ends when the stream does, however it ends: with its status code and the messages it sent.
    """

    def __init__(self, upstream: grpc.aio.ServerInterceptor) -> None:
        self._upstream = upstream

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        if _method_name(method) not in _OWN_STREAMS:
            return await self._upstream.intercept_service(continuation, handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or not handler.response_streaming:
            return handler
        return grpc.unary_stream_rpc_method_handler(
            _traced_stream(handler.unary_stream, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _traced_stream(
    behavior: Callable[[Any, Any], Any], method: str
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    service, _, name = method.lstrip("/").rpartition("/")

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        carrier = {str(k): v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        span = telemetry.tracer().start_span(
            method,
            context=telemetry.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        code = grpc.StatusCode.OK
        sent = 0
        result = behavior(request, context)
        try:
            if inspect.isasyncgen(result):
                while True:
                    with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                        try:
                            message = await anext(result)
                        except StopAsyncIteration:
                            break
                    sent += 1
                    yield message
            elif inspect.isawaitable(result):  # a servicer that writes with context.write
                with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                    await result
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED  # the client went away (a watch closed early)
            raise
        except grpc.aio.AbortError:
            code = _status_code(context.code())
            raise
        except Exception as exc:
            code = grpc.StatusCode.UNKNOWN
            span.record_exception(exc)
            raise
        finally:
            if inspect.isasyncgen(result):
                await result.aclose()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.set_attribute("fedplane.watch.messages", sent)
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                span.set_status(
                    trace.Status(trace.StatusCode.ERROR, f"{code.name}: {context.details() or ''}")
                )
            span.end()

    return stream


def _status_code(code: Any) -> grpc.StatusCode:
    """The status an aborted call ends with (grpc.aio keeps it as the enum, or as its number)."""
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


def server_interceptor() -> Any:
    """Server interceptor that continues the caller's trace from the call's metadata."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return _ServerTracing(aio_server_interceptor(filter_=_untraced_streams()))  # type: ignore[no-untyped-call]
