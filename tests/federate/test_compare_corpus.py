"""`squall federate compare FILE` with no flag on every example: examples/, the ten public v1
examples and the 42 catalog templates rendered with their values. Each gets a chosen site
with its price, or (exit 1) every site listed with why it cannot take the workflow; never a
traceback. In-process (Typer's runner) for speed, with nothing configured: the catalog shipped
with Squall, no policy, no sites file, an empty data directory. `--offline`: the tests do not
reach the internet for the sizes of the public examples' downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import ROOT, catalog_apps, example_files
from tests.fuzzfile.test_corpus import _render

OURS = sorted((ROOT / "examples").glob("*.yaml"))
WORKFLOWS = [(p.name, p) for p in OURS] + [(p.name, p) for p in example_files()]
APPS = [(f"{app.name} (rendered)", app) for app in catalog_apps()]


def test_every_example_is_here() -> None:
    assert len(OURS) >= 5
    assert len(example_files()) == 10
    assert len(APPS) == 42


@pytest.fixture
def bare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("SQUALL_CATALOG", "SQUALL_POLICY", "SQUALL_SITES", "SQUALL_STORE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SQUALL_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def compare(path: Path) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(app, ["federate", "compare", str(path), "--offline", "-o", "json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code in (0, 1), result.output
    found = json.loads(result.stdout)
    if result.exit_code == 0:
        assert found["chosen"] == found["sites"][0]["site"]
        assert found["sites"][0]["feasible"]
        assert found["total_usd"] == found["sites"][0]["total_usd"] >= 0
    else:
        assert found["chosen"] is None
        assert all(not s["feasible"] and s["reasons"] for s in found["sites"])
    assert found["catalog"] == "shipped with Squall"
    return found  # type: ignore[no-any-return]


@pytest.mark.parametrize(("name", "path"), WORKFLOWS, ids=[n for n, _ in WORKFLOWS])
def test_compare_answers_for_every_example(bare: Path, name: str, path: Path) -> None:
    compare(path)


@pytest.mark.parametrize(("name", "app_dir"), APPS, ids=[n for n, _ in APPS])
def test_compare_answers_for_every_catalog_template(bare: Path, name: str, app_dir: Path) -> None:
    rendered = bare / f"{app_dir.name}.yaml"
    rendered.write_text(_render(app_dir), encoding="utf-8")
    compare(rendered)


def test_services_are_priced_and_this_machine_wins_a_tie(bare: Path) -> None:
    """Workflows of services alone (a file browser, a model server) used to price as nothing
    at all, so a cloud region won the tie on its name; services need nodes like jobs do."""
    apps = dict(APPS)
    for name in ("cloudcommander", "nim_flux_webui"):
        (bare / f"{name}.yaml").write_text(_render(apps[f"{name} (rendered)"]))
    small = compare(bare / "cloudcommander.yaml")
    assert small["chosen"] == "local"  # free here, and it fits
    gpu = compare(bare / "nim_flux_webui.yaml")
    cloud = next(s for s in gpu["sites"] if ":" in s["site"])  # priced, feasible or not
    assert {j["job"] for j in cloud["jobs"]} == {"nim", "nim-stub", "open-webui"}
    assert cloud["compute_usd"] > 0
