"""Ingress of one S3 object into a volume through a node's agent, next to a plain boto3
download of the same object, in one run.

Run: .venv/bin/python bench/data_ingress.py [--size-mb 1024] [--reps 5]

The object (--size-mb MiB of random bytes, and a 1 KiB one for the fixed cost) is written
once to moto's S3 server on 127.0.0.1 (a process of its own, started here), then downloaded
by each side in turn:

Squall  an agent started by LocalProvisioner (one node, not namespaced, mutual TLS, its
        --volume-root a folder of this bench), called as the orchestrator calls it:
        `DataAgent.ingress` (the `Transfer` RPC, DIRECTION_INGRESS, the endpoint and keys in
        the request's credentials). The agent makes its own boto3 client and downloads into
        its staging folder, places the file into the volume and returns; then it copies the
        file into the node's ingress cache, off the transfer's path. Timed from the call until
        it returns (the final progress message); the bench then waits for the cache copy
        before the next download, and reports when it landed.
boto3   in this process, what `aws s3 cp` does: `boto3.client("s3", ...)` made as the agent
        makes its own, then `download_file` into a file on the same disk, with the same
        boto3 and the same transfer settings (the agent passes no TransferConfig: boto3's
        defaults, 8 MiB parts, 10 threads). Timed from making the client until
        `download_file` returns.
Squall, no cache copy   a second agent, the same code and setup, whose ingress cache's
        `put` is skipped (a launcher replaces it in the agent's process before it starts):
        all the agent does but the copy into the cache, which was on the transfer's path
        before (then Squall ran at 42% of boto3, and this row at 83%).

Every repetition downloads to a new file (the previous one is deleted first), the agent's
ingress cache is emptied before each ingress (and the final progress message must say
`cached: false`), and the page cache's dirty pages are written out (sync) between downloads,
so each starts with the disk as idle as the last; the object stays in moto's memory, so
neither side reads a disk to get it. Repetitions are interleaved, each side first in turn,
after one warm-up download of each side that is not counted. Every file is read back and its
SHA-256 compared with the object's.

moto (5.2) reads a whole object from its spooled file for every ranged GET, and boto3 asks
for 8 MiB parts: a 1 GiB download reads 128 GiB inside moto (plain moto_server gave 128 MiB
at 95 MB/s and 256 MiB at 50 MB/s on the machine of the README's figures). The server here is
moto's own with one change, made in its process: a key's bytes are kept once read, so a
ranged GET costs its range, as on S3.

CPU s/GiB: user + system time per GiB downloaded, of the downloading process (the agent, or
this process for boto3) and of moto; `CPUs busy` is every CPU's busy time over a side's
downloads divided by their wall time (near the machine's CPU count: bound by CPU).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import machine_busy, process_cpu, sha256  # noqa: E402
from orchestrator.data.data_agent import DataAgent  # noqa: E402
from orchestrator.data.transfers import TransferPolicy  # noqa: E402
from orchestrator.provision.base import NodeSlice  # noqa: E402
from orchestrator.provision.local import LocalProvisioner, local_plan, this_machine  # noqa: E402
from tests.substrate.registry import free_port  # noqa: E402

MIB = 1 << 20
BUCKET = "bench-ingress"
BIG, TINY = "big.bin", "tiny.bin"
TINY_SIZE = 1024

# run in moto's process before its server starts: a key's value (the whole object, read from
# its spooled file for every GET) is kept once read, and forgotten when the key is rewritten
MOTO = """
import sys
from moto.s3 import models
from moto.server import main

plain = models.FakeKey.value

def value(self):
    held = self.__dict__.get("_bench_value")
    if held is None:
        held = self.__dict__["_bench_value"] = plain.fget(self)
    return held

def set_value(self, new):
    self.__dict__.pop("_bench_value", None)
    plain.fset(self, new)

