"""The checked-in gRPC stubs are what protoc makes of the .proto files today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    protos = sorted(p.relative_to(ROOT) for p in (ROOT / "api").rglob("*.proto"))
    assert protos
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT),
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--plugin=protoc-gen-mypy={plugin}",
            *map(str, protos),
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc wrote nothing"
    stale = [str(p) for p in generated if (ROOT / p).read_bytes() != (tmp_path / p).read_bytes()]
    assert not stale, f"run scripts/gen-protos.sh: stale stubs {stale}"
    assert shutil.which("taskset")  # the agent pins tasks with it (util-linux)
