"""YAML text into nodes with positions, at a cost bounded by `limits`, never a crash.

libyaml's parser is a state machine (deep input only grows its stacks), but PyYAML's C
composer builds nodes by recursion in C, about 300 bytes of stack a level: 25,000 nested `[`
overflow the stack and kill the process (SIGSEGV), which no `except` can catch.

So there are two ways here to the same nodes. A document cannot nest deeper, nor hold more
nodes than about twice, than its text has indicator characters (`[ { - : ? ,`): each list
or mapping starts at one, and every entry after the first is separated by one. Text with
at most `C_COMPOSER_MAX_INDICATORS` of them (every real Fuzzfile: the corpus has at most
575) goes to the fast C composer, which then recurses at most that deep. Anything else
goes to `_compose`, which builds the nodes from libyaml's events in a loop with an explicit
stack (composing takes about 40% longer) and stops at `MAX_DEPTH` levels and `MAX_NODES` nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from .limits import MAX_DEPTH, MAX_NODES

__all__ = [
    "MERGE_TAG",
    "STR_TAG",
    "LimitError",
    "compose_documents",
    "reader_error_position",
    "too_deep",
]

STR_TAG = "tag:yaml.org,2002:str"
MERGE_TAG = "tag:yaml.org,2002:merge"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"
_RESOLVER: Any = Resolver()  # the tags of untagged scalars, as PyYAML's composer gives them

# The fast path: at most this many indicators, so that many levels (~600 KiB of C stack).
C_COMPOSER_MAX_INDICATORS = 2_000
_INDICATORS = "[{-:?,"

_CLoader: Any = getattr(yaml, "CSafeLoader", None)  # PyYAML built with libyaml
_Parser: Any = getattr(getattr(yaml, "cyaml", None), "CParser", None)
_BYTE_POSITIONS = _Parser is not None  # libyaml counts a reader error's position in bytes
if _Parser is None:  # PyYAML's pure Python parser is a state machine too
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _PyParser(Reader, Scanner, Parser):
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)

    _Parser = _PyParser


class LimitError(Exception):
    """The document goes beyond a limit; `mark` is where (a YAML mark, 0-based)."""

    def __init__(self, message: str, mark: Any, hint: str, code: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.hint = hint
        self.code = code


def too_deep(mark: Any) -> LimitError:
    """The error for a list or mapping at `mark` nested more than `MAX_DEPTH` levels deep."""
    return LimitError(
        f"the document nests lists and mappings more than {MAX_DEPTH} levels deep",
        mark,
        "a Fuzzfile is a few levels deep: check the brackets, the indentation and the aliases",
        "too-deep",
    )


def compose_documents(text: str, limit: int = 2) -> list[Node]:
    """The root nodes of the first `limit` documents of `text` (a caller that wants one
    document needs to know only that there is a second).

    Raises `LimitError`, or `yaml.YAMLError` for text that is not YAML.
    """
    if _CLoader is not None and _indicators(text) <= C_COMPOSER_MAX_INDICATORS:
        return _first_nodes(_CLoader(text), limit)
    return _first_nodes(_BoundedComposer(text), limit)


def _indicators(text: str) -> int:
    return sum(text.count(c) for c in _INDICATORS)


def _first_nodes(loader: Any, limit: int) -> list[Node]:
    try:
        documents: list[Node] = []
        while len(documents) < limit and loader.check_node():
            documents.append(loader.get_node())
        return documents
    finally:
        loader.dispose()


class _BoundedComposer:
    """libyaml's (or PyYAML's) parser and `_compose`, with a composer's `check_node` and
    `get_node`."""

    def __init__(self, text: str) -> None:
        self.parser = _Parser(text)

    def check_node(self) -> bool:
        if self.parser.check_event(StreamStartEvent):
            self.parser.get_event()
        return not self.parser.check_event(StreamEndEvent)

    def get_node(self) -> Node:
        self.parser.get_event()  # DocumentStartEvent
        node = _compose(self.parser.get_event)
        self.parser.get_event()  # DocumentEndEvent
        return node

    def dispose(self) -> None:
        self.parser.dispose()


def _compose(next_event: Callable[[], Any]) -> Node:
    """One document's root node from its events, with an explicit stack (no recursion)."""
    anchors: dict[str, Node] = {}
    count = 0
    open_nodes: list[Node] = []  # collections started and not yet ended, outermost first
    keys: list[Node | None] = []  # for each of them: a mapping's key awaiting its value
    while True:
        event = next_event()
        kind = type(event)
        node: Node
        if kind is SequenceEndEvent or kind is MappingEndEvent:
            node = open_nodes.pop()
            keys.pop()
            node.end_mark = event.end_mark
        elif kind is AliasEvent:
            if event.anchor not in anchors:  # messages as PyYAML's C composer words them
                raise ComposerError(None, None, "found undefined alias", event.start_mark)
            node = anchors[event.anchor]
        else:
            count += 1
            if count > MAX_NODES:
                raise LimitError(
                    f"the document has more than {MAX_NODES:,} values, lists and mappings",
                    event.start_mark,
                    "split the workflow, or use a task-array instead of repeating jobs",
                    "too-many-nodes",
                )
            node = _new_node(event)
            if event.anchor is not None:
                if event.anchor in anchors:
                    first = anchors[event.anchor].start_mark
                    message = "found duplicate anchor; first occurrence"
                    raise ComposerError(message, first, "second occurrence", event.start_mark)
                anchors[event.anchor] = node
            if kind is not ScalarEvent:
                if len(open_nodes) >= MAX_DEPTH:
                    raise too_deep(event.start_mark)
                open_nodes.append(node)
                keys.append(None)
                continue
        if not open_nodes:
            return node
        parent = open_nodes[-1]
        if isinstance(parent, SequenceNode):
            parent.value.append(node)
        elif keys[-1] is None:
            keys[-1] = node
        else:
            parent.value.append((keys[-1], node))
            keys[-1] = None


def _new_node(event: Any) -> Node:
    tag, start, end = event.tag, event.start_mark, event.end_mark
    if type(event) is ScalarEvent:
        if tag is None or tag == "!":
            tag = _RESOLVER.resolve(ScalarNode, event.value, event.implicit)
        return ScalarNode(tag, event.value, start, end, style=event.style)
    if type(event) is SequenceStartEvent:
        tag = _SEQ_TAG if tag is None or tag == "!" else tag
        return SequenceNode(tag, [], start, None, flow_style=event.flow_style)
    tag = _MAP_TAG if tag is None or tag == "!" else tag
    return MappingNode(tag, [], start, None, flow_style=event.flow_style)


def reader_error_position(text: str, error: yaml.reader.ReaderError) -> tuple[int, int]:
    """1-based line and column of a reader error (a character YAML does not allow)."""
    before = text[: error.position]
    if _BYTE_POSITIONS:
        raw = text.encode("utf-8", "surrogatepass")[: error.position]
        before = raw.decode("utf-8", "replace")
    line_start = before.rfind("\n") + 1
    return before.count("\n") + 1, len(before) - line_start + 1
