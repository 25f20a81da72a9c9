"""Property tests: whatever the input, loading gives a result with located diagnostics and
never raises. Inputs are random YAML, random text, and mutations of real corpus files; then
hostile input (deep nesting, huge numbers, long strings, odd Unicode, alias bombs, random
bytes), which must also be answered within a bounded time."""

from __future__ import annotations

import copy
import random
import time
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.fuzzfile import LoadResult, compose, load_text
from orchestrator.fuzzfile.limits import MAX_DEPTH, MAX_NODES
from orchestrator.fuzzfile.loader import load_bytes
from orchestrator.fuzzfile.schema import (
    DOCUMENT_MODELS,
    DocumentV4,
    allowed_keys,
    model_fields_by_alias,
)
from tests.conftest import example_files

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keys a Fuzzfile really uses, so that random documents get past the first level often.
KEYS = sorted(
    {
        "version",
        "jobs",
        "services",
        "volumes",
        "image",
        "uri",
        "resource",
        "cpu",
        "cores",
        "memory",
        "size",
        "mounts",
        "depends-on",
        "name",
        "status",
        "task-array",
        "start",
        "end",
        "multinode",
        "nodes",
        "implementation",
        "policy",
        "timeout",
        "execute",
        "env",
        "command",
        "script",
        "location",
        "volume",
        "use",
        "reference",
        "ingress",
        "egress",
        "source",
        "destination",
        "network",
        "ports",
        "endpoints",
        "readiness-probe",
        "files",
        "defaults",
        "job",
        "requires",
        "/data",
        "v1",
        "v4",
    }
    | set(model_fields_by_alias(DocumentV4))
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.sampled_from(
        [
            "v1",
            "v4",
            "docker://alpine",
            "1GiB",
            "10m",
            "NUMA",
            "RUNNING",
            "/data",
            "file://x",
            "secret://user/X",
            "volume://user/ephemeral",
            "a=b",
            "",
        ]
    ),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=10))
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=40,
)


def check(result: LoadResult) -> None:
    assert isinstance(result, LoadResult)
    if result.ok:
        assert result.workflow is not None
        assert result.workflow.jobs or result.workflow.services
        return
    assert result.errors
    for d in result.errors:
        assert d.message
        assert d.file == "fuzz.yaml"
        assert "!r}" not in d.message


@SETTINGS
@given(documents)
def test_random_documents(data: Any) -> None:
    check(load_text(yaml.safe_dump(data), "fuzz.yaml"))


@SETTINGS
@given(st.dictionaries(keys, documents, max_size=6), st.sampled_from(["v1", "v4"]))
def test_random_documents_with_a_version(data: dict[str, Any], version: str) -> None:
    check(load_text(yaml.safe_dump({"version": version, **data}), "fuzz.yaml"))


@SETTINGS
@given(st.text(max_size=300))
def test_random_text(text: str) -> None:
    check(load_text(text, "fuzz.yaml"))


CORPUS = [p.read_text(encoding="utf-8") for p in example_files()]
CORPUS_DATA = [yaml.safe_load(t) for t in CORPUS]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


@SETTINGS
@given(st.data())
def test_mutated_corpus_documents(data: st.DataObject) -> None:
    doc = copy.deepcopy(data.draw(st.sampled_from(CORPUS_DATA)))
    paths = [p for p in _paths(doc) if p]
    path = data.draw(st.sampled_from(paths))
    parent = _parent(doc, path)
    action = data.draw(st.sampled_from(["delete", "replace", "add-key"]))
    if action == "delete":
        del parent[path[-1]]
    elif action == "replace":
        parent[path[-1]] = data.draw(documents)
    elif isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=8)) + "-zz"] = data.draw(scalars)
    result = load_text(yaml.safe_dump(doc), "fuzz.yaml")
    check(result)
    if action == "add-key" and allowed_keys(DOCUMENT_MODELS[doc["version"]], path[:-1]):
        # a key added to a mapping with a fixed set of fields (not to `jobs:` or `env:`)
        assert any(d.code == "unknown-key" for d in result.errors)


@SETTINGS
@given(st.data())
def test_text_mutations_of_corpus_files(data: st.DataObject) -> None:
    text = data.draw(st.sampled_from(CORPUS))
    lines = text.splitlines(keepends=True)
    i = data.draw(st.integers(0, len(lines) - 1))
    action = data.draw(st.sampled_from(["drop-line", "duplicate-line", "insert", "truncate"]))
    if action == "drop-line":
        del lines[i]
    elif action == "duplicate-line":
        lines.insert(i, lines[i])
    elif action == "insert":
        col = data.draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:col] + data.draw(st.text(min_size=1, max_size=3)) + lines[i][col:]
    else:
        lines = lines[:i]
    check(load_text("".join(lines), "fuzz.yaml"))


