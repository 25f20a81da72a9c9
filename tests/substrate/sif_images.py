"""SIF images made here, as Apptainer makes them: a busybox root with Apptainer's metadata
(`/.singularity.d`), packed with mksquashfs, written into a SIF file per the format's
specification (github.com/sylabs/sif, `pkg/sif`), and pushed to the local registry as an ORAS
artifact with the media types Apptainer and Sylabs use.

The writer is written from the specification, independently of `substrate/sif.py`; a test
checks it against `siftool`, the maintainers' own tool.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

from tests.substrate.registry import busybox_root

REQUIRED = ("mksquashfs", "unsquashfs")
SIF_LAYER = "application/vnd.sylabs.sif.layer.v1.sif"
SIF_CONFIG = "application/vnd.sylabs.sif.config.v1+json"

# packed little-endian structures of pkg/sif (sif.go `header`, descriptor.go `rawDescriptor`)
_HEADER = struct.Struct("<32s10s3s3s16sqqqqqqqq")
_DESCRIPTOR = struct.Struct("<i?IIIqqqqqqq128s384s")
_CAPACITY = 48  # descriptors, as the tools make them
_DESCRIPTORS_AT = 4096
_ALIGN = 4096  # partitions are aligned to 4 KiB
_GROUP = 0xF0000000 | 1  # the first object group
DEFFILE, PARTITION = 0x4001, 0x4004
SQUASHFS, EXT3, ENCRYPTED_SQUASHFS = 1, 2, 5
SYSTEM, PRIMARY_SYSTEM = 1, 2

ENVIRONMENT = """\
# what `%environment` in a definition file becomes
export SIF_GREETING="hello from the image"
export CHOSEN_BY=image
export PATH="/opt/tools/bin:$PATH"
"""
RUNSCRIPT = """\
#!/bin/sh
echo "runscript got: $*"
"""


def sif_root(work: Path) -> Path:
    """A busybox root as Apptainer builds one: environment scripts, a runscript, a user's
    file (uid 1000), a hard link, a set-uid file, and a link to the host's /."""
    root = busybox_root(work / "sif-root")
    meta = root / ".singularity.d"
    (meta / "env").mkdir(parents=True)
    (meta / "env" / "90-environment.sh").write_text(ENVIRONMENT)
    (meta / "runscript").write_text(RUNSCRIPT)
    (meta / "runscript").chmod(0o755)
    (root / "singularity").symlink_to(".singularity.d/runscript")
    tool = root / "opt" / "tools" / "bin" / "image-tool"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\necho image-tool ran\n")
    tool.chmod(0o755)
    home = root / "home" / "user"
    home.mkdir(parents=True)
    (home / "notes").write_text("mine\n")
    os.chown(home, 1000, 1000)
    os.chown(home / "notes", 1000, 1000)
    os.lchown(root / "etc" / "escape", 1000, 1000)  # the link's own owner
    (root / "data").mkdir()
    (root / "data" / "one").write_text("linked\n")
    os.link(root / "data" / "one", root / "data" / "two")  # one inode, two names
    (root / "bin" / "setuid-tool").write_text("#!/bin/sh\n")
    (root / "bin" / "setuid-tool").chmod(0o4755)
    return root


def squashfs(root: Path, out: Path) -> bytes:
    """`root` packed by mksquashfs (owners kept, as when Apptainer builds as root)."""
    subprocess.run(
        ["mksquashfs", str(root), str(out), "-noappend", "-quiet", "-no-progress"],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def write_sif(
    out: Path,
    partition: bytes,
    *,
    arch: bytes = b"02",
    fstype: int = SQUASHFS,
    parttype: int = PRIMARY_SYSTEM,
    deffile: bytes = b"Bootstrap: localimage\nFrom: busybox\n",
) -> Path:
    """A SIF file holding a definition file and one partition, laid out as the SIF tools
    lay it out (descriptors at 4 KiB, 48 of them, partitions aligned to 4 KiB)."""
    now = int(time.time())
    data_at = _DESCRIPTORS_AT + _CAPACITY * _DESCRIPTOR.size
    objects = [(DEFFILE, deffile, b"", 0), (PARTITION, partition, _part(fstype, parttype, arch), 1)]
    body = bytearray()
    descriptors = bytearray()
    for i, (datatype, data, extra, aligned) in enumerate(objects):
        start = data_at + len(body)
        offset = -(-start // _ALIGN) * _ALIGN if aligned else start
        body += b"\0" * (offset - start) + data
        name = b"rootfs.squashfs" if datatype == PARTITION else b"recipe.def"
        descriptors += _DESCRIPTOR.pack(
            datatype, True, i + 1, _GROUP, 0, offset, len(data), offset - start + len(data),
            now, now, 0, 0, name, extra,
        )  # fmt: skip
    descriptors += b"\0" * (_CAPACITY * _DESCRIPTOR.size - len(descriptors))
    header = _HEADER.pack(
        b"#!/usr/bin/env run-singularity\n", b"SIF_MAGIC\0", b"01\0", arch + b"\0",
        os.urandom(16), now, now, _CAPACITY - len(objects), _CAPACITY, _DESCRIPTORS_AT,
        len(descriptors), data_at, len(body),
    )  # fmt: skip
    out.write_bytes(header.ljust(_DESCRIPTORS_AT, b"\0") + descriptors + body)
    return out


def _part(fstype: int, parttype: int, arch: bytes) -> bytes:
    return struct.pack("<ii3s", fstype, parttype, arch + b"\0")


def build_sif(work: Path, **kw: object) -> Path:
    """The busybox SIF (`sif_root`) at work/busybox.sif; `kw` as for `write_sif`."""
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    assert not missing, "install squashfs-tools (scripts/setup.sh --test does, as root)"
    work.mkdir(parents=True, exist_ok=True)
    image = squashfs(sif_root(work), work / "rootfs.squashfs")
    return write_sif(work / "busybox.sif", image, **kw)  # type: ignore[arg-type]


def push_sif(address: str, sif: Path, name: str, credentials: tuple[str, str] | None = None) -> str:
    """Push `sif` to the registry at `address` as `name` (REPO:TAG), as `apptainer push
    oras://` does, and return its oras:// reference. With `credentials`, the registry is the
    HTTPS one with a login (its certificate made by the test, so not verified)."""
    import oras.client

    config = sif.with_suffix(".config.json")
    config.write_text(json.dumps({}))
    if credentials is None:
        client = oras.client.OrasClient(hostname=address, insecure=True)
    else:
        client = oras.client.OrasClient(hostname=address, tls_verify=False, auth_backend="basic")
        client.auth.set_basic_auth(*credentials)
    response = client.push(
        target=f"{address}/{name}",
        files=[f"{sif}:{SIF_LAYER}"],
        manifest_config=f"{config}:{SIF_CONFIG}",
        disable_path_validation=True,
        quiet=True,
    )
    assert response.status_code == 201, response.text
    return f"oras://{address}/{name}"
