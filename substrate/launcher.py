"""The launcher of a multi-node gang, in place of ssh: no sshd, no keys, nothing listening in
the containers.

The member that launches the others (MPI's mpirun or mpiexec, or a generic job's own
launcher) has `/.squall/launch/squall-launch HOST COMMAND...` in its container: Open MPI calls
it as `plm_rsh_agent`, MPICH's Hydra as `-launcher-exec`, a generic job as
`$MULTINODE_RSH_WRAPPER`. It is a POSIX shell script (it needs `sh`, `mktemp`, `mkfifo`
and `cat`, which every Debian, Ubuntu, Alpine and busybox image has) that hands the request
to this node's agent through the launch folder, bind-mounted from the task's folder:

    run.XXXXXX/argv      HOST and COMMAND, each ended by a NUL (written by the script)
    run.XXXXXX/out, err  FIFOs the script reads: the command's stdout and stderr
    run.XXXXXX/status    its exit status (written by the agent before it closes the FIFOs)
    requests             a FIFO: the script writes `run.XXXXXX` and a newline to it

The agent (`LaunchService`) runs COMMAND (its words joined by spaces and run by `/bin/sh -c`,
as ssh runs a remote command: Open MPI sends `PATH=... ; export PATH ; ... orted ...`) in the
container of the member whose hostname is HOST,
through that member's agent's Exec call, authorised by the member's exec grant (the agent
token is never sent between nodes), or in this container itself for its own hostname. The
command gets no stdin (as `ssh -n`); its exit status is the script's (255 when the launch
itself failed, as ssh's). Everything in the folder is the container's: it is opened relative
to the folder, never through a link, and checked to be what it should be.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from api.substrate.v1 import agent_pb2 as pb
from api.substrate.v1 import agent_pb2_grpc as rpc

from .tls import ClientTLS, secure_channel

__all__ = [
    "GRANT_HEADER",
    "LAUNCHER",
    "LAUNCH_DIR",
    "LaunchService",
    "Peer",
    "prepare",
]

log = logging.getLogger("substrate")

LAUNCH_DIR = "/.squall/launch"  # in the container
LAUNCHER = f"{LAUNCH_DIR}/squall-launch"
GRANT_HEADER = "x-squall-grant"
MAX_ARGV = 1 << 20  # bytes of a request's HOST and COMMAND
MAX_LAUNCHES = 256  # launches in flight at once, per task
OPEN_WAIT = 10.0  # seconds for the script to open its end of a FIFO
NO_LAUNCH = 255  # the exit status when the launch itself failed (as ssh's)

SCRIPT = f"""#!/bin/sh
# squall-launch HOST COMMAND...: run COMMAND in the container of this job on HOST, through the
# agents (MPI's remote launcher in place of ssh). As with ssh, COMMAND's words are joined and
# run by the shell there; options before HOST (ssh's, such as -x) are ignored; COMMAND gets no
# stdin; the exit status is COMMAND's, or 255 if it could not start.
while [ "${{1#-}}" != "$1" ]; do shift; done
if [ $# -lt 2 ]; then echo "usage: squall-launch HOST COMMAND..." >&2; exit 255; fi
d=$(mktemp -d {LAUNCH_DIR}/run.XXXXXX) || exit 255
trap 'rm -rf "$d"' EXIT
trap 'exit 255' HUP INT TERM
printf '%s\\0' "$@" > "$d/argv" && mkfifo "$d/out" "$d/err" || exit 255
echo "${{d##*/}}" > {LAUNCH_DIR}/requests || exit 255
cat "$d/err" >&2 &
cat "$d/out"
wait
status=$(cat "$d/status" 2>/dev/null)
exit "${{status:-255}}"
"""


@dataclass(frozen=True, slots=True)
class Peer:
    """Another member of the gang: where its agent is, its task, and the grant to exec in it."""

    hostname: str
    agent: str
    task_id: str
    grant: str


# command -> ExecOutput messages: an Exec in this node's own task (no gRPC)
LocalExec = Callable[[list[str]], Iterator[pb.ExecOutput]]


def prepare(folder: Path) -> None:
    """Make the launch folder of a task (mounted at LAUNCH_DIR): the script and the FIFO of
    requests."""
    folder.mkdir(mode=0o755)
    script = folder / "squall-launch"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    os.mkfifo(folder / "requests", 0o622)


class LaunchService:
    """Serves the launch requests of one task until it ends."""

    def __init__(
        self,
        folder: Path,
        hostname: str,
        peers: Mapping[str, Peer],
        local: LocalExec,
        done: threading.Event,
        tls: ClientTLS | None = None,
    ) -> None:
        """`tls`: this node's certificate, shown to the peers' agents (None: they serve
        plaintext)."""
        self.folder, self.hostname, self.peers, self.local = folder, hostname, peers, local
        self.done = done
        self.tls = tls
        self._slots = threading.BoundedSemaphore(MAX_LAUNCHES)
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._serve, name="launcher", daemon=True).start()

    def _serve(self) -> None:
        # read and write: the FIFO never reads as ended while no script has it open
        fd = os.open(self.folder / "requests", os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW)
        pending = b""
        try:
            while not self.done.is_set():
                if not select.select([fd], [], [], 0.5)[0]:
                    continue
                with contextlib.suppress(BlockingIOError):
                    pending += os.read(fd, 65536)
                *lines, pending = pending.split(b"\n")
                pending = pending[-256:]  # a line is a folder's name: a longer one is junk
                for line in lines:
                    name = line.decode(errors="replace").strip()
                    if not (name.startswith("run.") and "/" not in name and len(name) < 64):
                        continue
                    if not self._slots.acquire(blocking=False):
                        log.warning("launcher: too many launches at once; refused %s", name)
                        continue
                    threading.Thread(target=self._launch, args=(name,), daemon=True).start()
        finally:
            os.close(fd)
            with self._lock:
                channels, self._channels = self._channels, {}
            for channel in channels.values():
                channel.close()

    def _launch(self, name: str) -> None:
        try:
            # the folder is the agent's; what is in it is the container's: opened relative
            # to it, never through a link
            dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                run_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
            try:
                self._run_one(run_fd)
            finally:
                os.close(run_fd)
        except OSError as exc:
            log.warning("launcher: request %s: %s", name, exc)
        finally:
            self._slots.release()

    def _run_one(self, run_fd: int) -> None:
        argv = _read_argv(run_fd)
        out = _open_fifo(run_fd, "out", self.done)
        try:
            err = _open_fifo(run_fd, "err", self.done)
        except BaseException:
            os.close(out)
            raise
        code = NO_LAUNCH
        try:
            if len(argv) < 2:
                _write(err, b"squall-launch: no host and command given\n")
            else:  # as ssh does: the words joined, run by the shell (Open MPI counts on it)
                code = self._exec(argv[0], ["/bin/sh", "-c", " ".join(argv[1:])], out, err)
        finally:
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                status = os.open("status", flags, 0o644, dir_fd=run_fd)
                os.write(status, f"{code}\n".encode())
                os.close(status)
            finally:
                os.close(out)
                os.close(err)

    def _exec(self, host: str, command: list[str], out: int, err: int) -> int:
        """Run `command` on `host`, copying its output to `out` and `err`; its exit status."""
        if host == self.hostname:
            outputs: Iterator[pb.ExecOutput] = self.local(command)
        else:
            peer = self.peers.get(host)
            if peer is None:
                known = ", ".join(sorted({self.hostname, *self.peers}))
                _write(err, f"squall-launch: no host {host!r} in this job ({known})\n".encode())
                return NO_LAUNCH
            outputs = self._remote(peer, command)
        code = NO_LAUNCH
        try:
            for message in outputs:
                kind = message.WhichOneof("output")
                if kind == "stdout":
                    _write(out, message.stdout)
                elif kind == "stderr":
                    _write(err, message.stderr)
                elif kind == "exit_code":
                    code = message.exit_code
        except grpc.RpcError as exc:
            _write(err, f"squall-launch: {host}: {exc.details()}\n".encode())
            return NO_LAUNCH
        except BrokenPipeError:  # the script was killed (its caller gave up): so is the command
            stop = getattr(outputs, "cancel", None) or getattr(outputs, "close", None)
            if stop is not None:
                stop()
            return NO_LAUNCH
        return code

    def _remote(self, peer: Peer, command: list[str]) -> Iterator[pb.ExecOutput]:
        with self._lock:
            channel = self._channels.get(peer.agent)
            if channel is None:
                channel = self._channels[peer.agent] = (
                    grpc.insecure_channel(peer.agent)
                    if self.tls is None
                    else secure_channel(peer.agent, self.tls)
                )
        stub = rpc.AgentStub(channel)  # type: ignore[no-untyped-call]

        def requests() -> Iterator[pb.ExecInput]:
            yield pb.ExecInput(start=pb.ExecStart(task_id=peer.task_id, command=command))
            yield pb.ExecInput(close_stdin=True)

        call: Iterator[pb.ExecOutput] = stub.Exec(requests(), metadata=[(GRANT_HEADER, peer.grant)])
        return call  # an iterator that can be cancelled


def _read_argv(run_fd: int) -> list[str]:
    fd = os.open("argv", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=run_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "argv is not a file")
        data = os.read(fd, MAX_ARGV + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_ARGV:
        raise OSError(errno.E2BIG, "the command is too long")
    return [part.decode(errors="surrogateescape") for part in data.split(b"\0")[:-1]]


def _open_fifo(run_fd: int, name: str, done: threading.Event) -> int:
    """The writing end of the script's FIFO `name`, once the script has opened it to read."""
    deadline = time.monotonic() + OPEN_WAIT
    while True:
        try:
            fd = os.open(name, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=run_fd)
        except OSError as exc:
            if exc.errno != errno.ENXIO or done.is_set() or time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # no reader yet
            continue
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, f"{name} is not a FIFO")
        os.set_blocking(fd, True)
        return fd


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