# ---- hostile input: what anyone holding a token can send to the API ---------------------------

CASE_SECONDS = 5.0  # the most one case may take on a loaded CI machine (most take milliseconds)
HOSTILE = settings(SETTINGS, max_examples=200)


def check_hostile(data: str | bytes) -> LoadResult:
    """Load `data` as the API would: a result with located diagnostics, soon, and never a
    diagnostic that stands for a defect of the loader."""
    start = time.perf_counter()
    result = (
        load_text(data, "fuzz.yaml") if isinstance(data, str) else load_bytes(data, "fuzz.yaml")
    )
    assert time.perf_counter() - start < CASE_SECONDS
    check(result)
    assert not [d for d in result.diagnostics if d.code == "internal"]
    for d in result.diagnostics:
        assert len(d.message) < 2_100  # quoted values are cut
        assert d.line is None or d.line >= 1
    return result


def _nested(depth: int, kind: str) -> str:
    if kind == "flow-list":
        return "[" * depth + "x" + "]" * depth
    if kind == "flow-map":
        return "{k: " * depth + "x" + "}" * depth
    if kind == "block-list":  # `- - - x`: nested sequences on one line
        return "- " * depth + "x"
    return "[" * depth  # unclosed


def _big_number(digits: int, form: str) -> str:
    return {
        "decimal": "9" * digits,
        "negative": "-" + "7" * digits,
        "hex": "0x" + "f" * digits,
        "octal": "0o" + "7" * digits,
        "float": "1" * digits + ".5e" + "9" * 4,
    }[form]


def _aliases(width: int, levels: int) -> str:
    """A flow list that repeats the one below it `width` times, `levels` deep (a bomb when
    both are large: the last case takes 0.3 s to refuse; hence few of them here)."""
    text = "&l0 [x]"
    for i in range(1, levels + 1):
        text = f"&l{i} [{text}" + f", *l{i - 1}" * (width - 1) + "]"
    return text


ODD_TEXT = st.text(
    st.characters(categories=["Cc", "Cf", "Cs", "Co", "Zl", "Zp", "Mn", "So", "Lo"]), max_size=40
)
fragments = st.one_of(
    st.builds(_nested, st.integers(1, 3_000), st.sampled_from(["flow-list", "flow-map", "open"])),
    st.builds(
        _big_number,
        st.integers(15, 6_000),
        st.sampled_from(["decimal", "negative", "hex", "octal", "float"]),
    ),
    st.integers(1_000, 100_000).map(lambda n: "x" * n),
    st.integers(1_000, 100_000).map(lambda n: '"' + "\\u00e9" * (n // 6) + '"'),
    ODD_TEXT,
    st.builds(_aliases, st.integers(2, 4), st.integers(1, 6)),
    st.sampled_from(["*nope", "&a [*a]", "<<: *a", "&a x", "!!binary aGk=", "!custom x", "? [a]"]),
)


@HOSTILE
@given(st.sampled_from(CORPUS), st.data())
def test_hostile_values_in_corpus_files(text: str, data: st.DataObject) -> None:
    """A value of a real file replaced with something hostile, or a line of it added."""
    lines = text.splitlines(keepends=True)
    i = data.draw(st.integers(0, len(lines) - 1))
    fragment = data.draw(fragments)
    key, colon, _ = lines[i].partition(":")
    if colon and data.draw(st.booleans()):
        lines[i] = f"{key}: {fragment}\n"
    else:
        indent = len(lines[i]) - len(lines[i].lstrip(" "))
        lines.insert(i, " " * indent + f"hostile: {fragment}\n")
    check_hostile("".join(lines))


HOSTILE_JOB = "version: v4\njobs:\n  a:\n    image: {uri: docker://alpine:3.20}\n    command: "


@settings(HOSTILE, max_examples=200)
@given(st.integers(1, 5_000), st.sampled_from(["flow-list", "flow-map", "block-list"]))
def test_deep_nesting_is_refused_where_it_starts(depth: int, kind: str) -> None:
    block = kind == "block-list"  # on a line of its own
    result = check_hostile(HOSTILE_JOB + ("\n      " if block else "") + _nested(depth, kind))
    too_deep = [d for d in result.errors if d.code == "too-deep"]
    # the document, jobs and a hold the fragment, which starts at level 4
    if depth + 3 > MAX_DEPTH:
        assert [(d.code, d.line) for d in result.errors] == [("too-deep", 6 if block else 5)]
    else:
        assert not too_deep


@settings(HOSTILE, max_examples=100)
@given(st.integers(20, 6_000), st.sampled_from(["decimal", "negative", "hex", "octal", "float"]))
def test_huge_numbers_are_values_or_located_errors(digits: int, form: str) -> None:
    result = check_hostile(
        HOSTILE_JOB + "[x]\n    resource: {cpu: {cores: " + _big_number(digits, form) + "}}\n"
    )
    assert not result.ok
    assert result.errors[0].field == "jobs.a.resource.cpu.cores"
    assert result.errors[0].line == 6


@pytest.mark.parametrize(("width", "levels"), [(2, 5), (2, 40), (3, 12), (10, 5), (12, 12)])
def test_alias_bombs_stop_at_the_node_limit(width: int, levels: int) -> None:
    result = check_hostile(HOSTILE_JOB + "[x]\n    args: " + _aliases(width, levels) + "\n")
    expanded = sum(width**k for k in range(levels + 1)) + width**levels  # lists and the x's
    if expanded > MAX_NODES:
        assert [d.code for d in result.errors] == ["too-many-nodes"]
    else:
        assert "too-many-nodes" not in [d.code for d in result.errors]


shared_documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(keys, inner, max_size=4),
        st.builds(lambda x, n: [x] * n, inner, st.integers(2, 9)),  # safe_dump writes aliases
    ),
    max_leaves=30,
)


