"""Where `squall workflow ...` commands act: this machine's store (local mode) or a server
(a context). Both give the same typed views (`orchestrator.view_types`: the local backend
reads them from the store, the remote one from the control API's messages), so each command
is written once."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from api.squall.v1 import control_pb2 as pb
from api.squall.v1 import control_pb2_grpc as rpc
from orchestrator.errors import (
    CATEGORY_TRAILER,
    Category,
    SquallError,
    UsageError,
    category_of,
    error_for,
)
from orchestrator.view_types import EventView, RunListItem, RunUpdate, RunView, ScheduleView

from .contexts import Context

if TYPE_CHECKING:
    from orchestrator.identity import Principal
    from orchestrator.secrets import SecretStore

__all__ = ["Backend", "LocalBackend", "RemoteBackend", "ServerError", "open_backend"]


class ServerError(SquallError):
    """The server could not be reached, or refused for a reason that is not the input's."""

    category = Category.SERVER


class Backend(Protocol):
    def start(self, name: str, text: str, budget_usd: float | None = None) -> RunView: ...
    def status(self, name: str) -> RunView: ...
    def runs(self, pattern: str) -> list[RunListItem]: ...
    def watch(self, name: str) -> Iterator[RunUpdate]:
        """The run and its new events until it has ended (the last update)."""
        ...

    def cancel(self, name: str) -> RunView: ...
    def logs(self, name: str, job: str, index: int, follow: bool) -> Iterator[bytes]: ...
    def exec(self, requests: Iterator[pb.ExecInput]) -> Iterator[pb.ExecOutput]: ...
    def port_forward(
        self, requests: Iterator[pb.PortForwardInput]
    ) -> Iterator[pb.PortForwardOutput]: ...

    def create_schedule(self, request: pb.CreateScheduleRequest) -> ScheduleView: ...
    def schedules(self) -> list[ScheduleView]: ...
    def schedule(self, name: str) -> ScheduleView:
        """The schedule with its latest firings."""
        ...

    def pause_schedule(self, name: str, paused: bool) -> ScheduleView: ...
    def delete_schedule(self, name: str) -> None: ...

    # identity and access (`squall admin`, `squall login`, `squall secret`); lifetimes in
    # seconds, None for the default, 0 for never
    def whoami(self) -> pb.Identity: ...
    def add_user(
        self, name: str, groups: list[str], admin: bool, ttl: float | None
    ) -> pb.NewToken: ...
    def users(self) -> list[pb.UserInfo]: ...
    def disable_user(self, name: str, disabled: bool) -> pb.UserInfo: ...
    def create_token(self, user: str, ttl: float | None, note: str) -> pb.NewToken: ...
    def tokens(self, user: str) -> list[pb.TokenInfo]: ...
    def revoke_token(self, token_id: str) -> pb.TokenInfo: ...
    def audit(
        self, user: str, since: datetime | None, limit: int, denied: bool = False
    ) -> list[pb.AuditEntry]: ...
    def rotate_key(self) -> int: ...
    def set_secret(self, ref: str, value: bytes, group: str) -> pb.SecretInfo: ...
    def secrets(self, everything: bool) -> list[pb.SecretInfo]: ...
    def delete_secret(self, ref: str, group: str) -> None: ...


