"""`squall image export --disk`: a bootable disk from a built node image.

The disk is GPT with two partitions: an EFI system partition holding systemd-boot (from the
image itself), the image's kernel and initramfs and one boot entry, and the root file system
(ext4) made from the image's files. It boots under UEFI, which every cloud's current
machines and QEMU (OVMF) have: AWS (boot mode `uefi`), GCE (`UEFI_COMPATIBLE`), Azure
(generation 2). Nothing is mounted to make it: mkfs.ext4 fills the file system from a folder,
mtools fills the FAT one, sfdisk writes the partition table into the file.

Formats: `raw` (AWS's snapshot import), `qcow2` (QEMU, OpenStack), `vhd` (Azure: fixed size,
whole MiB), `gce` (GCE's image import: a tar.gz holding `disk.raw`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .build import EPOCH, BuiltImage, run_tool
from .recipe import RecipeError

__all__ = ["DISK_FORMATS", "ROOT_PARTUUID", "DiskImage", "export_disk"]

DISK_FORMATS = ("raw", "qcow2", "vhd", "gce")
# fixed identifiers: a disk is the same whatever machine made it, and the boot entry names
# its root by partition UUID
DISK_UUID = "5C0A11D1-5C00-4000-8000-000000000001"
ESP_PARTUUID = "5C0A11D1-5C00-4000-8000-0000000000E5"
ROOT_PARTUUID = "5C0A11D1-5C00-4000-8000-00000000000F"
ROOT_FS_UUID = "5c0a11d1-5c00-4000-8000-0000000000f5"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # Linux root (x86-64)
ESP_MIB = 128
MIB = 1 << 20
SECTOR = 512
# the console on the first serial port (every cloud's console log, QEMU's -serial) and the
# screen; NVMe that waits for EBS rather than failing I/O (AWS's advice)
CMDLINE = "rw console=tty0 console=ttyS0,115200n8 nvme_core.io_timeout=4294967295"
_TOOLS = {
    "mkfs.ext4": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "sfdisk": "fdisk",
    "umoci": "umoci",
    "qemu-img": "qemu-utils",
}


@dataclass(frozen=True, slots=True)
class DiskImage:
    path: Path
    format: str
    size: int  # bytes of the file
    virtual_size: int  # bytes of the disk it holds
    kernel: str  # the kernel version it boots

    def as_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "format": self.format,
            "size_bytes": self.size,
            "virtual_size_bytes": self.virtual_size,
            "kernel": self.kernel,
        }


def export_disk(image: BuiltImage, dest: Path, fmt: str = "qcow2") -> DiskImage:
    """Write the bootable disk of `image` to `dest` in `fmt`; RecipeError says what is
    missing or what failed. `dest` appears whole or not at all."""
    if fmt not in DISK_FORMATS:
        raise RecipeError(f"disk format {fmt!r} is not one of {', '.join(DISK_FORMATS)}")
    needed = dict(_TOOLS)
    if fmt == "raw":
        needed.pop("qemu-img")
    missing = sorted({pkg for tool, pkg in needed.items() if shutil.which(tool) is None})
    if missing:
        raise RecipeError(f"exporting a disk needs {', '.join(missing)} (apt-get install them)")
    if os.geteuid() != 0:
        raise RecipeError("exporting a disk needs root (the image's files keep their owners)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".disk-") as tmp:
        work = Path(tmp)
        rootfs = work / "rootfs"
        _run(["umoci", "raw", "unpack", "--image", image.reference, str(rootfs)])
        kernel = _kernel(rootfs)
        (rootfs / "etc" / "fstab").write_text(
            f"PARTUUID={ROOT_PARTUUID.lower()} / ext4 defaults,discard,errors=remount-ro 0 1\n"
        )
        root_img = work / "root.img"
        _root_fs(rootfs, root_img)
        esp_img = work / "esp.img"
        _esp(rootfs, kernel, esp_img, work)
        shutil.rmtree(rootfs)
        raw = work / "disk.raw"
        virtual = _assemble(esp_img, root_img, raw)
        out = work / "out"
        _convert(raw, out, fmt)
        out.rename(dest)
    return DiskImage(dest, fmt, dest.stat().st_size, virtual, kernel)


def _kernel(rootfs: Path) -> str:
    found = sorted(p.name.removeprefix("vmlinuz-") for p in (rootfs / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise RecipeError(f"the image has {len(found)} kernels in /boot, not one: {found}")
    version = found[0]
    if not (rootfs / "boot" / f"initrd.img-{version}").exists():
        raise RecipeError(f"the image has no initramfs for its kernel {version}")
    return version


def _size_of(folder: Path) -> int:
    done = subprocess.run(
        ["du", "-sb", "--apparent-size", str(folder)], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[0])


def _root_fs(rootfs: Path, out: Path) -> None:
    # room for the file system's own tables and a little more; a cloud's disk is larger and
    # cloud-init grows the partition and the file system to it at first boot
    used = _size_of(rootfs)
    mib = (used * 5 // 4) // MIB + 256
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-d",
            str(rootfs),
            "-L",
            "squall-root",
            "-U",
            ROOT_FS_UUID,
            "-E",
            f"hash_seed={ROOT_FS_UUID},root_owner=0:0",
            str(out),
            f"{mib}M",
        ]
    )


def _esp(rootfs: Path, kernel: str, out: Path, work: Path) -> None:
    boot = rootfs / "usr" / "lib" / "systemd" / "boot" / "efi" / "systemd-bootx64.efi"
    if not boot.exists():
        raise RecipeError("the image has no systemd-boot (systemd-boot-efi) to boot a disk with")
    _run(["mkfs.vfat", "-C", "-F", "32", "-n", "SQUALL-ESP", "-i", "5c0a11d1", str(out),
          str(ESP_MIB * 1024)])  # fmt: skip
    loader = work / "loader.conf"
    loader.write_text("default squall.conf\ntimeout 0\neditor no\n")
    entry = work / "squall.conf"
    entry.write_text(
        "title Squall node\nlinux /vmlinuz\ninitrd /initrd.img\n"
        f"options root=PARTUUID={ROOT_PARTUUID.lower()} {CMDLINE}\n"
    )
    target = f"-i{out}"
    _run(["mmd", target, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"])
    for source, name in (
        (boot, "::/EFI/BOOT/BOOTX64.EFI"),
        (rootfs / "boot" / f"vmlinuz-{kernel}", "::/vmlinuz"),
        (rootfs / "boot" / f"initrd.img-{kernel}", "::/initrd.img"),
        (loader, "::/loader/loader.conf"),
        (entry, "::/loader/entries/squall.conf"),
    ):
        _run(["mcopy", "-m", target, str(source), name])


def _assemble(esp: Path, root: Path, out: Path) -> int:
    """A GPT disk of the two partitions (1 MiB aligned); its size in bytes."""
    first = MIB // SECTOR
    esp_sectors = esp.stat().st_size // SECTOR
    root_start = first + esp_sectors
    root_sectors = root.stat().st_size // SECTOR
    total = root_start * SECTOR + root.stat().st_size + MIB  # + the backup GPT
    with open(out, "wb") as disk:
        disk.truncate(total)
    table = "\n".join(
        [
            "label: gpt",
            f"label-id: {DISK_UUID}",
            f"start={first}, size={esp_sectors}, type={ESP_TYPE}, uuid={ESP_PARTUUID}, name=esp",
            f"start={root_start}, size={root_sectors}, type={ROOT_TYPE}, uuid={ROOT_PARTUUID}, "
            "name=root",
            "",
        ]
    )
    _run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(out)], stdin=table)
    with open(out, "r+b") as disk:
        for part, start in ((esp, first), (root, root_start)):
            disk.seek(start * SECTOR)
            with open(part, "rb") as src:
                shutil.copyfileobj(src, disk, 16 * MIB)
    return total


def _convert(raw: Path, out: Path, fmt: str) -> None:
    if fmt == "raw":
        raw.rename(out)
    elif fmt == "qcow2":
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)])
    elif fmt == "vhd":
        # Azure takes a fixed VHD whose size is a whole number of MiB
        size = raw.stat().st_size
        if size % MIB:
            os.truncate(raw, (size // MIB + 1) * MIB)
        _run(["qemu-img", "convert", "-O", "vpc", "-o", "subformat=fixed,force_size",
              str(raw), str(out)])  # fmt: skip
    else:  # gce: disk.raw in a tar.gz (sparse, old GNU format, as GCE's import documents)
        _run(
            [
                "tar",
                "--format=oldgnu",
                "-S",
                "-czf",
                str(out),
                f"--mtime=@{EPOCH}",
                "-C",
                str(raw.parent),
                raw.name,
            ]
        )


# mkfs.ext4 and mtools stamp times and check nothing of the host's drives
_DISK_ENV = {"E2FSPROGS_FAKE_TIME": str(EPOCH), "MTOOLS_SKIP_CHECK": "1"}


def _run(cmd: list[str], stdin: str | None = None) -> None:
    run_tool(cmd, stdin=stdin, env=_DISK_ENV)
