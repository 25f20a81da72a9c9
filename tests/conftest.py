"""Shared test fixtures: where the corpus lives, a local registry, a stand-in `pulumi` CLI."""

from __future__ import annotations

import json
import os
import sys
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


class FakePulumi:
    """tests/orchestrator/fake_pulumi.py installed as `pulumi` on PATH (see its docstring)."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.log = root / "argv.jsonl"

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def verbs(self) -> list[str]:
        """Each command as its first one or two words (`stack init`, `up`, ...)."""
        out = []
        for args in self.calls():
            words = [a for a in args if not a.startswith("-")]
            out.append(" ".join(words[:2]) if words[0] in ("stack", "config") else words[0])
        return out

    def stacks(self, backend: Path) -> dict[str, dict]:
        """What the fake backend holds: stack name -> its state."""
        folder = backend / ".fake"
        return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


@pytest.fixture
def fake_pulumi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePulumi:
    fake = FakePulumi(tmp_path / "fake-pulumi")
    fake.bin.mkdir(parents=True)
    script = Path(__file__).parent / "orchestrator" / "fake_pulumi.py"
    cli = fake.bin / "pulumi"
    cli.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    cli.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PULUMI_LOG", str(fake.log))
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE", raising=False)
    return fake
