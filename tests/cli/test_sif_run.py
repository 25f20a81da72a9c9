"""`squall run` of a workflow whose image is an `oras://` SIF, end to end and without
Apptainer: a SIF built here and pushed to the local registry, the local site's agents pulling
it, extracting its squashfs root and running it under crun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from substrate.agent import USERNS_BASE
from tests.substrate.registry import Registry
from tests.substrate.sif_images import build_sif, push_sif

SQUALL = str(Path(sys.executable).parent / "squall")

WORKFLOW = """\
version: v1
jobs:
  greet:
    image:
      uri: {image}
    command: [/bin/sh, -c, 'echo "$SIF_GREETING from $(id -u)"; cat /proc/self/uid_map']
    resource: {{cpu: {{cores: 1}}, memory: {{size: 64MiB}}}}
  runscript:
    image:
      uri: {image}
    args: [from, squall]
    depends-on: [{{name: greet, status: FINISHED}}]
    resource: {{cpu: {{cores: 1}}, memory: {{size: 64MiB}}}}
"""


def test_squall_run_runs_a_sif_image_from_an_oras_registry(
    registry: Registry, tmp_path: Path
) -> None:
    image = push_sif(registry.address, build_sif(tmp_path / "sif"), "sifs/hello:1.0")
    assert image == f"oras://{registry.address}/sifs/hello:1.0"
    workflow = tmp_path / "sif.yaml"
    workflow.write_text(WORKFLOW.format(image=image))
    env = {
        **os.environ,
        "SQUALL_DATA_DIR": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "SQUALL_INSECURE_REGISTRIES": registry.address,
    }
    env.pop("SQUALL_CONTEXT", None)

    def squall(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SQUALL, *args], env=env, capture_output=True, text=True, timeout=180, check=False
        )

    done = squall("run", str(workflow), "--name", "me/sif", "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["state"] == "FINISHED"
    assert {j["name"]: j["state"] for j in summary["jobs"]} == {
        "greet": "FINISHED",
        "runscript": "FINISHED",
    }
    greet = squall("workflow", "log", "me/sif", "greet").stdout.splitlines()
    assert greet[0] == "hello from the image from 0"
    assert greet[1].split() == ["0", str(USERNS_BASE), "65536"]  # root in the job is not root
    runscript = squall("workflow", "log", "me/sif", "runscript").stdout
    assert runscript == "runscript got: from squall\n"
