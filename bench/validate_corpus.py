"""How long validating the whole corpus takes, next to its floor: parsing the same YAML.

Run: .venv/bin/python bench/validate_corpus.py [--repeat N]

Texts are read (and catalog templates rendered) before timing starts, so the figures are
in-process work after start-up. Side by side in one run:
  yaml.load (CSafeLoader)   parse only: the least any validator must do
  squall load_text          parse + schema + normalise + rules, with line numbers
and, as whole processes, `squall workflow validate` on the examples next to a bare
`python -c "import yaml"` (interpreter start-up).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.fuzzfile import load_text  # noqa: E402
from orchestrator.fuzzfile.apps import render_app  # noqa: E402
from tests.conftest import catalog_apps, example_files  # noqa: E402
from tests.fuzzfile.test_corpus import REQUIRED_INPUTS  # noqa: E402


def corpus() -> list[tuple[str, str]]:
    texts = [(str(p), p.read_text(encoding="utf-8")) for p in example_files()]
    for app in catalog_apps():
        text = render_app(
            app / "template.yaml", app / "values.yaml", REQUIRED_INPUTS.get(app.name, []), seed=1
        )
        texts.append((app.name, text))
    return texts


def best_of(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    texts = corpus()
    size = sum(len(t) for _, t in texts)
    load_text(texts[0][1], "warm-up")  # pydantic builds its validators on first use

    def parse_only() -> None:
        for _, text in texts:
            yaml.load(text, Loader=yaml.CSafeLoader)

    def squall() -> None:
        for name, text in texts:
            assert load_text(text, name).ok, name

    print(f"corpus: {len(texts)} Fuzzfiles, {size / 1024:.0f} KiB, best/median of {args.repeat}")
    print(f"{'':28} {'best':>9} {'median':>9}")
    for label, fn in (("yaml.load (CSafeLoader)", parse_only), ("squall load_text", squall)):
        best, median = best_of(fn, args.repeat)
        print(f"{label:28} {best * 1000:7.1f}ms {median * 1000:7.1f}ms")

    squall_exe = Path(sys.executable).parent / "squall"
    files = [str(p) for p in example_files()]
    procs = (
        ("python -c 'import yaml'", [sys.executable, "-c", "import yaml"]),
        ("squall workflow validate", [str(squall_exe), "workflow", "validate", "-q", *files]),
    )
    print(f"\nwhole processes on the {len(files)} example files, best/median of 5")
    for label, cmd in procs:
        best, median = best_of(
            lambda cmd=cmd: subprocess.run(cmd, check=True, capture_output=True), 5
        )
        print(f"{label:28} {best * 1000:7.1f}ms {median * 1000:7.1f}ms")


if __name__ == "__main__":
    main()