@HOSTILE
@given(shared_documents, st.sampled_from(["v1", "v4"]))
def test_documents_sharing_parts_through_aliases(data: Any, version: str) -> None:
    text = yaml.safe_dump({"version": version, "jobs": {"a": {"args": data}}})
    check_hostile(text)
    assert_composers_agree(text)


# ---- the two composers (compose.py) make the same nodes -----------------------------------


def _composed(loader: Any) -> Any:
    """What a composer makes of a text, in a comparable form: its nodes (tag, value, where;
    a repeated node by its first index), or the error it raises."""
    seen: dict[int, int] = {}

    def shape(node: yaml.Node) -> Any:
        if id(node) in seen:
            return ("alias", seen[id(node)])
        seen[id(node)] = len(seen)
        where = (node.start_mark.line, node.start_mark.column)
        if isinstance(node, yaml.ScalarNode):
            return (node.tag, node.value, node.style or None, where)
        if isinstance(node, yaml.SequenceNode):
            return (node.tag, [shape(item) for item in node.value], where)
        return (node.tag, [(shape(k), shape(v)) for k, v in node.value], where)

    try:
        return [shape(n) for n in compose._first_nodes(loader, 2)]
    except yaml.MarkedYAMLError as exc:
        marks = [(m.line, m.column) if m else None for m in (exc.context_mark, exc.problem_mark)]
        return (type(exc).__name__, exc.context, exc.problem, marks)
    except (yaml.YAMLError, ValueError) as exc:
        return (type(exc).__name__, str(exc))


def assert_composers_agree(text: str) -> None:
    assert _composed(compose._BoundedComposer(text)) == _composed(yaml.CSafeLoader(text))


@pytest.mark.parametrize("text", CORPUS, ids=[p.name for p in example_files()])
def test_composers_agree_on_the_corpus(text: str) -> None:
    assert_composers_agree(text)


@settings(HOSTILE, max_examples=300)
@given(st.sampled_from(CORPUS), st.data())
def test_composers_agree_on_broken_text(text: str, data: st.DataObject) -> None:
    chars = list(text)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(chars) - 1))
        chars[at] = data.draw(st.sampled_from(list("[]{}:-&*!|>'\"\n #,?<%@`\t")))
    assert_composers_agree("".join(chars))


CORPUS_BYTES = [(p.name, p.read_bytes()) for p in example_files()]


@pytest.mark.parametrize(("name", "original"), CORPUS_BYTES, ids=[n for n, _ in CORPUS_BYTES])
def test_byte_mutations_of_corpus_files(name: str, original: bytes) -> None:
    """Seeded (reproducible) byte flips, insertions, deletions and repeats, as load_bytes
    gets them from the API: 300 per file."""
    rng = random.Random(name)
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data))
            action = rng.randrange(4)
            if action == 0:
                data[at] = rng.randrange(256)
            elif action == 1:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            elif action == 2:
                del data[at : at + rng.randint(1, 40)]
            else:
                data[at:at] = data[at : at + rng.randint(1, 200)] * rng.randint(2, 50)
        result = check_hostile(bytes(data))
        bad = _first_non_utf8(bytes(data))
        if bad is not None:  # said where: the line and column of that byte
            [error] = result.errors
            assert error.code == "encoding"
            assert error.line == data.count(b"\n", 0, bad) + 1
            assert error.column is not None


def _first_non_utf8(data: bytes) -> int | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return None
