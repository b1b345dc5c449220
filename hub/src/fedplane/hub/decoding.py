"""Request decoding for the gRPC services: every request is decoded without ever failing the
call, and held to the input limits (`validation.request_problems`) before any servicer code runs.

gRPC decodes a request with its method's deserializer before any servicer code, and an
exception there (bytes that are no protobuf, a nesting too deep for the parser) reaches the
client as UNKNOWN, with a stack trace in the hub's log. Here the deserializer never raises: a
request that does not parse becomes an `Undecodable`, which the method refuses with
INVALID_ARGUMENT, as it refuses a request over the limits. Services are registered through
`register`, so that this holds for every method without each servicer having to remember it.
Interceptors (telemetry, authentication) keep the deserializer they find and run before the
wrapped method, so a caller learns that a request is malformed only once it is let in.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from fedplane.hub.validation import refusal, request_problems

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes did not parse, and why."""

    reason: str


def register(add: Callable[[Any, Any], None], servicer: object, server: grpc.aio.Server) -> None:
    """`add(servicer, server)` with a generated `add_*Servicer_to_server`, every method checked."""
    add(servicer, _CheckingServer(server))


def checked(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that never raises, refusing what does not parse or exceeds
    the limits. A method that streams requests (none in this API) is left as it is: its
    messages are read one by one while the servicer iterates, where no status can be set first."""
    if handler.request_streaming:
        return handler
    parse = handler.request_deserializer

    def decode(data: bytes) -> Any:
        try:
            return parse(data) if parse is not None else data
        except Exception as exc:  # DecodeError, RecursionError: whatever the bytes make it raise
            return Undecodable(f"request: not a valid protobuf message for {method} ({exc})")

    if handler.response_streaming:
        stream = handler.unary_stream

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            await _admit(request, context)
            result = stream(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            elif inspect.isawaitable(result):
                await result  # a servicer that writes with context.write

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=decode, response_serializer=handler.response_serializer
        )
    unary = handler.unary_unary

    async def unary_unary(request: Any, context: Context) -> Any:
        await _admit(request, context)
        result = unary(request, context)
        return await result if inspect.isawaitable(result) else result

    return grpc.unary_unary_rpc_method_handler(
        unary_unary, request_deserializer=decode, response_serializer=handler.response_serializer
    )


async def _admit(request: Any, context: Context) -> None:
    """Abort the call with INVALID_ARGUMENT if the request did not parse or exceeds the limits."""
    if isinstance(request, Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
    problems = request_problems(request)
    if problems:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(refusal(problems)))


class _CheckingServer:
    """The server as a generated `add_*Servicer_to_server` sees it: it registers checked handlers."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_CheckingGeneric(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service, {name: checked(h, f"/{service}/{name}") for name, h in handlers.items()}
        )


class _CheckingGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose methods are checked (each wrapped once, on first use; a method it
    does not serve is not remembered, so that callers naming random methods cost no memory)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._checked: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        known = self._checked.get(method)
        if known is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            known = self._checked[method] = checked(handler, method)
        return known
