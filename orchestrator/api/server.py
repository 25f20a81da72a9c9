"""`squall server`: the control-plane API over gRPC, running each started workflow in a thread
of this process (its owner), with the same engine and store as `squall run`.

Errors map to status codes by category, by the one table in `orchestrator.errors` (`ERRORS`),
and carry their category's name in the `squall-category` trailer; anything unexpected is
INTERNAL with its message (a database error's without its SQL), and logged.

Whatever a client sends, the server answers and goes on serving: a Fuzzfile is validated
at a bounded cost (`orchestrator.fuzzfile.limits`), one that is not UTF-8 gets a diagnostic
saying where (not a failure to decode the request), and a request larger than
`MAX_REQUEST_BYTES` is refused by gRPC (RESOURCE_EXHAUSTED) before it is read.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc

from api.squall.v1 import control_pb2 as pb
from api.squall.v1 import control_pb2_grpc as rpc
from substrate.auth import TokenAuth

from .. import schedules
from ..access import RunAccess
from ..engine import Engine, request_cancel
from ..errors import CATEGORY_TRAILER, InvalidInput, SquallError, describe, status_of
from ..fuzzfile import FuzzfileError
from ..fuzzfile.limits import MAX_FUZZFILE_BYTES
from ..fuzzfile.loader import load_bytes
from ..run_threads import RunThreads
from ..views import find_run, run_list, run_summary, watch
from .requests import RawStartWorkflowRequest, start_workflow_deserializer

__all__ = ["MAX_REQUEST_BYTES", "ControlServer", "serve"]

log = logging.getLogger("squall.server")
F = TypeVar("F", bound=Callable[..., Any])

# The largest request the server reads: a Fuzzfile at its limit with room to spare, so that
# one somewhat over it is told so by a diagnostic; gRPC refuses larger ones unread.
MAX_REQUEST_BYTES = 2 * MAX_FUZZFILE_BYTES
# Error details travel in a trailer, which clients refuse past 8 KiB (percent-encoded).
MAX_DETAILS_BYTES = 2000


def _details(message: str) -> str:
    """`message` cut to whole lines that fit in `MAX_DETAILS_BYTES`, saying what was cut."""
    if len(message.encode()) <= MAX_DETAILS_BYTES:
        return message
    budget = MAX_DETAILS_BYTES - 100  # for the last line, which says what was cut
    lines = message.splitlines()
    kept: list[str] = []
    for line in lines:
        budget -= len(line.encode()) + 1
        if budget < 0:
            break
        kept.append(line)
    if not kept:  # one very long line
        return message.encode()[: MAX_DETAILS_BYTES - 100].decode(errors="ignore") + " [...]"
    dropped = len(lines) - len(kept)
    kept.append(f"... ({dropped} more lines: `squall workflow validate` shows them all)")
    return "\n".join(kept)


def _status_codes(method: F) -> F:
    """Turn Squall's errors into gRPC status codes, for unary and streaming methods."""

    def fail(context: Any, exc: Exception) -> None:
        if isinstance(exc, SquallError):
            message = str(exc)  # written for people, diagnostics on lines of their own
        else:
            log.exception("%s failed", method.__name__)
            message = describe(exc)
        status, category = status_of(exc)
        context.set_trailing_metadata(((CATEGORY_TRAILER, category.value),))
        context.abort(grpc.StatusCode[status], _details(message))

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            fail(context, exc)

    @functools.wraps(method)
    def streaming(self: Any, request: Any, context: Any) -> Any:
        try:
            yield from method(self, request, context)
        except Exception as exc:
            fail(context, exc)

    return streaming if inspect.isgeneratorfunction(method) else unary  # type: ignore[return-value]


