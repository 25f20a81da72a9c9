"""A reader of the Singularity Image Format (SIF), as its maintainers specify it
(github.com/sylabs/sif, `pkg/sif`: `sif.go`, `descriptor.go`, `load.go`, `arch.go`).

A SIF file is a global header, a table of data-object descriptors, then the objects. All
integers are little-endian and the structures are packed (Go's `encoding/binary`):

    header (128 bytes)     launch script [32], magic "SIF_MAGIC\\0" [10], version "01\\0" [3],
                           arch [3] (of the primary partition, "02\\0" = amd64), uuid [16],
                           created, modified, descriptors free, descriptors total,
                           descriptors offset, descriptors size, data offset, data size (int64)
    descriptor (585 bytes) datatype int32, used bool, id, group id, linked id (uint32),
                           offset, size, size with padding, created, modified, uid, gid (int64),
                           name [128], extra [384]

For a partition (datatype 0x4004) `extra` starts with its file system (int32: 1 squashfs,
2 ext3, 3 archive, 4 raw, 5 encrypted squashfs), its partition type (int32: 1 system,
2 primary system, 3 data, 4 overlay) and its architecture [3]. What a container runs is the
primary system partition, as Apptainer picks it. This module only reads: it never executes
or mounts anything, and it refuses what a node cannot run with one line that says why.
"""

from __future__ import annotations

import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["Partition", "SifError", "host_arch", "primary_partition"]

MAGIC = b"SIF_MAGIC\0"
VERSION = b"01"
HEADER = struct.Struct("<32s10s3s3s16s8q")
DESCRIPTOR = struct.Struct("<i?III7q128s384s")
PARTITION_EXTRA = struct.Struct("<ii3s")
DATA_PARTITION = 0x4004
SQUASHFS_MAGIC = b"hsqs"
MAX_DESCRIPTORS = 4096  # the tools make 48; a larger table is not a real image

FS_SQUASHFS, FS_ENCRYPTED = 1, 5
FILE_SYSTEMS = {1: "squashfs", 2: "ext3", 3: "archive", 4: "raw", 5: "encrypted squashfs"}
PART_PRIMARY = 2

# the header's and partitions' architecture codes (arch.go), by Go's names
ARCHES = {
    b"01": "386",
    b"02": "amd64",
    b"03": "arm",
    b"04": "arm64",
    b"05": "ppc64",
    b"06": "ppc64le",
    b"07": "mips",
    b"08": "mipsle",
    b"09": "mips64",
    b"10": "mips64le",
    b"11": "s390x",
    b"12": "riscv64",
}
_MACHINES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
    "armv7l": "arm",
}


class SifError(Exception):
    """A file that is not a SIF, is damaged, or holds nothing this node can run; says why."""


@dataclass(frozen=True, slots=True)
class Partition:
    """The primary system partition: where its squashfs image lies in the file."""

    offset: int
    size: int
    arch: str  # Go's name: amd64, arm64, ...


def host_arch() -> str:
    """This machine's architecture, by Go's (and so SIF's) names."""
    machine = platform.machine()
    return _MACHINES.get(machine, machine)


def primary_partition(path: Path) -> Partition:
    """The squashfs root file system of the SIF at `path`, checked to run on this machine;
    raises `SifError` for anything else."""
    want = host_arch()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = _read(f, 0, HEADER.size, size, "its header")
        _, magic, version, _, _, *numbers = HEADER.unpack(header)
        if magic != MAGIC:
            raise SifError("not a SIF file (no SIF_MAGIC at its start)")
        if version.rstrip(b"\0") != VERSION:
            found = version.rstrip(b"\0").decode(errors="replace")
            raise SifError(f"SIF version {found!r} is not supported (only 01)")
        _, _, _, total, table_offset, table_size, _, _ = numbers
        if not 0 <= total <= MAX_DESCRIPTORS or table_size != total * DESCRIPTOR.size:
            raise SifError(f"its descriptor table is damaged ({total} descriptors)")
        table = _read(f, table_offset, table_size, size, "its descriptor table")
        partition = _primary(table, total)
        if partition.arch != want:
            raise SifError(f"it is built for {partition.arch}; this node is {want}")
        start = _read(f, partition.offset, len(SQUASHFS_MAGIC), size, "its root file system")
        if partition.offset + partition.size > size:
            raise SifError(
                f"it is truncated: its root file system ends at byte "
                f"{partition.offset + partition.size:,} of a {size:,}-byte file"
            )
        if start != SQUASHFS_MAGIC:
            raise SifError("its root file system partition does not hold a squashfs image")
    return partition


def _read(f: BinaryIO, offset: int, length: int, size: int, what: str) -> bytes:
    if offset < 0 or length < 0 or offset + length > size:
        raise SifError(f"it is truncated: {what} lies beyond its {size:,} bytes")
    f.seek(offset)
    data: bytes = f.read(length)
    return data


def _primary(table: bytes, total: int) -> Partition:
    found: list[tuple[int, int, int, int, bytes]] = []
    for i in range(total):
        fields = DESCRIPTOR.unpack_from(table, i * DESCRIPTOR.size)
        datatype, used, offset, size, extra = fields[0], fields[1], fields[5], fields[6], fields[-1]
        if used and datatype == DATA_PARTITION:
            fstype, parttype, arch = PARTITION_EXTRA.unpack_from(extra)
            found.append((fstype, parttype, offset, size, arch))
    primary = [p for p in found if p[1] == PART_PRIMARY]
    if not primary:
        kinds = ", ".join(FILE_SYSTEMS.get(p[0], f"type {p[0]}") for p in found) or "none"
        raise SifError(f"it has no primary system partition to run (partitions: {kinds})")
    fstype, _, offset, size, arch = primary[0]
    if fstype != FS_SQUASHFS:
        name = FILE_SYSTEMS.get(fstype, f"file system type {fstype}")
        hint = (
            "encrypted images are not supported; publish it unencrypted"
            if fstype == FS_ENCRYPTED
            else "only squashfs root file systems are supported"
        )
        raise SifError(f"its root file system is {name}: {hint}")
    if offset < 0 or size <= 0:
        raise SifError("its root file system partition is damaged (empty or before the file)")
    code = arch.rstrip(b"\0")
    return Partition(offset, size, ARCHES.get(code, f"unknown architecture {code!r}"))
