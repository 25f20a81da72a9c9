"""`squall workflow start|status|list|log|cancel|exec|port-forward|egress`: runs, on this
machine's store or on a server (see `squall context`)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from .output import EXIT_RUN_FAILED, Format, die, err, escape, out, print_json

if TYPE_CHECKING:
    from orchestrator.view_types import RunUpdate, RunView

    from .backends import Backend

__all__ = ["cancel", "egress", "exec_", "list_", "log", "port_forward", "start", "status"]

OUTPUT = typer.Option(Format.text, "--output", "-o", help="text for people, json for scripts.")
CONTEXT = typer.Option(
    None,
    "--context",
    help="Server context to use (default: the current one; see `squall context`).",
)
T = TypeVar("T")


def _backend(context: str | None) -> Backend:
    from orchestrator.errors import SquallError

    from .backends import open_backend

    try:
        return open_backend(context)
    except SquallError as exc:
        die(str(exc), exc.category)


def _guard(call: Callable[[], T]) -> T:
    """What `call` returns; a failure of Squall's said in one line, with its exit code."""
    from orchestrator.errors import SquallError

    try:
        return call()
    except SquallError as exc:
        die(str(exc), exc.category)


def _show(summary: RunView) -> None:
    from .live import render

    out.print(render(summary, []))


def read_fuzzfile(file: Path) -> str:
    """The file's text; what cannot be sent (too large, not UTF-8) is refused here."""
    from orchestrator.fuzzfile import FuzzfileError
    from orchestrator.fuzzfile.loader import read_source

    try:
        return read_source(file)
    except FuzzfileError as exc:
        unreadable = any(d.code == "io" for d in exc.diagnostics)
        die(str(exc), None if unreadable else exc.category)


