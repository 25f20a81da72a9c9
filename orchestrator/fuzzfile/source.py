"""Read Fuzzfile YAML into plain data plus the line and column of every key and value.

PyYAML's composer (libyaml where installed) gives nodes with positions; this module walks
them itself so that it can (a) keep a position for every field path, (b) resolve plain
scalars with the YAML 1.2 core schema that Fuzzfiles are written in (so `on`, `no`, `1:30`
and `2026-06-05` stay strings, as a Go YAML parser would read them), (c) refuse duplicate
keys, multi-document streams and alias bombs with a clear error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .diagnostics import Diagnostic, FieldPath, Severity

__all__ = ["Position", "SourceDocument", "SourceError", "parse_yaml"]

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# YAML 1.2 core schema, https://yaml.org/spec/1.2.2/#1032-tag-resolution
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT10 = re.compile(r"^[-+]?[0-9]+$")
_INT8 = re.compile(r"^0o[0-7]+$")
_INT16 = re.compile(r"^0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_INF = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$")
_NAN = re.compile(r"^\.(?:nan|NaN|NAN)$")

# A document may share nodes through aliases; this bounds what such sharing can expand to.
_MAX_NODES = 200_000
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True, slots=True)
class Position:
    """1-based line and column of a node in the source text."""

    line: int
    column: int


class SourceError(Exception):
    """The text is not a single YAML mapping that can be read; carries its diagnostics."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__("; ".join(d.message for d in diagnostics))
        self.diagnostics = diagnostics


@dataclass(slots=True)
class SourceDocument:
    """Plain data of one YAML document and where each part of it was written."""

    data: Any
    file: str
    values: dict[FieldPath, Position] = field(default_factory=dict)
    keys: dict[FieldPath, Position] = field(default_factory=dict)
    containers: set[FieldPath] = field(default_factory=set)  # paths of mappings and lists

    def locate(self, path: FieldPath, *, key: bool = False) -> Position | None:
        """Where to point a reader for `path`.

        A scalar is pointed at by its value (`cores: four` -> `four`); a mapping or list that
        has a key by its key (`hello:`), since its value starts on a later line; `key`
        prefers the key even for scalars (unknown keys). A path that the document lacks
        (a missing field) is pointed at through its nearest enclosing field.
        """
        for cut in range(len(path), -1, -1):
            sub = path[:cut]
            if sub not in self.values:
                continue
            prefer_key = (key and cut == len(path)) or sub in self.containers
            if prefer_key and sub in self.keys:
                return self.keys[sub]
            return self.values[sub]
        return None


def _mark(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


_IMPLICIT_TAGS = {
    f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "timestamp", "value")
}


def _scalar(node: yaml.ScalarNode) -> Any:
    text: str = node.value
    if node.style or node.tag == _STR_TAG:  # libyaml gives plain scalars style "", PyYAML None
        return text  # quoted and block scalars, plain strings and explicit !!str
    if node.tag not in _IMPLICIT_TAGS:
        raise _WalkError(f"unsupported YAML tag {node.tag!r}", node, "remove the tag")
    if _NULL.match(text):
        return None
    if _BOOL.match(text):
        return text.lower() == "true"
    if _INT10.match(text):
        return int(text)
    if _INT8.match(text):
        return int(text[2:], 8)
    if _INT16.match(text):
        return int(text[2:], 16)
    if _FLOAT.match(text):
        return float(text)
    if _INF.match(text):
        return float("-inf") if text.startswith("-") else float("inf")
    if _NAN.match(text):
        return float("nan")
    return text  # YAML 1.1-only forms (yes, on, 1:30, dates) are strings in YAML 1.2


class _WalkError(Exception):
    def __init__(self, message: str, node: yaml.Node, hint: str | None = None) -> None:
        super().__init__(message)
        self.node = node
        self.hint = hint