class LocalBackend:
    """This machine's store. Runs start with `squall run` (or a server), not here."""

    def __init__(self) -> None:
        from orchestrator.access import RunAccess
        from orchestrator.local_site import LocalSettings

        settings = LocalSettings()
        self.store = settings.store()
        self.data_dir = settings.data_dir
        self.access = RunAccess(self.store, settings.data_dir)

    def start(self, name: str, text: str, budget_usd: float | None = None) -> RunView:
        raise UsageError(
            "`workflow start` needs a server: start one with `squall server`, point the CLI at "
            "it with `squall context create` and `squall context use`; or run the workflow "
            "here, in this process, with `squall run FILE`"
        )

    def status(self, name: str) -> RunView:
        from orchestrator.views import find_run, run_summary

        return run_summary(self.store, find_run(self.store, name))

    def runs(self, pattern: str) -> list[RunListItem]:
        from orchestrator.views import run_list

        return run_list(self.store, pattern)

    def watch(self, name: str) -> Iterator[RunUpdate]:
        from orchestrator.views import find_run, watch

        return watch(self.store, find_run(self.store, name))

    def cancel(self, name: str) -> RunView:
        from orchestrator.engine import request_cancel

        request_cancel(self.store, name)
        return self.status(name)

    def logs(self, name: str, job: str, index: int, follow: bool) -> Iterator[bytes]:
        return self.access.logs(name, job, index, follow)

    def exec(self, requests: Iterator[pb.ExecInput]) -> Iterator[pb.ExecOutput]:
        return self.access.exec(requests)

    def port_forward(
        self, requests: Iterator[pb.PortForwardInput]
    ) -> Iterator[pb.PortForwardOutput]:
        return self.access.port_forward(requests)

    def create_schedule(self, request: pb.CreateScheduleRequest) -> ScheduleView:

        from orchestrator.schedules import create_schedule

        return create_schedule(
            self.store,
            request.name,
            request.fuzzfile,
            request.cron,
            owner=getpass.getuser(),
            window_seconds=request.window_seconds,
            budget_usd=request.budget_usd if request.HasField("budget_usd") else None,
            policy=request.policy,
        )

    def schedules(self) -> list[ScheduleView]:
        from orchestrator.schedules import list_schedules

        return list_schedules(self.store)

    def schedule(self, name: str) -> ScheduleView:
        from orchestrator.schedules import show_schedule

        return show_schedule(self.store, name)

    def pause_schedule(self, name: str, paused: bool) -> ScheduleView:
        from orchestrator.schedules import set_paused

        return set_paused(self.store, name, paused)

    def delete_schedule(self, name: str) -> None:
        from orchestrator.schedules import delete_schedule

        delete_schedule(self.store, name)

    # ---- identity and access: this machine's store, as its owner (an admin of it)

    def _me(self) -> Principal:
        from orchestrator.identity import Principal, groups_of

        name = getpass.getuser()
        return Principal(name, groups_of(self.store, name), admin=True)

    def _secrets(self) -> SecretStore:
        from orchestrator.secrets import SecretStore

        return SecretStore(
            self.store, self.data_dir / "secrets.key", legacy_dir=self.data_dir / "secrets"
        )

    def whoami(self) -> pb.Identity:
        from orchestrator.api.messages import identity_message

        return identity_message(self._me())

    def add_user(self, name: str, groups: list[str], admin: bool, ttl: float | None) -> pb.NewToken:
        from orchestrator import identity
        from orchestrator.api.messages import token_message, user_message

        user = identity.add_user(self.store, name, groups, admin=admin)
        text, token = identity.issue_token(
            self.store, name, ttl=identity.token_ttl(ttl), note="made with the user"
        )
        return pb.NewToken(user=user_message(user), token=token_message(token), text=text)

    def users(self) -> list[pb.UserInfo]:
        from orchestrator import identity
        from orchestrator.api.messages import user_message

        return [user_message(u) for u in identity.list_users(self.store)]

    def disable_user(self, name: str, disabled: bool) -> pb.UserInfo:
        from orchestrator import identity
        from orchestrator.api.messages import user_message

        return user_message(identity.set_disabled(self.store, name, disabled))

    def create_token(self, user: str, ttl: float | None, note: str) -> pb.NewToken:
        from orchestrator import identity
        from orchestrator.api.messages import token_message

        if not user:
            raise UsageError("name the user whose token it is (--user): this machine's store")
        text, token = identity.issue_token(self.store, user, ttl=identity.token_ttl(ttl), note=note)
        return pb.NewToken(token=token_message(token), text=text)

    def tokens(self, user: str) -> list[pb.TokenInfo]:
        from orchestrator import identity
        from orchestrator.api.messages import token_message

        found = identity.list_tokens(self.store, None if user in ("", "*") else user)
        return [token_message(t) for t in found]

    def revoke_token(self, token_id: str) -> pb.TokenInfo:
        from orchestrator import identity
        from orchestrator.api.messages import token_message

        return token_message(identity.revoke_token(self.store, token_id))

    def audit(
        self, user: str, since: datetime | None, limit: int, denied: bool = False
    ) -> list[pb.AuditEntry]:
        from orchestrator.api.audit import MAX_ENTRIES, read_audit
        from orchestrator.api.messages import audit_message

        found = read_audit(
            self.store, user=user, since=since, limit=limit or MAX_ENTRIES, denied=denied
        )
        return [audit_message(e) for e in found]

    def rotate_key(self) -> int:
        return self._secrets().rotate_key()

    def set_secret(self, ref: str, value: bytes, group: str) -> pb.SecretInfo:
        from orchestrator.api.iam import secret_holder
        from orchestrator.secrets import parse_reference

        scope, _ = parse_reference(ref)
        holder, _ = secret_holder(scope, self._me(), group)
        self._secrets().put(ref, holder, value)
        return pb.SecretInfo(ref=ref, scope=scope, holder=holder)

    def secrets(self, everything: bool) -> list[pb.SecretInfo]:
        from orchestrator.api.messages import secret_message

        me = self._me()
        return [
            secret_message(e)
            for e in self._secrets().entries(me.name, me.groups, everything=everything)
        ]

    def delete_secret(self, ref: str, group: str) -> None:
        from orchestrator.api.iam import secret_holder
        from orchestrator.errors import NotFound
        from orchestrator.secrets import parse_reference

        scope, _ = parse_reference(ref)
        holder, _ = secret_holder(scope, self._me(), group)
        if not self._secrets().remove(ref, holder):
            raise NotFound(f"{ref} is not set" + (f" for {holder}" if holder else ""))


