"""An MPI job through Squall next to bare `mpirun` across the same kind of nodes, in one run.

Run as root:  .venv/bin/python bench/mpi_launch.py [--reps 5] [--nodes 4] [--per-node 2]

The job: Open MPI's ring of images/mpi/ring.c (a ring and an allreduce, checked by rank 0) on
--nodes nodes x --per-node ranks, from the image scripts/mpi_image.py builds (cached after
its first build). Each rank's first action is to print the wall clock (`date +%s.%N`, then
`exec ring`); the earliest of those is the first rank's start. Every run's ranks, hosts and
ring check are read back, and a run that is wrong stops the bench.

Squall  `engine.run` of the local site in this process (as `squall run FILE --nodes N` runs it,
        less the CLI's start-up): N separate nodes (node_network.py: a bridge, a network
        namespace, address and hostname per node), an agent per node, the image from the
        site's cache (checked with the registry on 127.0.0.1), the gang's containers (members
        1..N-1 idle first, then member 0 runs mpirun with the agents' launcher as
        plm_rsh_agent), teardown. Timed from engine.run until it returns.
bare    the same nodes made the same way (RunNetwork, a run id of its own) once, and the
        image's root file system unpacked once (umoci); per run, `ip netns exec NODE0 unshare
        --uts` with /proc, /dev, /sys and /run/netns mounted in its root, then `chroot ROOT
        mpirun` with the options Squall gives Open MPI (orchestrator/gangs.py: pml ob1,
        btl self,tcp on eth0, no tree spawn, hwloc's GL plugin off), whose plm_rsh_agent is
        a shell script that runs the daemon of each other node by `ip netns exec NODE unshare
        --uts` (hostname set) in the same root: no containers, no agents. Timed from just
        before mpirun's command starts until it returns.

One warm-up run of each side is not counted (its imports, the page cache, the registry's
first read; Squall's pulls and unpacks the image into the site's image cache, where the later
runs' agents find it, checked with the registry). The breakdown of Squall's phases below the
table says where its time goes. Repetitions are interleaved (Squall first in even ones).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from orchestrator.gangs import hosts  # noqa: E402
from orchestrator.local_site import LocalSettings, local_engine  # noqa: E402
from orchestrator.provision.node_network import RunNetwork, run_key  # noqa: E402
from orchestrator.store import RunState  # noqa: E402
from orchestrator.store.models import Event  # noqa: E402
from scripts import mpi_image  # noqa: E402
from tests.substrate.registry import Registry  # noqa: E402

JOB = "ring"
# each rank's first action: the wall clock, then the ring
RANK = 'echo "rank-start $(date +%s.%N)"; exec ring'
PATH = "/opt/squall:/usr/local/bin:/usr/bin:/bin"  # the image's
TIMEOUT = 180  # seconds for one run of either side


@dataclass
class Sample:
    first_rank: float  # seconds from submit (bare: mpirun's start) to the first rank's start
    total: float  # seconds from submit until done
    # from the gang's lease (Squall; bare: from mpirun's start) to the first rank's start,
    # and to the job's end: the launch alone, without provisioning, pull or teardown
    leased_first_rank: float = 0.0
    leased_done: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # Squall: event -> seconds


def check(log: str, nodes: int, per_node: int, side: str) -> list[float]:
    """The ranks' start times, once the log shows every rank on its node and the ring's
    check passed; raises otherwise."""
    ranks = nodes * per_node
    starts = [float(line.split()[1]) for line in log.splitlines() if line.startswith("rank-start")]
    where: dict[int, str] = {}
    for line in log.splitlines():
        if line.startswith("rank ") and " of " in line:
            words = line.split()
            where[int(words[1])] = words[-1]
    expected = ranks * (ranks - 1) // 2
    ok = f"ring ok: {ranks} ranks, token {expected}, allreduce {expected}, expected {expected}"
    names = hosts(JOB, nodes)
    per_host = sorted(list(where.values()).count(h) for h in names)
    problems = []
    if len(starts) != ranks:
        problems.append(f"{len(starts)} rank-start lines, not {ranks}")
    if sorted(where) != list(range(ranks)) or per_host != [per_node] * nodes:
        found = sorted(where.items())
        problems.append(f"ranks on hosts {found}, not {per_node} on each of {names}")
    if ok not in log:
        problems.append(f"no {ok!r}")
    if problems:
        raise RuntimeError(f"{side}: wrong run: {'; '.join(problems)}\n{log[-3000:]}")
    return starts


# ---- Squall ----------------------------------------------------------------------------------


def fuzzfile(nodes: int, per_node: int) -> str:
    return (
        "version: v4\njobs:\n"
        f"  {JOB}:\n"
        f"    image: {{uri: docker://{mpi_image.NAME}:{mpi_image.TAG}}}\n"
        f"    command: [sh, -c, '{RANK}']\n"
        f"    multinode: {{nodes: {nodes}, implementation: openmpi, procs-per-node: {per_node}}}\n"
        "    resource: {cpu: {cores: 1}, memory: {size: 256MiB}}\n"
        f"    policy: {{timeout: {{execute: {TIMEOUT}s}}}}\n"  # a hung ring fails the run
    )


# (label, event kind, subject, state): the events whose times the breakdown shows, in order
PHASES = (
    ("nodes up (network, agents)", "run", "", "STAGING"),
    ("image pulled and unpacked", "run", "", "RUNNING"),
    ("gang leased", "task", f"{JOB}[0]", "STARTING"),
    ("member 0 started (1..N-1 first)", "task", f"{JOB}[0]", "RUNNING"),
    ("first rank started", "", "", ""),
    ("job finished", "task", f"{JOB}[0]", "FINISHED"),
    ("run finished (teardown done)", "", "", ""),
)


class Squall:
    def __init__(self, work: Path, registry: str, nodes: int, per_node: int) -> None:
        settings = LocalSettings(
            data_dir=work / "squall",
            store_url="",
            search_registries=[registry],
            insecure_registries=[registry],
            nodes=nodes,
        )
        self.engine = local_engine(settings)
        self.text = fuzzfile(nodes, per_node)
        self.nodes, self.per_node = nodes, per_node
        self.runs = 0

    def run(self) -> Sample:
        self.runs += 1
        t0 = time.time()
        outcome = self.engine.run(f"bench/mpi-{self.runs}", self.text)
        total = time.time() - t0
        log_path = self.engine.data_dir / "runs" / outcome.run_id / "logs" / JOB / "0.1.log"
        log = log_path.read_text() if log_path.exists() else ""
        if outcome.state is not RunState.FINISHED:
            raise RuntimeError(f"Squall: the run {outcome.state.value}: {outcome.reason}\n{log}")
        first = min(check(log, self.nodes, self.per_node, "Squall")) - t0
        with self.engine.store.session() as s:
            events = s.execute(
                select(Event.kind, Event.subject, Event.state, Event.at).where(
                    Event.run_id == outcome.run_id
                )
            ).all()
        leftover = [p.name for p in Path("/run/netns").glob(f"sqn{run_key(outcome.run_id)}-*")]
        if leftover:
            raise RuntimeError(f"Squall: the run left its nodes: {leftover}")
        phases = {}
        for label, kind, subject, state in PHASES:
            key = (kind, subject, state)
            at = [e.at.timestamp() for e in events if (e.kind, e.subject, e.state) == key]
            if at:
                phases[label] = min(at) - t0
        phases["first rank started"] = first
        phases["run finished (teardown done)"] = total
        leased = phases["gang leased"]
        return Sample(first, total, first - leased, phases["job finished"] - leased, phases)


# ---- bare mpirun -----------------------------------------------------------------------------

# plm_rsh_agent: HOST COMMAND... run by sh in HOST's node namespace (options before HOST, as
# ssh's, are skipped); written into the root with the case lines of the nodes
LAUNCH = """#!/bin/sh
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
case $host in
{cases}
*) echo "launch: no node $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec sh -c "$1"' "$host" "$*" \\
  </dev/null
