"""Bulk bytes through the exec and port-forward streams, with the agent in a process of its
own (`python -m substrate`), as on a node; and the pieces that make them move MiB chunks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from api.substrate.v1 import agent_pb2 as pb
from substrate.client import connect, port_forward
from substrate.wire import CHUNK, Framer, field_bytes
from tests.substrate.conftest import TOKEN

OLD_CHUNK = 65536  # what one message carried at most before


@dataclass
class Process:
    stub: Any
    channel: Any
    lease: str

    def run(self, command: list[str]) -> str:
        request = pb.RunRequest(lease_id=self.lease, runtime="process", command=command)
        return str(self.stub.Run(request).task_id)


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Process]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "substrate", "--data-dir", str(tmp_path / "agent")),
            *("--token-file", str(token_file), "--weak-runtimes", "--no-pod-network"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    channel, stub = connect(line.split()[-1], TOKEN)
    try:
        lease = stub.AcquireLease(pb.AcquireLeaseRequest(holder="t", cores=1, ttl_seconds=300))
        yield Process(stub, channel, lease.id)
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


ECHO = textwrap.dedent(
    """
    import socket, sys
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    while data := conn.recv(1 << 20):
        conn.sendall(data)
    conn.close()  # after the client's end of input: the stream ends
    """
)


def _echo_server(agent: Process, tmp_path: Path) -> tuple[str, int]:
    """A task echoing one connection, and its port (printed to a file once it listens)."""
    out = tmp_path / "port"
    task = agent.run(["/bin/sh", "-c", f'"{sys.executable}" -c "$0" > {out}', ECHO])
    deadline = time.monotonic() + 15
    while not (out.exists() and out.read_text().strip()):
        assert time.monotonic() < deadline, "the echo server did not start"
        time.sleep(0.05)
    return task, int(out.read_text())


def _sending(task: str, port: int, payload: bytes) -> Iterator[pb.PortForwardInput]:
    yield pb.PortForwardInput(start=pb.PortForwardStart(task_id=task, port=port))
    for at in range(0, len(payload), CHUNK):
        yield pb.PortForwardInput(data=payload[at : at + CHUNK])
    yield pb.PortForwardInput(close=True)


def test_megabytes_cross_port_forward_both_ways_byte_exact(
    agent_process: Process, tmp_path: Path
) -> None:
    payload = os.urandom(24 << 20)
    task, port = _echo_server(agent_process, tmp_path)
    received: list[bytes] = []
    sizes: list[int] = []
    for data in port_forward(agent_process.channel, _sending(task, port, payload)):
        received.append(bytes(data))
        sizes.append(len(data))
    assert b"".join(received) == payload
    assert max(sizes) > OLD_CHUNK  # whole chunks, not 64 KiB pieces
    assert max(sizes) <= CHUNK


def test_the_agents_port_forward_messages_parse_with_the_generated_code(
    agent_process: Process, tmp_path: Path
) -> None:
    payload = os.urandom(4 << 20)
    task, port = _echo_server(agent_process, tmp_path)
    replies = list(agent_process.stub.PortForward(_sending(task, port, payload)))
    assert b"".join(m.data for m in replies) == payload


def test_exec_output_comes_in_large_chunks_byte_exact(agent_process: Process) -> None:
    task = agent_process.run(["sleep", "300"])
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 32768); sys.stderr.write('e')"

    def requests() -> Iterator[pb.ExecInput]:
        yield pb.ExecInput(start=pb.ExecStart(task_id=task, command=[sys.executable, "-c", script]))

    out, err, codes, sizes = b"", b"", [], []
    for msg in agent_process.stub.Exec(requests()):
        kind = msg.WhichOneof("output")
        if kind == "stdout":
            out += msg.stdout
            sizes.append(len(msg.stdout))
        elif kind == "stderr":
            err += msg.stderr
        else:
            codes.append(msg.exit_code)
    assert out == bytes(range(256)) * 32768
    assert (err, codes) == (b"e", [0])
    assert max(sizes) > OLD_CHUNK


# ---- the wire form ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 127, 128, 16383, 16384, 65537, CHUNK])
def test_framed_messages_are_what_protobuf_serializes(size: int) -> None:
    data = os.urandom(size)

    def read_into(room: memoryview) -> int:
        room[:size] = data
        return size

    framed = Framer(pb.PortForwardOutput.DATA_FIELD_NUMBER).read(read_into)
    assert framed == pb.PortForwardOutput(data=data).SerializeToString()
    framed = Framer(pb.ExecOutput.STDERR_FIELD_NUMBER).read(read_into)
    assert framed == pb.ExecOutput(stderr=data).SerializeToString()
    view = field_bytes(framed, pb.ExecOutput.STDERR_FIELD_NUMBER)
    assert view is not None
    assert view.tobytes() == data


def test_a_framer_says_when_its_source_ended() -> None:
    assert Framer(1).read(lambda room: 0) is None


def test_field_bytes_declines_what_is_not_that_field_alone() -> None:
    data = b"x" * 200
    other_field = pb.ExecOutput(stderr=data).SerializeToString()
    two_fields = pb.ExecOutput(stdout=data).SerializeToString() + other_field
    for message in (b"", other_field, two_fields, other_field[:-1]):
        assert field_bytes(message, pb.ExecOutput.STDOUT_FIELD_NUMBER) is None, message[:4]


# ---- freed memory -------------------------------------------------------------------------

ROUNDS = """
import resource, sys
sys.path.insert(0, sys.argv[2])
if sys.argv[1] == "keep":
    from substrate.client import keep_freed_memory
    assert keep_freed_memory()
blocks = [bytearray(1 << 20) for _ in range(8)]  # as a stream's message buffers come and go
del blocks
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    blocks = [bytearray(1 << 20) for _ in range(8)]
    del blocks
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_kept_freed_memory_is_reused_without_page_faults() -> None:
    root = str(Path(__file__).resolve().parents[2])

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", ROUNDS, mode, root], capture_output=True, text=True, check=True
        )
        return int(out.stdout)

    default, kept = faults("default"), faults("keep")
    assert default > 20 * 256  # glibc hands the pages back and faults them in each round
    assert kept < default / 20
