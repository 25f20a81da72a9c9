"""The node image's recipe, its build (real mmdebstrap and umoci, cached by recipe hash), its
Warewulf export checked against what Warewulf 4 documents and its code reads, and its disk
in each cloud's format. That the disk boots is test_vm_site.py's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from orchestrator.nodeimage.build import BuiltImage, build, cached_image
from orchestrator.nodeimage.disk import ROOT_PARTUUID, export_disk
from orchestrator.nodeimage.recipe import RECIPE, RecipeError, checkout, load_recipe
from orchestrator.nodeimage.warewulf import export_warewulf

TOOLS = ("mmdebstrap", "umoci", "skopeo", "qemu-img", "mkfs.vfat", "mcopy", "sfdisk")
needs_tools = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in TOOLS),
    reason="needs root and the image tools (scripts/setup.sh --test installs them)",
)
# Warewulf 4.6 reads the kernel version out of the kernel's path with this expression
# (internal/pkg/util/version.go), among /boot/vmlinuz-* and /lib/modules/*/vmlinuz
WAREWULF_VERSION = re.compile(r"\d+\.\d+\.\d+(-[\d\.]+|)")


def write(tmp_path: Path, text: str) -> Path:
    shutil.copytree(checkout() / "images" / "warewulf" / "rootfs", tmp_path / "rootfs")
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_the_recipe_in_the_checkout_loads_with_its_layers() -> None:
    recipe = load_recipe(checkout() / RECIPE)
    packages = recipe.all_packages()
    assert packages[:2] == ["linux-image-cloud-amd64", "systemd-sysv"]
    needed = {"cloud-init", "crun", "skopeo", "umoci", "nftables", "openmpi-bin", "mpich"}
    needed |= {"nfs-common", "nfs-kernel-server", "systemd-boot-efi", "python3-venv"}
    assert needed <= set(packages)
    assert "openssh-server" not in packages  # nothing on a node is reached but the agent
    assert set(recipe.layers) == {"gpu", "efa", "infiniband"}
    with_ib = recipe.all_packages(("infiniband",))
    assert "rdma-core" in with_ib
    assert len(with_ib) == len(set(with_ib))
    assert "non-free" in recipe.components(("gpu",))
    with pytest.raises(RecipeError, match="no layer fpga in the recipe"):
        recipe.all_packages(("fpga",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("kernel: linux-image-cloud-amd64", "kernel: Linux Image"), "kernel: String should"),
        (("architecture: amd64", "architecture: s390x"), "architecture"),
        (("overlay: rootfs", "overlay: missing"), "overlay: .* is not a folder"),
        (("name: squall-node", "name: squall-node\nflavour: extra"), "flavour: Extra inputs"),
    ],
)
def test_a_wrong_recipe_names_its_file_and_field(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    text = (checkout() / RECIPE).read_text()
    assert change[0] in text
    path = write(tmp_path, text.replace(change[0], change[1], 1))
    with pytest.raises(RecipeError, match=f"{re.escape(str(path))}: {message}"):
        load_recipe(path)


def test_the_build_key_follows_the_recipe_and_its_overlay(tmp_path: Path) -> None:
    path = write(tmp_path, (checkout() / RECIPE).read_text())
    first = load_recipe(path).key(())
    assert load_recipe(path).key(()) == first
    assert load_recipe(path).key(("efa",)) != first
    (tmp_path / "rootfs" / "etc" / "motd").write_text("hello\n")
    assert load_recipe(path).key(()) != first


@pytest.fixture(scope="module")
def image() -> BuiltImage:
    return build(load_recipe(checkout() / RECIPE))


def fake_entry(cache: Path, tag: str) -> tuple[Path, str]:
    """A cache entry as a build leaves it: an OCI layout whose manifest is tagged `tag`."""
    import hashlib

    folder = cache / "entry"
    blobs = folder / "oci" / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    manifest = json.dumps({"schemaVersion": 2, "layers": [{"size": 7}]}).encode()
    digest = hashlib.sha256(manifest).hexdigest()
    (blobs / digest).write_bytes(manifest)
    ref = {"org.opencontainers.image.ref.name": tag}
    index = {"manifests": [{"digest": f"sha256:{digest}", "annotations": ref}]}
    (folder / "oci" / "index.json").write_text(json.dumps(index))
    (folder / "image.json").write_text(
        json.dumps({"digest": f"sha256:{digest}", "size": 7, "layers": []})
    )
    return folder, digest


@pytest.mark.skipif(os.geteuid() != 0, reason="the cache must be root's: run as root")
def test_a_cache_entry_is_used_only_when_root_alone_could_have_written_it(tmp_path: Path) -> None:
    from orchestrator.nodeimage.build import _from_cache

    recipe = load_recipe(checkout() / RECIPE)
    cache = tmp_path / "cache"
    folder, digest = fake_entry(cache, recipe.name)
    cache.chmod(0o755)
    assert _from_cache(folder, recipe, "k", ()).digest == f"sha256:{digest}"
    # writable by others: anyone could have planted it
    (folder / "oci").chmod(0o777)
    with pytest.raises(RecipeError, match="is not root's alone"):
        _from_cache(folder, recipe, "k", ())
    (folder / "oci").chmod(0o755)
    # a manifest that is not what its name says
    blob = folder / "oci" / "blobs" / "sha256" / digest
    blob.write_bytes(blob.read_bytes().replace(b"7", b"8"))
    with pytest.raises(RecipeError, match="does not match its digest"):
        _from_cache(folder, recipe, "k", ())


@needs_tools
def test_a_build_is_an_oci_image_with_a_digest_and_a_second_one_is_the_cache(
    image: BuiltImage,
) -> None:
    index = json.loads((image.layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["digest"] == image.digest
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "squall-node"
    manifest = json.loads(
        (image.layout / "blobs" / "sha256" / image.digest.split(":")[1]).read_text()
    )
    config = json.loads(
        (image.layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_text()
    )
    assert config["created"] == "2025-12-01T00:00:00Z"  # fixed: a rebuild gives this digest
    assert config["config"]["Labels"]["io.squall.recipe"] == image.key
    again = build(load_recipe(checkout() / RECIPE))
    assert again.cached
    assert (again.digest, again.layout) == (image.digest, image.layout)
    found = cached_image(load_recipe(checkout() / RECIPE))
    assert found is not None
    assert found.digest == image.digest


def resolve(members: dict[str, tarfile.TarInfo], path: str, hops: int = 0) -> str:
    """`path` inside the image with its links followed as the node's kernel would (merged
    /usr: /sbin, /bin and /lib are links into /usr): the path of the file it names, with
    the usr/ of merged directories dropped to compare; KeyError when nothing is there."""
    assert hops < 20, f"a link loop at {path}"
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        head = "/".join(parts[:i])
        member = members[head]
        if member.issym():
            target = member.linkname
            base = target.lstrip("/") if target.startswith("/") else str(Path(head).parent / target)
            rest = "/".join(parts[i:])
            return resolve(members, f"{base}/{rest}" if rest else base, hops + 1)
    return path.removeprefix("usr/")


def _layer_files(archive: Path, tmp_path: Path) -> tuple[dict, tarfile.TarFile]:
    with tarfile.open(archive) as outer:
        (manifest,) = json.loads(outer.extractfile("manifest.json").read())  # type: ignore[union-attr]
        (layer,) = manifest["Layers"]
        outer.extract(layer, tmp_path, filter="data")
    return manifest, tarfile.open(tmp_path / layer)


@needs_tools
def test_the_warewulf_archive_is_what_wwctl_image_import_reads(
    image: BuiltImage, tmp_path: Path
) -> None:
    archive = tmp_path / "squall-node.tar"
    assert export_warewulf(image, archive).format == "docker-archive"
    # Warewulf opens a file with containers/image's docker-archive reader: manifest.json
    manifest, layer = _layer_files(archive, tmp_path)
    # skopeo names it in full (docker.io/library/...); wwctl is given the image's own name
    assert [t.rsplit("/", 1)[-1] for t in manifest["RepoTags"]] == ["squall-node:latest"]
    with layer:
        members = {m.name.removeprefix("./"): m for m in layer.getmembers()}
        # an init Warewulf's wwinit hands over to (/sbin/init, systemd's), and a shell
        assert resolve(members, "sbin/init") == "lib/systemd/systemd"
        assert resolve(members, "bin/sh") == "bin/dash"
        # since 4.6 the kernel is inside the image, where Warewulf looks for it
        kernels = [n for n in members if re.fullmatch(r"boot/vmlinuz-.+", n)]
        assert len(kernels) == 1
        version = WAREWULF_VERSION.findall(kernels[0])
        assert version, kernels
        full = kernels[0].removeprefix("boot/vmlinuz-")
        assert resolve(members, f"lib/modules/{full}/modules.dep")
        # excludes: one filepath.Match pattern a line, no comments; /boot/ (served apart)
        excludes = layer.extractfile(members["etc/warewulf/excludes"]).read().decode()  # type: ignore[union-attr]
        lines = [line for line in excludes.splitlines() if line.strip()]
        assert "/boot/" in lines
        assert not [line for line in lines if line.lstrip().startswith("#")]
        # the agent, on PATH, and its service is the boot script's to write
        assert members["usr/local/bin/squall"].issym()
        assert "opt/squall/bin/squall" in members
        # nothing that would make two nodes alike: an empty machine-id
        assert members["etc/machine-id"].size == 0
    with pytest.raises(RecipeError, match="colon"):
        export_warewulf(image, tmp_path / "bad:name.tar")


@needs_tools
def test_the_warewulf_chroot_is_a_folder_wwctl_imports(image: BuiltImage, tmp_path: Path) -> None:
    chroot = tmp_path / "chroot"
    assert export_warewulf(image, chroot).format == "chroot"
    assert (chroot / "bin" / "sh").exists()  # what wwctl's directory import checks
    assert (chroot / "etc" / "warewulf" / "excludes").is_file()
    assert (chroot / "usr" / "bin" / "crun").stat().st_uid == 0
    with pytest.raises(RecipeError, match="not empty"):
        export_warewulf(image, chroot)


@needs_tools
@pytest.mark.parametrize("fmt", ["raw", "vhd", "qcow2"])
def test_the_disk_is_gpt_with_an_efi_partition_that_boots_its_root(
    image: BuiltImage, tmp_path: Path, fmt: str
) -> None:
    disk = export_disk(image, tmp_path / f"disk.{fmt}", fmt)
    if fmt == "vhd":  # Azure: a fixed VHD (a footer after the raw disk), whole MiB
        with open(disk.path, "rb") as f:
            f.seek(-512, os.SEEK_END)
            footer = f.read()
        assert footer[:8] == b"conectix"
        assert int.from_bytes(footer[60:64], "big") == 2  # fixed
        size = int.from_bytes(footer[48:56], "big")
        assert size % 2**20 == 0
        assert disk.path.stat().st_size == size + 512
    if fmt == "qcow2":
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(disk.path)],
                capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == disk.virtual_size
    if fmt != "raw":
        return
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(disk.path)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    assert table["label"] == "gpt"
    esp, root = table["partitions"]
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    assert root["uuid"] == ROOT_PARTUUID
    at = f"{disk.path}@@{esp['start'] * 512}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}

    def esp_file(name: str) -> str:
        return subprocess.run(["mtype", "-i", at, name], capture_output=True, text=True,
                              check=True, env=env).stdout  # fmt: skip

    listing = subprocess.run(["mdir", "-i", at, "-/b", "::/"], capture_output=True, text=True,
                             check=True, env=env).stdout  # fmt: skip
    assert "::/EFI/BOOT/BOOTX64.EFI" in listing
    assert "::/vmlinuz" in listing
    assert "::/initrd.img" in listing
    entry = esp_file("::/loader/entries/squall.conf")
    assert f"root=PARTUUID={ROOT_PARTUUID.lower()}" in entry
    assert "console=ttyS0" in entry


@needs_tools
def test_gce_gets_disk_raw_in_a_tarball(image: BuiltImage, tmp_path: Path) -> None:
    disk = export_disk(image, tmp_path / "disk.tar.gz", "gce")
    with tarfile.open(disk.path) as tar:
        assert tar.getnames() == ["disk.raw"]
    with pytest.raises(RecipeError, match="disk format 'vmdk' is not one of"):
        export_disk(image, tmp_path / "disk.vmdk", "vmdk")
