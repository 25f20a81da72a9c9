"""What the data benches measure with: a process's CPU time, the machine's busy time, a
file's digest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20


def process_cpu(pid: int) -> float:
    """User + system seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy() -> float:
    """Seconds every CPU of the machine spent busy since boot (less idle and iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICK


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MIB):
            digest.update(block)
    return digest.hexdigest()
