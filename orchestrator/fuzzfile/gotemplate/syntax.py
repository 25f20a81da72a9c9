"""Lex and parse Go `text/template` source into a small tree.

Covers what the Fuzzball application catalog writes: text and `{{ }}` actions with `{{-`/`-}}`
whitespace trimming, comments, pipelines with `|`, parenthesised pipelines, fields (`.A.B`),
variables (`$x`, `$x.A`, `$`), string/raw/number/bool/nil literals, variable declaration and
assignment (`:=`, `=`), `if`/`else if`/`else`, `range` (with `$i, $v :=`), `with`, `break`,
`continue` and `end`. Semantics follow https://pkg.go.dev/text/template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "Action",
    "Command",
    "If",
    "Node",
    "Pipeline",
    "Range",
    "TemplateError",
    "Text",
    "With",
    "parse",
]


class TemplateError(Exception):
    """A template that cannot be parsed or rendered, with the line and column of the cause."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column

    def __str__(self) -> str:
        if self.line is None:
            return self.message
        return f"{self.line}:{self.column}: {self.message}"


# ---- tree ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Pos:
    line: int
    column: int


@dataclass(slots=True)
class Field:
    """`.A.B` on dot (`base` None), on a variable (`$x.A`) or on a parenthesised pipeline."""

    names: tuple[str, ...]
    pos: Pos
    base: Variable | Pipeline | None = None


@dataclass(slots=True)
class Variable:
    name: str  # includes the $
    pos: Pos


@dataclass(slots=True)
class Identifier:
    name: str
    pos: Pos


@dataclass(slots=True)
class Literal:
    value: object
    pos: Pos


@dataclass(slots=True)
class Dot:
    pos: Pos


@dataclass(slots=True)
class Command:
    args: list[Field | Variable | Identifier | Literal | Dot | Pipeline]
    pos: Pos


@dataclass(slots=True)
class Pipeline:
    commands: list[Command]
    pos: Pos
    decl: list[str] = field(default_factory=list)
    assign: bool = False  # `=` (assign to an existing variable) rather than `:=`


@dataclass(slots=True)
class Text:
    text: str


@dataclass(slots=True)
class Action:
    pipeline: Pipeline


@dataclass(slots=True)
class If:
    pipeline: Pipeline
    body: list[Node]
    orelse: list[Node]


@dataclass(slots=True)
class With:
    pipeline: Pipeline
    body: list[Node]
    orelse: list[Node]


@dataclass(slots=True)
class Range:
    pipeline: Pipeline
    body: list[Node]
    orelse: list[Node]


@dataclass(slots=True)
class Loop:
    """`break` or `continue`."""

    kind: str
    pos: Pos


Node = Text | Action | If | With | Range | Loop


# ---- lexer ---------------------------------------------------------------------------------

_SPACE = " \t\r\n"
_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r\n]+)
  | (?P<declare>:=)
  | (?P<assign>=)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<char>'(?:[^'\\\n]|\\.)+')
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F_]+|0[oO]?[0-7_]+|(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][-+]?\d+)?))
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
  | (?P<dot>\.)
  | (?P<variable>\$[A-Za-z0-9_]*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE,
)
_KEYWORDS = {
    "if",
    "else",
    "end",
    "range",
    "with",
    "break",
    "continue",
    "define",
    "template",
    "block",
    "nil",
    "true",
    "false",
}


@dataclass(slots=True)
class _Tok:
    kind: str
    text: str
    pos: Pos


class _Source:
    def __init__(self, text: str) -> None:
        self.text = text
        self.line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]

    def pos(self, offset: int) -> Pos:
        import bisect

        line = bisect.bisect_right(self.line_starts, offset)
        return Pos(line, offset - self.line_starts[line - 1] + 1)


def _lex(src: _Source) -> list[tuple[str, object, Pos]]:
    """Split into ("text", str) and ("action", list[_Tok]) items; trim markers applied."""
    text = src.text
    items: list[tuple[str, object, Pos]] = []
    i = 0
    trim_next = False
    while i < len(text):
        start = text.find("{{", i)
        chunk = text[i:] if start < 0 else text[i:start]
        if trim_next:
            chunk = chunk.lstrip(_SPACE)
        if start < 0:
            if chunk:
                items.append(("text", chunk, src.pos(i)))
            break
        j = start + 2
        if text.startswith("- ", j) or text.startswith("-\n", j) or text.startswith("-\t", j):
            chunk = chunk.rstrip(_SPACE)
            j += 2
        if chunk:
            items.append(("text", chunk, src.pos(i)))
        action_pos = src.pos(start)
        stripped = j
        while stripped < len(text) and text[stripped] in _SPACE:
            stripped += 1
        if text.startswith("/*", stripped):
            end = text.find("*/", stripped + 2)
            if end < 0:
                raise TemplateError("unclosed comment", action_pos.line, action_pos.column)
            k = end + 2
            while k < len(text) and text[k] in _SPACE:
                k += 1
            trim_next = text.startswith("-}}", k) and k > end + 2
            if trim_next:
                k += 1
            if not text.startswith("}}", k):
                raise TemplateError("comment ends without }}", action_pos.line, action_pos.column)
            i = k + 2
            continue
        tokens, i, trim_next = _lex_action(src, j, action_pos)
        items.append(("action", tokens, action_pos))
    return items


