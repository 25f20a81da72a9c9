"""The CLI imports what a command needs when it runs: `squall --help` and `squall workflow
validate` start without the network, store and cloud libraries (issue 13's start-up goal;
bench/cli_startup.py has the times). Checked in a fresh interpreter, not by timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TypedDict

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
HELLO = ROOT / "examples" / "hello.yaml"

# Never needed to print help or to validate a file.
HEAVY = (
    "grpc",
    "google.protobuf",
    "api.squall",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "boto3",
    "botocore",
    "httpx",
    "pulumi",
    "ruamel",
    "orchestrator.engine",
    "orchestrator.store",
    "orchestrator.api",
    "orchestrator.provision",
    "federate",
    "substrate",
    "rich.live",
)
# Help needs no Fuzzfile machinery either.
HELP_ONLY = ("pydantic", "yaml", "orchestrator")
# A command imports its own module alone (cli/lazy.py): validate needs none of these.
OTHER_COMMANDS = (
    "cli.run_cmd",
    "cli.server_cmd",
    "cli.agent_cmd",
    "cli.doctor_cmd",
    "cli.app_cmd",
    "cli.context_cmd",
    "cli.secret_cmd",
    "cli.federate_cmd",
    "cli.stack_cmd",
)

_RUN = """
import json, sys
sys.argv = ["squall", *json.loads(sys.argv[1])]
from cli.main import main
try:
    main()
except SystemExit:
    pass
finally:
    with open(OUT, "w") as fh:
        json.dump(sorted(sys.modules), fh)
"""


def modules_after(tmp_path: Path, *args: str) -> set[str]:
    """The modules loaded by the time `squall ARGS` has finished, in a fresh interpreter."""
    out = tmp_path / "modules.json"
    code = f"OUT = {str(out)!r}\n" + _RUN
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(args))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(out.read_text()))


def loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_help_imports_no_heavy_library(tmp_path: Path) -> None:
    modules = modules_after(tmp_path, "--help")
    assert "cli.main" in modules
    assert loaded(modules, HEAVY + HELP_ONLY) == []


BROKEN = "version: v4\njobs:\n  a:\n    image: {uri: docker://x}\n    resource: {cores: 4}\n"


@pytest.mark.parametrize(
    "args", [(str(HELLO),), ("-o", "json", str(HELLO)), ("broken.yaml",), (str(HELLO), ".")]
)
def test_validate_imports_only_the_fuzzfile_machinery(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """Valid, invalid (errors printed) and several files (a summary line): validate prints
    without rich (cli/output.py `paint`)."""
    (tmp_path / "broken.yaml").write_text(BROKEN)
    args = tuple(str(tmp_path / a) if a in ("broken.yaml", ".") else a for a in args)
    modules = modules_after(tmp_path, "workflow", "validate", *args)
    assert "orchestrator.fuzzfile.schema" in modules  # it did validate
    assert loaded(modules, HEAVY) == []
    assert loaded(modules, OTHER_COMMANDS) == []
    assert loaded(modules, ("rich",)) == []


def test_a_command_without_fuzzfiles_imports_no_pydantic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Typer 0.29 built a pydantic validator for each parameter of the command that runs, so
    every command imported pydantic (pyproject.toml pins 0.28)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    modules = modules_after(tmp_path, "context", "list", "-o", "json")
    assert "cli.context_cmd" in modules
    assert loaded(modules, ("pydantic", "pydantic_core")) == []


_BUILT = """
import json, sys
from pydantic import BaseModel
from orchestrator.fuzzfile import load_text, schema
def built():
    return sorted(
        name for name, value in vars(schema).items()
        if isinstance(value, type) and issubclass(value, BaseModel) and value.__pydantic_complete__
    )
at_import = built()
assert load_text(sys.argv[1], "hello.yaml").ok
print(json.dumps([at_import, built()]))
"""


def test_the_schema_builds_one_validator_when_first_used() -> None:
    """Importing the Fuzzfile package builds no pydantic validator; validating a v4 file
    builds the v4 document's (its nested models inline), not one per model nor v1's."""
    done = subprocess.run(
        [sys.executable, "-c", _BUILT, HELLO.read_text()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    at_import, after_validating = json.loads(done.stdout)
    assert at_import == []
    assert after_validating == ["DocumentV4"]


_ENTRY = """
import gc, importlib.metadata, json, sys
looked_up = []
entry_points = importlib.metadata.entry_points
def spy(**params):
    looked_up.append(params.get("group"))
    return entry_points(**params)
importlib.metadata.entry_points = spy
sys.argv = ["squall", *json.loads(sys.argv[1])]
from cli.main import main
try:
    main()
except SystemExit:
    pass
finally:
    print(json.dumps({"pydantic_plugins_looked_up": "pydantic" in looked_up,
                      "frozen": gc.get_freeze_count(), "young": gc.get_threshold()[0]}),
          file=sys.stderr)
"""


class EntryPointRun(TypedDict):
    pydantic_plugins_looked_up: bool
    frozen: int  # gc.get_freeze_count() when the command was over
    young: int  # the youngest generation's collection threshold then


def entry_point_run(args: tuple[str, ...], **env: str) -> EntryPointRun:
    """What `squall ARGS` did, run through the console script's `main` in a fresh interpreter
    with `env` added to the environment."""
    done = subprocess.run(
        [sys.executable, "-c", _ENTRY, json.dumps(list(args))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"} | env,
    )
    assert done.returncode == 0, done.stderr
    result: EntryPointRun = json.loads(done.stderr.strip().splitlines()[-1])
    return result


def test_the_entry_point_skips_the_search_for_pydantic_plugins_unless_told() -> None:
    """Searching reads every installed package's entry points (bench/cli_startup.py);
    PYDANTIC_DISABLE_PLUGINS set by the user, even to nothing, is pydantic's to read."""
    validate = ("workflow", "validate", str(HELLO))
    assert entry_point_run(validate)["pydantic_plugins_looked_up"] is False
    asked = entry_point_run(validate, PYDANTIC_DISABLE_PLUGINS="")
    assert asked["pydantic_plugins_looked_up"] is True


@pytest.mark.parametrize("args", [("--help",), ("workflow", "validate", str(HELLO))])
def test_the_entry_point_leaves_its_objects_to_the_shutdown_uncollected(
    args: tuple[str, ...],
) -> None:
    """The interpreter's shutdown would otherwise run full collections over every object
    the command left, about a tenth of `squall workflow validate`'s time."""
    assert entry_point_run(args)["frozen"] > 10_000


def test_the_entry_point_collects_the_youngest_generation_less_often() -> None:
    """Start-up's long-lived objects are not walked by a full collection every few
    thousand allocations (about 15 ms of validate)."""
    from cli.main import YOUNG_GC

    assert YOUNG_GC > 700  # Python's default
    assert entry_point_run(("workflow", "validate", str(HELLO)))["young"] == YOUNG_GC
