"""Mutual TLS between an orchestrator and its run's agents, and between the agents of a gang.

Each run's cluster has its own certificate authority (made by the orchestrator, which keeps
no key of it once the certificates are signed). Its agents hold one node certificate, named
`NODE_NAME` and good for serving and for calling a peer; the orchestrator holds a client
certificate named `ORCHESTRATOR_NAME`. An agent serving with TLS requires a client
certificate of its run's authority on every call; a plaintext client, or one whose
certificate another authority signed, fails the handshake and reaches no method. Who the
caller is then decides what it may call (`PeerRoles`): the orchestrator everything (with
the agent token, as before), another node of the run only the calls a gang member's grant
opens (Exec).

Nodes are addressed by whatever address the cloud gave them, so a client checks the agent's
certificate against `NODE_NAME`, not the address it dialled.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "JOIN_NAME",
    "NODE_NAME",
    "ORCHESTRATOR_NAME",
    "ClientTLS",
    "PeerRoles",
    "ServerTLS",
    "TLSError",
    "secure_channel",
]

NODE_NAME = "squall-agent"  # the node certificate's DNS name and common name
ORCHESTRATOR_NAME = "squall-orchestrator"  # the orchestrator's client certificate's
JOIN_NAME = "squall-join"  # the orchestrator's join service's certificate's DNS name

_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class TLSError(Exception):
    """TLS material that cannot be used; says which and why."""


def _pem(text: bytes, what: str, marker: bytes) -> bytes:
    if marker not in text:
        raise TLSError(f"{what} is not PEM ({marker.decode()} not found)")
    return text


@dataclass(frozen=True, slots=True, repr=False)
class ClientTLS:
    """What a caller presents and trusts: the run's CA, its own certificate and key (PEM)."""

    ca: bytes
    certificate: bytes
    key: bytes

    def __repr__(self) -> str:  # never the key
        return "ClientTLS(...)"

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.certificate
        )


@dataclass(frozen=True, slots=True, repr=False)
class ServerTLS:
    """What an agent serves with: its node certificate and key, and the CA its callers'
    certificates must come from (the same run CA). The node certificate doubles as the
    client certificate an agent shows another node's agent."""

    certificate: bytes
    key: bytes
    ca: bytes

    def __repr__(self) -> str:  # never the key
        return "ServerTLS(...)"

    @classmethod
    def from_files(cls, certificate: Path, key: Path, ca: Path) -> ServerTLS:
        def read(path: Path, what: str, marker: bytes) -> bytes:
            try:
                return _pem(path.read_bytes(), f"{what} {path}", marker)
            except OSError as exc:
                raise TLSError(f"cannot read the {what} {path}: {exc.strerror}") from None

        return cls(
            certificate=read(certificate, "certificate", b"-----BEGIN CERTIFICATE-----"),
            key=read(key, "private key", b"PRIVATE KEY-----"),
            ca=read(ca, "CA certificate", b"-----BEGIN CERTIFICATE-----"),
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.certificate)], root_certificates=self.ca, require_client_auth=True
        )

    def as_client(self) -> ClientTLS:
        """This node's material for calling a peer agent of its run."""
        return ClientTLS(ca=self.ca, certificate=self.certificate, key=self.key)


def secure_channel(address: str, tls: ClientTLS) -> grpc.Channel:
    """A TLS channel to the agent at `address` that checks it holds the run's node
    certificate (whatever address it is reached at)."""
    return grpc.secure_channel(
        address,
        tls.credentials(),
        options=(("grpc.ssl_target_name_override", NODE_NAME),),
    )


def _common_names(context: grpc.ServicerContext) -> list[str]:
    names = context.auth_context().get("x509_common_name", [])
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


class PeerRoles(grpc.ServerInterceptor):  # type: ignore[misc]
    """On a TLS server: the orchestrator's certificate may call every method; a node's may
    call only `node_methods` (full method names); any other caller is refused with
    PERMISSION_DENIED. (The handshake has already refused a certificate of another CA.)"""

    def __init__(self, node_methods: Collection[str]) -> None:
        self._node_methods = frozenset(node_methods)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        allowed = {ORCHESTRATOR_NAME} | (
            {NODE_NAME} if details.method in self._node_methods else set()
        )
        attribute, make = _KINDS[(handler.request_streaming, handler.response_streaming)]
        behaviour = getattr(handler, attribute)

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            names = _common_names(context)
            if not allowed.intersection(names):
                who = ", ".join(names) or "no certificate name"
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the caller's certificate ({who}) may not call {details.method}",
                )
            return behaviour(request, context)

        return make(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
