"""Agent launch latency and port-forward throughput, next to their peers, in one run.

Run as root: .venv/bin/python bench/substrate_agent.py [--launches 200] [--mib 256]

Launch: one `/bin/true`, from request to exit, p50 and p99, and the CPU each launch costs
(user and system time of the processes that did the work, the containers included), for
  subprocess          subprocess.run(["/bin/true"]) on the host
  crun run            a bare `crun run` of a prepared bundle of the same image
  agent Run+Wait      the agent's Run RPC and a Wait for the end (crun runtime: overlay root,
                      cgroup, pod network namespace, crun, cleanup), over gRPC on loopback
  agent task          what the engine asks per task: AcquireLease, Run, Wait, Logs,
                      ReleaseLease
Both crun rows run the same confined config (user namespace, seccomp compiled once,
capabilities); the bare one has no network namespace of the pod network and no cgroup.
The agent runs in a process of its own (`python -m substrate`); its CPU is read from
/proc/PID/stat (its own time and that of the children it reaped: crun and the containers),
the peers' from getrusage of this process's children. `machine` is every CPU's busy time
over the row (/proc/stat) per launch: it includes kernel work done outside those processes
(such as destroying network namespaces) and whatever else runs on the machine.
Port-forward: bytes from a TCP server on 127.0.0.1 to this process,
  direct TCP          a plain socket copy over loopback
  agent PortForward   the same bytes through the agent's PortForward stream
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.substrate.v1 import agent_pb2 as pb  # noqa: E402
from substrate.agent import USERNS_BASE  # noqa: E402
from substrate.client import connect  # noqa: E402
from substrate.confine import UserNamespace  # noqa: E402
from substrate.images import ImageCache  # noqa: E402
from substrate.runtimes.crun import UNIFIED, CrunRuntime, hybrid_cgroups, oci_config  # noqa: E402
from substrate.runtimes.rootfs import mount_overlay, unmount_overlay  # noqa: E402
from tests.substrate.registry import Registry, build_busybox_image  # noqa: E402

IMAGE = "docker://busybox:1.36"
TICK = os.sysconf("SC_CLK_TCK")


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {p50:7.2f} ms   p99 {p99:7.2f} ms"


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def own_children_cpu() -> tuple[float, float]:
    """User and system seconds of this process's reaped children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def process_cpu(pid: int) -> tuple[float, float]:
    """User and system seconds of process `pid` and of the children it reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + cutime) / TICK, (stime + cstime) / TICK


def machine_busy() -> float:
    """Seconds every CPU of the machine spent busy since boot."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICK  # less idle and iowait


def row(label: str, fn, n: int, cpu) -> None:
    """Time `fn` `n` times; print its latency and its CPU per launch (`cpu` reads it)."""
    user0, sys0 = cpu()
    busy0 = machine_busy()
    samples = timed(fn, n)
    user1, sys1 = cpu()
    busy = (machine_busy() - busy0) / n * 1000
    user, system = (user1 - user0) / n * 1000, (sys1 - sys0) / n * 1000
    print(
        f"  {label:20} {percentiles(samples)}   CPU user {user:5.1f} ms  sys {system:5.1f} ms"
        f"   machine {busy:5.1f} ms"
    )