"""
LAUNCHER = "/opt/bench/launch"


class Bare:
    def __init__(self, work: Path, layout: Path, nodes: int, per_node: int) -> None:
        self.nodes, self.per_node = nodes, per_node
        self.root = work / "rootfs"
        subprocess.run(
            ["umoci", "raw", "unpack", "--image", f"{layout}:{mpi_image.TAG}", str(self.root)],
            check=True,
            capture_output=True,
        )
        self.network = RunNetwork(f"bench-mpi-bare-{uuid.uuid4()}")
        places = self.network.make(nodes)
        self.names = hosts(JOB, nodes)
        self.netns = [p.netns for p in places]
        etc_hosts = "127.0.0.1 localhost\n" + "".join(
            f"{p.address} {h}\n" for p, h in zip(places, self.names, strict=True)
        )
        (self.root / "etc" / "hosts").write_text(etc_hosts)
        (self.root / "run" / "netns").mkdir(parents=True, exist_ok=True)
        launcher = self.root / LAUNCHER.lstrip("/")
        launcher.parent.mkdir(parents=True, exist_ok=True)
        cases = "\n".join(
            f"{h}) ns={p.netns.name} ;;" for h, p in zip(self.names, places, strict=True)
        )
        launcher.write_text(LAUNCH.format(cases=cases))
        launcher.chmod(0o755)
        hostfile = "".join(f"{h} slots={per_node}\n" for h in self.names)
        (self.root / "opt" / "bench" / "hostfile").write_text(hostfile)

    def command(self) -> list[str]:
        r = shlex.quote(str(self.root))
        mpirun = (
            f"mpirun.openmpi --hostfile /opt/bench/hostfile -np {self.nodes * self.per_node} "
            f"--mca plm_rsh_agent {LAUNCHER} --mca plm_rsh_no_tree_spawn 1 "
            "--mca pml ob1 --mca btl self,tcp --mca btl_tcp_if_include eth0 "
            "--mca oob_tcp_if_include eth0 --allow-run-as-root -x HWLOC_COMPONENTS "
            f"sh -c {shlex.quote(RANK)}"
        )
        # in node 0's namespace (ip netns exec gives it a mount namespace of its own, which
        # keeps these mounts from this machine's): its hostname, the root a mount point (ip
        # netns exec in it makes / a slave), /proc, /dev, /sys and the nodes' namespaces
        inside = (
            f"hostname {self.names[0]} && mount --bind {r} {r} && "
            f"mount -t proc proc {r}/proc && mount --rbind /dev {r}/dev && "
            f"mount -t sysfs sysfs {r}/sys && mount --rbind /run/netns {r}/run/netns && "
            f"exec chroot {r} env -i PATH={PATH} HOME=/root HWLOC_COMPONENTS=-gl {mpirun}"
        )
        return ["ip", "netns", "exec", self.netns[0].name, "unshare", "--uts", "sh", "-c", inside]

    def run(self) -> Sample:
        cmd = self.command()
        t0 = time.time()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            log, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            self.kill_leftovers()
            raise RuntimeError(f"bare: mpirun ran past {TIMEOUT} s\n{log[-3000:]}") from None
        total = time.time() - t0
        if proc.returncode != 0:
            self.kill_leftovers()
            raise RuntimeError(f"bare: mpirun exited {proc.returncode}\n{log[-3000:]}")
        first = min(check(log, self.nodes, self.per_node, "bare")) - t0
        return Sample(first, total, first, total)

    def kill_leftovers(self) -> None:
        """End what the bare runs started that still runs in the root (a daemon of a run that
        failed): by pid, each process whose root directory is this one."""
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if os.readlink(proc / "root") == str(self.root):
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                continue

    def close(self) -> None:
        self.kill_leftovers()
        self.network.remove()


def mounted_under(path: Path) -> list[str]:
    """Mount points of this mount namespace at or below `path`."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == str(path) or point.startswith(f"{path}/"):
            found.append(point)
    return found


