"""Servicer methods whose domain errors become gRPC status codes: one wrapper for plain and
streaming methods, given the function that maps an error to an abort (or re-raises it)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Abort", "translating"]

# (context, error): calls context.abort(...) for a domain error, else re-raises it
Abort = Callable[[Any, Exception], None]


def translating(abort: Abort) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator for servicer methods: what they raise goes through `abort`."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def streaming(self: Any, request: Any, context: Any) -> Iterator[Any]:
                try:
                    yield from method(self, request, context)
                except Exception as exc:  # re-raised unless a domain error
                    abort(context, exc)

            return streaming

        @functools.wraps(method)
        def unary(self: Any, request: Any, context: Any) -> Any:
            try:
                return method(self, request, context)
            except Exception as exc:  # re-raised unless a domain error
                abort(context, exc)
                raise  # pragma: no cover - abort raises

        return unary

    return wrap
