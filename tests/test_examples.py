"""Every workflow under examples/ validates cleanly: no errors and no warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.fuzzfile import load_file

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_clean(path: Path) -> None:
    result = load_file(path)
    rendered = [d.render() for d in result.diagnostics]
    assert result.ok, rendered
    assert not result.warnings, rendered
