"""Bearer-token authentication for the control API: every call, streams included, must carry
`authorization: Bearer <token>`; the comparison is constant-time."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["TokenAuth"]

_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class TokenAuth(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        if len(token) < 16:
            raise ValueError("the server token must be at least 16 characters")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        given = str(dict(details.invocation_metadata or ()).get("authorization", "")).encode()
        if handler is None or hmac.compare_digest(given, self._expected):
            return handler

        def deny(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        make = _KINDS[(handler.request_streaming, handler.response_streaming)]
        return make(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