def bench_launch(stub, agent_pid: int, lease_id: str, image, work: Path, n: int, userns) -> None:
    print(f"launch of /bin/true, {n} times each (CPU per launch)")
    row("subprocess", lambda: subprocess.run(["/bin/true"]), n, own_children_cpu)

    # a bare crun bundle of the same image, prepared once (as a peer would have it)
    at = Path("/run/squall/roots/bench/bare")  # reachable from the user namespace
    crun = CrunRuntime(work / "crun-state", userns, at.parent)
    task_dir = work / "bare"
    task_dir.mkdir()
    root = mount_overlay(image.rootfs, task_dir, userns.root, at)
    from substrate.runtimes.base import TaskSpec

    spec = TaskSpec(name="bare", runtime="crun", command=("/bin/true",))
    config = oci_config(spec, image, root, "/", userns, crun.seccomp)
    config["annotations"] = {"run.oci.seccomp_bpf_data": crun.seccomp_bpf}  # as the agent
    (task_dir / "config.json").write_text(json.dumps(config))
    counter = iter(range(10**9))
    # as a peer runs it: the installed crun, in a mount namespace of its own per start where
    # the host has hybrid cgroups (which crun refuses)
    hide = f'mount -t tmpfs -o size=4k squall-hide {UNIFIED} && exec "$@"'
    prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", hide, "sh"]
    crun_argv = [
        *(prefix if hybrid_cgroups() else []),
        *("crun", "--root", str(work / "crun-state"), "--cgroup-manager=disabled"),
    ]

    def bare_crun() -> None:
        cid = f"bench-{next(counter)}"
        subprocess.run([*crun_argv, "run", "--bundle", str(task_dir), cid], check=True)

    try:
        row("crun run", bare_crun, n, own_children_cpu)
    finally:
        unmount_overlay(task_dir, at)
        crun.remove_roots()

    def run_and_wait(lease: str) -> str:
        request = pb.RunRequest(
            lease_id=lease, name="true", runtime="crun", image=IMAGE, command=["/bin/true"]
        )
        task_id: str = stub.Run(request).task_id
        status = stub.Wait(pb.WaitRequest(task_id=task_id))
        assert status.exit_code == 0, status
        return task_id

    def engine_task() -> None:
        request = pb.AcquireLeaseRequest(holder="bench", cores=1, ttl_seconds=60)
        lease = stub.AcquireLease(request).id
        task_id = run_and_wait(lease)
        for _ in stub.Logs(pb.LogsRequest(task_id=task_id)):
            pass
        stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease))

    agent_cpu = functools.partial(process_cpu, agent_pid)
    row("agent Run+Wait", lambda: run_and_wait(lease_id), n, agent_cpu)
    row("agent task", engine_task, n, agent_cpu)


def serve_bytes(total: int) -> int:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    chunk = os.urandom(1 << 20)

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                sent = 0
                while sent < total:
                    conn.sendall(chunk)
                    sent += len(chunk)

    threading.Thread(target=serve, daemon=True).start()
    return port


def bench_port_forward(stub, task_id: str, mib: int) -> None:
    total = mib << 20
    port = serve_bytes(total)
    print(f"port-forward: {mib} MiB from a TCP server on loopback")

    def direct() -> None:
        got = 0
        with socket.create_connection(("127.0.0.1", port)) as conn:
            while got < total:
                got += len(conn.recv(1 << 20))

    def forwarded() -> None:
        def requests():
            yield pb.PortForwardInput(start=pb.PortForwardStart(task_id=task_id, port=port))

        got = 0
        for msg in stub.PortForward(requests()):
            got += len(msg.data)
            if got >= total:
                break

    for label, fn in (("direct TCP", direct), ("agent PortForward", forwarded)):
        best = min(timed(fn, 3))
        print(f"  {label:20} {mib / best:8.0f} MiB/s  (best of 3: {best:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", type=int, default=200)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("crun"):
        sys.exit("run as root with crun installed (scripts/setup.sh --test installs it)")
    work = Path(tempfile.mkdtemp(prefix="squall-bench-"))
    registry = Registry(work)
    registry.push(build_busybox_image(work / "image"), "1.36", "busybox:1.36")
    (work / "token").write_text("bench")
    agent_log = open(work / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen(
        [
            *(sys.executable, "-m", "substrate"),
            *("--listen", "127.0.0.1:0", "--data-dir", str(work / "agent")),
            *("--token-file", str(work / "token"), "--weak-runtimes"),
            *("--search-registry", registry.address, "--insecure-registry", registry.address),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=agent_log,
        text=True,
    )
    channel = None
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline()
        if not line.startswith("listening on "):
            sys.exit(f"the agent did not start: {(work / 'agent.log').read_text()}")
        channel, stub = connect(line.split()[-1], "bench")
        for _ in stub.PullImage(pb.PullImageRequest(reference=IMAGE)):
            pass
        userns = UserNamespace(USERNS_BASE)
        search = (registry.address,)
        image = ImageCache(work / "images", search, search, userns=userns).get(IMAGE)
        lease = stub.AcquireLease(pb.AcquireLeaseRequest(holder="bench", cores=1, ttl_seconds=3600))
        bench_launch(stub, agent.pid, lease.id, image, work, args.launches, userns)
        anchor = stub.Run(
            pb.RunRequest(lease_id=lease.id, runtime="process", command=["sleep", "600"])
        ).task_id
        bench_port_forward(stub, anchor, args.mib)
    finally:
        if channel is not None:
            channel.close()
        agent.terminate()
        agent.wait(timeout=60)
        agent_log.close()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
