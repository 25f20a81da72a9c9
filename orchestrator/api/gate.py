"""The one place the control plane decides who may do what: each call's token is checked
(`identity.authenticate_in`), its verb and target are checked against the access policy
(`iam`), and the call goes to the audit log, allowed or denied, before anything is done; all
three in one unit of work of the store. When the call ends, its audit entry gets its outcome.

`guarded(verb, target, of)` marks a servicer method with what it needs; the server applies
it to every method of the Control service (a test checks that none is left unmarked).
Streaming requests (exec, port-forward) are checked on their first message, which names the
run, before any byte reaches an agent. An open stream (watch, log --follow, exec,
port-forward) is checked again every `STREAM_RECHECK_S` seconds, and at once after a token
is revoked or a user disabled here: when its token no longer works, or the policy no longer
allows it, it is cut off with UNAUTHENTICATED or PERMISSION_DENIED and the audit log says so.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import InvalidInput, NotFound, PermissionDenied, SquallError, Unauthenticated
from ..identity import Principal, authenticate, authenticate_in
from ..schedules import plain_name
from ..store import Schedule, Store, User
from ..views import run_named
from .audit import Throttle, add_entry, settle
from .iam import AccessPolicy

__all__ = ["STREAM_RECHECK_S", "Admission", "Gate", "Guard", "guarded"]

log = logging.getLogger(__name__)

ANY = ""  # the verb of calls any authenticated user may make (the method checks the rest)
STREAM_RECHECK_S = 5.0  # how often an open stream's token and permission are checked again
NEW_NAME_VERBS = frozenset({"start", "schedule"})  # they name a run or schedule to be made
LONGEST_RUN_NAME = 255  # the store's column
_RUN_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Guard:
    """What a method needs: `verb` (ANY: only a valid token), the name it acts on in its
    request, and `of`: "run" or "schedule" when that names one that exists (its owner counts),
    "" when it is new (the caller will own it) or the method takes no name."""

    verb: str
    target: Callable[[Any], str] | None = None
    of: str = ""


@dataclass(frozen=True, slots=True)
class Admission:
    """An allowed call: who makes it, what it acts on and its audit entry."""

    who: Principal
    token: str
    name: str
    owner: str | None
    entry: int


@dataclass(slots=True)
class _Stream:
    """An open stream, checked again while it lasts."""

    context: Any
    method: str
    verb: str
    admission: Admission
    cut: str = ""  # why it was cut off


def outcome_of(exc: BaseException) -> str:
    """An audit entry's outcome for a call that raised `exc`."""
    if isinstance(exc, GeneratorExit):
        return "ok (the client closed the stream)"
    if isinstance(exc, SquallError):
        return str(exc.category.value)
    return "internal"


