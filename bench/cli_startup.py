"""How long the CLI takes to start, next to the interpreter's own start-up.

Run: .venv/bin/python bench/cli_startup.py [--runs N] [--file FUZZFILE]

Whole processes, interleaved round by round so that a busy machine slows every row alike:
  python -c pass                       the interpreter alone: the floor
  a bare Typer app's --help            two commands: what Typer and Rich take to print help
  squall --help                        the top-level help (Typer and Rich render it)
  import typer, rich, pydantic, yaml   the libraries validate cannot start without
  squall workflow validate FILE        examples/hello.yaml and one corpus example
Prints the median and the 90th percentile of the wall times, and each row's cost above the
floor. The goal (issue 13): validate <= 150 ms and --help <= 120 ms on the 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS_EXAMPLE = (
    ROOT / "tests/corpus/fuzzball-workflow-examples/openfoam/openfoam-motorbike-mpi.yaml"
)


BARE_TYPER = """
import typer
app = typer.Typer(rich_markup_mode="markdown", add_completion=False, pretty_exceptions_enable=False)
@app.command()
def one() -> None:
    '''The first command.'''
@app.command()
def two() -> None:
    '''The second command.'''
app()
"""
LIBRARIES = "import typer, rich.console, yaml; from pydantic import BaseModel, TypeAdapter"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--file", type=Path, default=CORPUS_EXAMPLE, help="a corpus example")
    args = parser.parse_args()
    squall = str(Path(sys.executable).parent / "squall")
    hello = ROOT / "examples/hello.yaml"
    rows = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "a bare Typer app's --help": [sys.executable, "-c", BARE_TYPER, "--help"],
        "squall --help": [squall, "--help"],
        "import typer, rich, pydantic, yaml": [sys.executable, "-c", LIBRARIES],
        f"squall workflow validate {hello.relative_to(ROOT)}": [
            squall,
            "workflow",
            "validate",
            str(hello),
        ],
        f"squall workflow validate {args.file.name}": [
            squall,
            "workflow",
            "validate",
            str(args.file),
        ],
    }
    # What users run: Python writes .pyc files once and reads them after (a
    # PYTHONDONTWRITEBYTECODE in this environment would recompile every changed module per run)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for cmd in rows.values():  # warm the page cache and the .pyc files; fail early
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=env)
    times: dict[str, list[float]] = {label: [] for label in rows}
    for _ in range(args.runs):
        for label, cmd in rows.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=env)
            times[label].append(time.perf_counter() - start)
    floor = statistics.median(times["python -c pass"])
    print(f"whole processes, {args.runs} runs each, interleaved")
    print(f"{'':56} {'median':>8} {'p90':>8} {'above floor':>12}")
    for label, values in times.items():
        median = statistics.median(values)
        print(
            f"{label:56} {median * 1000:6.0f}ms {percentile(values, 0.9) * 1000:6.0f}ms"
            f" {(median - floor) * 1000:10.0f}ms"
        )


if __name__ == "__main__":
    main()
