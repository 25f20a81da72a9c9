"""The map in DESIGN.md, enforced: imports point down the path, never back; the public
surface of the Fuzzfile package is what its `__all__` says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import orchestrator.fuzzfile as fuzzfile

ROOT = Path(__file__).resolve().parent.parent
OURS = {"cli", "orchestrator", "substrate", "federate", "infra", "api"}
# folder -> which of our top-level packages it may import (DESIGN.md, "Top-level layout")
ALLOWED = {
    # cli starts an agent in-process for `squall agent` (substrate's entry point only)
    "cli": {"cli", "orchestrator", "federate", "api", "substrate"},
    "orchestrator": {"orchestrator", "federate", "infra", "substrate", "api"},
    "substrate": {"substrate", "api"},
    "federate": {"federate"},
    "infra": {"infra"},
    "api": {"api"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_map(package: str) -> None:
    for path in (ROOT / package).rglob("*.py"):
        wrong = _imports(path) - ALLOWED[package]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_layout_exists() -> None:
    for name in (
        "infra",
        "orchestrator",
        "substrate",
        "federate",
        "cli",
        "images/warewulf",
        "tests",
        "bench",
        "examples",
        "Pulumi.yaml",
        "pyproject.toml",
        "README.md",
    ):
        assert (ROOT / name).exists(), name


def test_public_surface_of_fuzzfile() -> None:
    assert sorted(fuzzfile.__all__) == [
        "Diagnostic",
        "FieldPath",
        "FuzzfileError",
        "Job",
        "LoadResult",
        "Service",
        "Severity",
        "Volume",
        "Workflow",
        "format_path",
        "load_file",
        "load_text",
    ]
    for name in fuzzfile.__all__:
        assert hasattr(fuzzfile, name), name


def test_help_does_not_import_the_fuzzfile_stack() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from cli.main import app; "
        "print(any(m.startswith('orchestrator.fuzzfile.schema') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