def _lex_action(src: _Source, i: int, action_pos: Pos) -> tuple[list[_Tok], int, bool]:
    text = src.text
    tokens: list[_Tok] = []
    while True:
        if i >= len(text):
            raise TemplateError("unclosed action: no }}", action_pos.line, action_pos.column)
        if text.startswith("}}", i):
            return tokens, i + 2, False
        if text.startswith("-}}", i) and i > 0 and text[i - 1] in _SPACE:
            return tokens, i + 3, True
        match = _TOKEN.match(text, i)
        if match is None or match.end() == i:
            p = src.pos(i)
            raise TemplateError(f"unexpected character {text[i]!r} in action", p.line, p.column)
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(_Tok(kind, match.group(), src.pos(i)))
        i = match.end()


# ---- parser --------------------------------------------------------------------------------


def parse(text: str) -> list[Node]:
    """Parse template source into a list of nodes; raises `TemplateError` with a position."""
    src = _Source(text)
    parser = _Parser(_lex(src))
    nodes, terminator = parser.block()
    if terminator is not None:
        kind, pos = terminator[0], terminator[2]
        raise TemplateError(f"unexpected {{{{{kind}}}}}", pos.line, pos.column)
    return nodes


class _Parser:
    def __init__(self, items: list[tuple[str, object, Pos]]) -> None:
        self.items = items
        self.i = 0

    def block(self) -> tuple[list[Node], tuple[str, list[_Tok], Pos] | None]:
        """Nodes up to an `else` or `end` action (returned as the terminator) or the end."""
        nodes: list[Node] = []
        while self.i < len(self.items):
            kind, payload, pos = self.items[self.i]
            self.i += 1
            if kind == "text":
                nodes.append(Text(str(payload)))
                continue
            toks: list[_Tok] = payload  # type: ignore[assignment]
            if not toks:
                raise TemplateError("missing value for command", pos.line, pos.column)
            head = toks[0]
            if head.kind == "ident" and head.text in ("else", "end"):
                return nodes, (head.text, toks, pos)
            if head.kind == "ident" and head.text in ("if", "with", "range"):
                nodes.append(self.control(head.text, toks[1:], pos))
            elif head.kind == "ident" and head.text in ("break", "continue"):
                nodes.append(Loop(head.text, pos))
            elif head.kind == "ident" and head.text in ("define", "template", "block"):
                raise TemplateError(f"{{{{{head.text}}}}} is not supported", pos.line, pos.column)
            else:
                nodes.append(Action(_PipelineParser(toks, pos).pipeline(allow_decl=True)))
        return nodes, None

    def control(self, kind: str, toks: list[_Tok], pos: Pos) -> Node:
        if not toks:
            raise TemplateError(f"missing pipeline in {{{{{kind}}}}}", pos.line, pos.column)
        pipeline = _PipelineParser(toks, pos).pipeline(allow_decl=True)
        body, term = self.block()
        orelse: list[Node] = []
        if term is None:
            raise TemplateError(f"{{{{{kind}}}}} without {{{{end}}}}", pos.line, pos.column)
        if term[0] == "else":
            rest = term[1][1:]
            if rest:  # `else if ...` / `else with ...`: a nested block sharing this `end`
                if rest[0].text != kind or kind == "range":
                    raise TemplateError(
                        f"unexpected {rest[0].text!r} after else", term[2].line, term[2].column
                    )
                orelse = [self.control(kind, rest[1:], term[2])]
                return _make(kind, pipeline, body, orelse)
            orelse, term = self.block()
            if term is None or term[0] != "end":
                raise TemplateError(f"{{{{{kind}}}}} without {{{{end}}}}", pos.line, pos.column)
        if len(term[1]) > 1:
            raise TemplateError("unexpected words after end", term[2].line, term[2].column)
        return _make(kind, pipeline, body, orelse)


def _make(kind: str, pipeline: Pipeline, body: list[Node], orelse: list[Node]) -> Node:
    if kind == "if":
        return If(pipeline, body, orelse)
    if kind == "with":
        return With(pipeline, body, orelse)
    return Range(pipeline, body, orelse)