# ---- the table -------------------------------------------------------------------------------


def summary(samples: list[Sample], attr: str) -> tuple[float, float]:
    values = [getattr(s, attr) for s in samples]
    return statistics.median(values), min(values)


def report(squall: list[Sample], bare: list[Sample], nodes: int, per_node: int) -> None:
    print(
        f"Open MPI ring, {nodes} nodes x {per_node} ranks, {len(squall)} runs each interleaved "
        f"(after one warm-up run each), {os.cpu_count()} cores; seconds"
    )
    print(f"{'':26}{'Squall median':>15}{'min':>8}{'bare median':>13}{'min':>8}{'ratio':>8}")
    rows = (
        ("submit -> first rank", "first_rank"),
        ("submit -> done", "total"),
        ("leased -> first rank", "leased_first_rank"),
        ("leased -> job done", "leased_done"),
    )
    for label, attr in rows:
        sq_med, sq_min = summary(squall, attr)
        b_med, b_min = summary(bare, attr)
        print(
            f"{label:26}{sq_med:>15.2f}{sq_min:>8.2f}{b_med:>13.2f}{b_min:>8.2f}"
            f"{sq_med / b_med:>7.1f}x"
        )
    print("ratio: Squall's median over bare's (the goal: at most 1.5x in the first two rows)")
    print(
        "leased: Squall from the gang's lease (its nodes up, the image unpacked), bare from\n"
        "  mpirun's start, to the first rank's start or the job's end: the launch alone"
    )
    print("\nSquall's run, median seconds after engine.run was called (and the step before it):")
    before = 0.0
    for label, *_ in PHASES:
        at = [s.phases[label] for s in squall if label in s.phases]
        if at:
            median = statistics.median(at)
            print(f"  {label:34}{median:7.2f}  (+{median - before:.2f})")
            before = median


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5, help="runs of each side (after a warm-up)")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--per-node", type=int, default=2, help="ranks on each node")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("mpi_launch: run as root (separate nodes are network namespaces)", file=sys.stderr)
        return 1
    layout = mpi_image.build()
    work = Path(tempfile.mkdtemp(prefix="squall-bench-mpi-"))
    work.chmod(0o755)
    registry = bare = None
    squall_samples: list[Sample] = []
    bare_samples: list[Sample] = []
    try:
        (work / "registry").mkdir()
        registry = Registry(work / "registry")
        registry.push(layout, mpi_image.TAG, f"{mpi_image.NAME}:{mpi_image.TAG}")
        squall = Squall(work, registry.address, args.nodes, args.per_node)
        bare = Bare(work, layout, args.nodes, args.per_node)
        squall.run()  # warm-up
        bare.run()
        for rep in range(args.reps):
            sides: list[tuple[Callable[[], Sample], list[Sample]]] = [
                (squall.run, squall_samples),
                (bare.run, bare_samples),
            ]
            for run, samples in sides if rep % 2 == 0 else reversed(sides):
                samples.append(run())
    finally:
        if bare is not None:
            bare.close()
        if registry is not None:
            registry.stop()
        mounts = mounted_under(work)
        if mounts:  # never delete through a mount (the root's /dev is this machine's)
            print(f"mpi_launch: left {work}: mounts under it: {mounts}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(
            json.dumps(
                {
                    "squall": [vars(s) for s in squall_samples],
                    "bare": [vars(s) for s in bare_samples],
                },
                indent=2,
            )
        )
        return 0
    report(squall_samples, bare_samples, args.nodes, args.per_node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
