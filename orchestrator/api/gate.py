"""The one place the control plane decides who may do what: each call's token is checked
(`identity.authenticate`), its verb and target are checked against the access policy
(`iam`), and the call goes to the audit log, allowed or denied, before anything is done.

`guarded(verb, target, of)` marks a servicer method with what it needs; the server applies
it to every method of the Control service (a test checks that none is left unmarked).
Streaming requests (exec, port-forward) are checked on their first message, which names the
run, before any byte reaches an agent.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from ..errors import NotFound, SquallError
from ..identity import Principal, authenticate
from ..store import Schedule, Store
from ..views import run_named
from .audit import record
from .iam import AccessPolicy

__all__ = ["Gate", "Guard", "guarded"]

ANY = ""  # the verb of calls any authenticated user may make (the method checks the rest)


@dataclass(frozen=True, slots=True)
class Guard:
    """What a method needs: `verb` (ANY: only a valid token), the name it acts on in its
    request, and `of`: "run" or "schedule" when that names one that exists (its owner counts),
    "" when it is new (the caller will own it) or the method takes no name."""

    verb: str
    target: Callable[[Any], str] | None = None
    of: str = ""


class Gate:
    def __init__(self, store: Store, policy: AccessPolicy) -> None:
        self.store = store
        self.policy = policy

    def caller(self, context: Any, method: str) -> Principal:
        """The authenticated caller, or Unauthenticated (written to the audit log)."""
        metadata = dict(context.invocation_metadata() or ())
        header = str(metadata.get("authorization", ""))
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        try:
            return authenticate(self.store, token)
        except SquallError as exc:
            self.audit(context, "", method, "-", "", False, str(exc))
            raise

    def owner(self, of: str, name: str) -> tuple[str, str]:
        """(name, owner) of the run or schedule called `name`; NotFound if there is none."""
        with self.store.session() as s:
            if of == "run":
                run = run_named(s, name)
                return run.name, run.owner
            found = s.scalars(select(Schedule.owner).where(Schedule.name == name)).first()
            if found is None:
                raise NotFound(f"no schedule {name!r} (`squall schedule list`)")
            return name, found

    def admit(self, context: Any, who: Principal, method: str, guard: Guard, name: str) -> None:
        """Allow the call or raise PermissionDenied (or NotFound); either way, audited."""
        owner: str | None = None
        try:
            if guard.of and name:
                name, owner = self.owner(guard.of, name)
            if guard.verb != ANY:
                self.policy.check(who, guard.verb, name, owner)
        except SquallError as exc:
            self.audit(context, who.name, method, guard.verb or "-", name, False, str(exc))
            raise
        self.audit(context, who.name, method, guard.verb or "-", name, True)

    def require(self, context: Any, who: Principal, method: str, verb: str, name: str = "") -> None:
        """A further check a method makes itself (egress on start; admin for another user's
        tokens; a group's secrets), audited as its own entry."""
        try:
            self.policy.check(who, verb, name)
        except SquallError as exc:
            self.audit(context, who.name, method, verb, name, False, str(exc))
            raise
        self.audit(context, who.name, method, verb, name, True)

    def audit(
        self,
        context: Any,
        user: str,
        method: str,
        verb: str,
        target: str,
        allowed: bool,
        detail: str = "",
    ) -> None:
        record(
            self.store,
            user=user,
            method=method,
            verb=verb,
            target=target,
            allowed=allowed,
            detail=detail,
            peer=str(context.peer() or ""),
        )


Method = Callable[[Any, Any, Any], Any]  # what gRPC calls: (self, request, context)


def guarded(
    verb: str, target: Callable[[Any], str] | None = None, of: str = ""
) -> Callable[[Callable[..., Any]], Method]:
    """Check the caller and `verb` on the request's `target` before the method runs; the
    method gets the caller as a fourth argument. Methods whose request is a stream are
    checked on its first message."""
    guard = Guard(verb, target, of)

    def wrap(method: Callable[..., Any]) -> Method:
        name = method.__name__
        streamed = name in STREAMED_REQUESTS

        def enter(self: Any, request: Any, context: Any) -> tuple[Any, Principal]:
            gate: Gate = self.gate
            who = gate.caller(context, name)
            subject = request
            if streamed:
                first = next(request, None)
                request = iter(()) if first is None else itertools.chain([first], request)
                subject = first
            try:
                found = target(subject) if target is not None and subject is not None else ""
            except (AttributeError, ValueError):
                found = ""
            gate.admit(context, who, name, guard, found or "")
            return request, who

        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def streaming(self: Any, request: Any, context: Any) -> Iterator[Any]:
                request, who = enter(self, request, context)
                yield from method(self, request, context, who)

            wrapper: Any = streaming
        else:

            @functools.wraps(method)
            def unary(self: Any, request: Any, context: Any) -> Any:
                request, who = enter(self, request, context)
                return method(self, request, context, who)

            wrapper = unary
        wrapper.guard = guard
        return wrapper  # type: ignore[no-any-return]

    return wrap


STREAMED_REQUESTS = frozenset({"Exec", "PortForward"})
