"""The two bidirectional streams: exec (with or without a terminal) and port-forward.

Each consumes the client's messages on a thread of its own and yields output as it comes,
so input and output flow at the same time.
"""

from __future__ import annotations

import fcntl
import os
import pty
import queue
import signal
import socket
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from api.substrate.v1 import agent_pb2 as pb

from .tasks import TaskError, TaskState

if TYPE_CHECKING:
    from .agent import Agent

__all__ = ["exec_stream", "port_forward_stream"]

_END = object()


def _running(agent: Agent, task_id: str) -> Any:
    task = agent.tasks.get(task_id)
    if task.state is not TaskState.RUNNING:
        raise TaskError(f"task {task_id!r} is not running ({task.state.value})")
    return task


def _set_size(fd: int, size: pb.TerminalSize) -> None:
    if size.rows and size.columns:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.columns, 0, 0))


def exec_stream(
    agent: Agent, requests: Iterator[pb.ExecInput], context: Any
) -> Iterator[pb.ExecOutput]:
    """Run the command of the first (start) message inside its task; relay the streams."""
    first = next(requests, None)
    if first is None or first.WhichOneof("input") != "start":
        raise ValueError("the first Exec message must be `start`")
    start = first.start
    if not start.command:
        raise ValueError("exec needs a command")
    task = _running(agent, start.task_id)
    runtime = agent.runtimes[task.spec.runtime]
    launch = runtime.exec_launch(
        task.spec, task.cpus, task.dir, list(start.command), dict(start.env)
    )
    out: queue.Queue[Any] = queue.Queue(maxsize=64)
    argv = launch.pinned_argv()
    if start.tty:
        master, slave = pty.openpty()
        _set_size(master, start.size)
        # `setsid --ctty` makes the pty the controlling terminal of a new session
        proc = subprocess.Popen(
            ["setsid", "--ctty", *argv],
            env=launch.env,
            cwd=launch.cwd,
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        readers = [threading.Thread(target=_read_fd, args=(master, out, "stdout"), daemon=True)]
        stdin = _Stdin(master, tty=True, proc=proc)
    else:
        proc = subprocess.Popen(
            argv,
            env=launch.env,
            cwd=launch.cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdin
        assert proc.stdout
        assert proc.stderr
        readers = [
            threading.Thread(
                target=_read_fd, args=(proc.stdout.fileno(), out, "stdout"), daemon=True
            ),
            threading.Thread(
                target=_read_fd, args=(proc.stderr.fileno(), out, "stderr"), daemon=True
            ),
        ]
        stdin = _Stdin(proc.stdin.fileno(), tty=False, proc=proc)
    for r in readers:
        r.start()
    threading.Thread(target=stdin.feed, args=(requests,), daemon=True).start()
    try:
        done = 0
        while done < len(readers):
            item = out.get()
            if item is _END:
                done += 1
                continue
            kind, data = item
            yield pb.ExecOutput(**{kind: data})
        code = proc.wait()
        yield pb.ExecOutput(exit_code=code if code >= 0 else 128 - code)
    finally:
        if proc.poll() is None:  # the client went away: do not leave the command behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if start.tty:
            os.close(master)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _read_fd(fd: int, out: queue.Queue[Any], kind: str) -> None:
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the pty's other side closed
                break
            if not data:
                break
            out.put((kind, data))
    finally:
        out.put(_END)


class _Stdin:
    """Feeds the client's stdin, resize and close messages to the command."""

    def __init__(self, fd: int, *, tty: bool, proc: Any) -> None:
        self.fd, self.tty, self.proc = fd, tty, proc

    def feed(self, requests: Iterator[pb.ExecInput]) -> None:
        try:
            for msg in requests:
                kind = msg.WhichOneof("input")
                if kind == "stdin":
                    os.write(self.fd, msg.stdin)
                elif kind == "resize" and self.tty:
                    _set_size(self.fd, msg.resize)
                    os.killpg(self.proc.pid, signal.SIGWINCH)
                elif kind == "close_stdin":
                    self._close()
                    return
        except (OSError, ValueError):
            return  # the command ended or the client hung up

    def _close(self) -> None:
        if self.tty:
            os.write(self.fd, b"\x04")  # end of input on a terminal is ^D
        else:
            self.proc.stdin.close()


def port_forward_stream(
    agent: Agent, requests: Iterator[pb.PortForwardInput], context: Any
) -> Iterator[pb.PortForwardOutput]:
    """Connect to the task's TCP port and relay bytes both ways until either side closes."""
    first = next(requests, None)
    if first is None or first.WhichOneof("input") != "start":
        raise ValueError("the first PortForward message must be `start`")
    task = _running(agent, first.start.task_id)
    if task.spec.isolated_network:
        raise TaskError("port-forward into an isolated network needs an OCI runtime")
    port = first.start.port
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is outside 1-65535")
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as exc:
        raise TaskError(
            f"nothing accepts connections on port {port} of the task: {exc.strerror or exc}"
        ) from None
    conn.settimeout(None)

    def upstream() -> None:
        try:
            for msg in requests:
                if msg.WhichOneof("input") == "data":
                    conn.sendall(msg.data)
                elif msg.WhichOneof("input") == "close":
                    break
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=upstream, daemon=True).start()
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            yield pb.PortForwardOutput(data=data)
    finally:
        conn.close()
