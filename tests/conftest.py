"""Shared test fixtures: where the corpus lives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.substrate.registry import Registry, build_busybox_image, missing_tools

ROOT = Path(__file__).resolve().parent.parent
# A copy of the public Fuzzfile corpus (Apache-2.0, see the LICENSE and SOURCE.txt files in it)
CORPUS = ROOT / "tests" / "corpus"
EXAMPLES = CORPUS / "fuzzball-workflow-examples"
CATALOG = CORPUS / "ciq-fuzzball-catalog" / "applications"


def example_files() -> list[Path]:
    """Every Fuzzfile of the examples repository (.yaml, .yml and .fz)."""
    return sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".yaml", ".yml", ".fz"))


def catalog_apps() -> list[Path]:
    """Every application folder of the catalog (template.yaml + values.yaml)."""
    return sorted(p.parent for p in CATALOG.glob("*/template.yaml"))


@pytest.fixture
def tmp_file(tmp_path: Path):
    """Write text to a file in a temporary folder and return its path."""

    def write(text: str, name: str = "wf.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A local registry holding busybox:1.36 and busybox:latest, built in this session."""
    missing = missing_tools()
    assert not missing, f"install {missing} (scripts/setup.sh --test does, as root)"
    work = tmp_path_factory.mktemp("registry")
    layout = build_busybox_image(work)
    reg = Registry(work)
    for name in ("busybox:1.36", "busybox:latest"):
        reg.push(layout, "1.36", name)
    yield reg
    reg.stop()
