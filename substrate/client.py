"""Connect to an agent: a channel (mutual TLS where the agent serves it) whose every call
carries the agent token; the port-forward stream's data without parsing its messages."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterator
from typing import Any

import grpc

from api.substrate.v1 import agent_pb2 as pb
from api.substrate.v1 import agent_pb2_grpc as rpc

from .heap import keep_freed_memory
from .tls import ClientTLS, secure_channel
from .wire import field_bytes

__all__ = ["ClientTLS", "connect", "keep_freed_memory", "port_forward"]

_PORT_FORWARD = "/squall.substrate.v1.Agent/PortForward"


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


def connect(address: str, token: str, tls: ClientTLS | None = None) -> tuple[Any, rpc.AgentStub]:
    """A channel to the agent at `address` and a stub whose calls carry `token`; over
    mutual TLS with `tls` (the run's CA and this caller's certificate), else plaintext."""
    raw = grpc.insecure_channel(address) if tls is None else secure_channel(address, tls)
    channel = grpc.intercept_channel(raw, _Token(token))
    return channel, rpc.AgentStub(channel)  # type: ignore[no-untyped-call]


def _port_forward_data(message: bytes) -> memoryview:
    data = field_bytes(message, pb.PortForwardOutput.DATA_FIELD_NUMBER)
    if data is None:  # not the agent's usual form: let protobuf read it
        return memoryview(pb.PortForwardOutput.FromString(message).data)
    return data


def port_forward(channel: Any, requests: Iterator[pb.PortForwardInput]) -> Any:
    """The agent's PortForward call on `channel` (from `connect`): an iterator of the data of
    each output message, as a view into the message as it arrived (no message object, no
    copy), that is also the call (`cancel()` ends it).

    The call raises `grpc.RpcError` as the stub's does. A process that receives much through
    it should call `keep_freed_memory()` once."""
    call = channel.stream_stream(
        _PORT_FORWARD,
        request_serializer=pb.PortForwardInput.SerializeToString,
        response_deserializer=_port_forward_data,
    )
    return call(requests)
