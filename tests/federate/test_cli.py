"""`squall federate compare` and `squall catalog search` on the reference catalog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CATALOG = str(Path(__file__).resolve().parents[1] / "catalog")
SQUALL = str(Path(sys.executable).parent / "squall")

WORKFLOW = """version: v4
volumes:
  data:
    annotations:
      squall.io/ingress-size: 2000GB
    ingress:
      - source: {uri: s3://genomes/reads.tar}
        destination: {uri: file://reads.tar}
jobs:
  crunch:
    image: {uri: docker://busybox:1.36}
    command: [/bin/true]
    mounts: {/data: {volume: data}}
    resource:
      cpu: {cores: 32}
      memory: {size: 64GiB}
      annotations:
        squall.io/expected-runtime: 10h
"""


def squall(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SQUALL, *args], capture_output=True, text=True, timeout=60)


def test_compare_follows_the_data_and_explains_itself(tmp_path: Path) -> None:
    wf = tmp_path / "crunch.yaml"
    wf.write_text(WORKFLOW)
    near = squall(
        "federate",
        "compare",
        str(wf),
        "--catalog",
        CATALOG,
        "--bucket",
        "genomes=aws:us-west-2",
        "--clouds-only",
        "-o",
        "json",
    )
    # the data's own region is the cheapest, and is chosen: its one node holds the volume
    # on its own disk (node-local storage, nothing more to pay for)
    assert near.returncode == 0, near.stderr
    found = json.loads(near.stdout)
    sites = found["sites"]
    assert found["chosen"] == sites[0]["site"] == "aws:us-west-2"
    assert sites[0]["total_usd"] == min(r["total_usd"] for r in sites)
    assert sites[0]["reasons"] == []
    assert (sites[0]["storage"], sites[0]["storage_usd"]) == ("node-local", 0.0)
    assert sites[0]["jobs"][0]["instance"] == "c8in.12xlarge"
    # the runtime is annotated; the size is an annotation, not metadata: a guess, said so
    assert sites[0]["guesses"] == ["s3://genomes/reads.tar: size from annotation"]
    policy = tmp_path / "policy.yaml"
    policy.write_text("allowed-clouds: [gcp]\nbudget-usd: 1000\n")
    limited = squall(
        "federate",
        "compare",
        str(wf),
        "--catalog",
        CATALOG,
        "--bucket",
        "genomes=aws:us-west-2",
        "--policy",
        str(policy),
        "--clouds-only",
        "-o",
        "json",
    )
    rows = json.loads(limited.stdout)["sites"]
    aws = next(r for r in rows if r["site"] == "aws:us-west-2")
    assert aws["reasons"] == ["policy: cloud aws is not allowed"]
    assert json.loads(limited.stdout)["chosen"].startswith("gcp:")
    text = squall(
        "federate",
        "compare",
        str(wf),
        "--catalog",
        CATALOG,
        "--bucket",
        "genomes=aws:us-west-2",
        "--clouds-only",
    )
    assert text.returncode == 0
    assert "chosen: aws:us-west-2" in text.stdout
    assert "STORAGE $" in text.stdout


def test_bad_policy_is_clear_and_no_flags_needs_no_catalog(tmp_path: Path) -> None:
    wf = tmp_path / "crunch.yaml"
    wf.write_text(WORKFLOW)
    policy = tmp_path / "policy.yaml"
    policy.write_text("allowed-cloud: [gcp]\n")
    bad = squall("federate", "compare", str(wf), "--catalog", CATALOG, "--policy", str(policy))
    assert bad.returncode == 2
    assert "unknown keys ['allowed-cloud']" in bad.stderr
    bare = subprocess.run(  # nothing configured: the catalog shipped with Squall
        [SQUALL, "federate", "compare", str(wf), "--offline", "-o", "json"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert bare.returncode in (0, 1), bare.stderr  # 1: this machine is too small for it
    found = json.loads(bare.stdout)
    assert (found["catalog"], found["catalog_date"]) == ("shipped with Squall", "2026-04-02")
    assert found["chosen"] is not None
    assert {r["site"] for r in found["sites"]} >= {"local", "aws:us-east-1", "gcp:us-central1"}


def test_catalog_search_finds_efa_h100_types() -> None:
    found = squall(
        "catalog", "search", "--catalog", CATALOG, "--gpu", "H100", "--fabric", "efa", "-o", "json"
    )
    rows = json.loads(found.stdout)
    assert rows
    assert all(r["fabric"] == "efa" and "H100" in r["gpu_model"] for r in rows)
    prices = [r["price_ondemand"] for r in rows if r["price_ondemand"] is not None]
    assert prices == sorted(prices)


def test_a_cloud_site_is_known_with_nothing_configured_and_what_is_missing_is_one_line(
    tmp_path: Path,
) -> None:
    """`--site aws:us-east-1` on a machine with no catalog, no pulumi CLI and no settings:
    the shipped catalog knows the region; the run stops before anything is made."""
    wf = tmp_path / "hello.yaml"
    wf.write_text(
        "version: v4\njobs:\n  hello:\n    image: {uri: docker://busybox:1.36}\n"
        "    command: [/bin/true]\n"
    )
    (tmp_path / "empty").mkdir()
    run = subprocess.run(
        [SQUALL, "run", str(wf), "--site", "aws:us-east-1", "--name", "me/burst-1", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": str(tmp_path / "empty"),  # no pulumi CLI
            "HOME": str(tmp_path),
            "SQUALL_DATA_DIR": str(tmp_path / "data"),
        },
    )
    assert run.returncode == 1, run.stderr
    summary = json.loads(run.stdout)
    assert summary["placement"]["site"] == "aws:us-east-1"
    assert summary["placement"]["catalog_date"] == "2026-04-02"
    assert "cloud sites need the pulumi CLI, which is not on PATH: install" in summary["reason"]
    assert "\n" not in summary["reason"]


def test_a_site_that_does_not_exist_is_refused_before_a_run_is_recorded(tmp_path: Path) -> None:
    wf = tmp_path / "hello.yaml"
    wf.write_text(
        "version: v4\njobs:\n  hello:\n    image: {uri: docker://busybox:1.36}\n"
        "    command: [/bin/true]\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SQUALL_DATA_DIR": str(tmp_path / "d")}
    run = subprocess.run(
        [SQUALL, "run", str(wf), "--site", "aws:nowhere-1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 2, run.stderr
    assert "no site named 'aws:nowhere-1'; the sites are local, aws:" in run.stderr
    listed = subprocess.run(
        [SQUALL, "workflow", "list", "-o", "json"], capture_output=True, text=True, env=env
    )
    assert json.loads(listed.stdout) == []  # nothing was recorded
