"""Readiness probes (`orchestrator/probes.py`) against real servers on loopback: each action
and the fields of the Fuzzfile that shape it (port by number or name, path, scheme,
headers, gRPC service, timeout). `exec` probes and the timings (initial delay, period,
success threshold) are shown by a whole run in test_fidelity_runs.py."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from orchestrator.fuzzfile import load_text
from orchestrator.fuzzfile.model import Probe
from orchestrator.probes import check
from tests.orchestrator.servers import FileServer


def _probe(spec: str) -> Probe:
    """The probe of a service whose readiness-probe is `spec`, as the engine gets it."""
    wf = load_text(
        "version: v4\nservices:\n  s:\n    image: {uri: docker://busybox:1.36}\n"
        "    persist: true\n    network: {ports: [{name: web, port: 1}]}\n"
        f"    readiness-probe: {spec}\n"
    ).unwrap()
    probe = wf.services["s"].readiness_probe
    assert probe is not None
    return probe


def _no_exec(command: list[str], timeout: float) -> int:
    raise AssertionError("not an exec probe")


@pytest.fixture
def web() -> Iterator[tuple[int, list[tuple[str, str | None]]]]:
    """An HTTP server on loopback: 200 on /ok, 503 elsewhere; records (path, X-Probe)."""
    seen: list[tuple[str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("X-Probe")))
            self.send_response(200 if self.path == "/ok" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


def test_http_get_path_port_name_and_headers(web: tuple[int, list]) -> None:
    port, seen = web
    ok = _probe("{http-get: {path: /ok, port: web, http-headers: [{name: X-Probe, value: yes}]}}")
    assert check(ok, "127.0.0.1", {"web": port}, _no_exec) == (True, "HTTP 200")
    bad = _probe(f"{{http-get: {{path: /starting, port: {port}}}}}")
    assert check(bad, "127.0.0.1", {}, _no_exec) == (False, "HTTP 503")
    assert seen == [("/ok", "yes"), ("/starting", None)]


def test_http_get_https_scheme(tmp_path: Path) -> None:
    server = FileServer(tmp_path, {"ok": b"fine"})
    try:
        port = int(server.url.rsplit(":", 1)[1])
        https = _probe(f"{{http-get: {{path: /ok, port: {port}, scheme: HTTPS}}}}")
        assert check(https, "127.0.0.1", {}, _no_exec) == (True, "HTTP 200")
        plain = _probe(f"{{http-get: {{path: /ok, port: {port}, scheme: HTTP}}}}")
        assert not check(plain, "127.0.0.1", {}, _no_exec)[0]  # HTTP spoken to a TLS port
    finally:
        server.stop()


def test_tcp_socket_open_and_closed_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert check(_probe("{tcp-socket: {port: web}}"), "127.0.0.1", {"web": port}, _no_exec)[0]
    ok, why = check(_probe(f"{{tcp-socket: {{port: {port}}}}}"), "127.0.0.1", {}, _no_exec)
    assert not ok
    assert "refused" in why.lower()


def test_timeout_seconds_bounds_a_probe_that_gets_no_answer() -> None:
    with socket.socket() as listener:  # accepts (the backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = _probe(f"{{http-get: {{port: {port}}}, timeout-seconds: 1}}")
        started = time.monotonic()
        ok, _ = check(probe, "127.0.0.1", {}, _no_exec)
        assert not ok
        assert time.monotonic() - started < 5


def test_grpc_health_check_with_its_service_name() -> None:
    """The standard grpc.health.v1 check: SERVING for the named service only."""
    asked: list[bytes] = []

    def health(request: bytes, context: grpc.ServicerContext) -> bytes:
        asked.append(request)
        return b"\x08\x01" if request == b"\x0a\x03api" else b"\x08\x02"  # SERVING, NOT_SERVING

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(health)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        api = _probe(f"{{grpc: {{port: {port}, service: api}}}}")
        assert check(api, "127.0.0.1", {}, _no_exec) == (True, "SERVING")
        other = _probe(f"{{grpc: {{port: {port}}}}}")
        assert check(other, "127.0.0.1", {}, _no_exec) == (False, "status 2")
        assert asked == [b"\x0a\x03api", b""]
    finally:
        server.stop(None)


def test_a_path_cannot_turn_the_probe_to_another_host(web: tuple[int, list]) -> None:
    """Validation refuses such a path (tests/fuzzfile/broken/96-*); a probe that got one
    anyway still connects only to the service, never to the host the path names."""
    port, seen = web
    sneaky = Probe(action="http-get", port=port, path=f"@127.0.0.1:{port}/ok")
    ok, why = check(sneaky, "192.0.2.1", {}, _no_exec)  # 192.0.2.1: TEST-NET, never reached
    assert not ok
    assert "not a path of the service" in why
    assert seen == []
