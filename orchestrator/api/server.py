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
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc

from api.squall.v1 import control_pb2 as pb
from api.squall.v1 import control_pb2_grpc as rpc
from federate.policy import narrow, parse_policy, policy_text

from .. import identity, schedules
from ..access import RunAccess
from ..engine import Engine, request_cancel
from ..errors import CATEGORY_TRAILER, InvalidInput, NotFound, SquallError, describe, status_of
from ..fuzzfile import FuzzfileError
from ..fuzzfile.limits import MAX_FUZZFILE_BYTES
from ..fuzzfile.loader import load_bytes, load_text
from ..identity import Principal
from ..run_threads import RunThreads
from ..secrets import parse_reference
from ..views import find_run, run_list, run_summary, watch
from .audit import MAX_ENTRIES, read_audit
from .gate import ANY, Gate, guarded
from .iam import DEFAULT, AccessPolicy, placement_text, secret_holder
from .messages import (
    audit_message,
    identity_message,
    secret_message,
    token_message,
    user_message,
)
from .requests import RawStartWorkflowRequest, start_workflow_deserializer

__all__ = ["MAX_REQUEST_BYTES", "ControlServer", "serve"]

log = logging.getLogger("squall.server")
F = TypeVar("F", bound=Callable[..., Any])

# The largest request the server reads: a Fuzzfile at its limit with room to spare, so that
# one somewhat over it is told so by a diagnostic; gRPC refuses larger ones unread.
MAX_REQUEST_BYTES = 2 * MAX_FUZZFILE_BYTES
# A user's own tokens, without admin, live at most USER_TOKEN_TTL (a stolen token cannot
# mint one that outlives its revocation for long)
USER_TOKEN_TTL = timedelta(days=365)
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


def _name(request: Any) -> str:
    return str(request.name or "")


def _started(request: Any) -> str:
    """The run a stream's first message names."""
    return str(request.start.name) if request.WhichOneof("input") == "start" else ""


def _ttl(request: Any, field: str) -> timedelta | None:
    """A token lifetime from an optional seconds field (`identity.token_ttl`)."""
    return identity.token_ttl(getattr(request, field) if request.HasField(field) else None)