models.FakeKey.value = property(value, set_value)
sys.exit(main())
"""

# the third row's agent: the agent as it is, with its ingress cache's copy skipped (the cache
# is still asked first, and is empty), started by this launcher in place of the interpreter
NO_CACHE_COPY = """
import runpy, sys
sys.path.insert(0, {root!r})
from substrate.transfers import TransferCache
TransferCache.put = lambda self, *args, **kwargs: False
sys.argv = ["substrate", *sys.argv[3:]]  # after "-m substrate"
runpy.run_module("substrate", run_name="__main__", alter_sys=True)
"""


class S3:
    """moto's S3 server (as tests/orchestrator/servers.py starts it), with the change above."""

    def __init__(self, work: Path) -> None:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = open(work / "moto.log", "wb")  # noqa: SIM115 - the server writes to it
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MOTO, "-H", "127.0.0.1", "-p", str(port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto did not start; see moto.log") from None
                time.sleep(0.1)
        self.credentials = {
            "endpoint": self.endpoint,
            "region": "us-east-1",
            "accessKeyId": "testing",
            "secretAccessKey": "testing",
        }

    def client(self) -> Any:
        """A client made as the agent makes its own (substrate/transfers.py `_s3_client`)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.credentials["endpoint"],
            region_name=self.credentials["region"],
            aws_access_key_id=self.credentials["accessKeyId"],
            aws_secret_access_key=self.credentials["secretAccessKey"],
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@dataclass
class Side:
    name: str
    download: Callable[[str], tuple[Path, float, int]]  # key -> (file, seconds, messages)
    pid: int  # the downloading process
    seconds: list[float] = field(default_factory=list)  # big object, counted runs
    tiny: list[float] = field(default_factory=list)  # the 1 KiB object
    cpu_self: float = 0.0  # the downloading process's CPU seconds over the counted runs
    cpu_moto: float = 0.0
    busy: float = 0.0  # every CPU's busy seconds over the counted runs
    messages: list[int] = field(default_factory=list)  # Squall: progress messages per run


class Node:
    """An agent started by LocalProvisioner under `site`, with a volume of its own beneath
    `volumes`; with `python`, started by that interpreter (the launcher of the third row)."""

    def __init__(self, site: Path, volumes: Path, name: str, python: str = sys.executable):
        self.cache = site / "ingress-cache"  # the agent's --cache-dir (LocalProvisioner)
        self.caches = python == sys.executable  # the third row's agent keeps nothing
        self.cached_after: list[float] = []  # s from a transfer's end to its cache copy's
        self.volume = volumes / name
        self.provisioner = LocalProvisioner(
            site, volume_roots=lambda run_id: [volumes], python=python
        )
        machine = this_machine()
        node = NodeSlice(cpus=machine.cpu_ids, memory_bytes=machine.memory_bytes)
        self.run_id = f"bench-{name}"
        self.log = site / self.run_id / "node-0" / "agent.log"
        self.cluster = self.provisioner.up(local_plan(self.run_id, [node]))
        endpoint = self.cluster.agents[0]
        assert endpoint.tls is not None, "the agent serves mutual TLS"
        self.pid = endpoint.pid
        self.agent = DataAgent(endpoint)
        self.agent.make_volume(name, str(self.volume), None)

    def close(self) -> None:
        self.agent.close()
        self.provisioner.down(self.cluster)


class Bench:
    def __init__(self, work: Path, size: int) -> None:
        self.work, self.size = work, size
        self.nodes: list[Node] = []
        self.s3 = S3(work)
        client = self.s3.client()
        client.create_bucket(Bucket=BUCKET)
        source = work / "source"
        digest = hashlib.sha256()
        with open(source, "wb") as f:
            for chunk in [MIB] * (size // MIB) + [size % MIB]:
                block = os.urandom(chunk)
                digest.update(block)
                f.write(block)
        self.digest = digest.hexdigest()
        started = time.monotonic()
        client.upload_file(str(source), BUCKET, BIG)
        self.upload_s = time.monotonic() - started
        source.unlink()
        self.tiny_bytes = os.urandom(TINY_SIZE)
        client.put_object(Bucket=BUCKET, Key=TINY, Body=self.tiny_bytes)

        self.plain = work / "plain"
        self.plain.mkdir()
        volumes = work / "volumes"
        self.nodes.append(Node(work / "site", volumes, "ingress"))
        launcher = work / "python-no-cache-copy"
        launcher.write_text(f"#!{sys.executable}\n{NO_CACHE_COPY.format(root=str(ROOT))}")
        launcher.chmod(0o755)
        self.nodes.append(Node(work / "site-no-cache-copy", volumes, "nocopy", str(launcher)))
        self.runs = 0

    def sides(self) -> list[Side]:
        squall, nocopy = self.nodes
        return [
            Side("Squall", functools.partial(self.squall, squall), squall.pid),
            Side("boto3", self.boto3, os.getpid()),
            Side("Squall, no cache copy", functools.partial(self.squall, nocopy), nocopy.pid),
        ]

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self.s3.stop()

    def _between(self) -> None:
        """Before a download: the previous files gone, the caches empty, dirty pages written."""
        folders = [self.plain] + [f for n in self.nodes for f in (n.volume, n.cache)]
        for folder in folders:
            for path in folder.iterdir():
                path.unlink()
        os.sync()

    def squall(self, node: Node, key: str) -> tuple[Path, float, int]:
        self._between()
        self.runs += 1
        name = f"{key}.{self.runs}"
        messages = 0

        def progress(done: int, total: int | None) -> None:
            nonlocal messages
            messages += 1

        started = time.monotonic()
        cached = node.agent.ingress(
            f"s3://{BUCKET}/{key}",
            str(node.volume),
            name,
            credentials=self.s3.credentials,
            policy=TransferPolicy(),
            private_volume=True,  # a run's ephemeral volume, as the orchestrator says
            progress=progress,
        )
        seconds = time.monotonic() - started
        if cached:  # the final progress message's `cached`
            raise RuntimeError("Squall: the ingress came from the agent's cache")
        if node.caches and key == BIG:  # its copy into the cache, after the transfer
            while not [f for f in node.cache.iterdir() if not f.name.endswith(".tmp")]:
                if time.monotonic() - started > 600:
                    raise RuntimeError("Squall: the download never reached the cache")
                time.sleep(0.01)
            node.cached_after.append(time.monotonic() - started - seconds)
        return node.volume / name, seconds, messages

    def boto3(self, key: str) -> tuple[Path, float, int]:
        self._between()
        self.runs += 1
        path = self.plain / f"{key}.{self.runs}"
        started = time.monotonic()
        client = self.s3.client()
        client.download_file(BUCKET, key, str(path))
        return path, time.monotonic() - started, 0

    def check(self, path: Path, side: str) -> None:
        if path.stat().st_size != self.size or sha256(path) != self.digest:
            raise RuntimeError(f"{side}: {path} is not the object")

    def measure(self, side: Side) -> None:
        """One counted download of each object, with the CPU the big one took."""
        moto = self.s3.proc.pid
        cpu0, moto0, busy0 = process_cpu(side.pid), process_cpu(moto), machine_busy()
        path, seconds, messages = side.download(BIG)
        cpu1, moto1, busy1 = process_cpu(side.pid), process_cpu(moto), machine_busy()
        side.seconds.append(seconds)
        side.cpu_self += cpu1 - cpu0
        side.cpu_moto += moto1 - moto0
        side.busy += busy1 - busy0
        side.messages.append(messages)
        self.check(path, side.name)
        tiny, seconds, _ = side.download(TINY)
        if tiny.read_bytes() != self.tiny_bytes:
            raise RuntimeError(f"{side.name}: {tiny} is not the tiny object")
        side.tiny.append(seconds)


def report(bench: Bench, sides: list[Side], load: tuple[float, float]) -> None:
    size_mib = bench.size / MIB
    print(
        f"{size_mib:g} MiB object from moto on 127.0.0.1, {len(sides[0].seconds)} downloads each "
        f"interleaved (after one warm-up each), {os.cpu_count()} cores, load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after; upload took {bench.upload_s:.1f} s"
    )
    print(
        f"{'':22}{'median MiB/s':>13}{'min':>7}{'max':>7}{'spread':>8}{'of boto3':>10}"
        f"{'median s':>10}{'1 KiB ms':>10}{'CPU s/GiB':>11}{'moto':>7}{'CPUs busy':>11}"
    )
    gib = bench.size * len(sides[0].seconds) / (1 << 30)
    plain = statistics.median(size_mib / s for s in sides[1].seconds)
    for side in sides:
        rates = [size_mib / s for s in side.seconds]
        med = statistics.median(rates)
        print(
            f"{side.name:22}{med:>13.0f}{min(rates):>7.0f}{max(rates):>7.0f}"
            f"{(max(rates) - min(rates)) / med:>8.0%}{med / plain:>10.0%}"
            f"{statistics.median(side.seconds):>10.2f}{statistics.median(side.tiny) * 1e3:>10.1f}"
            f"{side.cpu_self / gib:>11.2f}{side.cpu_moto / gib:>7.2f}"
            f"{side.busy / sum(side.seconds):>11.2f}"
        )
    print("of boto3: the side's median MiB/s over boto3's (the goal for Squall: at least 80%)")
    print("spread: (max - min) / median; CPU s/GiB: the downloading process's, then moto's")
    print(f"Squall's progress messages per run: {sides[0].messages}")
    after = bench.nodes[0].cached_after[1:]  # the warm-up's first
    print(
        f"Squall's copy into its cache was there {statistics.median(after):.2f} s (median; "
        f"{min(after):.2f}-{max(after):.2f}) after the transfer ended; the next download waited "
        "for it (its CPU is in Squall's CPU s/GiB)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="the object's size in MiB")
    p.add_argument("--reps", type=int, default=5, help="downloads of each side (after a warm-up)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="squall-bench-ingress-"))
    bench = None
    sides: list[Side] = []
    load0 = os.getloadavg()[0]
    try:
        bench = Bench(work, args.size_mb * MIB)
        sides = bench.sides()
        for side in sides:  # warm-up
            path, _, _ = side.download(BIG)
            bench.check(path, side.name)
            side.download(TINY)
        for rep in range(args.reps):  # each side first in turn
            turn = rep % len(sides)
            for side in sides[turn:] + sides[:turn]:
                bench.measure(side)
    except BaseException:
        for node in bench.nodes if bench is not None else []:
            if node.log.exists():
                print(f"{node.log}:\n{node.log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        if bench is not None:
            bench.close()
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()[0]
    if args.json:
        fields = ("seconds", "tiny", "cpu_self", "cpu_moto", "busy", "messages")
        print(json.dumps({s.name: {f: getattr(s, f) for f in fields} for s in sides}, indent=2))
        return 0
    report(bench, sides, (load0, load1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
