"""Connect to an agent: a channel whose every call carries the agent token."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import grpc

from api.substrate.v1 import agent_pb2_grpc as rpc

__all__ = ["connect"]


class _ClientCallDetails(
    namedtuple(
        "_ClientCallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


class _Token(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _add(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return _ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._add(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._add(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._add(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._add(details), requests)


def connect(address: str, token: str) -> tuple[Any, rpc.AgentStub]:
    """A channel to the agent at `address` and a stub whose calls carry `token`."""
    channel = grpc.intercept_channel(grpc.insecure_channel(address), _Token(token))
    return channel, rpc.AgentStub(channel)  # type: ignore[no-untyped-call]
