"""API-key check for gRPC calls: ``authorization: Bearer KEY`` or ``x-api-key: KEY`` metadata.

Health checks stay open so that load balancers and Kubernetes probes need no secret. A refused call gets
UNAUTHENTICATED before its handler runs, so it never reaches the engine.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

import grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def key_matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison, so timing does not leak how much of a guess was right."""
    return presented is not None and hmac.compare_digest(expected.encode(), presented.encode())


def key_from_headers(pairs: Sequence[tuple[str, str]]) -> str | None:
    """The key in ``authorization: Bearer KEY`` or ``x-api-key: KEY``, if any."""
    for name, value in pairs:
        name = name.lower()
        if name == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
        if name == "x-api-key":
            return value.strip()
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right key with UNAUTHENTICATED (health checks exempt)."""

    def __init__(self, api_key: str, exempt_prefixes: Sequence[str] = EXEMPT_PREFIXES):
        self._key = api_key
        self._exempt = tuple(exempt_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._exempt):
            return handler
        if key_matches(self._key, key_from_headers(details.invocation_metadata or ())):
            return handler
        return _rejecting(handler)


def _rejecting(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only aborts with UNAUTHENTICATED."""

    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")
        yield  # pragma: no cover - makes this an async generator

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        deny_stream if handler.response_streaming else deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
