"""Bearer-token authentication for a gRPC server: every call, streams included, must carry
`authorization: Bearer <token>`, compared in constant time. The agent uses it (the control
API checks its users' tokens in `orchestrator.api.gate`)."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Collection
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
    """Refuses every call whose `authorization` metadata is not `Bearer <token>`, saying
    "missing or wrong <what>"."""

    def __init__(
        self,
        token: str,
        what: str = "token",
        *,
        grant_header: str = "",
        grant_methods: Collection[str] = (),
    ) -> None:
        """`grant_methods` (full method names) may be called with `grant_header` instead of
        the token: the method itself checks the grant (see `valid`)."""
        if not token:
            raise ValueError(f"no {what} given")
        self._expected = f"Bearer {token}".encode()
        self._refusal = f"missing or wrong {what}"
        self._grant_header = grant_header
        self._grant_methods = frozenset(grant_methods)

    def valid(self, metadata: Any) -> bool:
        """Whether `metadata` (a call's invocation metadata) carries the token."""
        given = str(dict(metadata or ()).get("authorization", "")).encode()
        return hmac.compare_digest(given, self._expected)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or self.valid(details.invocation_metadata):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if details.method in self._grant_methods and metadata.get(self._grant_header):
            return handler
        refusal = self._refusal

        def deny(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)

        make = _KINDS[(handler.request_streaming, handler.response_streaming)]
        return make(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
