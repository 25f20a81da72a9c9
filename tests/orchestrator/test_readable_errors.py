"""Failed gRPC calls (to an agent, or a service's health check) reach people as one line:
the status and what it said, never the call object's repr. Real gRPC clients on loopback,
calling a port where nothing listens."""

from __future__ import annotations

import grpc
import pytest

from api.substrate.v1 import agent_pb2 as pb
from orchestrator.errors import describe
from orchestrator.fuzzfile.model import Probe
from orchestrator.probes import check
from substrate.client import connect
from tests.substrate.registry import free_port


def failed_calls() -> list[grpc.RpcError]:
    """A unary call and a server-streaming one (the latter raises the `_MultiThreadedRendezvous`
    that a pull used to leave in a run's reason)."""
    channel, stub = connect(f"127.0.0.1:{free_port()}", "token")
    errors = []
    try:
        for call in (
            lambda: stub.Health(pb.HealthRequest(), timeout=5),
            lambda: list(stub.PullImage(pb.PullImageRequest(reference="docker://x/y"))),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            errors.append(info.value)
    finally:
        channel.close()
    return errors


def test_describe_says_a_failed_call_in_one_line() -> None:
    unary, streaming = failed_calls()
    assert "Rendezvous" in type(streaming).__name__  # what it used to show
    for exc in (unary, streaming):
        said = describe(exc)
        assert said.startswith("UNAVAILABLE: ")
        assert "\n" not in said
        assert "<" not in said
        assert "Rendezvous" not in said
        assert "RpcError" not in said


def test_a_failed_grpc_probe_says_why_in_one_line() -> None:
    probe = Probe(action="grpc", port=free_port(), timeout=2)
    ok, why = check(probe, "127.0.0.1", {}, lambda command, timeout: 0)
    assert not ok
    assert why.startswith("UNAVAILABLE: ")
    assert "<" not in why
    assert "\n" not in why