def start(
    name: str = typer.Argument(..., help="A unique name for the run, e.g. me/gromacs-1."),
    file: Path = typer.Argument(..., help="The Fuzzfile.", show_default=False),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow the run until it ends."),
    budget: float | None = typer.Option(
        None,
        "--budget",
        min=0.01,
        metavar="USD",
        help="Cancel the run when it has spent this much. Default: the policy's, if any.",
    ),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Start a workflow on the server of the current context, and return.

    **Examples**

        squall workflow start me/pipeline-1 examples/pipeline.yaml
        squall workflow start me/pipeline-2 examples/pipeline.yaml --watch
        squall workflow start me/pipeline-3 examples/pipeline.yaml --budget 5
    """
    text = read_fuzzfile(file)
    backend = _backend(context)
    summary = _guard(lambda: backend.start(name, text, budget))
    if watch:
        summary = _follow(backend, name)
    if output is Format.json:
        print_json(summary.to_json())
    else:
        out.print(f"started {escape(summary.name)} ({summary.id}): {summary.state}")
    if watch and summary.state != "FINISHED":
        raise typer.Exit(EXIT_RUN_FAILED)


def _follow(backend: Backend, name: str) -> RunView:
    from .live import watch as live_watch

    def updates() -> Iterator[RunUpdate]:
        from orchestrator.errors import SquallError

        try:
            yield from backend.watch(name)
        except SquallError as exc:
            die(str(exc), exc.category)

    return live_watch(updates(), live=sys.stderr.isatty())


def status(
    name: str = typer.Argument(..., help="The run's name (or id)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow the run until it ends."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Show a run: its state, and every job's state, tasks and attempts.

    With --watch, follow it until it ends; the exit status then says how it ended (0:
    finished, 1: failed or cancelled).
    """
    backend = _backend(context)
    if watch:
        summary = _follow(backend, name)
        if output is Format.json:
            print_json(summary.to_json())
        else:
            _show(summary)
        if summary.state != "FINISHED":
            raise typer.Exit(EXIT_RUN_FAILED)
        return
    summary = _guard(lambda: backend.status(name))
    if output is Format.json:
        print_json(summary.to_json())
    else:
        _show(summary)


def list_(
    pattern: str = typer.Argument("*", help="A glob on run names, e.g. 'me/gromacs*'."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """List runs, newest first."""
    from rich.table import Table

    from .live import money

    backend = _backend(context)
    rows = _guard(lambda: backend.runs(pattern))
    if output is Format.json:
        print_json([r.to_json() for r in rows])
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "STATE", "SITE", "COST", "CREATED", "REASON"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            escape(r.name),
            r.state,
            escape(r.site),
            escape(money(r)),
            r.created_at.isoformat()[:19],
            escape(r.reason),
        )
    out.print(table)


def _split_job(job: str) -> tuple[str, int]:
    """`count[3]` or `count` -> (name, task index)."""
    if job.endswith("]") and "[" in job:
        name, _, index = job[:-1].partition("[")
        if index.isdigit():
            return name, int(index)
        die(f"{job!r}: write JOB or JOB[INDEX], e.g. count[3]")
    return job, 0


def log(
    name: str = typer.Argument(..., help="The run's name (or id)."),
    job: str | None = typer.Argument(
        None, help="The job; JOB[INDEX] for a task of an array. Default: every job, in order."
    ),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the task ends."),
    context: str | None = CONTEXT,
) -> None:
    """Print a job's output (its latest attempt): live while it runs, kept once it ended.

    Without JOB, prints the output of every job and service that started, each under a
    `== JOB ==` line (task arrays: name the task, JOB[INDEX]).
    """
    backend = _backend(context)

    def stream(job_name: str, index: int) -> None:
        for data in backend.logs(name, job_name, index, follow):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    if job is not None:
        job_name, index = _split_job(job)
        _guard(lambda: stream(job_name, index))
        return
    summary = _guard(lambda: backend.status(name))
    for entry in summary.jobs:
        if not entry.attempts:
            continue
        sys.stdout.write(f"== {entry.name} ==\n")
        sys.stdout.flush()
        if entry.tasks > 1:
            sys.stdout.write(f"(a task array: squall workflow log {name} {entry.name}[INDEX])\n")
            continue
        _guard(functools.partial(stream, entry.name, 0))


def cancel(
    name: str = typer.Argument(..., help="The run's name (or id)."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Cancel a run: its tasks are stopped and its cluster taken down by its owner."""
    backend = _backend(context)
    summary = _guard(lambda: backend.cancel(name))
    if output is Format.json:
        print_json(summary.to_json())
    else:
        out.print(f"cancel requested for {escape(summary.name)} ({summary.state})")


def egress(
    name: str = typer.Argument(..., help="The run's name (or id)."),
    release: bool = typer.Option(
        False, "--release", help="Give up on the failed egress and delete the kept volumes."
    ),
) -> None:
    """Retry the failed egress of an ended run on this machine (its data was kept).

    A run whose orchestrator died (killed mid-egress) is first ended as such, its owed
    results kept, as every local command that starts an orchestrator does."""
    from .run_cmd import start_local_engine

    engine = _guard(lambda: start_local_engine(1, None, [], []))
    kept = _guard(lambda: engine.retry_egress(name, release=release))
    if release:
        out.print(f"released the volumes of {escape(name)}")
    else:
        out.print(f"egress of {escape(name)} done" + (f"; still kept: {kept}" if kept else ""))


# ---- exec ----------------------------------------------------------------------------------


def exec_(
    name: str = typer.Argument(..., help="The run's name (or id)."),
    job: str = typer.Argument(..., help="The running job; JOB[INDEX] for a task of an array."),
    command: list[str] = typer.Argument(..., help="The command, after --."),
    tty: bool = typer.Option(False, "--tty", "-t", help="Give the command a terminal."),
    context: str | None = CONTEXT,
) -> None:
    """Run a command inside a running job, through its node's agent (no SSH).

    Exits with the command's exit status.

    **Examples**

        squall workflow exec me/train-1 trainer -- nvidia-smi
        squall workflow exec me/train-1 trainer --tty -- /bin/sh
    """
    import queue
    import signal
    import threading

    from api.squall.v1 import control_pb2 as pb

    backend = _backend(context)
    job_name, index = _split_job(job)
    inbox: queue.Queue[pb.ExecInput | None] = queue.Queue()
    rows, columns = _terminal_size() if tty else (0, 0)
    inbox.put(
        pb.ExecInput(
            start=pb.ExecStart(
                name=name,
                job=job_name,
                index=index,
                command=command,
                tty=tty,
                size=pb.TerminalSize(rows=rows, columns=columns),
            )
        )
    )

    def requests() -> Iterator[pb.ExecInput]:
        while (message := inbox.get()) is not None:
            yield message

    def pump_stdin() -> None:
        fd = sys.stdin.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                inbox.put(pb.ExecInput(close_stdin=True))
                return
            inbox.put(pb.ExecInput(stdin=data))

    threading.Thread(target=pump_stdin, daemon=True).start()
    restore = _raw_terminal() if tty and sys.stdin.isatty() else None
    if tty:
        signal.signal(
            signal.SIGWINCH,
            lambda *_: inbox.put(pb.ExecInput(resize=_size_message())),
        )
    code = 0
    try:

        def relay() -> int:
            for output in backend.exec(requests()):
                kind = output.WhichOneof("output")
                if kind == "stdout":
                    sys.stdout.buffer.write(output.stdout)
                    sys.stdout.buffer.flush()
                elif kind == "stderr":
                    sys.stderr.buffer.write(output.stderr)
                    sys.stderr.buffer.flush()
                elif kind == "exit_code":
                    return int(output.exit_code)
            return 255

        code = _guard(relay)
    finally:
        inbox.put(None)
        if restore is not None:
            restore()
    raise typer.Exit(code)


def _size_message() -> Any:
    from api.squall.v1 import control_pb2 as pb

    rows, columns = _terminal_size()
    return pb.TerminalSize(rows=rows, columns=columns)


def _terminal_size() -> tuple[int, int]:
    size = os.get_terminal_size(sys.stdout.fileno()) if sys.stdout.isatty() else None
    return (size.lines, size.columns) if size else (24, 80)


def _raw_terminal() -> Any:
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# ---- port-forward --------------------------------------------------------------------------


def port_forward(
    name: str = typer.Argument(..., help="The run's name (or id)."),
    job: str = typer.Argument(..., help="The running job or service; JOB[INDEX] for arrays."),
    ports: str = typer.Argument(..., help="LOCAL:REMOTE, e.g. 8888:8888 (LOCAL 0: any free)."),
    address: str = typer.Option("127.0.0.1", "--address", help="Local address to listen on."),
    context: str | None = CONTEXT,
) -> None:
    """Forward a local TCP port to a port in a running job, through its agent (no SSH).

    Each connection to LOCAL becomes one stream to REMOTE inside the job's network. Runs
    until Ctrl-C; prints `forwarding ADDRESS:PORT -> REMOTE` once it listens.
    """
    import queue
    import select
    import socket
    import threading

    from api.squall.v1 import control_pb2 as pb
    from substrate.client import keep_freed_memory

    local, sep, remote = ports.partition(":")
    if not sep or not local.isdigit() or not remote.isdigit():
        die(f"{ports!r}: write LOCAL:REMOTE, e.g. 8888:8888")
    backend = _backend(context)
    job_name, index = _split_job(job)
    _guard(lambda: backend.status(name))  # fails early on a wrong name
    listener = socket.create_server((address, int(local)))
    keep_freed_memory()  # MiB-sized messages pass through this process
    bound = listener.getsockname()[1]
    err.print(f"forwarding {address}:{bound} -> {job_name}:{remote}")
    print(f"{address}:{bound}", flush=True)

    def serve(conn: socket.socket) -> None:
        inbox: queue.Queue[pb.PortForwardInput | None] = queue.Queue()
        inbox.put(
            pb.PortForwardInput(
                start=pb.PortForwardStart(name=name, job=job_name, index=index, port=int(remote))
            )
        )

        def requests() -> Iterator[pb.PortForwardInput]:
            while (message := inbox.get()) is not None:
                yield message

        def upstream() -> None:
            while True:
                ready, _, _ = select.select([conn], [], [], 1.0)
                if not ready:
                    continue
                try:
                    data = conn.recv(1 << 20)  # as much as is there, up to a MiB
                except OSError:
                    data = b""
                if not data:
                    inbox.put(pb.PortForwardInput(close=True))
                    return
                inbox.put(pb.PortForwardInput(data=data))

        threading.Thread(target=upstream, daemon=True).start()
        try:
            for output in backend.port_forward(requests()):
                conn.sendall(output.data)
        except Exception as exc:  # one connection failing must not stop the others
            from orchestrator.errors import SquallError, describe

            why = str(exc) if isinstance(exc, SquallError) else describe(exc)
            err.print(f"[yellow]connection closed[/]: {escape(why)}")
        finally:
            inbox.put(None)
            conn.close()

    try:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
