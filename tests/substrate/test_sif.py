"""SIF images without Apptainer: the reader of the format (checked against the maintainers'
`siftool`), the image cache that extracts a SIF's squashfs root with its owners shifted into
the jobs' user namespace, and the agent running it under crun, confined like any image.

Everything is real: SIFs built here (tests/substrate/sif_images.py), the local registry
(pushed to with the oras SDK, pulled from by the agent's own client), unsquashfs, crun and the
agent over gRPC. Registries that lie or fail: tests/substrate/test_oras_pulls.py.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from api.substrate.v1 import agent_pb2 as pb
from substrate import sifroot
from substrate.agent import USERNS_BASE
from substrate.confine import UserNamespace
from substrate.images import ImageCache, ImageError
from substrate.sif import SifError, host_arch, primary_partition
from tests.substrate.conftest import Running
from tests.substrate.registry import Registry
from tests.substrate.sif_images import (
    ENCRYPTED_SQUASHFS,
    EXT3,
    SYSTEM,
    build_sif,
    push_sif,
    squashfs,
    write_sif,
)
from tests.substrate.test_agent_api import _exec

# an architecture that is not this machine's, by SIF's code and Go's name
OTHER_ARCH = (b"04", "arm64") if host_arch() != "arm64" else (b"02", "amd64")


@pytest.fixture(scope="module")
def sif_ref(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox SIF, pushed as an ORAS artifact (as `apptainer push oras://` does)."""
    work = tmp_path_factory.mktemp("sif")
    return push_sif(registry.address, build_sif(work), "sifs/busybox:1.0")


def output(agent: Running, task: str) -> str:
    return b"".join(c.data for c in agent.logs(task)).decode()


# ---- the reader ------------------------------------------------------------------------


def test_the_reader_and_the_maintainers_siftool_agree(tmp_path: Path) -> None:
    """Our SIFs read the same in siftool (sylabs' reference implementation), and a SIF that
    siftool writes is read by substrate/sif.py."""
    assert shutil.which("siftool"), "install siftool (scripts/setup.sh --test does, as root)"
    ours = build_sif(tmp_path / "ours")
    found = primary_partition(ours)
    listing = subprocess.run(
        ["siftool", "list", str(ours)], capture_output=True, text=True, check=True
    ).stdout
    span = f"{found.offset}-{found.offset + found.size}"
    assert re.search(rf"\|{span}\s+\|FS \(Squashfs/\*System/{host_arch()}\)", listing), listing

    image = squashfs(tmp_path / "ours" / "sif-root", tmp_path / "theirs.squashfs")
    theirs = tmp_path / "theirs.sif"
    (tmp_path / "recipe.def").write_text("Bootstrap: localimage\n")
    code = {"amd64": "2", "arm64": "4"}[host_arch()]
    for cmd in (
        ["siftool", "new", str(theirs)],
        ["siftool", "add", str(theirs), str(tmp_path / "recipe.def"), "--datatype", "1"],
        [
            *("siftool", "add", str(theirs), str(tmp_path / "theirs.squashfs")),
            *("--datatype", "4", "--parttype", "2", "--partfs", "1", "--partarch", code),
        ],
    ):
        subprocess.run(cmd, check=True, capture_output=True)
    partition = primary_partition(theirs)
    assert partition.size == len(image)
    with open(theirs, "rb") as f:
        f.seek(partition.offset)
        assert f.read(len(image)) == image


def _sif(**kw: object) -> Callable[[Path], Path]:
    """A SIF whose partition is a squashfs superblock's magic and padding (the reader does
    not look further)."""
    kw.setdefault("partition", b"hsqs" + bytes(4092))
    return lambda path: write_sif(path, **kw)  # type: ignore[arg-type]


def _cut(length: int) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        _sif()(path)
        data = path.read_bytes()
        path.write_bytes(data[: length if length > 0 else len(data) + length])
        return path

    return make


def _patched(offset: int, value: bytes) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        data = bytearray(_sif()(path).read_bytes())
        data[offset : offset + len(value)] = value
        path.write_bytes(bytes(data))
        return path

    return make


