"""The two bidirectional streams: exec (with or without a terminal) and port-forward.

Each consumes the client's messages on a thread of its own and yields output as it comes,
so input and output flow at the same time. Output goes out in chunks of up to 2 MiB, read
and handed to gRPC already serialized (`wire.Framer`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hmac
import os
import queue
import signal
import socket
import stat
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.substrate.v1 import agent_pb2 as pb

from .paths import IN_ROOT, PathEscape, open_in
from .runtimes.rootfs import children
from .tasks import TaskError, TaskState
from .wire import CHUNK, Framer

if TYPE_CHECKING:
    from .agent import Agent

__all__ = ["GrantRefused", "exec_stream", "port_forward_stream"]

_END = object()
_GONE = object()  # the caller went away
F_SETPIPE_SZ = 1031  # fcntl: set a pipe's capacity (Linux)
CLONE_NEWNET = 0x40000000
TIOCGPTPEER = 0x5441  # the slave of a pty master, opened from the master (Linux 4.13)
_libc = ctypes.CDLL(None, use_errno=True)


class GrantRefused(PermissionError):
    """An Exec with a gang member's grant that is not the task's."""


def _running(agent: Agent, task_id: str) -> Any:
    task = agent.tasks.get(task_id)
    if task.state is not TaskState.RUNNING:
        raise TaskError(f"task {task_id!r} is not running ({task.state.value})")
    return task


def _set_size(fd: int, size: pb.TerminalSize) -> None:
    if size.rows and size.columns:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.columns, 0, 0))


def exec_stream(
    agent: Agent, requests: Iterator[pb.ExecInput], context: Any, grant: str | None = None
) -> Iterator[bytes]:
    """Run the command of the first (start) message inside its task; relay the streams.
    `grant`: the call came with a gang member's exec grant instead of the agent token (None:
    with the token), which must be the task's.

    Yields serialized `ExecOutput` messages (the servicer sends them as they are)."""
    first = next(requests, None)
    if first is None or first.WhichOneof("input") != "start":
        raise ValueError("the first Exec message must be `start`")
    start = first.start
    if not start.command:
        raise ValueError("exec needs a command")
    task = _running(agent, start.task_id)
    if grant is not None and not (
        task.exec_grant and hmac.compare_digest(grant.encode(), task.exec_grant.encode())
    ):
        raise GrantRefused(f"the grant given does not open task {start.task_id!r}")
    runtime = agent.runtimes[task.spec.runtime]
    launch = runtime.exec_launch(
        task.spec, task.pid, task.dir, task.image, list(start.command), dict(start.env)
    )
    out: queue.Queue[Any] = queue.Queue(maxsize=8)
    popen = agent.tasks.popen  # in the task's cgroup, like the task itself
    if start.tty:
        master, slave = open_pty(f"/proc/{runtime.namespace_pid(task.pid, task.dir)}/root")
        _set_size(master, start.size)
        # `setsid --ctty` makes the pty the controlling terminal of a new session
        launch = replace(launch, argv=["setsid", "--ctty", *launch.argv])
        proc = popen(task, launch, stdin=slave, stdout=slave, stderr=slave, start_new_session=False)
        os.close(slave)
        readers = [
            threading.Thread(
                target=_read_fd, args=(master, out, pb.ExecOutput.STDOUT_FIELD_NUMBER), daemon=True
            )
        ]
        stdin = _Stdin(master, tty=True, proc=proc)
    else:
        proc = popen(
            task, launch, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        readers = [
            threading.Thread(
                target=_read_fd, args=(_widened(pipe.fileno()), out, field), daemon=True
            )
            for pipe, field in (
                (proc.stdout, pb.ExecOutput.STDOUT_FIELD_NUMBER),
                (proc.stderr, pb.ExecOutput.STDERR_FIELD_NUMBER),
            )
        ]
        stdin = _Stdin(proc.stdin.fileno(), tty=False, proc=proc)
    for r in readers:
        r.start()
    threading.Thread(target=stdin.feed, args=(requests,), daemon=True).start()
    if context is not None:  # a caller gone while the command is quiet: end it now
        context.add_callback(lambda: _offer(out, _GONE))
    try:
        done = 0
        while done < len(readers):
            item = out.get()
            if item is _GONE:
                return
            if item is _END:
                done += 1
                continue
            yield item
        code = proc.wait()
        yield pb.ExecOutput(exit_code=code if code >= 0 else 128 - code).SerializeToString()
    finally:
        if proc.poll() is None:  # the client went away: do not leave the command behind
            _kill_tree(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if start.tty:
            os.close(master)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process under it: the command an exec started in the task's
    namespaces is a child of the launcher, and killing the launcher alone would leave it
    running in the task. Each is stopped before its children are read, so none forks away."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        found.append(p)
        todo += children(p)
    for p in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _offer(out: queue.Queue[Any], item: object) -> None:
    """Put `item` unless `out` is full (then the reader is not waiting on it)."""
    with contextlib.suppress(queue.Full):
        out.put_nowait(item)


def open_pty(root: str) -> tuple[int, int]:
    """A pty pair from the devpts instance seen under `root` (a task's `/proc/PID/root`).

    Allocating it from the task's own /dev/ptmx lets programs inside name their terminal
    (`tty` prints /dev/pts/N instead of "not a tty"). The task owns its /dev: `ptmx` is
    resolved inside its root (never a link out to the host's files) and must be the pty
    multiplexer; the other end comes from the master itself (TIOCGPTPEER), not by path.
    """
    try:
        master = open_in(root, "/dev/ptmx", os.O_RDWR | os.O_NOCTTY, IN_ROOT)
    except PathEscape as exc:
        raise OSError(exc.errno, f"cannot set up a terminal: {exc.strerror}") from None
    try:
        st = os.fstat(master)
        if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (5, 2):
            raise OSError(errno.EPERM, "cannot set up a terminal: the task's /dev/ptmx is not one")
        if _libc.unlockpt(master) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot set up a terminal: {os.strerror(err)}")
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        os.close(master)
        raise
    return master, slave


def _widened(fd: int) -> int:
    """`fd`, the read end of a pipe, made to hold a chunk (64 KiB by default) or as much as
    the system lets this process have, so that a command writing fast fills large messages."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, CHUNK)
    except OSError:  # above /proc/sys/fs/pipe-max-size (1 MiB by default) without privilege
        with contextlib.suppress(OSError, ValueError):
            most = int(Path("/proc/sys/fs/pipe-max-size").read_text())
            fcntl.fcntl(fd, F_SETPIPE_SZ, min(most, CHUNK))
    return fd


def _read_fd(fd: int, out: queue.Queue[Any], field: int) -> None:
    framer = Framer(field)
    try:
        while True:
            try:
                message = framer.read(lambda room: os.readv(fd, [room]))
            except OSError:  # EIO: the pty's other side closed
                break
            if message is None:
                break
            out.put(message)
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
        except Exception:  # the command ended (OSError), or the client went away (the
            return  # request stream raises grpc.RpcError): the exec ends either way

    def _close(self) -> None:
        if self.tty:
            os.write(self.fd, b"\x04")  # end of input on a terminal is ^D
        else:
            self.proc.stdin.close()


def connect_in_netns(pid: int | None, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` in the network namespace of `pid` (None: ours).

    A socket belongs to the namespace it was made in, so a short-lived thread joins the
    task's namespace (setns affects only the calling thread), connects, and ends.
    """
    if pid is None:
        return socket.create_connection(("127.0.0.1", port), timeout=10)
    result: list[socket.socket | OSError] = []

    def inside() -> None:
        try:
            with open(f"/proc/{pid}/ns/net", "rb") as ns:
                if _libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns: {os.strerror(err)}")
            result.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=inside)
    thread.start()
    thread.join()
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def port_forward_stream(
    agent: Agent, requests: Iterator[pb.PortForwardInput], context: Any
) -> Iterator[bytes]:
    """Connect to the task's TCP port and relay bytes both ways until either side closes.

    Yields serialized `PortForwardOutput` messages (the servicer sends them as they are)."""
    first = next(requests, None)
    if first is None or first.WhichOneof("input") != "start":
        raise ValueError("the first PortForward message must be `start`")
    task = _running(agent, first.start.task_id)
    port = first.start.port
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is outside 1-65535")
    host = agent.host_network
    if task.spec.host_network and host is not None and port == host.agent_port:
        # the task's network is the node's: this would be a stream to the agent itself, as
        # root, past the firewall that keeps the task's own sockets from it
        raise TaskError(f"port {port} of a task on the node's network is the agent's")
    own_network = task.spec.isolated_network or bool(task.spec.netns)
    netns_pid = (
        agent.runtimes[task.spec.runtime].namespace_pid(task.pid, task.dir) if own_network else None
    )
    try:
        conn = connect_in_netns(netns_pid, port)
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
    framer = Framer(pb.PortForwardOutput.DATA_FIELD_NUMBER)
    try:
        while (message := framer.read(conn.recv_into)) is not None:
            yield message
    finally:
        conn.close()