class _PipelineParser:
    def __init__(self, toks: list[_Tok], pos: Pos) -> None:
        self.toks = toks
        self.i = 0
        self.pos = pos

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def fail(self, message: str, tok: _Tok | None = None) -> TemplateError:
        p = tok.pos if tok else self.pos
        return TemplateError(message, p.line, p.column)

    def pipeline(self, allow_decl: bool) -> Pipeline:
        pipe = self._pipeline(allow_decl, closing=None)
        if self.peek() is not None:
            raise self.fail(f"unexpected {self.peek().text!r}", self.peek())  # type: ignore[union-attr]
        return pipe

    def _pipeline(self, allow_decl: bool, closing: str | None) -> Pipeline:
        start = self.peek()
        pipe = Pipeline([], start.pos if start else self.pos)
        if allow_decl:
            self._declarations(pipe)
        while True:
            cmd = self._command(closing)
            pipe.commands.append(cmd)
            tok = self.peek()
            if tok is None or tok.kind == closing:
                break
            if tok.kind != "pipe":
                raise self.fail(f"unexpected {tok.text!r}", tok)
            self.i += 1
        return pipe

    def _declarations(self, pipe: Pipeline) -> None:
        names: list[str] = []
        j = self.i
        while j < len(self.toks) and self.toks[j].kind == "variable":
            names.append(self.toks[j].text)
            j += 1
            if j < len(self.toks) and self.toks[j].kind == "comma":
                j += 1
                continue
            break
        if names and j < len(self.toks) and self.toks[j].kind in ("declare", "assign"):
            pipe.decl = names
            pipe.assign = self.toks[j].kind == "assign"
            self.i = j + 1

    def _command(self, closing: str | None) -> Command:
        args: list[Field | Variable | Identifier | Literal | Dot | Pipeline] = []
        first = self.peek()
        while True:
            tok = self.peek()
            if (
                tok is None
                or tok.kind in ("pipe", closing)
                or (closing is None and tok.kind == "rparen")
            ):
                break
            args.append(self._operand())
        if not args:
            raise self.fail("missing value for command", first)
        return Command(args, args_pos(args[0]))

    def _operand(self) -> Field | Variable | Identifier | Literal | Dot | Pipeline:
        tok = self.peek()
        assert tok is not None
        self.i += 1
        kind, text = tok.kind, tok.text
        if kind == "field":
            return Field(tuple(text[1:].split(".")), tok.pos)
        if kind == "dot":
            return Dot(tok.pos)
        if kind == "variable":
            return self._chain(Variable(text, tok.pos))
        if kind == "lparen":
            inner = self._pipeline(allow_decl=False, closing="rparen")
            close = self.peek()
            if close is None or close.kind != "rparen":
                raise self.fail("unclosed left paren", tok)
            self.i += 1
            return self._chain(inner)
        if kind == "string":
            return Literal(_unquote(text, tok), tok.pos)
        if kind == "raw":
            return Literal(text[1:-1], tok.pos)
        if kind == "char":
            return Literal(ord(_unquote('"' + text[1:-1] + '"', tok)), tok.pos)
        if kind == "number":
            return Literal(_number(text, tok), tok.pos)
        if kind == "ident":
            if text in ("true", "false"):
                return Literal(text == "true", tok.pos)
            if text == "nil":
                return Literal(None, tok.pos)
            if text in _KEYWORDS:
                raise self.fail(f"unexpected keyword {text!r}", tok)
            return Identifier(text, tok.pos)
        raise self.fail(f"unexpected {text!r}", tok)

    def _chain(self, base: Variable | Pipeline) -> Field | Variable | Pipeline:
        tok = self.peek()
        if tok is not None and tok.kind == "field" and _adjacent(self.toks[self.i - 1], tok):
            self.i += 1
            return Field(tuple(tok.text[1:].split(".")), tok.pos, base)
        return base


def args_pos(arg: object) -> Pos:
    return getattr(arg, "pos", Pos(0, 0))


def _adjacent(before: _Tok, after: _Tok) -> bool:
    return (
        before.pos.line == after.pos.line
        and before.pos.column + len(before.text) == after.pos.column
    )


def _unquote(text: str, tok: _Tok) -> str:
    import json

    try:
        return str(
            json.loads(text.replace("\\'", "'").replace("\\a", "\\u0007").replace("\\v", "\\u000b"))
        )
    except ValueError:
        raise TemplateError(f"bad string literal {text}", tok.pos.line, tok.pos.column) from None


def _number(text: str, tok: _Tok) -> int | float:
    clean = text.replace("_", "")
    try:
        if re.fullmatch(r"[-+]?0[xX][0-9a-fA-F]+", clean):
            return int(clean, 16)
        if re.fullmatch(r"[-+]?0[oO][0-7]+", clean):
            return int(clean.replace("o", "").replace("O", ""), 8)
        if re.fullmatch(r"[-+]?0[0-7]+", clean):
            return int(clean, 8)
        if re.fullmatch(r"[-+]?\d+", clean):
            return int(clean)
        return float(clean)
    except ValueError:
        raise TemplateError(f"bad number {text}", tok.pos.line, tok.pos.column) from None
