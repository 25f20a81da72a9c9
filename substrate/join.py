"""A booting node joins its run: it makes its own key, sends its run's join token and a
certificate request to the orchestrator's join service (api/squall/v1/join.proto), checked
against the join CA its boot data carries, and gets back the node certificate it serves with.

The key never leaves the node: it is written, mode 0600, next to the certificate and the
run's CA, where `--tls-key`, `--tls-cert` and `--tls-ca` point. The orchestrator may still be
making the rest of the cluster, or be briefly away: the node tries again until its deadline.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from api.squall.v1 import join_pb2, join_pb2_grpc

from .tls import JOIN_NAME, NODE_NAME

__all__ = ["JoinError", "JoinRequest", "join", "say"]

log = logging.getLogger("substrate")
RETRY_S = 3.0
CALL_TIMEOUT_S = 20.0


class JoinError(Exception):
    """The node could not join; says why (the orchestrator's refusal, or the last error)."""


@dataclass(frozen=True, slots=True, repr=False)
class JoinRequest:
    orchestrator: str  # host:port of the join service
    join_ca: bytes  # PEM: who signs the join service's certificate
    run_id: str
    token: str
    group: str
    agent_port: int
    address: str = ""  # "": the address this node's default route leaves from
    hostname: str = ""  # "": this machine's hostname
    index: int | None = None  # its place in its group, when its boot data names one

    def __repr__(self) -> str:  # never the token
        return f"JoinRequest({self.run_id}, {self.group}, {self.orchestrator})"


def _channel(request: JoinRequest) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=request.join_ca)
    return grpc.secure_channel(
        request.orchestrator,
        credentials,
        options=(("grpc.ssl_target_name_override", JOIN_NAME),),
    )


def own_address(towards: str) -> str:
    """The address this node's packets to `towards` (host:port) leave from: a connected UDP
    socket sends nothing and asks the kernel's routing."""
    host, _, port = towards.rpartition(":")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host.strip("[]"), int(port)))
        return str(probe.getsockname()[0])


def join(request: JoinRequest, tls_dir: Path, deadline_s: float) -> str:
    """Join the run; write node.key, node.pem and ca.pem into `tls_dir`; the node's name.
    JoinError when the orchestrator refuses (a wrong token, say) or does not answer in time."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_NAME)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    until = time.monotonic() + deadline_s
    last = "no answer"
    while True:
        try:
            address = request.address or own_address(request.orchestrator)
            with _channel(request) as channel:
                reply = join_pb2_grpc.NodeJoinStub(channel).Join(  # type: ignore[no-untyped-call]
                    join_pb2.JoinRequest(
                        run_id=request.run_id,
                        token=request.token,
                        group=request.group,
                        hostname=request.hostname or socket.gethostname(),
                        address=address,
                        agent_port=request.agent_port,
                        csr=csr,
                        index=request.index,
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            break
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
                raise JoinError(
                    f"the orchestrator refused to join this node: {exc.details()}"
                ) from None
            last = f"{code.name}: {exc.details()}"
        except OSError as exc:  # no route yet
            last = str(exc)
        if time.monotonic() >= until:
            raise JoinError(
                f"could not join run {request.run_id} at {request.orchestrator} in "
                f"{deadline_s:.0f} s: {last}"
            )
        log.warning("joining run %s at %s: %s; again", request.run_id, request.orchestrator, last)
        time.sleep(RETRY_S)
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for name, data in (
        ("node.key", pem_key),
        ("node.pem", reply.certificate),
        ("ca.pem", reply.ca),
    ):
        tmp = tls_dir / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        tmp.rename(tls_dir / name)
    log.info("joined run %s as %s", request.run_id, reply.node)
    return str(reply.node)


def say(request: JoinRequest, text: str) -> None:
    """Tell the orchestrator one line of this node's boot (best effort: never raises)."""
    try:
        with _channel(request) as channel:
            join_pb2_grpc.NodeJoinStub(channel).Say(  # type: ignore[no-untyped-call]
                join_pb2.BootLine(
                    run_id=request.run_id,
                    token=request.token,
                    hostname=request.hostname or socket.gethostname(),
                    text=text[:2000],
                ),
                timeout=10,
            )
    except (grpc.RpcError, OSError, ValueError) as exc:
        log.warning("could not tell the orchestrator %r: %s", text, exc)
