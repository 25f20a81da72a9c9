"""Readiness probes of services: `exec` (through the agent), `tcp-socket`, `http-get` and
`grpc` (the standard grpc.health.v1 check), as Kubernetes defines them.

`check` runs one probe once and says whether it passed and, if not, why. The engine runs it
every `period` seconds after `initial-delay`, and calls a service ready after
`success-threshold` passes in a row. Failures before that are reported, never fatal: a
service that never becomes ready keeps its dependents waiting until the run is cancelled or
the service's own time limit ends it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping

import grpc
import httpx

from .errors import rpc_gist
from .fuzzfile.model import Probe

__all__ = ["check"]

ExecFn = Callable[[list[str], float], int]  # command, timeout -> exit code

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_SERVING = 1


def _port(probe: Probe, ports: Mapping[str, int]) -> int:
    if isinstance(probe.port, int):
        return probe.port
    if probe.port is not None and probe.port.isdigit():
        return int(probe.port)
    if probe.port is not None and probe.port in ports:
        return ports[probe.port]
    raise ValueError(f"the probe names port {probe.port!r}, which the service does not declare")


def _health_request(service: str) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service} in protobuf wire format."""
    data = service.encode()
    return (b"\x0a" + bytes([len(data)]) + data) if data else b""


def _health_status(reply: bytes) -> int:
    """The `status` field of a grpc.health.v1.HealthCheckResponse."""
    if len(reply) >= 2 and reply[0] == 0x08:
        return reply[1]
    return 0  # UNKNOWN


def check(probe: Probe, host: str, ports: Mapping[str, int], exec_fn: ExecFn) -> tuple[bool, str]:
    """Run `probe` once against a service on `host`."""
    timeout = float(probe.timeout)
    try:
        if probe.action == "exec":
            code = exec_fn(list(probe.command), timeout)
            return code == 0, f"exit status {code}"
        port = _port(probe, ports)
        target = host
        if probe.action == "tcp-socket":
            with socket.create_connection((target, port), timeout=timeout):
                return True, "connected"
        if probe.action == "http-get":
            scheme = (probe.scheme or "http").lower()
            url = httpx.URL(f"{scheme}://{target}:{port}{probe.path or '/'}")
            if url.host != target.strip("[]") or url.port != port:  # the path stays a path
                return False, f"the probe's path {probe.path!r} is not a path of the service"
            reply = httpx.get(url, headers=dict(probe.headers), timeout=timeout, verify=False)
            return 200 <= reply.status_code < 400, f"HTTP {reply.status_code}"
        if probe.action == "grpc":
            with grpc.insecure_channel(f"{target}:{port}") as channel:
                call = channel.unary_unary(
                    _HEALTH_CHECK,
                    request_serializer=lambda b: b,
                    response_deserializer=lambda b: b,
                )
                status = _health_status(
                    call(_health_request(probe.grpc_service or ""), timeout=timeout)
                )
            return status == _SERVING, "SERVING" if status == _SERVING else f"status {status}"
    except grpc.RpcError as exc:
        return False, rpc_gist(exc)  # not the call object's repr
    except (OSError, httpx.HTTPError, ValueError) as exc:
        return False, str(exc) or type(exc).__name__
    return False, f"unknown probe action {probe.action!r}"
