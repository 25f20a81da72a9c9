"""README.md's table of what Squall does with each public Fuzzfile is the one the project's
script writes from the code as it is: validation, the engine's refusals and PLACING."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_readme_table_is_current() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fidelity-table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_table_has_every_public_workflow_and_no_ignored_column() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- fidelity-table: written")[1].split("<!-- fidelity-table: end")[0]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert len(rows) == 10 + 42
    outcomes = {line.split(" | ")[1] for line in rows}
    assert all(
        o in ("runs here", "refused at validation", "refused at submit", "no site can run it")
        or o.startswith(("would run at ", "no site can run it yet: "))
        for o in outcomes
    ), outcomes
    assert "ignored" not in block.lower()