class ControlServer(rpc.ControlServicer):
    """Every method is `guarded`: the caller's token, the access policy and the audit log
    (`gate`) come before what it does; each gets the caller as its fourth argument."""

    def __init__(
        self, engine: Engine, runs: RunThreads | None = None, policy: AccessPolicy = DEFAULT
    ) -> None:
        self.engine = engine
        self.access = RunAccess(engine.store, engine.data_dir, engine.secrets)
        self.runs = runs or RunThreads(engine)
        self.gate = Gate(engine.store, policy)

    def _summary(self, name: str) -> pb.Workflow:
        return run_summary(self.engine.store, find_run(self.engine.store, name)).to_message()

    def _placement(self, who: Principal, name: str, policy: str = "") -> str:
        """The placement policy text for runs `who` starts as `name`: `policy` narrowed to
        the sites its grants allow."""
        sites = self.gate.policy.sites(who, name)
        if sites is None:
            return policy
        narrowed = parse_policy(placement_text(sites), "the access policy's sites")
        if policy:
            narrowed = narrow(parse_policy(policy, "the schedule's policy"), narrowed)
        return policy_text(narrowed)

    @_status_codes
    @guarded("start", _name)
    def StartWorkflow(
        self,
        request: pb.StartWorkflowRequest | RawStartWorkflowRequest,
        context: Any,
        who: Principal,
    ) -> pb.Workflow:
        if isinstance(request, RawStartWorkflowRequest):  # not UTF-8: say where
            if request.name is None:
                raise InvalidInput("the workflow name is not UTF-8 text")
            raise FuzzfileError(load_bytes(request.fuzzfile, request.name).diagnostics)
        if not request.name:
            raise InvalidInput("a workflow needs a name, e.g. user/gromacs-1")
        wf = load_text(request.fuzzfile, request.name).unwrap()
        if any(v.egress for v in wf.volumes.values()):
            self.gate.require(context, who, "StartWorkflow", "egress", request.name)
        budget = request.budget_usd if request.HasField("budget_usd") else None
        policy = self._placement(who, request.name)
        run_id = self.runs.launch(request.name, request.fuzzfile, who.name, budget, policy)
        return run_summary(self.engine.store, run_id).to_message()

    @_status_codes
    @guarded("status", _name, of="run")
    def GetWorkflow(
        self, request: pb.GetWorkflowRequest, context: Any, who: Principal
    ) -> pb.Workflow:
        return self._summary(request.name)

    @_status_codes
    @guarded("status")
    def ListWorkflows(
        self, request: pb.ListWorkflowsRequest, context: Any, who: Principal
    ) -> pb.ListWorkflowsResponse:
        rows = run_list(self.engine.store, request.pattern or "*")
        seen = [r for r in rows if self.gate.policy.allows(who, "status", r.name, r.owner)]
        return pb.ListWorkflowsResponse(workflows=[r.to_message() for r in seen])

    @_status_codes
    @guarded("status", _name, of="run")
    def WatchWorkflow(
        self, request: pb.WatchWorkflowRequest, context: Any, who: Principal
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
    @guarded("cancel", _name, of="run")
    def CancelWorkflow(
        self, request: pb.CancelWorkflowRequest, context: Any, who: Principal
    ) -> pb.Workflow:
        request_cancel(self.engine.store, request.name)
        return self._summary(request.name)

    @_status_codes
    @guarded("log", _name, of="run")
    def Logs(self, request: pb.LogsRequest, context: Any, who: Principal) -> Iterator[pb.LogChunk]:
        chunks = self.access.logs(
            request.name, request.job, request.index, request.follow, context.add_callback
        )
        for data in chunks:
            yield pb.LogChunk(data=data)

    @_status_codes
    @guarded("exec", _started, of="run")
    def Exec(
        self, request_iterator: Iterator[pb.ExecInput], context: Any, who: Principal
    ) -> Iterator[pb.ExecOutput]:
        yield from self.access.exec(request_iterator, context.add_callback)

    @_status_codes
    @guarded("port-forward", _started, of="run")
    def PortForward(
        self, request_iterator: Iterator[pb.PortForwardInput], context: Any, who: Principal
    ) -> Iterator[pb.PortForwardOutput]:
        yield from self.access.port_forward(request_iterator, context.add_callback)

    # ---- schedules

    @_status_codes
    @guarded("schedule", _name)
    def CreateSchedule(
        self, request: pb.CreateScheduleRequest, context: Any, who: Principal
    ) -> pb.ScheduleStatus:
        self.gate.require(context, who, "CreateSchedule", "start", request.name)
        wf = load_text(request.fuzzfile, request.name).unwrap()
        if any(v.egress for v in wf.volumes.values()):
            self.gate.require(context, who, "CreateSchedule", "egress", request.name)
        view = schedules.create_schedule(
            self.engine.store,
            request.name,
            request.fuzzfile,
            request.cron,
            owner=who.name,
            window_seconds=request.window_seconds,
            budget_usd=request.budget_usd if request.HasField("budget_usd") else None,
            policy=self._placement(who, request.name, request.policy),
        )
        return view.to_message()

    @_status_codes
    @guarded("schedule")
    def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: Any, who: Principal
    ) -> pb.ListSchedulesResponse:
        found = schedules.list_schedules(self.engine.store)
        seen = [v for v in found if self.gate.policy.allows(who, "schedule", v.name, v.owner)]
        return pb.ListSchedulesResponse(schedules=[v.to_message() for v in seen])

    @_status_codes
    @guarded("schedule", _name, of="schedule")
    def GetSchedule(
        self, request: pb.GetScheduleRequest, context: Any, who: Principal
    ) -> pb.ScheduleStatus:
        return schedules.show_schedule(self.engine.store, request.name).to_message()

    @_status_codes
    @guarded("schedule", _name, of="schedule")
    def PauseSchedule(
        self, request: pb.PauseScheduleRequest, context: Any, who: Principal
    ) -> pb.ScheduleStatus:
        view = schedules.set_paused(self.engine.store, request.name, request.paused)
        return view.to_message()

    @_status_codes
    @guarded("schedule", _name, of="schedule")
    def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: Any, who: Principal
    ) -> pb.DeleteScheduleResponse:
        schedules.delete_schedule(self.engine.store, request.name)
        return pb.DeleteScheduleResponse()

    # ---- identity and access

    @_status_codes
    @guarded(ANY)
    def WhoAmI(self, request: pb.WhoAmIRequest, context: Any, who: Principal) -> pb.Identity:
        return identity_message(who)

    @_status_codes
    @guarded("admin", _name)
    def AddUser(self, request: pb.AddUserRequest, context: Any, who: Principal) -> pb.NewToken:
        ttl = _ttl(request, "token_ttl_seconds")
        user = identity.add_user(
            self.engine.store, request.name, list(request.groups), admin=request.admin
        )
        text, token = identity.issue_token(
            self.engine.store, user.name, ttl=ttl, note=f"made by {who.name} with the user"
        )
        return pb.NewToken(user=user_message(user), token=token_message(token), text=text)

    @_status_codes
    @guarded("admin")
    def ListUsers(
        self, request: pb.ListUsersRequest, context: Any, who: Principal
    ) -> pb.ListUsersResponse:
        users = identity.list_users(self.engine.store)
        return pb.ListUsersResponse(users=[user_message(u) for u in users])

    @_status_codes
    @guarded("admin", _name)
    def DisableUser(
        self, request: pb.DisableUserRequest, context: Any, who: Principal
    ) -> pb.UserInfo:
        if request.name == who.name and request.disabled:
            raise InvalidInput("an admin cannot disable itself (another admin can)")
        user = identity.set_disabled(self.engine.store, request.name, request.disabled)
        self.gate.recheck()  # its open streams end now
        return user_message(user)

    def _for_user(self, context: Any, who: Principal, method: str, user: str) -> str:
        """`user` (empty: the caller); another user's tokens take `admin`."""
        user = user or who.name
        if user != who.name:
            self.gate.require(context, who, method, "admin", user)
        return user

    @_status_codes
    @guarded(ANY)
    def CreateToken(
        self, request: pb.CreateTokenRequest, context: Any, who: Principal
    ) -> pb.NewToken:
        user = self._for_user(context, who, "CreateToken", request.user)
        ttl = _ttl(request, "ttl_seconds")
        if ttl is None or ttl > USER_TOKEN_TTL:
            long = "never expires" if ttl is None else f"lives {ttl.days} days"
            self.gate.require(context, who, "CreateToken", "admin", f"a token that {long}")
        text, token = identity.issue_token(self.engine.store, user, ttl=ttl, note=request.note)
        return pb.NewToken(token=token_message(token), text=text)

    @_status_codes
    @guarded(ANY)
    def ListTokens(
        self, request: pb.ListTokensRequest, context: Any, who: Principal
    ) -> pb.ListTokensResponse:
        user = self._for_user(context, who, "ListTokens", request.user)
        tokens = identity.list_tokens(self.engine.store, None if user == "*" else user)
        return pb.ListTokensResponse(tokens=[token_message(t) for t in tokens])

    @_status_codes
    @guarded(ANY)
    def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: Any, who: Principal
    ) -> pb.TokenInfo:
        mine = {t.id for t in identity.list_tokens(self.engine.store, who.name)}
        if request.id not in mine:
            self.gate.require(context, who, "RevokeToken", "admin", request.id)
        token = identity.revoke_token(self.engine.store, request.id)
        self.gate.recheck()  # its open streams end now
        return token_message(token)

    @_status_codes
    @guarded("admin")
    def ListAudit(
        self, request: pb.ListAuditRequest, context: Any, who: Principal
    ) -> pb.ListAuditResponse:
        since = None
        if request.since:
            try:
                since = datetime.fromisoformat(request.since)
            except ValueError:
                raise InvalidInput(f"since: not an ISO 8601 time: {request.since!r}") from None
            if since.tzinfo is None:
                since = since.replace(tzinfo=UTC)
        entries = read_audit(
            self.engine.store,
            user=request.user,
            since=since,
            limit=request.limit or MAX_ENTRIES,
            denied=request.denied,
        )
        return pb.ListAuditResponse(entries=[audit_message(e) for e in entries])

    @_status_codes
    @guarded("admin")
    def RotateKey(
        self, request: pb.RotateKeyRequest, context: Any, who: Principal
    ) -> pb.RotateKeyResponse:
        return pb.RotateKeyResponse(reencrypted=self.engine.secrets.rotate_key())

    def _holder(self, context: Any, who: Principal, method: str, ref: str, group: str) -> str:
        """Whose secret `ref` is when `who` sets or deletes it (`iam.secret_holder`)."""
        scope, _ = parse_reference(ref)
        holder, needs_admin = secret_holder(scope, who, group)
        if needs_admin:
            self.gate.require(context, who, method, "admin", needs_admin)
        return holder

    @_status_codes
    @guarded("secret", lambda r: str(r.ref))
    def SetSecret(
        self, request: pb.SetSecretRequest, context: Any, who: Principal
    ) -> pb.SecretInfo:
        holder = self._holder(context, who, "SetSecret", request.ref, request.group)
        if not request.value.strip():
            raise InvalidInput("a secret's value cannot be empty")
        self.engine.secrets.put(request.ref, holder, request.value)
        scope, _ = parse_reference(request.ref)
        return pb.SecretInfo(ref=request.ref, scope=scope, holder=holder)

    @_status_codes
    @guarded("secret")
    def ListSecrets(
        self, request: pb.ListSecretsRequest, context: Any, who: Principal
    ) -> pb.ListSecretsResponse:
        if request.all:
            self.gate.require(context, who, "ListSecrets", "admin", "every holder's secrets")
        entries = self.engine.secrets.entries(who.name, who.groups, everything=request.all)
        return pb.ListSecretsResponse(secrets=[secret_message(e) for e in entries])

    @_status_codes
    @guarded("secret", lambda r: str(r.ref))
    def DeleteSecret(
        self, request: pb.DeleteSecretRequest, context: Any, who: Principal
    ) -> pb.DeleteSecretResponse:
        holder = self._holder(context, who, "DeleteSecret", request.ref, request.group)
        if not self.engine.secrets.remove(request.ref, holder):
            raise NotFound(f"{request.ref} is not set" + (f" for {holder}" if holder else ""))
        return pb.DeleteSecretResponse()

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
    policy: AccessPolicy = DEFAULT,
) -> tuple[grpc.Server, int, ControlServer]:
    """Start serving on `address` (with TLS when given a certificate chain and key);
    `token`: the server's own token, which belongs to the admin user `admin`
    (`identity.bootstrap`); `runs`: where started runs are driven (shared with a scheduler);
    `policy`: who may do what."""
    identity.bootstrap(engine.store, token)
    servicer = ControlServer(engine, runs, policy)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="control-rpc"),
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
