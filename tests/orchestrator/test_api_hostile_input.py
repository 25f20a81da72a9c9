"""The control-plane API against hostile Fuzzfiles, through a real `squall server` process on
loopback: each gets a clear error that says what is wrong and where, and the server goes on
serving. Only validation failures are sent: no workflow here starts a container."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from api.squall.v1 import control_pb2 as pb
from api.squall.v1 import control_pb2_grpc as rpc
from orchestrator.api.server import MAX_DETAILS_BYTES, MAX_REQUEST_BYTES
from orchestrator.fuzzfile.limits import MAX_FUZZFILE_BYTES

SQUALL = str(Path(sys.executable).parent / "squall")
TOKEN = "hostile-input-test-token"
MEMORY_CAP = 4 << 30  # a server that loses control of its memory fails, not the machine

HELLO = (
    "version: v4\njobs:\n  hello:\n    image: {uri: docker://alpine:3.20}\n    command: [echo]\n"
)
# Were a check below to regress, this would still keep the workflow from starting.
UNSET_SECRET = "    env: [TOKEN=secret://user/never-set]\n"


METADATA = (("authorization", f"Bearer {TOKEN}"),)


@dataclass
class Server:
    proc: subprocess.Popen[str]
    address: str
    env: dict[str, str]
    channel: grpc.Channel

    @property
    def stub(self) -> rpc.ControlStub:
        return rpc.ControlStub(self.channel)  # type: ignore[no-untyped-call]

    def start(self, name: str, fuzzfile: str) -> grpc.RpcError:
        """StartWorkflow, which must fail: its error."""
        request = pb.StartWorkflowRequest(name=name, fuzzfile=fuzzfile)
        with pytest.raises(grpc.RpcError) as info:
            self.stub.StartWorkflow(request, metadata=METADATA, timeout=60)
        return info.value

    def start_raw(self, name: bytes, fuzzfile: bytes) -> grpc.RpcError:
        """StartWorkflow with bytes that need not be UTF-8, as a client in another language
        could send them (field 1: name, field 2: fuzzfile)."""
        call = self.channel.unary_unary(
            "/squall.v1.Control/StartWorkflow",
            request_serializer=lambda b: b,
            response_deserializer=pb.Workflow.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(_field(1, name) + _field(2, fuzzfile), metadata=METADATA, timeout=60)
        return info.value

    def assert_serving(self) -> None:
        assert self.proc.poll() is None, f"the server died: {self.proc.returncode}"
        reply = self.stub.ListWorkflows(pb.ListWorkflowsRequest(), metadata=METADATA, timeout=30)
        assert list(reply.workflows) == []  # nothing hostile was recorded as a run


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    size, varint = len(data), b""
    while True:
        byte, size = size & 0x7F, size >> 7
        varint += bytes([byte | (0x80 if size else 0)])
        if not size:
            return bytes([number << 3 | 2]) + varint + data


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("hostile-server")
    token = home / "token"
    token.write_text(TOKEN)
    env = {
        **os.environ,
        "SQUALL_DATA_DIR": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }
    env.pop("SQUALL_CONTEXT", None)
    proc = subprocess.Popen(
        [SQUALL, "server", "--listen", "127.0.0.1:0", "--token-file", str(token)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_cap_memory,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("serving on "), proc.stderr.read() if proc.stderr else ""
    address = line.split()[-1]
    with grpc.insecure_channel(address) as channel:
        yield Server(proc, address, env, channel)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)


def test_deep_nesting_is_a_diagnostic_not_a_crash(server: Server) -> None:
    # 25,000 nested lists overflowed the C stack of PyYAML's composer: SIGSEGV, server gone
    error = server.start("me/deep", "version: v4\njobs: " + "[" * 25_000 + "]" * 25_000)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("me/deep:2:")
    assert "nests lists and mappings more than 64 levels deep" in error.details()
    server.assert_serving()


def test_task_array_beyond_the_limit_is_refused_before_anything_is_made(server: Server) -> None:
    # this validated, and then the server made a row per task: memory ran out
    text = HELLO + "    task-array: {start: 0, end: 100000000000}\n" + UNSET_SECRET
    error = server.start("me/huge-array", text)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "me/huge-array:6:" in error.details()
    assert "at most 10,000" in error.details()
    server.assert_serving()


def test_fuzzfile_over_the_size_limit_is_told_its_size(server: Server) -> None:
    text = HELLO + UNSET_SECRET
    text += "#" * (MAX_FUZZFILE_BYTES * 3 // 2 - len(text) - 1) + "\n"  # 1.5 MiB exactly
    error = server.start("me/big", text)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the file is 1.5 MiB; a Fuzzfile may be at most 1 MiB" in error.details()
    server.assert_serving()


def test_request_over_the_message_limit_is_refused_unread(server: Server) -> None:
    # beyond gRPC's default 4 MiB: refused by gRPC itself at the server's explicit limit
    text = HELLO + "#" * (5 * MAX_FUZZFILE_BYTES)
    error = server.start("me/huge", text)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_REQUEST_BYTES) in error.details()
    server.assert_serving()


def test_fuzzfile_that_is_not_utf8_is_told_where(server: Server) -> None:
    text = HELLO.encode().replace(b"hello:", b"caf\xe9:")  # Latin-1, line 3, column 6
    error = server.start_raw(b"me/latin1", text)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("me/latin1:3:6: error: <document>: the file is not UTF-8")
    error = server.start_raw(b"me/\xff", HELLO.encode())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the workflow name is not UTF-8 text"
    server.assert_serving()


def test_thousands_of_diagnostics_fit_in_one_status(server: Server) -> None:
    jobs = "".join(
        f"  j{i}: {{image: {{uri: docker://a}}, command: [x], cwd: rel}}\n" for i in range(3000)
    )
    error = server.start("me/many-errors", "version: v4\njobs:\n" + jobs)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details()
    assert details.startswith("me/many-errors:3:")
    assert "'rel' is not an absolute path" in details
    assert len(details.encode()) <= MAX_DETAILS_BYTES
    assert details.splitlines()[-1].endswith(
        "more lines: `squall workflow validate` shows them all)"
    )
    server.assert_serving()


def test_cli_refuses_what_it_cannot_send_and_shows_what_the_server_says(
    server: Server, tmp_path: Path
) -> None:
    def squall(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SQUALL, *args], env=server.env, capture_output=True, text=True, timeout=120
        )

    token = Path(server.env["SQUALL_DATA_DIR"]).parent / "token"
    created = squall(
        "context", "create", "hostile", "--server", server.address, "--token-file", str(token)
    )
    assert created.returncode == 0, created.stderr
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(HELLO.encode().replace(b"hello:", b"caf\xe9:"))
    done = squall("workflow", "start", "me/latin1", str(latin1))
    assert done.returncode == 1
    assert f"{latin1}:3:6: error: <document>: the file is not UTF-8 text" in done.stderr
    deep = tmp_path / "deep.yaml"
    deep.write_text("version: v4\njobs: " + "[" * 25_000 + "]" * 25_000)
    done = squall("workflow", "start", "me/deep", str(deep))
    assert done.returncode == 1
    assert "me/deep:2:" in done.stderr
    assert "more than 64 levels deep" in done.stderr
    server.assert_serving()
