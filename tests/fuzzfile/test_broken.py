"""Each file under broken/ has one defect; its first line says which error must be reported.

`# expect: CODE FIELD.PATH line N`: validation must fail with a diagnostic of that code, on
that field path and line, and it must say how to fix it (a hint) or say what is expected.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.fuzzfile import Severity, load_file

BROKEN = sorted((Path(__file__).parent / "broken").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (?P<code>\S+) (?P<path>\S+) line (?P<line>\d+)$")


def test_the_suite_is_large_enough() -> None:
    assert len(BROKEN) >= 40


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_file_reports_its_defect(path: Path) -> None:
    header = path.read_text(encoding="utf-8").splitlines()[0]
    match = EXPECT.match(header)
    assert match, f"{path.name} lacks an `# expect:` header"
    result = load_file(path)
    assert not result.ok
    assert result.errors, "an invalid file must report at least one error"
    found = [(d.code, d.field, d.line) for d in result.errors]
    wanted = (match["code"], match["path"], int(match["line"]))
    assert wanted in found, f"expected {wanted}, got {found}"
    diag = next(d for d in result.errors if (d.code, d.field, d.line) == wanted)
    assert diag.severity is Severity.ERROR
    assert diag.file == str(path)
    assert diag.column is not None
    assert diag.column >= 1
    assert diag.message
    assert "!r}" not in diag.message
    assert "{" not in diag.message.split(":")[0]
    rendered = diag.render()
    assert rendered.startswith(f"{path}:{diag.line}:{diag.column}: error: {diag.field}: ")
