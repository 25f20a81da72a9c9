"""How the CLI prints diagnostics: plain text into a pipe or a file, colour on a terminal that
takes it (NO_COLOR, TERM=dumb and FORCE_COLOR as rich reads them)."""

from __future__ import annotations

import io
import os
import pty

import pytest

from cli.output import paint, print_diagnostic
from orchestrator.fuzzfile import load_text

BROKEN = "version: v4\njobs:\n  a:\n    image: {uri: docker://x}\n    resource: {cores: 4}\n"


@pytest.fixture
def plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_COLOR", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)


def test_a_diagnostic_is_one_line_with_its_place_then_its_hint(plain_env: None) -> None:
    result = load_text(BROKEN, "broken.yaml")
    (d,) = result.errors
    stream = io.StringIO()
    print_diagnostic(d, stream, indent="  ")
    first, hint = stream.getvalue().splitlines()
    assert first == "  broken.yaml:5:16: error: jobs.a.resource.cores: unknown key 'cores'"
    assert hint.startswith("      hint: allowed here: ")
    assert "cpu" in hint
    assert "\x1b" not in stream.getvalue()


def test_paint_colours_a_terminal_only(plain_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    leader, follower = pty.openpty()
    try:
        with open(follower, "w", closefd=False) as terminal:
            assert paint(terminal, "error", "bold red") == "\x1b[1;31merror\x1b[0m"
            monkeypatch.setenv("NO_COLOR", "1")
            assert paint(terminal, "error", "bold red") == "error"
            monkeypatch.delenv("NO_COLOR")
            monkeypatch.setenv("TERM", "dumb")
            assert paint(terminal, "error", "bold red") == "error"
    finally:
        os.close(leader)
        os.close(follower)
    monkeypatch.delenv("TERM")
    assert paint(io.StringIO(), "valid", "green") == "valid"
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert paint(io.StringIO(), "valid", "green") == "\x1b[32mvalid\x1b[0m"
