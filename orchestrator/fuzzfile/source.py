"""Read Fuzzfile YAML into plain data plus the line and column of every key and value.

`compose.py` gives nodes with positions (libyaml's parser, a composer bounded in size and
depth); this module walks them itself so that it can (a) keep a position for every field
path, (b) resolve plain scalars with the YAML 1.2 core schema that Fuzzfiles are written in
(so `on`, `no`, `1:30` and `2026-06-05` stay strings, as a Go YAML parser would read them),
(c) refuse duplicate keys, multi-document streams and alias bombs with a clear error.
Whatever the text, the result is a `SourceDocument` or a `SourceError`: nothing else escapes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .compose import (
    MERGE_TAG,
    STR_TAG,
    LimitError,
    compose_documents,
    reader_error_position,
    too_deep,
)
from .diagnostics import Diagnostic, FieldPath, Severity
from .limits import MAX_DEPTH, MAX_FUZZFILE_BYTES, MAX_NODES, describe_bytes

__all__ = ["Position", "SourceDocument", "SourceError", "check_size", "decode", "parse_yaml"]

# YAML 1.2 core schema, https://yaml.org/spec/1.2.2/#1032-tag-resolution
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT10 = re.compile(r"^[-+]?[0-9]+$")
_INT8 = re.compile(r"^0o[0-7]+$")
_INT16 = re.compile(r"^0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_INF = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$")
_NAN = re.compile(r"^\.(?:nan|NaN|NAN)$")

# Whole numbers that a Go parser reads as such (int64 or uint64); the widest has 20 digits.
_GO_INT_MIN, _GO_INT_MAX, _GO_INT_DIGITS = -(2**63), 2**64 - 1, 20


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
    if node.style or node.tag == STR_TAG:  # libyaml gives plain scalars style "", PyYAML None
        return text  # quoted and block scalars, plain strings and explicit !!str
    if node.tag not in _IMPLICIT_TAGS:
        raise _WalkError(f"unsupported YAML tag {node.tag!r}", node, "remove the tag")
    if _NULL.match(text):
        return None
    if _BOOL.match(text):
        return text.lower() == "true"
    if _INT10.match(text):
        return _whole_number(text, text, 10)
    if _INT8.match(text):
        return _whole_number(text, text[2:], 8)
    if _INT16.match(text):
        return _whole_number(text, text[2:], 16)
    if _FLOAT.match(text):
        return float(text)
    if _INF.match(text):
        return float("-inf") if text.startswith("-") else float("inf")
    if _NAN.match(text):
        return float("nan")
    return text  # YAML 1.1-only forms (yes, on, 1:30, dates) are strings in YAML 1.2


def _whole_number(text: str, digits: str, base: int) -> int | float | str:
    """An integer as a Go YAML parser reads it: a whole number when it fits in 64 bits; past
    that a float when decimal and finite, else the text. (Python's own conversion of a long
    decimal is refused past 4,300 digits, and would cost quadratic time before that.)"""
    if len(digits.lstrip("+-0")) <= _GO_INT_DIGITS or base != 10:
        value = int(digits, base)
        if _GO_INT_MIN <= value <= _GO_INT_MAX:
            return value
    if base != 10:
        return text
    approx = float(text)
    return text if math.isinf(approx) else approx


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
        if self.count > MAX_NODES:
            raise LimitError(
                f"the document expands to more than {MAX_NODES:,} values, lists and mappings "
                "through aliases",
                node.start_mark,
                "remove the aliases (*name) that repeat large parts of the document",
                "too-many-nodes",
            )
        self.doc.values.setdefault(path, _mark(node))
        if isinstance(node, yaml.ScalarNode):
            return _scalar(node)
        self.doc.containers.add(path)
        if id(node) in self.stack:
            raise _WalkError("an alias refers to a node that contains it (a cycle)", node)
        if len(self.stack) >= MAX_DEPTH:  # aliases in aliases nest deeper than what they are
            raise too_deep(node.start_mark)
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
            if key_node.tag == MERGE_TAG:
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


def _size(size: int, at_least: bool) -> str:
    return f"more than {describe_bytes(MAX_FUZZFILE_BYTES)}" if at_least else describe_bytes(size)


def check_size(size: int, file: str, *, at_least: bool = False) -> None:
    """Raise `SourceError` when `size` (bytes of UTF-8; `at_least` that many, when the rest
    was not read) is beyond what a Fuzzfile may be."""
    if size > MAX_FUZZFILE_BYTES:
        raise SourceError(
            [
                Diagnostic(
                    Severity.ERROR,
                    f"the file is {_size(size, at_least)}; a Fuzzfile may be at most "
                    f"{describe_bytes(MAX_FUZZFILE_BYTES)}",
                    (),
                    file,
                    hint="move large inline `files:` into a volume's ingress "
                    "(https://, s3://) and refer to them from there",
                    code="too-large",
                )
            ]
        )


def decode(data: bytes, file: str) -> str:
    """The text of a Fuzzfile's bytes (UTF-8), or `SourceError` saying where it is not."""
    check_size(len(data), file)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        column = len(data[line_start : exc.start].decode("utf-8", "replace")) + 1
        raise SourceError(
            [
                Diagnostic(
                    Severity.ERROR,
                    f"the file is not UTF-8 text: byte 0x{data[exc.start]:02x} cannot start or "
                    "continue a character here",
                    (),
                    file,
                    data.count(b"\n", 0, exc.start) + 1,
                    column,
                    "save the file as UTF-8",
                    "encoding",
                )
            ]
        ) from None


