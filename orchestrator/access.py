"""Reaching a run's jobs: their logs (kept files, or live from the agent), exec into them and
port-forward to them through their node's agent. The control-plane server relays its clients
through this, and the CLI uses it directly on the local site; both speak the control API's
messages, translated here to the agent's.

Logs come with the values of the run's secrets masked, resolved here (the process reading
them may not be the one that drives the run) for the run's owner from its workflow. Exec
output is not: whoever may exec into a job can read its environment anyway."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import select

from api.squall.v1 import control_pb2 as cpb
from api.substrate.v1 import agent_pb2 as apb
from substrate.client import ClientTLS, connect, keep_freed_memory, port_forward

from .errors import Conflict, InvalidInput, NotFound
from .fuzzfile import load_text
from .identity import groups_of
from .redaction import Redactor, current
from .runloop import log_path
from .scheduler import TaskKey
from .secrets import SecretStore, referenced_secrets
from .store import Agent, Attempt, Job, Run, Store, Task, TaskState
from .views import run_named

__all__ = ["RunAccess", "TaskNotRunning"]

_LIVE = (TaskState.STARTING, TaskState.RUNNING, TaskState.READY)


# what calls a function when the caller goes away (a gRPC server's `context.add_callback`,
# which answers False when the call has ended already)
OnClose = Callable[[Callable[[], None]], object]


def _ends_with_caller(call: Any, on_close: OnClose | None) -> bool:
    """Tie the agent's `call` to the caller's: it is cancelled when the caller goes away (at
    once, answering False, when the caller is gone already)."""
    if on_close is not None and on_close(call.cancel) is False:
        call.cancel()
        return False
    return True


class TaskNotRunning(Conflict):
    """Exec and port-forward need a running task."""


@dataclass(frozen=True, slots=True)
class _Where:
    run_id: str
    key: TaskKey
    attempt: int  # 0: never started
    live: bool
    address: str = ""
    token: str = ""
    agent_task_id: str = ""
    tls: ClientTLS | None = None


class RunAccess:
    """`secrets`: where the values masked in logs come from (default: the store's, with the
    key file of `data_dir`, as the engine's)."""

    def __init__(self, store: Store, data_dir: Path, secrets: SecretStore | None = None) -> None:
        self.store = store
        self.data_dir = data_dir
        self.secrets = secrets or SecretStore(
            store, data_dir / "secrets.key", legacy_dir=data_dir / "secrets"
        )

    def _redactor(self, run_id: str) -> Redactor:
        """What masks the values of the secrets run `run_id` uses: as its owner has them now,
        and as they were when it started when this process drives it (a value changed
        meanwhile is still in what the job printed before)."""
        with self.store.session() as s:
            run = s.get_one(Run, run_id)
            text, name, owner = run.fuzzfile, run.name, run.owner
        loaded = load_text(text, name)
        refs = referenced_secrets(loaded.workflow) if loaded.workflow is not None else []
        started = current(run_id).values
        if not refs:
            return Redactor(started)
        view = self.secrets.view(owner, groups_of(self.store, owner))
        return Redactor([*started, *view.values(refs)])

    def _where(self, name: str, job: str, index: int) -> _Where:
        with self.store.session() as s:
            run = run_named(s, name)
            task = s.scalars(
                select(Task)
                .join(Task.job)
                .where(Job.run_id == run.id, Job.name == job, Task.index == index)
            ).first()
            if task is None:
                jobs = ", ".join(s.scalars(select(Job.name).where(Job.run_id == run.id)))
                raise NotFound(
                    f"run {run.name} has no job {job!r} with task {index} (jobs: {jobs})"
                )
            attempt = s.scalars(
                select(Attempt).where(Attempt.task_id == task.id).order_by(Attempt.number.desc())
            ).first()
            key = TaskKey(job, index)
            if attempt is None:
                return _Where(run.id, key, 0, False)
            live = task.state in _LIVE and not attempt.state.ended
            agent = s.scalars(
                select(Agent).where(Agent.run_id == run.id, Agent.name == attempt.node)
            ).first()
            if agent is None or not attempt.agent_task_id:
                return _Where(run.id, key, attempt.number, False)
            return _Where(
                run.id,
                key,
                attempt.number,
                live,
                agent.address,
                agent.token,
                attempt.agent_task_id,
                agent.endpoint_tls,
            )

    # ---- logs -----------------------------------------------------------------------------

    def logs(
        self,
        name: str,
        job: str,
        index: int = 0,
        follow: bool = False,
        on_close: OnClose | None = None,
    ) -> Iterator[bytes]:
        """The output of the task's latest attempt: live from its agent while it runs (and,
        with `follow`, until it ends), else from the copy kept when it ended. `on_close`:
        given what ends the agent's stream, calls it when the caller goes away (a server's
        `context.add_callback`), so that a quiet task does not hold the stream open."""
        where = self._where(name, job, index)
        if where.attempt == 0:
            return
        redactor = self._redactor(where.run_id)
        if where.live:
            masker = redactor.masker()
            channel, stub = connect(where.address, where.token, where.tls)
            try:
                live = stub.Logs(apb.LogsRequest(task_id=where.agent_task_id, follow=follow))
                if not _ends_with_caller(live, on_close):
                    return
                for chunk in live:
                    out = masker.feed(chunk.data)
                    if out:
                        yield out
                yield masker.end()
                return
            except grpc.RpcError:
                pass  # the node went away meanwhile: the kept copy has it all
            finally:
                channel.close()
        path = log_path(self.data_dir, where.run_id, where.key, where.attempt)
        with contextlib.suppress(FileNotFoundError):
            yield redactor.data(path.read_bytes())

    # ---- exec and port-forward -------------------------------------------------------------

    def _live(self, name: str, job: str, index: int) -> _Where:
        where = self._where(name, job, index)
        if not where.live:
            raise TaskNotRunning(f"{job}[{index}] of {name} is not running")
        return where

    def exec(
        self,
        requests: Iterator[cpb.ExecInput],
        on_close: OnClose | None = None,
    ) -> Iterator[cpb.ExecOutput]:
        """Relay an exec into a running task (`on_close` as for `logs`: the agent's call ends
        with the caller's, and the command with it)."""
        first = next(requests, None)
        if first is None or first.WhichOneof("input") != "start":
            raise InvalidInput("the first exec message must be `start`")
        start = first.start
        if not start.command:
            raise InvalidInput("exec needs a command")
        where = self._live(start.name, start.job, start.index)

        def upstream() -> Iterator[apb.ExecInput]:
            yield apb.ExecInput(
                start=apb.ExecStart(
                    task_id=where.agent_task_id,
                    command=list(start.command),
                    tty=start.tty,
                    size=apb.TerminalSize(rows=start.size.rows, columns=start.size.columns),
                )
            )
            for message in requests:
                kind = message.WhichOneof("input")
                if kind == "stdin":
                    yield apb.ExecInput(stdin=message.stdin)
                elif kind == "resize":
                    size = apb.TerminalSize(
                        rows=message.resize.rows, columns=message.resize.columns
                    )
                    yield apb.ExecInput(resize=size)
                elif kind == "close_stdin":
                    yield apb.ExecInput(close_stdin=True)

        channel, stub = connect(where.address, where.token, where.tls)
        try:
            # not redacted: whoever may exec into the job can read its environment anyway
            call = stub.Exec(upstream())
            _ends_with_caller(call, on_close)
            for out in call:
                kind = out.WhichOneof("output")
                if kind == "stdout":
                    yield cpb.ExecOutput(stdout=out.stdout)
                elif kind == "stderr":
                    yield cpb.ExecOutput(stderr=out.stderr)
                elif kind == "exit_code":
                    yield cpb.ExecOutput(exit_code=out.exit_code)
        finally:
            channel.close()

    def port_forward(
        self,
        requests: Iterator[cpb.PortForwardInput],
        on_close: OnClose | None = None,
    ) -> Iterator[cpb.PortForwardOutput]:
        """Relay a TCP stream to a running task's port (`on_close` as for `exec`)."""
        first = next(requests, None)
        if first is None or first.WhichOneof("input") != "start":
            raise InvalidInput("the first port-forward message must be `start`")
        start = first.start
        where = self._live(start.name, start.job, start.index)

        def upstream() -> Iterator[apb.PortForwardInput]:
            yield apb.PortForwardInput(
                start=apb.PortForwardStart(task_id=where.agent_task_id, port=start.port)
            )
            for message in requests:
                kind = message.WhichOneof("input")
                if kind == "data":
                    yield apb.PortForwardInput(data=message.data)
                elif kind == "close":
                    yield apb.PortForwardInput(close=True)

        keep_freed_memory()  # MiB-sized messages pass through this process
        channel, _ = connect(where.address, where.token, where.tls)
        try:
            call = port_forward(channel, upstream())
            _ends_with_caller(call, on_close)
            for data in call:
                yield cpb.PortForwardOutput(data=bytes(data))
        finally:
            channel.close()