def _raw(data: bytes) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.write_bytes(data)
        return path

    return make


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_raw(b"\x7fELF" + os.urandom(4096)), "not a SIF file (no SIF_MAGIC at its start)"),
        (_raw(b"#!/usr/bin/env run-singularity\n"), "it is truncated: its header lies beyond"),
        (_cut(-2048), "it is truncated: its root file system ends at byte"),
        (_cut(8192), "it is truncated: its descriptor table lies beyond its 8,192 bytes"),
        (_patched(42, b"02"), "SIF version '02' is not supported (only 01)"),
        (_patched(88, b"\xff" * 8), "its descriptor table is damaged"),
        (
            _sif(fstype=ENCRYPTED_SQUASHFS),
            "its root file system is encrypted squashfs: encrypted images are not supported",
        ),
        (_sif(fstype=EXT3), "its root file system is ext3: only squashfs root file systems"),
        (_sif(parttype=SYSTEM), "it has no primary system partition to run (partitions: squashfs)"),
        (
            _sif(arch=OTHER_ARCH[0]),
            f"it is built for {OTHER_ARCH[1]}; this node is {host_arch()}",
        ),
        (_sif(partition=b"EXT3" * 1024), "partition does not hold a squashfs image"),
    ],
    ids=[
        "elf",
        "header-only",
        "truncated-partition",
        "truncated-table",
        "version",
        "descriptor-count",
        "encrypted",
        "ext3",
        "no-primary",
        "architecture",
        "not-squashfs",
    ],
)
def test_what_a_node_cannot_run_is_refused_with_its_reason(
    tmp_path: Path, make: Callable[[Path], Path], reason: str
) -> None:
    path = make(tmp_path / "image.sif")
    with pytest.raises(SifError) as info:
        primary_partition(path)
    message = str(info.value)
    assert reason in message
    assert "\n" not in message


# ---- the image cache -------------------------------------------------------------------


def test_a_sif_becomes_a_root_with_its_owners_shifted_into_the_user_namespace(
    registry: Registry, sif_ref: str, tmp_path: Path
) -> None:
    base = USERNS_BASE
    cache = ImageCache(
        tmp_path / "images", insecure_registries=(registry.address,), userns=UserNamespace(base)
    )
    image = cache.get(sif_ref)
    assert image.rootfs == cache.root / "rootfs" / f"{image.digest.split(':')[1]}-u{base}"
    assert image.sif is not None
    assert image.sif.read_bytes()[32:41] == b"SIF_MAGIC"
    root = image.rootfs
    owner = lambda rel: (os.lstat(root / rel).st_uid, os.lstat(root / rel).st_gid)  # noqa: E731
    assert owner(".") == (base, base)
    assert owner("bin/busybox") == (base, base)
    assert owner("home/user") == owner("home/user/notes") == (base + 1000, base + 1000)
    # a link is changed itself, never what it points to (the host's /)
    assert os.readlink(root / "etc" / "escape") == "/"
    assert owner("etc/escape") == (base + 1000, base + 1000)
    assert os.stat("/").st_uid == 0
    # a hard-linked file is shifted once, and chown's clearing of set-id bits is undone
    one, two = os.lstat(root / "data" / "one"), os.lstat(root / "data" / "two")
    assert one.st_ino == two.st_ino
    assert one.st_uid == base
    assert stat.S_IMODE(os.lstat(root / "bin" / "setuid-tool").st_mode) == 0o4755
    # what Apptainer gives the image: its runscript, its environment scripts
    assert image.entrypoint == ("/.singularity.d/runscript",)
    assert image.env_scripts == "/.singularity.d/env"

    again = cache.get(sif_ref)
    assert again.cached
    assert again.rootfs == image.rootfs
    other = ImageCache(
        tmp_path / "images", insecure_registries=(registry.address,), userns=UserNamespace(base * 2)
    ).get(sif_ref)
    assert other.rootfs.name.endswith(f"-u{base * 2}")
    assert os.lstat(other.rootfs / "home" / "user").st_uid == base * 2 + 1000