def _cut_off(context: Any, code: grpc.StatusCode, reason: str) -> None:
    """End the call from another thread with `code` and `reason` (gRPC's server context has no
    public way to; the plain cancel, which says CANCELLED, is the fallback)."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], reason)  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        context.cancel()


class Gate:
    def __init__(
        self, store: Store, policy: AccessPolicy, *, recheck_s: float = STREAM_RECHECK_S
    ) -> None:
        self.store = store
        self.policy = policy
        self.recheck_s = recheck_s
        self.throttle = Throttle()
        self._streams: dict[int, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._watcher: threading.Thread | None = None

    # ---- a call

    @staticmethod
    def token_of(context: Any) -> str:
        metadata = dict(context.invocation_metadata() or ())
        header = str(metadata.get("authorization", ""))
        return header[7:].strip() if header.lower().startswith("bearer ") else ""

    def owner_in(self, s: Session, of: str, name: str) -> tuple[str, str]:
        """(name, owner) of the run or schedule called `name`; NotFound if there is none."""
        if of == "run":
            run = run_named(s, name)
            return run.name, run.owner
        found = s.scalars(select(Schedule.owner).where(Schedule.name == name)).first()
        if found is None:
            raise NotFound(f"no schedule {name!r} (`squall schedule list`)")
        return name, found

    def _refused(self, s: Session, method: str, peer: str, exc: SquallError) -> None:
        """Audit a call without a valid token (throttled per client address)."""
        written, dropped = self.throttle.admit(peer.rpartition(":")[0] or peer)
        if written:
            more = f" ({dropped} more such calls from there not written one by one)"
            add_entry(
                s,
                user="",
                method=method,
                verb="-",
                allowed=False,
                detail=str(exc) + (more if dropped else ""),
                peer=peer,
                outcome=outcome_of(exc),
            )

    def authenticated(self, context: Any, method: str) -> Principal:
        """The caller, or Unauthenticated (audited): for a stream, before its first message
        is read."""
        failure: SquallError | None = None
        with self.store.session() as s:
            try:
                return authenticate_in(s, self.token_of(context))
            except SquallError as exc:
                failure = exc
                self._refused(s, method, str(context.peer() or ""), exc)
        raise failure

    def admit(
        self,
        context: Any,
        method: str,
        guard: Guard,
        name: str,
        known: Principal | None = None,
    ) -> Admission:
        """The caller, allowed to make the call, or Unauthenticated, PermissionDenied or
        NotFound; either way written to the audit log, in one unit of work. `known`: the
        caller, authenticated already (`authenticated`)."""
        token = self.token_of(context)
        peer = str(context.peer() or "")
        who: Principal | None = known
        owner: str | None = None
        failure: SquallError | None = None
        entry = 0
        with self.store.session() as s:
            if who is None:
                try:
                    who = authenticate_in(s, token)
                except SquallError as exc:
                    failure = exc
                    self._refused(s, method, peer, exc)
            if who is not None:
                try:
                    if guard.of and name:
                        name, owner = self.owner_in(s, guard.of, name)
                    if guard.verb in NEW_NAME_VERBS and not guard.of and name:
                        self._check_new_name(s, who, guard.verb, name)
                    if guard.verb != ANY:
                        self.policy.check(who, guard.verb, name, owner)
                except SquallError as exc:
                    failure = exc
                entry = add_entry(
                    s,
                    user=who.name,
                    method=method,
                    verb=guard.verb or "-",
                    target=name,
                    allowed=failure is None,
                    detail=str(failure or ""),
                    peer=peer,
                    outcome=outcome_of(failure) if failure else "",
                ).id
        if failure is not None:
            raise failure
        assert who is not None  # authenticated, or failure was set
        return Admission(who, token, name, owner, entry)

    @staticmethod
    def _check_new_name(s: Session, who: Principal, verb: str, name: str) -> None:
        """A new run's or schedule's name is plain (letters, digits, `._/-`) and not shaped
        like a run's id; one under a user's name (`alice/...`, in any case) is that user's:
        no one else may take it (admins may)."""
        if not plain_name(name, LONGEST_RUN_NAME) or _RUN_ID.match(name):
            raise InvalidInput(
                f"{name!r} cannot name a run or schedule: use letters, digits and . _ / - "
                "(at most 255, starting with a letter or digit, not shaped like a run id)"
            )
        prefix, slash, _ = name.lower().partition("/")
        if slash and prefix != who.name and not who.admin and s.get(User, prefix) is not None:
            raise PermissionDenied(
                f"{who.name} may not {verb} {name}: names under {prefix}/ are {prefix}'s; "
                f"use {who.name}/..."
            )

    def require(self, context: Any, who: Principal, method: str, verb: str, name: str = "") -> None:
        """A further check a method makes itself (egress on start; admin for another user's
        tokens; a group's secrets), audited as its own entry."""
        failure: SquallError | None = None
        try:
            self.policy.check(who, verb, name)
        except SquallError as exc:
            failure = exc
        with self.store.session() as s:
            add_entry(
                s,
                user=who.name,
                method=method,
                verb=verb,
                target=name,
                allowed=failure is None,
                detail=str(failure or ""),
                peer=str(context.peer() or ""),
                outcome=outcome_of(failure) if failure else "checked",
            )
        if failure is not None:
            raise failure

    def settle(self, entry: int, outcome: str) -> None:
        try:
            settle(self.store, entry, outcome)
        except SquallError:  # the call's own answer matters more than its audit outcome
            log.exception("could not write the outcome of audit entry %s", entry)

    # ---- open streams

    @contextlib.contextmanager
    def watching(
        self, context: Any, method: str, verb: str, admission: Admission
    ) -> Iterator[_Stream]:
        """Check the stream of `admission` again while the block runs (`recheck`)."""
        stream = _Stream(context, method, verb, admission)
        with self._lock:
            self._streams[id(stream)] = stream
            if self._watcher is None and not self._closed:
                self._watcher = threading.Thread(
                    target=self._watch, name="gate-streams", daemon=True
                )
                self._watcher.start()
        try:
            yield stream
        finally:
            with self._lock:
                self._streams.pop(id(stream), None)

    def open_streams(self) -> int:
        """How many streams are open now."""
        with self._lock:
            return len(self._streams)

    def recheck(self) -> None:
        """Check every open stream now (a token was revoked, a user disabled)."""
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _watch(self) -> None:
        while not self._closed:
            self._wake.wait(self.recheck_s)
            self._wake.clear()
            with self._lock:
                streams = [s for s in self._streams.values() if not s.cut]
            for stream in streams:
                try:
                    self._check_again(stream)
                except Exception:  # a store hiccup: the next round tries again
                    log.exception("could not check an open %s stream again", stream.method)

    def _check_again(self, stream: _Stream) -> None:
        a = stream.admission
        try:
            who = authenticate(self.store, a.token)
            if stream.verb != ANY:
                self.policy.check(who, stream.verb, a.name, a.owner)
            return
        except (Unauthenticated, PermissionDenied) as exc:
            failure: SquallError = exc
        with self._lock:  # it may have ended meanwhile
            if id(stream) not in self._streams:
                return
            stream.cut = f"cut off: {failure}"
        code = (
            grpc.StatusCode.UNAUTHENTICATED
            if isinstance(failure, Unauthenticated)
            else grpc.StatusCode.PERMISSION_DENIED
        )
        _cut_off(stream.context, code, f"the stream was cut off: {failure}")  # first, whatever
        self.settle(a.entry, stream.cut)  # the store says
        with self.store.session() as s:
            add_entry(
                s,
                user=a.who.name,
                method=stream.method,
                verb=stream.verb or "-",
                target=a.name,
                allowed=False,
                detail=f"an open stream was cut off: {failure}",
                outcome=outcome_of(failure),
            )


class ClientGone(Exception):
    """A streaming request ended before its first message: nothing to answer."""


Method = Callable[[Any, Any, Any], Any]  # what gRPC calls: (self, request, context)


def guarded(
    verb: str, target: Callable[[Any], str] | None = None, of: str = ""
) -> Callable[[Callable[..., Any]], Method]:
    """Check the caller and `verb` on the request's `target` before the method runs; the
    method gets the caller as a fourth argument. Methods whose request is a stream are
    checked on its first message; streams are checked again while they last."""
    guard = Guard(verb, target, of)

    def wrap(method: Callable[..., Any]) -> Method:
        name = method.__name__
        streamed = name in STREAMED_REQUESTS

        def enter(self: Any, request: Any, context: Any) -> tuple[Any, Admission]:
            gate: Gate = self.gate
            subject, known = request, None
            if streamed:  # who calls is checked before any message is read
                known = gate.authenticated(context, name)
                try:
                    first = next(request, None)
                except grpc.RpcError:  # the client went away before it said what it wants
                    raise ClientGone() from None
                request = iter(()) if first is None else itertools.chain([first], request)
                subject = first
            try:
                found = target(subject) if target is not None and subject is not None else ""
            except (AttributeError, ValueError):
                found = ""
            return request, gate.admit(context, name, guard, found or "", known)

        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def streaming(self: Any, request: Any, context: Any) -> Iterator[Any]:
                gate: Gate = self.gate
                try:
                    request, admission = enter(self, request, context)
                except ClientGone:
                    return
                outcome = "ok"
                with gate.watching(context, name, guard.verb, admission) as stream:
                    try:
                        yield from method(self, request, context, admission.who)
                    except BaseException as exc:
                        outcome = outcome_of(exc)
                        raise
                    finally:
                        gate.settle(admission.entry, stream.cut or outcome)

            wrapper: Any = streaming
        else:

            @functools.wraps(method)
            def unary(self: Any, request: Any, context: Any) -> Any:
                gate: Gate = self.gate
                request, admission = enter(self, request, context)
                try:
                    answer = method(self, request, context, admission.who)
                except BaseException as exc:
                    gate.settle(admission.entry, outcome_of(exc))
                    raise
                gate.settle(admission.entry, "ok")
                return answer

            wrapper = unary
        wrapper.guard = guard
        return wrapper  # type: ignore[no-any-return]

    return wrap


STREAMED_REQUESTS = frozenset({"Exec", "PortForward"})
