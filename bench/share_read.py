"""Reading a volume on a second node, through the share node 0 serves, next to reading the same
file from node 0's own disk, in one run (as root).

Run: .venv/bin/python bench/share_read.py [--size-mb 1024] [--reps 3]

A local cluster of two separate nodes (network namespaces on the run's bridge) is brought up
by LocalProvisioner as `squall run --nodes 2` brings one up for a workflow with volumes: node
0 serves the run's volume folder over GlusterFS and both nodes mount it (node_share.py). A
file of --size-mb MiB of random bytes is written once through node 0's mount (so the share
knows it), then read whole, in 1 MiB reads, by each side in turn:

share   node 1's mount: every byte travels from node 0's brick over the run's bridge to node
        1's FUSE client (the client keeps no cache: what one node writes, another reads at once)
disk    the same file in node 0's brick, the run's volume folder on this machine's disk: what
        a job on a single node reads

Each read is done twice: `cold`, after the page cache is dropped (echo 3 >
/proc/sys/vm/drop_caches), so the bytes come from the disk, and `warm`, right after, with the
file in this machine's page cache (for the share, on the brick's side alone: the client
drops its cache at every open, as the share is mounted for coherence). Repetitions are
interleaved, each side first in turn. The CPU time of node 1's client and node 0's brick
over the share's reads is reported per GiB. The file read back by each side is checked against the
written one's SHA-256, once, outside the timings.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import process_cpu, sha256  # noqa: E402
from orchestrator.data.staging import volume_roots  # noqa: E402
from orchestrator.provision.base import NodeSlice  # noqa: E402
from orchestrator.provision.local import LocalProvisioner, local_plan  # noqa: E402

MIB = 1 << 20
RUN = "bench-share"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(path: Path) -> tuple[float, int]:
    """Seconds to read `path` whole in 1 MiB reads, and the bytes read."""
    buf = bytearray(MIB)
    view = memoryview(buf)
    got = 0
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [view]):
            got += n
    finally:
        os.close(fd)
    return time.perf_counter() - start, got


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="the file's size in MiB")
    p.add_argument("--reps", type=int, default=3, help="reads of each side, cold and warm")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("share_read: run as root (network namespaces, mounts, drop_caches)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="squall-bench-share-"))
    provisioner = LocalProvisioner(
        work / "site",
        namespaced=True,
        volume_roots=functools.partial(volume_roots, work / "data"),
    )
    nodes = [NodeSlice(cpus=(0,), memory_bytes=256 * MIB)] * 2
    up = time.perf_counter()
    cluster = provisioner.up(local_plan(RUN, nodes, storage="node-share"))
    up = time.perf_counter() - up
    share = work / "site" / RUN / "share"
    brick, _ = volume_roots(work / "data", RUN)
    sides = {"share": share / "node-1" / "big.bin", "disk": brick / "big.bin"}
    timings: dict[str, dict[str, list[float]]] = {s: {"cold": [], "warm": []} for s in sides}
    size = args.size_mb * MIB
    cpu = {"client": 0.0, "brick": 0.0}  # seconds over the share's reads
    try:
        written = hashlib.sha256()
        with open(share / "node-0" / "big.bin", "wb") as f:
            for _ in range(args.size_mb):
                block = os.urandom(MIB)
                written.update(block)
                f.write(block)
        for name, path in sides.items():
            if sha256(path) != written.hexdigest():
                raise RuntimeError(f"{name}: {path} is not the file written")
        # the share's processes: node 1's client and node 0's brick
        gluster = share / "glusterd"
        pids = {
            "client": int((gluster / "client-1.pid").read_text().split()[0]),
            "brick": int(next((gluster / "vols").glob("*/*.pid")).read_text().split()[0]),
        }
        for rep in range(args.reps):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for name in order:
                for kind in ("cold", "warm"):
                    if kind == "cold":
                        drop_caches()
                    before = {p: process_cpu(pid) for p, pid in pids.items()}
                    seconds, got = read_all(sides[name])
                    if name == "share":
                        for p, pid in pids.items():
                            cpu[p] += process_cpu(pid) - before[p]
                    if got != size:
                        raise RuntimeError(f"{name}: read {got} bytes of {size}")
                    timings[name][kind].append(seconds)
    finally:
        provisioner.down(cluster)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(
            json.dumps({"size": size, "up_seconds": up, "seconds": timings, "cpu": cpu}, indent=2)
        )
        return 0
    print(f"{args.size_mb} MiB file, {args.reps} reads each, median (min-max) MB/s")
    print(f"the 2-node cluster with its share came up in {up:.1f} s")
    print(f"{'':26} {'cold':>22} {'warm':>22}")
    rows = {"share": "node 1, through the share", "disk": "node 0's disk (the brick)"}
    for name, label in rows.items():
        cells = []
        for kind in ("cold", "warm"):
            rates = [size / s / 1e6 for s in timings[name][kind]]
            cells.append(f"{statistics.median(rates):7.0f} ({min(rates):.0f}-{max(rates):.0f})")
        print(f"{label:26} {cells[0]:>22} {cells[1]:>22}")
    gib = 2 * args.reps * size / (1 << 30)  # read through the share, cold and warm
    print(
        f"CPU s per GiB through the share: client {cpu['client'] / gib:.2f}, "
        f"brick {cpu['brick'] / gib:.2f} (on {os.cpu_count()} CPUs)"
    )
    for kind in ("cold", "warm"):
        ratio = statistics.median(timings["disk"][kind]) / statistics.median(timings["share"][kind])
        print(f"share / disk, {kind}: {ratio:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
