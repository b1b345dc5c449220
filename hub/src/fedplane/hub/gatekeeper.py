"""The gRPC server interceptor that admits calls: it authenticates each call once, refuses
what the caller's role allows nowhere, makes the caller the current principal for the
servicers (which check queues), and writes the call's audit line when it ends.

Health checks stay open (probes carry no credentials); everything else, reflection included,
needs an authenticated caller. Without authentication configured every caller is the
anonymous administrator, as before authentication existed, and mutating calls are still
audited.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeAlias

import grpc

from fedplane.hub import audit, authz, identity
from fedplane.hub.identity import Authenticator, Principal, Unauthenticated

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _code_name(context: Context) -> str:
    try:
        code = context.code()
    except Exception:  # pragma: no cover - depends on the grpc version
        code = None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "UNKNOWN" if code is None else str(code)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, authenticator: Authenticator | None) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or authz.METHODS.get(method) is authz.Permission.OPEN:
            return handler
        return self._wrap(handler, method)

    async def _admit(self, method: str, context: Context) -> Principal:
        """The caller, or the call is aborted (UNAUTHENTICATED or PERMISSION_DENIED) and audited."""
        if self.authenticator is None:
            principal = identity.ANONYMOUS
        else:
            try:
                principal = self.authenticator.authenticate(
                    context.invocation_metadata() or (), context.auth_context() or {}
                )
            except Unauthenticated as exc:
                audit.write(
                    who="",
                    authenticated_by="",
                    method=method,
                    decision="denied",
                    code="UNAUTHENTICATED",
                    reason=str(exc),
                    peer=context.peer(),
                )
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
                raise  # unreachable: abort raises
        denial = authz.method_denial(method, principal.access)
        if denial is not None:
            audit.write(
                who=principal.name,
                authenticated_by=principal.method,
                method=method,
                decision="denied",
                code="PERMISSION_DENIED",
                reason=denial,
                peer=context.peer(),
            )
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{principal.name}: {denial}")
        return principal

    @contextlib.contextmanager
    def _serving(self, principal: Principal, method: str, context: Context) -> Iterator[None]:
        token = identity.serving(principal)
        notes, notes_token = audit.begin()
        code = "OK"
        try:
            yield
        except BaseException:
            code = _code_name(context)
            raise
        finally:
            with contextlib.suppress(ValueError):  # a stream closed from another context
                identity.done(token)
                audit.end(notes_token)
            if notes.denied or method in authz.MUTATING:
                audit.write(
                    who=principal.name,
                    authenticated_by=principal.method,
                    method=method,
                    decision="denied" if notes.denied else "allowed",
                    code=code,
                    reason=notes.denied,
                    peer=context.peer(),
                    **notes.fields,
                )

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        admit, serving = self._admit, self._serving
        if handler.unary_unary:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                principal = await admit(method, context)
                with serving(principal, method, context):
                    return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            stream = handler.unary_stream

            async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                principal = await admit(method, context)
                with serving(principal, method, context):
                    async for item in stream(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            client_stream = handler.stream_unary

            async def stream_unary(requests: Any, context: Context) -> Any:
                principal = await admit(method, context)
                with serving(principal, method, context):
                    return await client_stream(requests, context)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        both = handler.stream_stream

        async def stream_stream(requests: Any, context: Context) -> AsyncIterator[Any]:
            principal = await admit(method, context)
            with serving(principal, method, context):
                async for item in both(requests, context):
                    yield item

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
