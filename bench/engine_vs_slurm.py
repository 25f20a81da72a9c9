"""The engine end to end on the local site, next to Slurm on the same machine, in one run.

Run as root:  .venv/bin/python bench/engine_vs_slurm.py [--tasks 1000,5000] [--wide 200]
              [--chain 50] [--slots 16] [--agents 1]

Workloads, each on both systems, with the same number of slots (concurrent tasks):
  array   a task array of `true` (each size in --tasks), submit -> every task done: tasks/s
  wide    a DAG of that many independent jobs of `true`: tasks/s (the per-task cost of a
          job against an array's task)
  chain   jobs each depending on the one before, submit -> last done: seconds per link

Squall: `squall run`'s engine in this process, a local cluster of --agents agents (default
one, as Slurm below has one slurmd) that lease each core to slots/(agents x cores) tasks at
once (`--oversubscribe`, as Slurm's OverSubscribe=FORCE below), every task `true` in a crun
container from an image served by a registry on 127.0.0.1, every state change committed to
SQLite with its event. Timed from submit to the run's end, and also for the RUNNING phase
alone (first task started to last task ended: provisioning, image pull and teardown excluded).

Slurm (Debian's slurm-wlm, installed and configured here in a scratch folder, as in the
project's runtime notes): slurmctld + slurmd on 127.0.0.1, tuned for throughput with
`SchedulerParameters=batch_sched_delay=0` and `OverSubscribe=FORCE:slots/2` on the partition;
`sbatch --array`, one `sbatch` per job of the wide DAG, and `--dependency=afterok` with
`--wrap=true` (bare `true`, no container). Timed from the first submit until squeue shows
none of the jobs pending or running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.local_site import LocalSettings, local_engine  # noqa: E402
from orchestrator.store import RunState  # noqa: E402
from tests.substrate.registry import Registry, build_busybox_image  # noqa: E402

# ---- Squall ----------------------------------------------------------------------------------


def array_fuzzfile(tasks: int) -> str:
    return (
        "version: v4\njobs:\n  t:\n    image: {uri: docker://busybox:1.36}\n"
        "    command: [/bin/true]\n"
        f"    task-array: {{start: 1, end: {tasks}}}\n"
    )


def wide_fuzzfile(jobs: int) -> str:
    lines = ["version: v4", "jobs:"]
    for i in range(jobs):
        lines += [f"  j{i}:", "    image: {uri: docker://busybox:1.36}", "    command: [/bin/true]"]
    return "\n".join(lines) + "\n"


def chain_fuzzfile(links: int) -> str:
    lines = ["version: v4", "jobs:"]
    for i in range(links):
        lines += [f"  j{i}:", "    image: {uri: docker://busybox:1.36}", "    command: [/bin/true]"]
        if i:
            lines.append(f"    depends-on: [{{name: j{i - 1}}}]")
    return "\n".join(lines) + "\n"


def squall(
    work: Path, registry: str, slots: int, agents: int, name: str, text: str
) -> dict[str, float]:
    cores = os.cpu_count() or 1
    settings = LocalSettings(
        data_dir=work / "squall",
        store_url="",
        search_registries=[registry],
        insecure_registries=[registry],
        nodes=agents,
        oversubscribe=max(1, -(-slots // (agents * cores))),  # ceil: at least `slots` in all
    )
    engine = local_engine(settings)
    t0 = time.perf_counter()
    outcome = engine.run(name, text)
    total = time.perf_counter() - t0
    assert outcome.state is RunState.FINISHED, outcome.reason
    from orchestrator.views import run_summary

    summary = run_summary(engine.store, outcome.run_id)
    starts = [j.started_at for j in summary.jobs if j.started_at is not None]
    ends = [j.finished_at for j in summary.jobs if j.finished_at is not None]
    running = (max(ends) - min(starts)).total_seconds()
    return {"total_s": total, "running_s": running}


# ---- Slurm -----------------------------------------------------------------------------------

SLURM_CONF = """ClusterName=squallbench
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={s}/munge-run/munge.socket
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd.pid
SlurmctldLogFile={s}/slurmctld.log
SlurmdLogFile={s}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MaxJobCount=20000
MaxArraySize=10001
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:{over}
"""


class Slurm:
    def __init__(self, work: Path, slots: int) -> None:
        if shutil.which("slurmctld") is None:
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "slurm-wlm"],
                check=True,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                stdout=subprocess.DEVNULL,
            )
        s = work / "slurm"
        for d in ("munge", "munge-run", "state", "spool", "jobs"):
            (s / d).mkdir(parents=True, exist_ok=True)
        shutil.chown(s / "munge", "munge", "munge")
        shutil.chown(s / "munge-run", "munge", "munge")
        (s / "munge").chmod(0o700)
        (s / "munge-run").chmod(0o755)
        s.chmod(0o755)
        work.chmod(0o755)
        key = s / "munge" / "munge.key"
        shutil.copy("/etc/munge/munge.key", key)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        cpus = os.cpu_count() or 2
        self.conf = s / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(s=s, cpus=cpus, over=max(1, slots // cpus)))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.jobs = s / "jobs"
        self.procs = [
            subprocess.Popen(
                [
                    "setpriv",
                    "--reuid=munge",
                    "--regid=munge",
                    "--init-groups",
                    "munged",
                    "--foreground",
                    f"--socket={s}/munge-run/munge.socket",
                    f"--key-file={key}",
                    f"--log-file={s}/munge/munged.log",
                    f"--pid-file={s}/munge-run/munged.pid",
                    f"--seed-file={s}/munge/munged.seed",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        ]
        time.sleep(1)
        for cmd in (
            ["slurmctld", "-D", "-f", str(self.conf)],
            ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)],
        ):
            self.procs.append(
                subprocess.Popen(
                    cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        deadline = time.time() + 60
        while "idle" not in self._out(["sinfo", "-h", "-o", "%T"]):
            if time.time() > deadline:
                raise RuntimeError(
                    "slurm did not come up: " + (s / "slurmctld.log").read_text()[-2000:]
                )
            time.sleep(0.5)

    def _out(self, cmd: list[str]) -> str:
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, cwd=self.jobs
        ).stdout

    def sbatch(self, *args: str) -> str:
        return self._out(["sbatch", "--parsable", "-o", "/dev/null", *args, "--wrap=true"]).strip()

    def wait_gone(self, ids: list[str]) -> None:
        while self._out(
            ["squeue", "-h", "-j", ",".join(ids), "-t", "PD,R,CG,CF", "-o", "%i"]
        ).strip():
            time.sleep(0.2)

    def array(self, tasks: int) -> float:
        t0 = time.perf_counter()
        self.wait_gone([self.sbatch(f"--array=1-{tasks}")])
        return time.perf_counter() - t0

    def wide(self, jobs: int) -> float:
        t0 = time.perf_counter()
        self.wait_gone([self.sbatch() for _ in range(jobs)])
        return time.perf_counter() - t0

    def chain(self, links: int) -> float:
        t0 = time.perf_counter()
        ids = [self.sbatch()]
        for _ in range(links - 1):
            ids.append(self.sbatch(f"--dependency=afterok:{ids[-1]}"))
        self.wait_gone(ids)
        return time.perf_counter() - t0

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="1000,5000", help="array sizes, comma-separated")
    p.add_argument("--wide", type=int, default=200, help="jobs of the wide DAG")
    p.add_argument("--chain", type=int, default=50)
    p.add_argument("--slots", type=int, default=16, help="concurrent tasks on each system")
    p.add_argument("--agents", type=int, default=1, help="Squall's agents (they share the slots)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sizes = [int(n) for n in args.tasks.split(",") if n]
    workloads = [
        *((f"array {n}", n, array_fuzzfile(n)) for n in sizes),
        (f"wide {args.wide}", args.wide, wide_fuzzfile(args.wide)),
        (f"chain {args.chain}", args.chain, chain_fuzzfile(args.chain)),
    ]
    work = Path(tempfile.mkdtemp(prefix="squall-bench-"))
    results: dict[str, dict[str, float]] = {}
    registry = None
    slurm = None
    try:
        layout = build_busybox_image(work / "image")
        registry = Registry(work / "image")
        registry.push(layout, "1.36", "busybox:1.36")
        for label, _, text in workloads:
            name = f"bench/{label.replace(' ', '-')}"
            r = squall(work, registry.address, args.slots, args.agents, name, text)
            results[label] = {"squall_s": r["total_s"], "squall_running_s": r["running_s"]}
        slurm = Slurm(work, args.slots)
        for label, n, _ in workloads:
            kind = label.split()[0]
            results[label]["slurm_s"] = {
                "array": slurm.array,
                "wide": slurm.wide,
                "chain": slurm.chain,
            }[kind](n)
    finally:
        if slurm is not None:
            slurm.stop()
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"{args.slots} slots, {os.cpu_count()} cores, {args.agents} Squall agent(s); "
        "Squall: submit -> done (RUNNING phase)"
    )
    print(f"{'':22}{'Squall':>22}{'Slurm':>10}{'ratio':>8}")
    for label, n, _ in workloads:
        r = results[label]
        if label.startswith("chain"):  # seconds per link: lower is better
            ours, run, theirs = r["squall_s"] / n, r["squall_running_s"] / n, r["slurm_s"] / n
            cell, ratio, unit = f"{ours:.3f} ({run:.3f})", theirs / ours, "s/link"
        else:
            ours, run, theirs = n / r["squall_s"], n / r["squall_running_s"], n / r["slurm_s"]
            cell, ratio, unit = f"{ours:.1f} ({run:.1f})", ours / theirs, "tasks/s"
        print(f"{label + ', ' + unit:22}{cell:>22}{theirs:>10.3g}{ratio:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