class _Walker:
    def __init__(self, doc: SourceDocument) -> None:
        self.doc = doc
        self.count = 0
        self.stack: set[int] = set()
        self.errors: list[Diagnostic] = []

    def walk(self, node: yaml.Node, path: FieldPath) -> Any:
        self.count += 1
        if self.count > _MAX_NODES:
            raise _WalkError(
                f"the document expands to more than {_MAX_NODES} nodes through aliases",
                node,
                "remove the aliases (*name) that repeat large parts of the document",
            )
        self.doc.values.setdefault(path, _mark(node))
        if isinstance(node, yaml.ScalarNode):
            return _scalar(node)
        self.doc.containers.add(path)
        if id(node) in self.stack:
            raise _WalkError("an alias refers to a node that contains it (a cycle)", node)
        self.stack.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.walk(item, (*path, i)) for i, item in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self.stack.discard(id(node))

    def _mapping(self, node: yaml.Node, path: FieldPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                self._merge(out, value_node, path)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise _WalkError(
                    "a mapping key must be a plain string, not a list or map", key_node
                )
            key = str(key_node.value)
            if key in out:
                first = self.doc.keys[(*path, key)]
                self.errors.append(
                    Diagnostic(
                        Severity.ERROR,
                        f"duplicate key {key!r} (first written on line {first.line})",
                        (*path, key),
                        self.doc.file,
                        key_node.start_mark.line + 1,
                        key_node.start_mark.column + 1,
                        hint="YAML keeps only one value per key: remove or rename one of them",
                        code="duplicate-key",
                    )
                )
                continue
            self.doc.keys[(*path, key)] = _mark(key_node)
            out[key] = self.walk(value_node, (*path, key))
        return out

    def _merge(self, out: dict[str, Any], value_node: yaml.Node, path: FieldPath) -> None:
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                raise _WalkError("a merge key (<<) must refer to a mapping", source)
            for key, value in self._mapping(source, path).items():
                out.setdefault(key, value)


def _error(file: str, message: str, mark: Any, code: str, hint: str | None = None) -> SourceError:
    """A `SourceError` with one diagnostic at a libyaml mark (0-based) or nowhere."""
    line = mark.line + 1 if mark is not None else None
    column = mark.column + 1 if mark is not None else None
    return SourceError([Diagnostic(Severity.ERROR, message, (), file, line, column, hint, code)])


def _syntax_error(exc: yaml.MarkedYAMLError, file: str) -> SourceError:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or "invalid YAML"
    if exc.context:
        problem = f"{exc.context}, {problem}"
    if exc.context_mark is not None and "end of stream" in problem:
        # an unclosed quote or bracket is reported at the end of the file: point at its start
        if mark is not None and mark.line != exc.context_mark.line:
            problem += f" (line {mark.line + 1})"
        mark = exc.context_mark
    hint = "check indentation and quoting near this line"
    return _error(file, f"YAML syntax error: {problem}", mark, "yaml-syntax", hint)


def parse_yaml(text: str, file: str = "<string>") -> SourceDocument:
    """Parse one YAML document into a `SourceDocument`, or raise `SourceError`."""
    doc = SourceDocument(data=None, file=file)
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, file) from None
    except (yaml.YAMLError, ValueError) as exc:  # reader errors: bad encoding, control chars
        raise _error(file, f"cannot read YAML: {exc}", None, "yaml-syntax") from None
    if len(nodes) != 1:
        message = "the file is empty" if not nodes else "the file holds several YAML documents"
        mark = nodes[1].start_mark if len(nodes) > 1 else None
        hint = "a Fuzzfile is one YAML mapping that starts with `version: v1` or `v4`"
        raise _error(file, message, mark, "yaml-structure", hint)
    walker = _Walker(doc)
    try:
        doc.data = walker.walk(nodes[0], ())
    except _WalkError as exc:
        raise _error(file, str(exc), exc.node.start_mark, "yaml-structure", exc.hint) from None
    except RecursionError:
        raise _error(file, "the document is nested too deeply", None, "yaml-structure") from None
    if walker.errors:
        raise SourceError(walker.errors)
    return doc
