"""The real public corpus: every example validates, every catalog app renders and validates,
and every v1 file upgrades to a v4 file that loads to an equal workflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.fuzzfile import load_file, load_text
from orchestrator.fuzzfile.apps import AppError, render_app
from orchestrator.fuzzfile.upgrade import upgrade_text
from tests.conftest import catalog_apps, example_files

# Templates that refuse their shipped defaults on purpose (`fail "X is required"`): the
# catalog expects the user to supply these. Each gets a plausible value, nothing more.
REQUIRED_INPUTS: dict[str, list[str]] = {
    "nim_flux_webui": [
        "NgcApiKeySecret=secret://user/NGC_API_KEY",
        "NgcOciSecret=secret://user/NGC_OCI",
        "HuggingFaceTokenSecret=secret://user/HF_TOKEN",
    ],
    "unsloth-studio": ["UserPassword=correct-horse"],
    "vllm-server": ["ServerApiKey=secret://user/VLLM_API_KEY"],
}


def test_corpus_is_complete() -> None:
    assert len(example_files()) == 10
    assert len(catalog_apps()) == 42


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    result = load_file(path)
    assert result.ok, "\n".join(d.render() for d in result.errors)
    assert result.workflow is not None
    assert result.workflow.jobs or result.workflow.services


def _render(app: Path, seed: int = 7) -> str:
    return render_app(
        app / "template.yaml", app / "values.yaml", REQUIRED_INPUTS.get(app.name, []), seed=seed
    )


@pytest.mark.parametrize("app", catalog_apps(), ids=lambda p: p.name)
def test_catalog_template_renders_and_validates(app: Path) -> None:
    text = _render(app)
    result = load_text(text, f"{app.name}/template.yaml (rendered)")
    assert result.ok, "\n".join(d.render() for d in result.errors)


@pytest.mark.parametrize("app", sorted(REQUIRED_INPUTS), ids=str)
def test_required_inputs_are_refused_when_missing(app: str) -> None:
    folder = next(p for p in catalog_apps() if p.name == app)
    with pytest.raises(AppError) as info:
        render_app(folder / "template.yaml", folder / "values.yaml", seed=1)
    assert info.value.refused
    assert "is required" in info.value.message
    assert info.value.line is not None


def _v1_sources() -> list[tuple[str, str]]:
    found = [(p.name, p.read_text(encoding="utf-8")) for p in example_files()]
    found += [(f"{app.name} (rendered)", _render(app)) for app in catalog_apps()]
    return [(name, text) for name, text in found if "version: v1" in text]


V1_SOURCES = _v1_sources()


def test_corpus_has_v1_files_to_upgrade() -> None:
    assert len(V1_SOURCES) == 11  # ten examples and the rclone-server catalog template


@pytest.mark.parametrize(("name", "text"), V1_SOURCES, ids=[n for n, _ in V1_SOURCES])
def test_upgrade_gives_equal_model(name: str, text: str) -> None:
    before = load_text(text, name)
    assert before.ok
    assert before.version == "v1"
    upgraded = upgrade_text(text)
    after = load_text(upgraded, name + " (v4)")
    assert after.ok, "\n".join(d.render() for d in after.errors)
    assert after.version == "v4"
    assert after.workflow == before.workflow
    assert "requires:" not in upgraded
    assert "location:" not in upgraded
