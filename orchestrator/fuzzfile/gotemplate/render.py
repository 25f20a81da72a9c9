"""Execute a parsed Go template against data, with Go's truth and printing rules.

Differences from Go, on purpose: a field that the data lacks is an error that names it
(Go prints `<no value>`), because a catalog value missing from values.yaml is a mistake.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from . import syntax as p
from .funcs import FailError, GoFuncError, builtin_funcs, go_print, truth

__all__ = ["FailError", "render"]


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


_MAX_OUTPUT = 10_000_000  # characters; a runaway range stops here


class _Exec:
    def __init__(self, funcs: Mapping[str, Callable[..., Any]]) -> None:
        self.funcs = funcs
        self.out: list[str] = []
        self.size = 0
        self.scopes: list[dict[str, Any]] = []

    # variables: each block opens a scope; `:=` declares in the innermost, `=` assigns where found
    def lookup(self, name: str, pos: p.Pos) -> Any:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise p.TemplateError(f"undefined variable {name}", pos.line, pos.column)

    def assign(self, name: str, value: Any, pos: p.Pos) -> None:
        for scope in reversed(self.scopes):
            if name in scope:
                scope[name] = value
                return
        raise p.TemplateError(f"undefined variable {name}", pos.line, pos.column)

    def write(self, text: str) -> None:
        self.size += len(text)
        if self.size > _MAX_OUTPUT:
            raise p.TemplateError(f"output is larger than {_MAX_OUTPUT} characters")
        self.out.append(text)

    def nodes(self, nodes: list[p.Node], dot: Any) -> None:
        for node in nodes:
            self.node(node, dot)

    def block(self, nodes: list[p.Node], dot: Any, scope: dict[str, Any] | None = None) -> None:
        self.scopes.append(scope or {})
        try:
            self.nodes(nodes, dot)
        finally:
            self.scopes.pop()

    def node(self, node: p.Node, dot: Any) -> None:
        if isinstance(node, p.Text):
            self.write(node.text)
        elif isinstance(node, p.Action):
            value = self.pipeline(node.pipeline, dot)
            if isinstance(value, Missing):
                pos = node.pipeline.pos
                raise p.TemplateError(
                    f"no value named {value.name!r} (add it to values.yaml or --set it)",
                    pos.line,
                    pos.column,
                )
            if not node.pipeline.decl:
                self.write(go_print(value))
        elif isinstance(node, p.If):
            self.scopes.append({})
            try:
                chosen = truth(self.pipeline(node.pipeline, dot))
                self.block(node.body if chosen else node.orelse, dot)
            finally:
                self.scopes.pop()
        elif isinstance(node, p.With):
            self.scopes.append({})
            try:
                value = self.pipeline(node.pipeline, dot)
                if truth(value):
                    self.block(node.body, value)
                else:
                    self.block(node.orelse, dot)
            finally:
                self.scopes.pop()
        elif isinstance(node, p.Range):
            self.range(node, dot)
        else:
            raise _Break() if node.kind == "break" else _Continue()

    def range(self, node: p.Range, dot: Any) -> None:
        pipe = node.pipeline
        decl, pipe_value = pipe.decl, p.Pipeline(pipe.commands, pipe.pos)
        value = self.pipeline(pipe_value, dot)
        if isinstance(value, Mapping):
            pairs = [(k, value[k]) for k in sorted(value)]
        elif isinstance(value, list | tuple | str):
            pairs = list(enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            pairs = [(i, i) for i in range(value)]
        elif value is None:
            pairs = []
        else:
            raise p.TemplateError(
                f"range can't iterate over {go_print(value)}", pipe.pos.line, pipe.pos.column
            )
        if not pairs:
            self.block(node.orelse, dot)
            return
        for key, item in pairs:
            scope: dict[str, Any] = {}
            if len(decl) == 1:
                scope[decl[0]] = item
            elif len(decl) == 2:
                scope[decl[0]], scope[decl[1]] = key, item
            try:
                self.block(node.body, item, scope)
            except _Break:
                break
            except _Continue:
                continue

    def pipeline(self, pipe: p.Pipeline, dot: Any) -> Any:
        value: Any = _NOTHING
        for cmd in pipe.commands:
            value = self.command(cmd, dot, value)
        if pipe.decl:
            if pipe.assign:
                self.assign(pipe.decl[0], value, pipe.pos)
            else:
                self.scopes[-1][pipe.decl[-1]] = value
        return value

    def command(self, cmd: p.Command, dot: Any, piped: Any) -> Any:
        head = cmd.args[0]
        if isinstance(head, p.Identifier):
            fn = self.funcs.get(head.name)
            if fn is None:
                raise p.TemplateError(
                    f'function "{head.name}" not defined', head.pos.line, head.pos.column
                )
            args = [self.operand(a, dot) for a in cmd.args[1:]]
            if piped is not _NOTHING:
                args.append(piped)
            args = [None if isinstance(a, Missing) else a for a in args]
            try:
                return fn(*args)
            except FailError as exc:
                exc.line, exc.column = head.pos.line, head.pos.column
                raise
            except (GoFuncError, TypeError, ValueError, IndexError, KeyError) as exc:
                raise p.TemplateError(
                    f"error calling {head.name}: {exc}", head.pos.line, head.pos.column
                ) from None
        if len(cmd.args) > 1 or piped is not _NOTHING:
            raise p.TemplateError(
                "can't give an argument to a non-function", cmd.pos.line, cmd.pos.column
            )
        return self.operand(head, dot)

    def operand(self, arg: Any, dot: Any) -> Any:
        if isinstance(arg, p.Literal):
            return arg.value
        if isinstance(arg, p.Dot):
            return dot
        if isinstance(arg, p.Variable):
            if arg.name == "$":
                return self.scopes[0]["$"]
            return self.lookup(arg.name, arg.pos)
        if isinstance(arg, p.Pipeline):
            return self.pipeline(arg, dot)
        if isinstance(arg, p.Identifier):
            fn = self.funcs.get(arg.name)
            if fn is None:
                raise p.TemplateError(
                    f'function "{arg.name}" not defined', arg.pos.line, arg.pos.column
                )
            return fn()
        assert isinstance(arg, p.Field)
        base = dot if arg.base is None else self.operand(arg.base, dot)
        for name in arg.names:
            if not isinstance(base, Mapping):
                raise p.TemplateError(
                    f"can't evaluate field {name} in {go_print(base)!r}",
                    arg.pos.line,
                    arg.pos.column,
                )
            if name not in base:
                return Missing(name)
            base = base[name]
        return base


_NOTHING = object()


class Missing:
    """A field the data lacks: false in `if`, nil to functions, an error when printed.

    Go prints `<no value>` for it; printing it is almost always a missing catalog value.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __bool__(self) -> bool:
        return False


def render(
    nodes: list[p.Node], data: Mapping[str, Any], *, rng: random.Random | None = None
) -> str:
    """Render parsed nodes with `data` as dot; raises `TemplateError` or `FailError`."""
    ex = _Exec(builtin_funcs(rng or random.Random()))
    ex.scopes.append({"$": data})
    try:
        ex.nodes(nodes, data)
    except (_Break, _Continue):
        raise p.TemplateError("break or continue outside range") from None
    except RecursionError:
        raise p.TemplateError("template nests too deeply") from None
    return "".join(ex.out)
