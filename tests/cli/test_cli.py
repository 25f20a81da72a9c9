"""The `squall` commands: exit codes, text and JSON output, files written (or not)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from orchestrator.fuzzfile import load_file
from tests.conftest import CATALOG, EXAMPLES, example_files

runner = CliRunner()
BLAST = EXAMPLES / "blast" / "blast.yaml"
BROKEN = Path(__file__).parent.parent / "fuzzfile" / "broken"


def squall(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_version_and_help() -> None:
    code, out, _ = squall("--version")
    assert code == 0
    assert out.startswith("squall 0.")
    code, out, _ = squall("workflow", "validate", "--help")
    assert code == 0
    assert "field path" in out
    assert "Examples" in out


def test_validate_corpus_text() -> None:
    code, out, _ = squall("workflow", "validate", *map(str, example_files()))
    assert code == 0
    assert "10 files: 10 valid, 0 invalid" in out
    assert "blast.yaml (v1, 5 jobs, 0 services, 1 volume), 4 warnings" in out


def test_validate_searches_folders(tmp_path: Path) -> None:
    code, out, _ = squall("workflow", "validate", "-o", "json", str(EXAMPLES))
    assert code == 0
    assert len(json.loads(out)["files"]) == 10
    code, _, err = squall("workflow", "validate", str(tmp_path))
    assert code == 2
    assert "holds no *.yaml" in err


def test_validate_invalid_file_exits_1_and_names_file_line_field() -> None:
    bad = BROKEN / "15-memory-size-words.yaml"
    code, out, _ = squall("workflow", "validate", str(bad))
    assert code == 1
    assert f"{bad}:17:15: error: jobs.hello.resource.memory.size: '14 GiBs'" in out


def test_names_and_values_print_as_written(tmp_path: Path) -> None:
    """Rich reads `:fire:` as an emoji code unless told not to."""
    named = tmp_path / "a:fire:b.yaml"
    named.write_text(
        "version: v4\njobs:\n  hello:\n    image: {uri: docker://alpine:3.20}\n"
        "    command: [echo]\n    resource:\n      memory: {size: ':fire:'}\n"
    )
    code, out, _ = squall("workflow", "validate", str(named))
    assert code == 1
    assert f"invalid {named}: 1 error" in out
    assert f"{named}:7:22: error: jobs.hello.resource.memory.size: ':fire:' is not a size" in out


def test_validate_json_report() -> None:
    bad = BROKEN / "35-dependency-cycle.yaml"
    code, out, _ = squall("workflow", "validate", "-o", "json", str(BLAST), str(bad))
    assert code == 1
    report = json.loads(out)
    assert report["valid"] is False
    good, broken = report["files"]
    assert good["valid"]
    assert good["version"] == "v1"
    assert len(good["warnings"]) == 4
    assert good["jobs"] == sorted(
        [
            "create-dirs",
            "retrieve-query-sequence",
            "retrieve-database-sequences",
            "make-blast-database",
            "run-blast",
        ]
    )
    [error] = broken["errors"]
    assert error["code"] == "cycle"
    assert error["line"] == 27
    assert error["field"] == "jobs.b.depends-on[0]"
    assert error["path"] == ["jobs", "b", "depends-on", 0]


def test_strict_fails_on_warnings_and_quiet_hides_them() -> None:
    code, out, _ = squall("workflow", "validate", "--strict", str(BLAST))
    assert code == 1
    code, out, _ = squall("workflow", "validate", "-q", str(BLAST))
    assert code == 0
    assert "warning" not in out.replace("4 warnings", "")


def test_validate_missing_file() -> None:
    code, out, _ = squall("workflow", "validate", "does-not-exist.yaml")
    assert code == 1
    assert "cannot read file: No such file or directory" in out


def test_upgrade_to_stdout_and_in_place(tmp_path: Path) -> None:
    code, out, _ = squall("workflow", "upgrade", str(BLAST))
    assert code == 0
    assert out.startswith("version: v4\n")
    assert "# egress:" in out
    copy = tmp_path / "blast.yaml"
    shutil.copy(BLAST, copy)
    code, _, err = squall("workflow", "upgrade", "--in-place", str(copy))
    assert code == 0
    assert "wrote" in err
    assert load_file(copy).version == "v4"
    assert load_file(copy).workflow == load_file(BLAST).workflow
    code, out, err = squall("workflow", "upgrade", str(copy))  # already v4: unchanged
    assert code == 0
    assert "already v4" in err
    assert out == copy.read_text()


def test_upgrade_refuses_invalid_input_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (BROKEN / "38-requires-dangling.yaml").read_text()
    bad.write_text(text)
    code, _, err = squall("workflow", "upgrade", "--in-place", str(bad))
    assert code == 1
    assert "not a valid Fuzzfile" in err
    assert bad.read_text() == text


def test_upgrade_refuses_host_volumes(tmp_file) -> None:
    path = tmp_file(
        "version: v1\nvolumes:\n  h:\n    type: HOST\n    path: /srv\njobs:\n"
        "  j:\n    image: {uri: docker://a}\n    mounts: {h: {location: /h}}\n"
    )
    code, _, err = squall("workflow", "upgrade", str(path))
    assert code == 1
    assert "HOST volume" in err


def test_graph_text_dot_and_json() -> None:
    code, out, _ = squall("workflow", "graph", str(BLAST))
    assert code == 0
    assert out.splitlines()[:2] == ["stage 1", "  create-dirs  (1 core, 1GiB)"]
    assert "  run-blast  (8 cores, 30GiB)  <- make-blast-database" in out
    code, out, _ = squall("workflow", "graph", "--dot", str(BLAST))
    assert code == 0
    assert out.startswith('digraph "blast" {')
    assert '"make-blast-database" -> "run-blast";' in out
    code, out, _ = squall("workflow", "graph", "-o", "json", str(BLAST))
    stages = json.loads(out)["stages"]
    assert stages[1] == ["retrieve-query-sequence", "retrieve-database-sequences"]


def test_graph_of_invalid_workflow_fails() -> None:
    code, _, err = squall("workflow", "graph", str(BROKEN / "35-dependency-cycle.yaml"))
    assert code == 1
    assert "dependency cycle: b -> hello -> b" in err


def test_app_render_folder_and_files(tmp_path: Path) -> None:
    code, out, _ = squall("app", "render", str(CATALOG / "mpi_hello_world"), "--set", "Nodes=4")
    assert code == 0
    assert "nodes: 4" in out
    assert "implementation: mpich" in out
    target = tmp_path / "hello.yaml"
    code, _, _err = squall(
        "app",
        "render",
        str(CATALOG / "hello_world" / "template.yaml"),
        str(CATALOG / "hello_world" / "values.yaml"),
        "--out",
        str(target),
    )
    assert code == 0
    assert load_file(target).ok


def test_app_render_is_reproducible_with_a_seed() -> None:
    args = ("app", "render", str(CATALOG / "jupyter"), "--seed", "42")
    assert squall(*args)[1] == squall(*args)[1]


def test_app_render_fail_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "vllm.yaml"
    code, out, err = squall("app", "render", str(CATALOG / "vllm-server"), "--out", str(target))
    assert code == 1
    assert "template.yaml:7:7: the template refused its values: ServerApiKey is required" in err
    assert not target.exists()
    assert out == ""


@pytest.mark.parametrize(
    ("setting", "message"),
    [("Cores=many", "Cores takes a whole number"), ("Cores", "write NAME=VALUE")],
)
def test_app_render_bad_settings(setting: str, message: str) -> None:
    code, _, err = squall("app", "render", str(CATALOG / "mpi_hello_world"), "--set", setting)
    assert code == 2
    assert message in err


def test_app_render_invalid_result_is_not_written(tmp_path: Path) -> None:
    target = tmp_path / "out.yaml"
    code, _, err = squall(
        "app",
        "render",
        str(CATALOG / "mpi_hello_world"),
        "--set",
        "MpiFlavor=intelmpi",
        "--out",
        str(target),
    )
    assert code == 1
    assert "multinode.implementation" in err
    assert not target.exists()


def test_console_script_runs_in_a_fresh_process() -> None:
    exe = Path(sys.executable).parent / "squall"
    proc = subprocess.run(
        [str(exe), "workflow", "validate", "-o", "json", str(BLAST)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["valid"] is True


def test_squall_agent_serves_a_slice_of_the_machine(tmp_path: Path) -> None:
    from api.substrate.v1 import agent_pb2 as pb
    from substrate.client import connect

    exe = Path(sys.executable).parent / "squall"
    env = {**__import__("os").environ, "SQUALL_AGENT_TOKEN": "cli-token"}
    proc = subprocess.Popen(
        [
            str(exe),
            "agent",
            "--data-dir",
            str(tmp_path / "a"),
            "--cpus",
            "0",
            "--memory",
            "1GiB",
            "--label",
            "site=local",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:")
        channel, stub = connect(line.split()[-1], "cli-token")
        inv = stub.Inventory(pb.InventoryRequest())
        assert [c.id for c in inv.cpus] == [0]
        assert inv.memory_bytes == 2**30
        assert inv.labels["site"] == "local"
        channel.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        proc.stdout.close()


def test_squall_agent_refuses_bad_input(tmp_path: Path) -> None:
    code, _, err = squall("agent", "--data-dir", str(tmp_path), "--memory", "lots")
    assert code == 2
    assert "--memory: 'lots' is not a size" in err
