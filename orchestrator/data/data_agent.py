"""The agent that moves a run's bytes: one node of its cluster (the first: on a cluster whose
nodes share an NFS export, the node that exports it), called over its mutual-TLS API.

The orchestrator sends requests and, for each transfer alone, the credentials it needs; the
bytes go between the node and the source or destination. Only `file:///` egress, which lands
on the orchestrator's own machine, streams back through the agent (`read_file`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc

from api.substrate.v1 import agent_pb2 as pb
from substrate.client import connect

from ..errors import InvalidInput
from ..provision import AgentEndpoint
from .transfers import TransferError, TransferPolicy

__all__ = ["DataAgent"]

Progress = Callable[[int, int | None], None]  # bytes done, total when known
# a call that moves no bytes (making a volume) answers within this; transfers have their own
# time limit (the workflow's), enforced by the agent
SHORT_CALL = 60.0


def _details(exc: grpc.RpcError) -> str:
    return str(exc.details() or exc.code().name)


class DataAgent:
    """Volumes, ingress and egress on the node `endpoint`."""

    def __init__(self, endpoint: AgentEndpoint) -> None:
        self.endpoint = endpoint
        self.channel, self.stub = connect(endpoint.address, endpoint.token, endpoint.tls)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DataAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def make_volume(self, name: str, path: str, size: int | None) -> None:
        """Make the volume's folder on the node; InvalidInput when its storage lacks the
        room the volume asks for (the run fails at STAGING, before any job)."""
        try:
            self.stub.MakeVolume(
                pb.MakeVolumeRequest(path=path, size_bytes=size or 0), timeout=SHORT_CALL
            )
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:  # "volume PATH asks for ..."
                why = _details(exc).removeprefix(f"volume {path} ")
                raise InvalidInput(f"volume {name!r} (its `size`) {why}") from None
            raise TransferError(
                f"volume {name!r}: the node {self.endpoint.name} cannot make it: {_details(exc)}"
            ) from None

    def ingress(
        self,
        source: str,
        volume: str,
        rel: str,
        *,
        content: bytes = b"",
        credentials: Mapping[str, str] | None = None,
        policy: TransferPolicy,
        ca_pem: str = "",
        private_volume: bool = False,
        progress: Progress,
    ) -> bool:
        """Have the node fetch `source` into `rel` of the volume; True when it came from
        the node's ingress cache. `private_volume`: no job can write the volume before this
        returns (see TransferRequest)."""
        return self._transfer(
            pb.TransferRequest(
                direction=pb.DIRECTION_INGRESS,
                volume=volume,
                path=rel,
                uri=source,
                content=content,
                credentials=dict(credentials or {}),
                timeout_seconds=policy.timeout or 0.0,
                attempts=policy.attempts,
                ca_pem=ca_pem,
                private_volume=private_volume,
            ),
            source,
            progress,
        )

    def egress(
        self,
        volume: str,
        rel: str,
        destination: str,
        *,
        credentials: Mapping[str, str] | None = None,
        policy: TransferPolicy,
        progress: Progress,
    ) -> None:
        """Have the node push `rel` of the volume to `destination` (s3://)."""
        self._transfer(
            pb.TransferRequest(
                direction=pb.DIRECTION_EGRESS,
                volume=volume,
                path=rel,
                uri=destination,
                credentials=dict(credentials or {}),
                timeout_seconds=policy.timeout or 0.0,
                attempts=policy.attempts,
            ),
            destination,
            progress,
        )

    def _transfer(self, request: pb.TransferRequest, what: str, progress: Progress) -> bool:
        cached = False
        try:
            for message in self.stub.Transfer(request):
                total = message.bytes_total if message.bytes_total >= 0 else None
                progress(message.bytes_done, total)
                if message.done:
                    cached = message.cached
        except grpc.RpcError as exc:
            details = _details(exc)
            # the agent's message names the source and the cause; say where it ran
            if not details.startswith(what):
                details = f"{what}: {details}"
            raise TransferError(f"{details} (on {self.endpoint.name})") from None
        return cached

    def read_file(self, volume: str, rel: str, into: Path, progress: Progress) -> None:
        """Copy `rel` of the volume from the node into the new file `into` (which must not
        exist: it is made here, 0600)."""
        fd = os.open(into, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            try:
                size, done = None, 0
                for chunk in self.stub.ReadFile(pb.ReadFileRequest(volume=volume, path=rel)):
                    if size is None:
                        size = chunk.size
                    out.write(chunk.data)
                    done += len(chunk.data)
                    progress(done, size)
            except grpc.RpcError as exc:
                raise TransferError(
                    f"file://{rel}: cannot read it from {self.endpoint.name}: {_details(exc)}"
                ) from None
        if size is not None and done != size:
            raise TransferError(f"file://{rel}: got {done} bytes of {size}")