class ControlServer(rpc.ControlServicer):
    def __init__(self, engine: Engine, runs: RunThreads | None = None) -> None:
        self.engine = engine
        self.access = RunAccess(engine.store, engine.data_dir)
        self.runs = runs or RunThreads(engine)

    def _summary(self, name: str) -> pb.Workflow:
        return run_summary(self.engine.store, find_run(self.engine.store, name)).to_message()

    @_status_codes
    def StartWorkflow(
        self, request: pb.StartWorkflowRequest | RawStartWorkflowRequest, context: Any
    ) -> pb.Workflow:
        if isinstance(request, RawStartWorkflowRequest):  # not UTF-8: say where
            if request.name is None:
                raise InvalidInput("the workflow name is not UTF-8 text")
            raise FuzzfileError(load_bytes(request.fuzzfile, request.name).diagnostics)
        if not request.name:
            raise InvalidInput("a workflow needs a name, e.g. user/gromacs-1")
        user = dict(context.invocation_metadata()).get("x-squall-user", "")
        budget = request.budget_usd if request.HasField("budget_usd") else None
        run_id = self.runs.launch(request.name, request.fuzzfile, user or None, budget)
        return run_summary(self.engine.store, run_id).to_message()

    @_status_codes
    def GetWorkflow(self, request: pb.GetWorkflowRequest, context: Any) -> pb.Workflow:
        return self._summary(request.name)

    @_status_codes
    def ListWorkflows(
        self, request: pb.ListWorkflowsRequest, context: Any
    ) -> pb.ListWorkflowsResponse:
        rows = run_list(self.engine.store, request.pattern or "*")
        return pb.ListWorkflowsResponse(workflows=[r.to_message() for r in rows])

    @_status_codes
    def WatchWorkflow(
        self, request: pb.WatchWorkflowRequest, context: Any
    ) -> Iterator[pb.WorkflowUpdate]:
        last = None
        for run, events in watch(self.engine.store, find_run(self.engine.store, request.name)):
            if not context.is_active():
                return
            if events or run != last:  # only what changed goes out
                yield pb.WorkflowUpdate(
                    workflow=run.to_message(), events=[e.to_message() for e in events]
                )
                last = run

    @_status_codes
    def CancelWorkflow(self, request: pb.CancelWorkflowRequest, context: Any) -> pb.Workflow:
        request_cancel(self.engine.store, request.name)
        return self._summary(request.name)

    @_status_codes
    def Logs(self, request: pb.LogsRequest, context: Any) -> Iterator[pb.LogChunk]:
        for data in self.access.logs(request.name, request.job, request.index, request.follow):
            yield pb.LogChunk(data=data)

    @_status_codes
    def Exec(
        self, request_iterator: Iterator[pb.ExecInput], context: Any
    ) -> Iterator[pb.ExecOutput]:
        yield from self.access.exec(request_iterator)

    @_status_codes
    def PortForward(
        self, request_iterator: Iterator[pb.PortForwardInput], context: Any
    ) -> Iterator[pb.PortForwardOutput]:
        yield from self.access.port_forward(request_iterator)

    # ---- schedules

    @_status_codes
    def CreateSchedule(self, request: pb.CreateScheduleRequest, context: Any) -> pb.ScheduleStatus:
        user = dict(context.invocation_metadata()).get("x-squall-user", "") or "unknown"
        view = schedules.create_schedule(
            self.engine.store,
            request.name,
            request.fuzzfile,
            request.cron,
            owner=user,
            window_seconds=request.window_seconds,
            budget_usd=request.budget_usd if request.HasField("budget_usd") else None,
            policy=request.policy,
        )
        return view.to_message()

    @_status_codes
    def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: Any
    ) -> pb.ListSchedulesResponse:
        found = schedules.list_schedules(self.engine.store)
        return pb.ListSchedulesResponse(schedules=[v.to_message() for v in found])

    @_status_codes
    def GetSchedule(self, request: pb.GetScheduleRequest, context: Any) -> pb.ScheduleStatus:
        return schedules.show_schedule(self.engine.store, request.name).to_message()

    @_status_codes
    def PauseSchedule(self, request: pb.PauseScheduleRequest, context: Any) -> pb.ScheduleStatus:
        view = schedules.set_paused(self.engine.store, request.name, request.paused)
        return view.to_message()

    @_status_codes
    def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: Any
    ) -> pb.DeleteScheduleResponse:
        schedules.delete_schedule(self.engine.store, request.name)
        return pb.DeleteScheduleResponse()

    def shutdown(self, grace: float = 60.0) -> None:
        """Cancel the runs this server owns and wait for their clusters to come down."""
        self.runs.shutdown(grace)


def _add_servicer(servicer: ControlServer, server: grpc.Server) -> None:
    """The generated registration, but with StartWorkflow's own request deserializer."""
    handlers: dict[str, dict[str, Any]] = {}

    class Collect:  # stands in for the server to receive the generated method handlers
        def add_generic_rpc_handlers(self, _: Any) -> None:
            pass

        def add_registered_method_handlers(self, service: str, found: dict[str, Any]) -> None:
            handlers[service] = found

    rpc.add_ControlServicer_to_server(servicer, Collect())  # type: ignore[no-untyped-call]
    if "StartWorkflow" not in handlers.get("squall.v1.Control", {}):
        raise RuntimeError("the generated stubs no longer register methods by name: regenerate")
    for service, methods in handlers.items():
        start = methods["StartWorkflow"]
        methods["StartWorkflow"] = start._replace(request_deserializer=start_workflow_deserializer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
        server.add_registered_method_handlers(service, methods)


def serve(
    engine: Engine,
    address: str,
    token: str,
    *,
    tls: tuple[bytes, bytes] | None = None,
    workers: int = 64,
    runs: RunThreads | None = None,
) -> tuple[grpc.Server, int, ControlServer]:
    """Start serving on `address` (with TLS when given a certificate chain and key);
    `runs`: where started runs are driven (shared with a scheduler)."""
    if len(token) < 16:
        raise ValueError("the server token must be at least 16 characters")
    servicer = ControlServer(engine, runs)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="control-rpc"),
        interceptors=[TokenAuth(token)],
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
    )
    _add_servicer(servicer, server)
    if tls is not None:
        credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise InvalidInput(f"cannot listen on {address}")
    server.start()
    return server, port, servicer
