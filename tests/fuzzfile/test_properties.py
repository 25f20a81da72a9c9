"""Property tests: whatever the input, loading gives a result with located diagnostics and
never raises. Inputs are random YAML, random text, and mutations of real corpus files."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.fuzzfile import LoadResult, load_text
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
