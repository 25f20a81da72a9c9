"""`squall federate compare` on a Fuzzfile with a bad `squall.io/` annotation: the validation
error (file, line, field), never a traceback. Before, annotations were read only while
pricing, and a bad duration ended compare with a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SQUALL = str(Path(sys.executable).parent / "squall")
CATALOG = str(Path(__file__).resolve().parents[1] / "catalog")


def test_a_bad_annotation_is_a_validation_error(tmp_path: Path) -> None:
    wf = tmp_path / "crunch.yaml"
    wf.write_text(
        "version: v4\n"
        "jobs:\n"
        "  crunch:\n"
        "    image: {uri: docker://busybox:1.36}\n"
        "    command: [/bin/true]\n"
        "    resource:\n"
        "      annotations:\n"
        "        squall.io/expected-runtime: ten hours\n"
    )
    done = subprocess.run(
        [SQUALL, "federate", "compare", str(wf), "--catalog", CATALOG],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    field = 'jobs.crunch.resource.annotations["squall.io/expected-runtime"]'
    assert f"{wf}:8:37: error: {field}: " in done.stderr + done.stdout
    assert "not a valid Fuzzfile" in done.stderr
