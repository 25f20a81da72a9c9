"""v1 and v4 load into one model; defaults merge into jobs; volumes and mounts normalise."""

from __future__ import annotations

import logging
import textwrap

import pytest

from orchestrator.fuzzfile import load_text
from orchestrator.fuzzfile.model import Affinity, DependencyStatus, Mount, Workflow

# The side-by-side pipeline of the Fuzzfile reference (§6A), in both syntaxes.
V1 = textwrap.dedent(
    """\
    version: v1
    files:
      params.csv: |
        x,42
    volumes:
      scratch:
        name: scratch
        reference: volume://user/ephemeral
        ingress:
          - source: { uri: "s3://my-bucket/in/data.tar.gz", secret: "secret://user/S3CREDS" }
            destination: { uri: "file://inputs/data.tar.gz" }
            policy: { timeout: { execute: 30m } }
          - source: { uri: "file://params.csv" }
            destination: { uri: "file://inputs/params.csv" }
        egress:
          - source: { uri: "file://results/out.tar.gz" }
            destination: { uri: "s3://my-bucket/out/out.tar.gz", secret: "secret://user/S3CREDS" }
      db:
        reference: volume://group/persistent/refdb
    defaults:
      job:
        mounts:
          scratch: { location: /scratch }
        env: [ SCRATCH=/scratch, MODE=default ]
        policy: { timeout: { execute: 2h } }
        resource: { memory: { size: 2GiB }, cpu: { affinity: NUMA } }
    jobs:
      split:
        image: { uri: "docker://alpine:3.20" }
        script: |
          #!/bin/sh
          tar -C "$SCRATCH/inputs" -xzf "$SCRATCH/inputs/data.tar.gz"
        env: [ MODE=split ]
        resource: { cpu: { cores: 1 }, memory: { size: 1GiB } }
      per-chunk:
        image: { uri: "docker://alpine:3.20" }
        command: [/bin/sh, -c, 'echo "chunk ${FB_TASK_ID}"']
        resource: { cpu: { cores: 1, affinity: CORE } }
        task-array: { start: 1, end: 10, concurrency: 5 }
        requires: [ split ]
      solve:
        image: { uri: "oras://ghcr.io/example/solver:1.0" }
        command: [/opt/solver/bin/solve, --in, /scratch/inputs]
        mounts:
          db: { location: /refdb }
        resource: { cpu: { cores: 8 }, memory: { size: 1GiB, by-core: true } }
        multinode: { nodes: 2, implementation: ompi }
        policy: { retry: { attempts: 3 } }
        depends-on: [ { name: per-chunk, status: finished } ]
    services:
      notebook:
        image: { uri: "docker://quay.io/jupyter/minimal-notebook:2026-06-05" }
        mounts:
          scratch: { location: /scratch }
        persist: true
        network:
          ports: [ { name: web, port: 8888, protocol: tcp } ]
          endpoints: [ { name: nb, port-name: web, protocol: http, type: path, scope: user } ]
        readiness-probe:
          http-get: { path: /, port: 8888, scheme: http }
          initial-delay-seconds: 10
        resource: { cpu: { cores: 2 }, memory: { size: 4GiB } }
    """
)

V4 = (
    V1.replace("version: v1", "version: v4")
    .replace("    name: scratch\n    reference: volume://user/ephemeral", "    use: ephemeral")
    .replace("      scratch: { location: /scratch }", "      /scratch: { volume: scratch }")
    .replace("      db: { location: /refdb }", "      /refdb: db")
    .replace("requires: [ split ]", "depends-on: [ { name: split } ]")
)


def load(text: str) -> Workflow:
    return load_text(text, "wf.yaml").unwrap()


def test_v1_and_v4_load_to_equal_models() -> None:
    assert V4 != V1
    assert load(V1) == load(V4)


def test_defaults_merge_into_jobs_field_by_field() -> None:
    wf = load(V1)
    split, chunk, solve = wf.jobs["split"], wf.jobs["per-chunk"], wf.jobs["solve"]
    assert split.env == {"SCRATCH": "/scratch", "MODE": "split"}  # job env wins by key
    assert chunk.env == {"SCRATCH": "/scratch", "MODE": "default"}
    assert split.mounts == (Mount(volume="scratch", path="/scratch"),)
    assert solve.mounts == (
        Mount(volume="scratch", path="/scratch"),
        Mount(volume="db", path="/refdb"),
    )
    assert split.policy.timeout == 7200
    assert split.policy.retries is None
    assert solve.policy.timeout == 7200
    assert solve.policy.retries == 3
    assert split.resource.memory == 2**30  # the job's own memory wins
    assert chunk.resource.memory == 2 * 2**30  # the default fills what the job left out
    assert split.resource.affinity is Affinity.NUMA
    assert chunk.resource.affinity is Affinity.CORE
    # defaults apply to jobs only: the service keeps its own resource section
    assert wf.services["notebook"].resource.affinity is Affinity.CORE


def test_units_and_aliases_normalise() -> None:
    wf = load(V1)
    solve = wf.jobs["solve"]
    assert solve.resource.memory_by_core
    assert solve.resource.memory_per_node == 8 * 2**30
    assert solve.multinode is not None
    assert solve.multinode.implementation == "openmpi"
    assert solve.depends_on[0].status is DependencyStatus.FINISHED
    chunk = wf.jobs["per-chunk"]
    assert chunk.task_array is not None
    assert chunk.task_array.size == 10
    assert chunk.depends_on[0].name == "split"
    transfer = wf.volumes["scratch"].ingress[0]
    assert transfer.policy.timeout == 1800
    assert transfer.source.secret == "secret://user/S3CREDS"


