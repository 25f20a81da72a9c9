"""Volume roots an agent keeps on a share (`--shared-volume-root DIR=MOUNT`): the orchestrator
names volumes beneath DIR on every node, this node has them at MOUNT, and what the agent makes
or places there belongs to the jobs' root, since a share takes no idmapped mount. Links
planted in a volume are never followed. Real files, as root."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from substrate.__main__ import main
from substrate.paths import PathEscape
from substrate.volumes import VolumeRoots

JOBS_ROOT = 100000  # the host uid (and gid) of the jobs' root: the agent's userns base


def owners(*paths: Path) -> set[tuple[int, int]]:
    return {(p.lstat().st_uid, p.lstat().st_gid) for p in paths}


def test_a_shared_root_is_reached_at_its_mount_and_its_files_are_the_jobs_roots(
    tmp_path: Path,
) -> None:
    named = tmp_path / "runs" / "r1" / "volumes"  # what the orchestrator names (not here)
    mount = tmp_path / "share"
    local = tmp_path / "persistent"
    mount.mkdir()
    local.mkdir()
    roots = VolumeRoots([local], {named: mount}, owner=JOBS_ROOT)

    assert roots.where(str(named / "v" / "f.txt")) == (str(mount / "v" / "f.txt"), True)
    assert roots.where(str(local / "v")) == (str(local / "v"), False)
    assert roots.where(f"{named}x/v") == (f"{named}x/v", False)  # a prefix is not a parent
    assert roots.where("relative/v") == ("relative/v", False)
    assert roots.split(str(named / "v")) == (PurePosixPath(mount), "v")

    assert roots.make(str(named / "v"))
    assert not roots.make(str(named / "v"))  # already there
    assert owners(mount / "v") == {(JOBS_ROOT, JOBS_ROOT)}
    assert roots.make(str(local / "w"))  # a root on this node's disk: the agent's own
    assert owners(local / "w") == {(0, 0)}

    # a file the agent placed in a volume on the share, and the folders on its way
    (mount / "v" / "a" / "b").mkdir(parents=True)
    (mount / "v" / "a" / "b" / "f.txt").write_text("x")
    roots.give(mount / "v", "a/b/f.txt")
    placed = (mount / "v" / "a", mount / "v" / "a" / "b", mount / "v" / "a" / "b" / "f.txt")
    assert owners(*placed) == {(JOBS_ROOT, JOBS_ROOT)}


def test_giving_goes_through_no_link_a_job_planted(tmp_path: Path) -> None:
    mount, outside = tmp_path / "share", tmp_path / "outside"
    (mount / "v").mkdir(parents=True)
    outside.mkdir()
    (outside / "f.txt").write_text("the host's")
    (mount / "v" / "l").symlink_to(outside)
    (mount / "v" / "f.txt").symlink_to(outside / "f.txt")
    roots = VolumeRoots([], {tmp_path / "named": mount}, owner=JOBS_ROOT)
    with pytest.raises(PathEscape, match="link"):
        roots.give(mount / "v", "l/f.txt")
    roots.give(mount / "v", "f.txt")  # the link itself is given, not what it names
    assert owners(outside, outside / "f.txt") == {(0, 0)}
    assert owners(mount / "v" / "f.txt") == {(JOBS_ROOT, JOBS_ROOT)}


@pytest.mark.parametrize("value", ["relative=/mnt/share", "/data/volumes=share", "/data/volumes"])
def test_a_shared_root_is_two_absolute_paths(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv("SQUALL_AGENT_TOKEN", "t")
    assert main(["--data-dir", str(tmp_path), "--shared-volume-root", value]) == 2
    assert f"--shared-volume-root {value}: write DIR=MOUNT, both absolute" in (
        capsys.readouterr().err
    )
    assert not os.listdir(tmp_path)  # refused before anything was made