def test_an_owner_the_user_namespace_cannot_map_is_refused_and_nothing_is_left(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    (root / "srv").mkdir(parents=True)
    (root / "srv" / "far").write_text("x\n")
    os.chown(root / "srv" / "far", 100000, 100000)
    sif = write_sif(tmp_path / "far.sif", squashfs(root, tmp_path / "far.squashfs"))
    target = tmp_path / "rootfs" / "far-u1000000"
    target.parent.mkdir()
    with pytest.raises(SifError) as info:
        sifroot.unpack(sif, target, UserNamespace(1000000))
    assert str(info.value) == (
        "its file /srv/far is owned by 100000:100000, outside the 65536 ids a job's user "
        "namespace maps"
    )
    assert list(target.parent.iterdir()) == []  # no root, no half-extracted staging tree


def test_a_sif_the_node_cannot_run_fails_its_pull_with_the_reason(
    agent: Running, registry: Registry, tmp_path: Path
) -> None:
    ref = push_sif(registry.address, build_sif(tmp_path, arch=OTHER_ARCH[0]), "sifs/other-arch:1.0")
    why = f"{ref} cannot run here: it is built for {OTHER_ARCH[1]}; this node is {host_arch()}"
    with pytest.raises(grpc.RpcError) as info:
        list(agent.stub.PullImage(pb.PullImageRequest(reference=ref)))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == why
    lease = agent.lease()
    with pytest.raises(grpc.RpcError) as info:
        agent.stub.Run(pb.RunRequest(lease_id=lease.id, image=ref, command=["true"]))
    assert info.value.details() == why
    assert not list((agent.data_dir / "images" / "sif").glob("*.sif"))
    with pytest.raises(ImageError):
        agent.agent.images.get(ref)


# ---- the agent runs it under crun --------------------------------------------------------


def test_a_sif_image_runs_under_crun_contained_with_apptainers_environment(
    agent: Running, sif_ref: str
) -> None:
    assert "apptainer" not in agent.agent.runtimes  # nothing of Apptainer on this machine
    lease = agent.lease()
    script = (
        "cat /proc/self/uid_map; id -u; stat -c %u /home/user/notes; "
        'echo "$SIF_GREETING|$CHOSEN_BY|$APPTAINER_CONTAINER"; image-tool'
    )
    reply = agent.stub.Run(  # no runtime named: the node's default, crun
        pb.RunRequest(
            lease_id=lease.id,
            name="sif-job",
            image=sif_ref,
            command=["/bin/sh", "-c", script],
            env={"CHOSEN_BY": "job"},
        )
    )
    assert agent.agent.tasks.get(reply.task_id).spec.runtime == "crun"
    status = agent.wait(reply.task_id)
    text = output(agent, reply.task_id)
    assert status.exit_code == 0, (status.message, text)
    lines = text.splitlines()
    # contained: root in the job is the unprivileged base uid of the node's user namespace
    assert lines[0].split() == ["0", str(USERNS_BASE), "65536"]
    assert lines[1:3] == ["0", "1000"]
    # the image's %environment sourced, the job's variable winning, PATH extended by it
    assert lines[3] == f"hello from the image|job|{sif_ref}"
    assert lines[4] == "image-tool ran"


def test_a_sif_image_without_a_command_runs_its_runscript_and_exec_sees_its_env(
    agent: Running, sif_ref: str
) -> None:
    lease = agent.lease()
    reply = agent.stub.Run(pb.RunRequest(lease_id=lease.id, image=sif_ref, args=["a", "b c"]))
    status = agent.wait(reply.task_id)
    assert status.exit_code == 0, status.message
    assert output(agent, reply.task_id) == "runscript got: a b c\n"

    task = agent.run(["sleep", "60"], lease=lease, runtime="", image=sif_ref)
    try:
        out, _, code = _exec(agent, task, ["/bin/sh", "-c", 'echo "$SIF_GREETING"; id -u'])
        assert (out, code) == (b"hello from the image\n0\n", 0)
    finally:
        agent.stub.Cancel(pb.CancelRequest(task_id=task, grace_seconds=1))