def _error(exc: grpc.RpcError, server: str) -> SquallError:
    """A failed call as the error of its category (`orchestrator.errors.ERRORS`): the status
    and the category the server sent with it."""
    code, details = exc.code(), exc.details() or ""
    trailers = getattr(exc, "trailing_metadata", lambda: None)() or ()
    sent = next((str(v) for k, v in trailers if k == CATEGORY_TRAILER), None)
    category = category_of(code.name, sent)
    if category is Category.UNAUTHENTICATED:
        return error_for(category, f"{server} refused the token: {details}")
    if category not in (Category.SERVER, Category.INTERNAL):
        return error_for(category, details)
    if code == grpc.StatusCode.UNAVAILABLE:
        error = ServerError(f"cannot reach the server at {server}: {details}")
    else:
        error = ServerError(f"{server}: {code.name}: {details}")
    error.category = category
    return error


class RemoteBackend:
    """A Squall server, through its gRPC API."""

    def __init__(self, context: Context) -> None:
        self.server = context.server
        if context.ca_file:
            with open(context.ca_file, "rb") as f:
                credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            channel = grpc.secure_channel(context.server, credentials)
        else:
            channel = grpc.insecure_channel(context.server)
        self.channel = channel
        self.stub = rpc.ControlStub(channel)  # type: ignore[no-untyped-call]
        self.metadata = (("authorization", f"Bearer {context.token}"),)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=60)
        except grpc.RpcError as exc:
            raise _error(exc, self.server) from None

    def _stream(self, method: Any, request: Any) -> Iterator[Any]:
        try:
            yield from method(request, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.server) from None

    def start(self, name: str, text: str, budget_usd: float | None = None) -> RunView:
        request = pb.StartWorkflowRequest(name=name, fuzzfile=text, budget_usd=budget_usd)
        return RunView.from_message(self._call(self.stub.StartWorkflow, request))

    def status(self, name: str) -> RunView:
        request = pb.GetWorkflowRequest(name=name)
        return RunView.from_message(self._call(self.stub.GetWorkflow, request))

    def runs(self, pattern: str) -> list[RunListItem]:
        reply = self._call(self.stub.ListWorkflows, pb.ListWorkflowsRequest(pattern=pattern))
        return [RunListItem.from_message(w) for w in reply.workflows]

    def watch(self, name: str) -> Iterator[RunUpdate]:
        """The server's stream of updates: it sends one when something changed, and ends
        after the one in which the run has ended (`orchestrator.views.watch` on its side)."""
        for update in self._stream(self.stub.WatchWorkflow, pb.WatchWorkflowRequest(name=name)):
            events = tuple(EventView.from_message(e) for e in update.events)
            yield RunView.from_message(update.workflow), events

    def cancel(self, name: str) -> RunView:
        request = pb.CancelWorkflowRequest(name=name)
        return RunView.from_message(self._call(self.stub.CancelWorkflow, request))

    def logs(self, name: str, job: str, index: int, follow: bool) -> Iterator[bytes]:
        request = pb.LogsRequest(name=name, job=job, index=index, follow=follow)
        for chunk in self._stream(self.stub.Logs, request):
            yield chunk.data

    def exec(self, requests: Iterator[pb.ExecInput]) -> Iterator[pb.ExecOutput]:
        return self._stream(self.stub.Exec, requests)

    def port_forward(
        self, requests: Iterator[pb.PortForwardInput]
    ) -> Iterator[pb.PortForwardOutput]:
        return self._stream(self.stub.PortForward, requests)

    def create_schedule(self, request: pb.CreateScheduleRequest) -> ScheduleView:
        return ScheduleView.from_message(self._call(self.stub.CreateSchedule, request))

    def schedules(self) -> list[ScheduleView]:
        reply = self._call(self.stub.ListSchedules, pb.ListSchedulesRequest())
        return [ScheduleView.from_message(m) for m in reply.schedules]

    def schedule(self, name: str) -> ScheduleView:
        request = pb.GetScheduleRequest(name=name)
        return ScheduleView.from_message(self._call(self.stub.GetSchedule, request))

    def pause_schedule(self, name: str, paused: bool) -> ScheduleView:
        request = pb.PauseScheduleRequest(name=name, paused=paused)
        return ScheduleView.from_message(self._call(self.stub.PauseSchedule, request))

    def delete_schedule(self, name: str) -> None:
        self._call(self.stub.DeleteSchedule, pb.DeleteScheduleRequest(name=name))

    def whoami(self) -> pb.Identity:
        reply: pb.Identity = self._call(self.stub.WhoAmI, pb.WhoAmIRequest())
        return reply

    def add_user(self, name: str, groups: list[str], admin: bool, ttl: float | None) -> pb.NewToken:
        request = pb.AddUserRequest(name=name, groups=groups, admin=admin, token_ttl_seconds=ttl)
        reply: pb.NewToken = self._call(self.stub.AddUser, request)
        return reply

    def users(self) -> list[pb.UserInfo]:
        return list(self._call(self.stub.ListUsers, pb.ListUsersRequest()).users)

    def disable_user(self, name: str, disabled: bool) -> pb.UserInfo:
        request = pb.DisableUserRequest(name=name, disabled=disabled)
        reply: pb.UserInfo = self._call(self.stub.DisableUser, request)
        return reply

    def create_token(self, user: str, ttl: float | None, note: str) -> pb.NewToken:
        request = pb.CreateTokenRequest(user=user, ttl_seconds=ttl, note=note)
        reply: pb.NewToken = self._call(self.stub.CreateToken, request)
        return reply

    def tokens(self, user: str) -> list[pb.TokenInfo]:
        return list(self._call(self.stub.ListTokens, pb.ListTokensRequest(user=user)).tokens)

    def revoke_token(self, token_id: str) -> pb.TokenInfo:
        reply: pb.TokenInfo = self._call(self.stub.RevokeToken, pb.RevokeTokenRequest(id=token_id))
        return reply

    def audit(
        self, user: str, since: datetime | None, limit: int, denied: bool = False
    ) -> list[pb.AuditEntry]:
        at = since.isoformat() if since else ""
        request = pb.ListAuditRequest(user=user, since=at, limit=limit, denied=denied)
        return list(self._call(self.stub.ListAudit, request).entries)

    def rotate_key(self) -> int:
        return int(self._call(self.stub.RotateKey, pb.RotateKeyRequest()).reencrypted)

    def set_secret(self, ref: str, value: bytes, group: str) -> pb.SecretInfo:
        request = pb.SetSecretRequest(ref=ref, value=value, group=group)
        reply: pb.SecretInfo = self._call(self.stub.SetSecret, request)
        return reply

    def secrets(self, everything: bool) -> list[pb.SecretInfo]:
        return list(
            self._call(self.stub.ListSecrets, pb.ListSecretsRequest(all=everything)).secrets
        )

    def delete_secret(self, ref: str, group: str) -> None:
        self._call(self.stub.DeleteSecret, pb.DeleteSecretRequest(ref=ref, group=group))


def open_backend(context_name: str | None = None) -> Backend:
    from .contexts import ContextFile

    context = ContextFile().selected(context_name)
    if context is None:
        return LocalBackend()
    return RemoteBackend(context)