def test_volumes_normalise() -> None:
    wf = load(V1)
    scratch, db = wf.volumes["scratch"], wf.volumes["db"]
    assert not scratch.persistent
    assert scratch.scope == "user"
    assert db.persistent
    assert db.persistent_name == "refdb"
    assert db.scope == "group"
    assert len(scratch.ingress) == 2
    assert len(scratch.egress) == 1


@pytest.mark.parametrize(
    ("v4_volume", "persistent", "name"),
    [
        ("{}", False, None),
        ("{use: ephemeral}", False, None),
        ("{use: persistent, name: cache}", True, "cache"),
        ("{name: cache, size: 1TiB}", True, "cache"),
        ("{reference: volume://account/persistent/x}", True, "x"),
        ("{reference: volume://user/ephemeral/ignored}", False, None),
    ],
)
def test_v4_volume_forms(v4_volume: str, persistent: bool, name: str | None) -> None:
    wf = load(
        f"version: v4\nvolumes:\n  v: {v4_volume}\njobs:\n  j:\n    image: {{uri: docker://a}}\n"
    )
    vol = wf.volumes["v"]
    assert (vol.persistent, vol.persistent_name) == (persistent, name)


def test_empty_volume_body_is_an_ephemeral_volume() -> None:
    wf = load("version: v4\nvolumes:\n  v:\njobs:\n  j:\n    image: {uri: docker://a}\n")
    assert not wf.volumes["v"].persistent


def test_several_errors_are_reported_together() -> None:
    result = load_text(
        "version: v4\njobs:\n  a:\n    image: {uri: alpine}\n    resource: {cpu: {cores: 0}}\n"
        "    policy: {timeout: {execute: soon}}\n",
        "wf.yaml",
    )
    assert {d.field for d in result.errors} == {
        "jobs.a.image.uri",
        "jobs.a.resource.cpu.cores",
        "jobs.a.policy.timeout.execute",
    }
    assert [d.line for d in result.errors] == [4, 5, 6]


def test_warnings_do_not_fail_validation() -> None:
    result = load_text(
        "version: v4\njobs:\n  Run_Me:\n    image: {uri: docker://a}\n"
        "services:\n  db:\n    image: {uri: docker://postgres:17}\n",
        "wf.yaml",
    )
    assert result.ok
    codes = {(d.code, d.field) for d in result.warnings}
    assert ("name-format", "jobs.Run_Me") in codes
    assert ("idle-service", "services.db") in codes


def test_yaml_12_scalars_stay_strings() -> None:
    wf = load(
        "version: v4\njobs:\n  j:\n    image: {uri: docker://a}\n"
        "    command: [echo, on, no, 1:30, 2026-06-05, 8]\n"
    )
    assert wf.jobs["j"].command == ("echo", "on", "no", "1:30", "2026-06-05", "8")


def test_anchors_and_merge_keys_are_understood() -> None:
    wf = load(
        "version: v4\njobs:\n  a: &base\n    image: {uri: docker://a}\n"
        "  b:\n    <<: *base\n    command: [b]\n"
    )
    assert wf.jobs["b"].image.uri == "docker://a"


def test_alias_bombs_are_refused() -> None:
    bomb = "version: v4\na: &a [x, x, x, x, x, x, x, x, x, x]\n"
    prev = "a"
    for i in range(8):
        bomb += f"l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        prev = f"l{i}"
    result = load_text(bomb, "bomb.yaml")
    assert not result.ok
    assert "aliases" in result.errors[0].message


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("version: [v4]\n", "version", "unsupported version ['v4']"),
        ("version: v1\nfunction-: null\n", "function-", "unknown key 'function-'"),
    ],
)
def test_odd_documents_found_by_the_property_tests(text: str, field: str, message: str) -> None:
    [error] = load_text(text, "wf.yaml").errors
    assert error.field == field
    assert message in error.message


@pytest.mark.parametrize(
    ("port", "ok"),
    [
        ("8080", True),
        ("web", True),
        ("'8080'", True),
        ("0", False),
        ("true", False),
        ("'Bad Name'", False),
        ("70000", False),
    ],
)
def test_probe_ports_are_numbers_or_names(port: str, ok: bool) -> None:
    text = (
        "version: v4\nservices:\n  s:\n    persist: true\n    image: {uri: docker://a}\n"
        f"    readiness-probe:\n      tcp-socket: {{port: {port}}}\n"
    )
    result = load_text(text, "wf.yaml")
    assert result.ok is ok
    if not ok:
        assert result.errors[0].field == "services.s.readiness-probe.tcp-socket.port"


def test_unreadable_documents_are_errors_not_crashes() -> None:
    deep = load_text("version: v4\njobs: " + "[" * 5000 + "]" * 5000, "deep.yaml")
    assert (
        deep.errors[0].message == "the document nests lists and mappings more than 64 levels deep"
    )
    assert (deep.errors[0].code, deep.errors[0].line) == ("too-deep", 2)
    binary = load_text("\x00\x01 bad", "bin.yaml")
    assert "control characters are not allowed" in binary.errors[0].message


def test_a_defect_of_the_loader_is_a_diagnostic_and_a_logged_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from orchestrator.fuzzfile import loader

    def broken(text: str, file: str) -> loader.LoadResult:
        raise RuntimeError("a bug")

    monkeypatch.setattr(loader, "_load", broken)
    with caplog.at_level(logging.ERROR, logger="squall.fuzzfile"):
        result = load_text("version: v4\n", "wf.yaml")
    [error] = result.errors
    assert (error.code, error.file) == ("internal", "wf.yaml")
    assert error.message == "internal error while validating: RuntimeError: a bug"
    [record] = caplog.records
    assert (record.name, record.getMessage()) == ("squall.fuzzfile", "validating wf.yaml failed")
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError
