"""What a node has: logical CPUs with their core, socket and NUMA node, memory, and GPUs.

Read from Linux sysfs and /proc, and from `nvidia-smi` or `rocm-smi` when present. An agent
may be limited to a slice of the machine (some CPUs, some memory), which is how several
agents share one machine on the local site.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Cpu", "Gpu", "Inventory", "parse_cpu_list", "read_inventory"]

SYS = Path("/sys/devices/system")


@dataclass(frozen=True, slots=True)
class Cpu:
    """One logical CPU: its kernel id, physical core, socket and NUMA node."""

    id: int
    core: int
    socket: int
    numa_node: int


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    vendor: str
    model: str
    memory_bytes: int
    uuid: str = ""


@dataclass(frozen=True, slots=True)
class Inventory:
    """The resources an agent may hand out."""

    hostname: str
    cpus: tuple[Cpu, ...]
    memory_bytes: int
    gpus: tuple[Gpu, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)


def parse_cpu_list(text: str) -> list[int]:
    """Parse the kernel's CPU list format: `0-3,8,10-11`."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def _numa_of_cpus(sys_root: Path) -> dict[int, int]:
    numa: dict[int, int] = {}
    for node_dir in sorted((sys_root / "node").glob("node[0-9]*")):
        node = int(node_dir.name.removeprefix("node"))
        try:
            for cpu in parse_cpu_list((node_dir / "cpulist").read_text()):
                numa[cpu] = node
        except OSError:
            continue
    return numa


def read_cpus(sys_root: Path = SYS) -> list[Cpu]:
    """Every online logical CPU with its topology (NUMA node 0 when the kernel has none)."""
    try:
        online = parse_cpu_list((sys_root / "cpu" / "online").read_text())
    except OSError:
        online = list(range(os.cpu_count() or 1))
    numa = _numa_of_cpus(sys_root)
    cpus = []
    for cpu in online:
        topo = sys_root / "cpu" / f"cpu{cpu}" / "topology"
        cpus.append(
            Cpu(
                id=cpu,
                core=_read_int(topo / "core_id", cpu),
                socket=_read_int(topo / "physical_package_id", 0),
                numa_node=numa.get(cpu, 0),
            )
        )
    return cpus


def read_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemTotal from /proc/meminfo."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no MemTotal in {meminfo}")


def read_gpus() -> list[Gpu]:
    """GPUs reported by nvidia-smi or rocm-smi; none when neither tool is installed."""
    gpus: list[Gpu] = []
    if shutil.which("nvidia-smi"):
        out = _run(
            [
                "nvidia-smi",
                "--query-gpu=index,name,memory.total,uuid",
                "--format=csv,noheader,nounits",
            ]
        )
        for row in csv.reader(io.StringIO(out)):
            if len(row) >= 4:
                index, name, mib, uuid = (c.strip() for c in row[:4])
                gpus.append(Gpu(int(index), "nvidia", name, int(float(mib)) * 2**20, uuid))
    if shutil.which("rocm-smi"):
        out = _run(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--csv"])
        for entry in csv.DictReader(io.StringIO(out)):
            card = entry.get("device", "")
            if card.startswith("card"):
                total = entry.get("VRAM Total Memory (B)", "0") or "0"
                model = entry.get("Card series") or entry.get("Card SKU") or "AMD GPU"
                gpus.append(Gpu(int(card.removeprefix("card")), "amd", model, int(total)))
    return gpus


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def read_inventory(
    *,
    cpus: list[int] | None = None,
    memory_bytes: int | None = None,
    gpus: list[int] | None = None,
    labels: dict[str, str] | None = None,
) -> Inventory:
    """This machine's inventory, limited to the given CPU ids, memory and GPU indexes."""
    all_cpus = read_cpus()
    if cpus is not None:
        known = {c.id for c in all_cpus}
        missing = sorted(set(cpus) - known)
        if missing:
            raise ValueError(f"CPUs {missing} are not online here (online: {sorted(known)})")
        all_cpus = [c for c in all_cpus if c.id in set(cpus)]
    total = read_memory_bytes()
    if memory_bytes is not None and memory_bytes > total:
        raise ValueError(f"asked for {memory_bytes} bytes of memory; the machine has {total}")
    found_gpus = read_gpus()
    if gpus is not None:
        found_gpus = [g for g in found_gpus if g.index in set(gpus)]
    return Inventory(
        hostname=socket.gethostname(),
        cpus=tuple(all_cpus),
        memory_bytes=memory_bytes if memory_bytes is not None else total,
        gpus=tuple(found_gpus),
        labels=dict(labels or {}),
    )
