"""What a Fuzzfile may ask of Squall (`limits.py`) and the paths it may name (`paths.py`):
each limit refuses just past it with a located error, and what real workflows write passes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.fuzzfile import load_file, load_text
from orchestrator.fuzzfile.limits import (
    MAX_FUZZFILE_BYTES,
    MAX_NODES,
    MAX_TASKS_PER_ARRAY,
    MAX_TASKS_PER_WORKFLOW,
)
from orchestrator.fuzzfile.loader import load_bytes
from orchestrator.fuzzfile.source import parse_yaml

JOB = "version: v4\njobs:\n  hello:\n    image: {uri: docker://alpine:3.20}\n    command: [echo]\n"


def _padded(size: int) -> str:
    """A valid Fuzzfile of exactly `size` bytes (a comment fills it up)."""
    return JOB + "#" * (size - len(JOB) - 1) + "\n"


def test_a_fuzzfile_at_the_size_limit_is_read_and_one_byte_more_is_not(tmp_path: Path) -> None:
    assert load_text(_padded(MAX_FUZZFILE_BYTES)).ok
    over = load_text(_padded(MAX_FUZZFILE_BYTES + 1), "big.yaml")
    [error] = over.errors
    assert (error.code, error.file) == ("too-large", "big.yaml")
    assert error.message == "the file is 1.1 MiB; a Fuzzfile may be at most 1 MiB"
    path = tmp_path / "big.yaml"
    path.write_text(_padded(3 * MAX_FUZZFILE_BYTES))
    assert load_file(path).errors[0].message.startswith("the file is 3 MiB;")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_file_is_read_no_further_than_the_limit() -> None:
    [error] = load_file("/dev/zero").errors
    assert error.code == "too-large"
    assert error.message.startswith("the file is more than 1 MiB;")


def test_bytes_that_are_not_utf8_are_located(tmp_path: Path) -> None:
    latin1 = JOB.encode().replace(b"hello:", b"caf\xe9:")
    [error] = load_bytes(latin1, "latin1.yaml").errors
    assert (error.code, error.line, error.column) == ("encoding", 3, 6)
    assert error.message.startswith("the file is not UTF-8 text: byte 0xe9")
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# é\n".encode() + latin1)  # columns count characters, not bytes
    [error] = load_file(path).errors
    assert (error.line, error.column) == (4, 6)


def test_lone_surrogates_are_located() -> None:
    [error] = load_text("version: v4\njobs: {a: \ud800}\n").errors
    assert (error.code, error.line, error.column) == ("encoding", 2, 11)


def test_characters_yaml_refuses_are_located() -> None:
    [error] = load_text("# é\nversion: v4\njobs: {a: \x01}\n").errors
    assert (error.code, error.line, error.column) == ("yaml-syntax", 3, 11)
    assert "#x0001" in error.message


def test_nodes_beyond_the_limit_are_refused_where_the_limit_is_reached() -> None:
    args = "".join(f"      - a{i}\n" for i in range(MAX_NODES))
    [error] = load_text(JOB + "    args:\n" + args).errors
    assert error.code == "too-many-nodes"
    assert error.line is not None
    assert error.line < 6 + MAX_NODES


def test_task_arrays_up_to_the_limits_pass() -> None:
    def array(name: str, size: int) -> str:
        return (
            f"  {name}:\n    image: {{uri: docker://alpine:3.20}}\n    command: [echo]\n"
            f"    task-array: {{start: 1, end: {size}, concurrency: 10}}\n"
        )

    most = MAX_TASKS_PER_WORKFLOW // MAX_TASKS_PER_ARRAY
    full = "version: v4\njobs:\n" + "".join(
        array(f"a{i}", MAX_TASKS_PER_ARRAY) for i in range(most)
    )
    assert load_text(full).ok
    one_more = load_text(full + "  extra:\n    image: {uri: docker://a}\n    command: [x]\n")
    assert [(d.code, d.field) for d in one_more.errors] == [("too-many-tasks", "jobs.extra")]
    too_long = load_text("version: v4\njobs:\n" + array("a", MAX_TASKS_PER_ARRAY + 1))
    assert [(d.code, d.field) for d in too_long.errors] == [
        ("too-many-tasks", "jobs.a.task-array.end")
    ]


def test_integers_are_read_as_a_go_parser_reads_them() -> None:
    doc = parse_yaml(
        "a: [18446744073709551615, 18446744073709551616, -9223372036854775808, "
        "-9223372036854775809, " + "9" * 400 + ", 0x" + "f" * 17 + "]"
    )
    assert doc.data["a"] == [2**64 - 1, 2.0**64, -(2**63), -(2.0**63), "9" * 400, "0x" + "f" * 17]


@pytest.mark.parametrize(
    "path", ["/data", "/dev/shm", "/dev/shm/work", "/proc2", "/devices", "/sys-data"]
)
def test_mounts_on_ordinary_directories_pass(path: str) -> None:
    text = "version: v4\nvolumes:\n  v: {}\n" + JOB.removeprefix("version: v4\n")
    assert load_text(text + f"    mounts: {{{path}: v}}\n").ok


def test_a_default_mount_on_proc_is_reported_once() -> None:
    text = (
        "version: v1\nvolumes:\n  v: {reference: volume://user/ephemeral}\n"
        "defaults:\n  job:\n    mounts:\n      v: {location: /proc/x}\njobs:\n"
        + "".join(f"  j{i}: {{image: {{uri: docker://a}}, command: [x]}}\n" for i in range(3))
    )
    assert [(d.code, d.field, d.line) for d in load_text(text).errors] == [
        ("mount-path", "defaults.job.mounts.v.location", 7)
    ]


@pytest.mark.parametrize(
    "uri", ["file://in.txt", "file:///in.txt", "file://a/b/c.txt", "file://a..b/c", "file://./x"]
)
def test_paths_inside_a_volume_pass(uri: str) -> None:
    text = (
        "version: v4\nvolumes:\n  v:\n    ingress:\n      - source: {uri: https://example.org/x}\n"
        f"        destination: {{uri: {uri!r}}}\n" + JOB.removeprefix("version: v4\n")
    )
    assert load_text(text).ok, load_text(text).errors
