"""What the access gate costs a control-plane call, next to a bare gRPC call on loopback.

Run: .venv/bin/python bench/control_calls.py [--calls N] [--tls]

One client, one call at a time, over 127.0.0.1 (with --tls: both servers use a self-signed
certificate made here with openssl), rows interleaved round by round so that a busy machine
slows every row alike:
  bare gRPC unary                an empty method of a generic handler: the floor
  squall WhoAmI                  the gate alone: token lookup (SHA-256, one SELECT) and
                                 the audit INSERT in one commit, the outcome UPDATE in another
  squall GetWorkflow             the gate with the run's owner looked up and the policy
                                 checked, then the run's summary read
  squall GetWorkflow, denied     the same call by a user the policy refuses (audited)
Prints the median and 90th percentile per call, and each row's cost above the floor.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.squall.v1 import control_pb2 as pb  # noqa: E402
from api.squall.v1 import control_pb2_grpc as rpc  # noqa: E402
from orchestrator import identity  # noqa: E402
from orchestrator.api import serve  # noqa: E402
from orchestrator.engine import Engine  # noqa: E402
from orchestrator.provision.local import LocalProvisioner  # noqa: E402
from orchestrator.store import AuditEntry, Store  # noqa: E402

ADMIN = "bench-admin-token-" + "b" * 20
QUICK = """\
version: v4
jobs:
  one:
    image: {uri: docker://busybox:1.36}
    command: [/bin/true]
"""


def _certificate(work: Path) -> tuple[bytes, bytes]:
    cert, key = work / "server.crt", work / "server.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert.read_bytes(), key.read_bytes()


def _bare_server(tls: tuple[bytes, bytes] | None) -> tuple[grpc.Server, int]:
    def empty(request: bytes, context: object) -> bytes:
        return b""

    handler = grpc.unary_unary_rpc_method_handler(empty)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Bare", {"Call": handler}),)
    )
    if tls:
        port = server.add_secure_port(
            "127.0.0.1:0", grpc.ssl_server_credentials([(tls[1], tls[0])])
        )
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _channel(port: int, tls: tuple[bytes, bytes] | None) -> grpc.Channel:
    if tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=tls[0])
        return grpc.secure_channel(f"127.0.0.1:{port}", credentials)
    return grpc.insecure_channel(f"127.0.0.1:{port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per row")
    parser.add_argument("--tls", action="store_true", help="both servers over TLS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tls = _certificate(work) if args.tls else None
        store = Store(f"sqlite:///{work / 'squall.db'}")
        engine = Engine(store, [LocalProvisioner(work / "site", nodes=lambda _: [])], data_dir=work)
        control, port, _ = serve(engine, "127.0.0.1:0", ADMIN, tls=tls, workers=8)
        bare, bare_port = _bare_server(tls)
        engine.submit("bench/run-1", QUICK, owner="alice")  # recorded, never started
        identity.add_user(store, "alice", ["chem"])
        identity.add_user(store, "bob", ["bio"])
        alice, _ = identity.issue_token(store, "alice")
        bob, _ = identity.issue_token(store, "bob")
        squall_channel, bare_channel = _channel(port, tls), _channel(bare_port, tls)
        stub = rpc.ControlStub(squall_channel)  # type: ignore[no-untyped-call]
        call_bare = bare_channel.unary_unary("/bench.Bare/Call")

        def as_(token: str) -> tuple[tuple[str, str], ...]:
            return (("authorization", f"Bearer {token}"),)

        def denied() -> None:
            try:
                stub.GetWorkflow(pb.GetWorkflowRequest(name="bench/run-1"), metadata=as_(bob))
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.PERMISSION_DENIED:
                    raise
            else:
                raise AssertionError("bob read alice's run")

        rows: dict[str, Callable[[], object]] = {
            "bare gRPC unary": lambda: call_bare(b""),
            "squall WhoAmI": lambda: stub.WhoAmI(pb.WhoAmIRequest(), metadata=as_(alice)),
            "squall GetWorkflow": lambda: stub.GetWorkflow(
                pb.GetWorkflowRequest(name="bench/run-1"), metadata=as_(alice)
            ),
            "squall GetWorkflow, denied": denied,
        }
        times: dict[str, list[float]] = {name: [] for name in rows}
        for call in rows.values():  # warm up: connections, caches
            for _ in range(20):
                call()
        for _ in range(args.calls):
            for name, call in rows.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        floor = statistics.median(times["bare gRPC unary"])
        print(f"{args.calls} calls per row, {'TLS' if tls else 'plaintext'} on 127.0.0.1")
        print(f"{'row':<28} {'median':>9} {'p90':>9} {'above floor':>12}")
        for name, seen in times.items():
            median = statistics.median(seen)
            p90 = statistics.quantiles(seen, n=10)[-1]
            print(
                f"{name:<28} {median * 1e3:>7.2f}ms {p90 * 1e3:>7.2f}ms "
                f"{(median - floor) * 1e3:>10.2f}ms"
            )
        with store.session() as s:
            audited = s.scalar(select(func.count()).select_from(AuditEntry))
        print(f"audit rows written: {audited}")
        squall_channel.close()
        bare_channel.close()
        control.stop(None)
        bare.stop(None)


if __name__ == "__main__":
    main()