def parse_yaml(text: str, file: str = "<string>") -> SourceDocument:
    """Parse one YAML document into a `SourceDocument`, or raise `SourceError`."""
    if len(text) > MAX_FUZZFILE_BYTES:  # a character is at least one byte: no need to encode
        check_size(len(text), file)
    check_size(len(text.encode("utf-8", "surrogatepass")), file)
    doc = SourceDocument(data=None, file=file)
    try:
        nodes = compose_documents(text)
    except LimitError as exc:
        raise _error(file, str(exc), exc.mark, exc.code, exc.hint) from None
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, file) from None
    except yaml.reader.ReaderError as exc:  # a character that YAML does not allow
        line, column = reader_error_position(text, exc)
        raise SourceError(
            [
                Diagnostic(
                    Severity.ERROR,
                    f"cannot read YAML: {exc.reason} (character #x{exc.character:04x})",
                    (),
                    file,
                    line,
                    column,
                    "remove the character, or write it as an escape in a double-quoted string",
                    "yaml-syntax",
                )
            ]
        ) from None
    except UnicodeEncodeError as exc:  # a lone surrogate: text that no UTF-8 file holds
        line_start = text.rfind("\n", 0, exc.start) + 1
        raise SourceError(
            [
                Diagnostic(
                    Severity.ERROR,
                    f"the text is not Unicode: {text[exc.start]!r} is half of a surrogate pair",
                    (),
                    file,
                    text.count("\n", 0, exc.start) + 1,
                    exc.start - line_start + 1,
                    "send the text as UTF-8",
                    "encoding",
                )
            ]
        ) from None
    except (yaml.YAMLError, ValueError) as exc:
        raise _error(file, f"cannot read YAML: {exc}", None, "yaml-syntax") from None
    if len(nodes) != 1:
        message = "the file is empty" if not nodes else "the file holds several YAML documents"
        mark = nodes[1].start_mark if len(nodes) > 1 else None
        hint = "a Fuzzfile is one YAML mapping that starts with `version: v1` or `v4`"
        raise _error(file, message, mark, "yaml-structure", hint)
    walker = _Walker(doc)
    try:
        doc.data = walker.walk(nodes[0], ())
    except LimitError as exc:
        raise _error(file, str(exc), exc.mark, exc.code, exc.hint) from None
    except _WalkError as exc:
        raise _error(file, str(exc), exc.node.start_mark, "yaml-structure", exc.hint) from None
    if walker.errors:
        raise SourceError(walker.errors)
    return doc
