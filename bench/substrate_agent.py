"""Agent launch latency and port-forward throughput, next to their peers, in one run.

Run as root: .venv/bin/python bench/substrate_agent.py [--launches 200] [--mib 1024]

Launch: one `/bin/true`, from request to exit, p50 and p99, and the CPU each launch costs
(user and system time of the processes that did the work, the containers included), for
  subprocess          subprocess.run(["/bin/true"]) on the host
  crun run            a bare `crun run` of a prepared bundle of the same image
  agent Run+Wait      the agent's Run RPC and a Wait for the end (crun runtime: overlay root,
                      cgroup, pod network namespace, crun, cleanup), over gRPC on loopback
  agent task          what the engine asks per task: AcquireLease, Run (the agent releases
                      the lease as the task ends), Wait (the output comes in its reply)
Both crun rows run the same confined config (user namespace, seccomp compiled once,
capabilities); the bare one has no network namespace of the pod network and no cgroup.
The agent runs in a process of its own (`python -m substrate`); its CPU is read from
/proc/PID/stat (its own time and that of the children it reaped: crun and the containers),
the peers' from getrusage of this process's children. `machine` is every CPU's busy time
over the row (/proc/stat) per launch: it includes kernel work done outside those processes
(such as destroying network namespaces) and whatever else runs on the machine.
Port-forward: bytes from a TCP server on 127.0.0.1 (a process of its own) to this process,
  direct TCP          a plain socket copy over loopback
  agent PortForward   the same bytes through the agent's PortForward stream (the agent in
                      its own process connects to the server; this process reads the stream
                      with substrate.client.port_forward)
  gRPC stream alone   the agent's messages (a full chunk each, serialized once) from a bare gRPC
                      server in a process of its own that reads no socket: what the gRPC
                      library carries between two Python processes, the bound of the row above
`CPUs busy` is every CPU's busy time over a row's runs divided by their wall time: near the
machine's CPU count, the row was bound by CPU (its own processes' or other work's).
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
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.substrate.v1 import agent_pb2 as pb  # noqa: E402
from substrate.agent import USERNS_BASE  # noqa: E402
from substrate.client import connect, keep_freed_memory, port_forward  # noqa: E402
from substrate.confine import UserNamespace  # noqa: E402
from substrate.images import ImageCache  # noqa: E402
from substrate.runtimes.crun import UNIFIED, CrunRuntime, hybrid_cgroups, oci_config  # noqa: E402
from substrate.runtimes.rootfs import mount_overlay, unmount_overlay  # noqa: E402
from substrate.wire import field_bytes  # noqa: E402
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
        run = pb.RunRequest(
            lease_id=lease,
            name="true",
            runtime="crun",
            image=IMAGE,
            command=["/bin/true"],
            release_lease_at_end=True,
        )
        task_id = stub.Run(run).task_id
        status = stub.Wait(pb.WaitRequest(task_id=task_id, output_limit=64 * 1024))
        assert status.exit_code == 0, status
        assert status.lease_released, status
        assert status.output_included, status

    agent_cpu = functools.partial(process_cpu, agent_pid)
    row("agent Run+Wait", lambda: run_and_wait(lease_id), n, agent_cpu)
    row("agent task", engine_task, n, agent_cpu)


SERVE = """
import os, socket, sys
total = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
chunk = os.urandom(1 << 20)
while True:
    conn, _ = listener.accept()
    with conn:
        for _ in range(total // len(chunk)):
            conn.sendall(chunk)
"""

# a gRPC server of the agent's messages that reads nothing: what the library alone carries
GRPC_SERVE = """
import os, sys
from concurrent import futures
import grpc
sys.path.insert(0, sys.argv[2])
from substrate.wire import CHUNK, Framer

def fill(room):
    room[:] = os.urandom(len(room))
    return len(room)

message = Framer(1).read(fill)  # PortForwardOutput(data=a chunk), as the agent sends it
total = int(sys.argv[1])

def stream(request, context):
    for _ in range(total // CHUNK):
        yield message

handlers = {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bytes", handlers),))
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""


def start(script: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    """Run `script` in a Python process of its own; it prints its port first."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def bench_port_forward(channel, agent_pid: int, task_id: str, mib: int) -> None:
    """The same bytes from a TCP server (a process of its own) read directly and through the
    agent, and the agent's messages from a bare gRPC server, in turn, best of 3 each; with
    the CPU each process spent per GiB over the 3 (user and system), and how many of the
    machine's CPUs were busy over them (every process counted, other work too)."""
    total = mib << 20
    server, port = start(SERVE, str(total))
    grpc_server, grpc_port = start(GRPC_SERVE, str(total), str(ROOT))
    keep_freed_memory()  # as the agent and the control plane do
    print(f"port-forward: {mib} MiB from a TCP server on loopback, to this process")

    def direct() -> None:
        got = 0
        room = memoryview(bytearray(1 << 20))
        with socket.create_connection(("127.0.0.1", port)) as conn:
            while n := conn.recv_into(room):
                got += n
        assert got == total, got

    def forwarded() -> None:
        def requests():
            yield pb.PortForwardInput(start=pb.PortForwardStart(task_id=task_id, port=port))

        got = 0
        for data in port_forward(channel, requests()):
            got += len(data)
        assert got == total, got

    def bare_grpc() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as bare:
            call = bare.unary_stream(
                "/bench.Bytes/Stream", response_deserializer=lambda m: field_bytes(m, 1)
            )
            got = sum(len(data) for data in call(b""))
        assert got == total, got

    rows = {  # the row, and the processes that do its work: reader, agent, server
        "direct TCP": (direct, (os.getpid(), None, server.pid)),
        "agent PortForward": (forwarded, (os.getpid(), agent_pid, server.pid)),
        "gRPC stream alone": (bare_grpc, (os.getpid(), None, grpc_server.pid)),
    }
    times: dict[str, list[float]] = {label: [] for label in rows}
    cpu: dict[str, list[float]] = {label: [0.0, 0.0, 0.0] for label in rows}
    busy = dict.fromkeys(rows, 0.0)

    def spent(pids) -> list[float]:
        return [sum(process_cpu(pid)) if pid else 0.0 for pid in pids]

    try:
        for _ in range(3):
            for label, (fn, pids) in rows.items():
                before, machine = spent(pids), machine_busy()
                times[label] += timed(fn, 1)
                busy[label] += machine_busy() - machine
                cpu[label] = [
                    c + b - a for c, a, b in zip(cpu[label], before, spent(pids), strict=True)
                ]
    finally:
        for proc in (server, grpc_server):
            proc.kill()
            proc.wait()
    gib = 3 * mib / 1024
    rates = {label: mib / min(t) for label, t in times.items()}
    header = f"CPU s/GiB: reader  agent  server   CPUs busy of {os.cpu_count()}"
    print(f"  {'':20} {'MiB/s':>8} {'best of 3':>10}   {header}")
    for label, rate in rates.items():
        reader, agent, source = (f"{c / gib:6.2f}" if c else "     -" for c in cpu[label])
        cores = busy[label] / sum(times[label])
        print(
            f"  {label:20} {rate:8.0f} {min(times[label]):9.2f}s {'':13}{reader} {agent} {source}"
            f"   {cores:8.2f}"
        )
    print(f"  PortForward / direct {rates['agent PortForward'] / rates['direct TCP']:8.0%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", type=int, default=200)
    parser.add_argument("--mib", type=int, default=1024)
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
        bench_port_forward(channel, agent.pid, anchor, args.mib)
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
