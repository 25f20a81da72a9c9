"""Agent launch latency and port-forward throughput, next to their peers, in one run.

Run as root: .venv/bin/python bench/substrate_agent.py [--launches 200] [--mib 256]

Launch: one `/bin/true`, from request to exit, p50 and p99, for
  subprocess          subprocess.run(["/bin/true"]) on the host
  crun run            a bare `crun run` of a prepared bundle of the same image
  agent Run+Wait      the agent's Run RPC and a Wait for the end (crun runtime: overlay root,
                      cgroup, pod network namespace, crun, cleanup), over gRPC on loopback
Both crun rows run the same confined config (user namespace, seccomp compiled once,
capabilities); the bare one has no network namespace of the pod network and no cgroup.
Port-forward: bytes from a TCP server on 127.0.0.1 to this process,
  direct TCP          a plain socket copy over loopback
  agent PortForward   the same bytes through the agent's PortForward stream
"""

from __future__ import annotations

import argparse
import json
import os
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
from substrate.agent import Agent, AgentConfig  # noqa: E402
from substrate.client import connect  # noqa: E402
from substrate.inventory import read_inventory  # noqa: E402
from substrate.runtimes import available  # noqa: E402
from substrate.runtimes.crun import CrunRuntime, oci_config  # noqa: E402
from substrate.runtimes.rootfs import mount_overlay, unmount_overlay  # noqa: E402
from substrate.server import create_server  # noqa: E402
from tests.substrate.registry import Registry, build_busybox_image  # noqa: E402


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


def bench_launch(stub, lease_id: str, image, work: Path, n: int, userns) -> None:
    print(f"launch of /bin/true, {n} times each")
    print(f"  {'subprocess':20} {percentiles(timed(lambda: subprocess.run(['/bin/true']), n))}")

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

    def bare_crun() -> None:
        cid = f"bench-{next(counter)}"
        subprocess.run(crun._crun("run", "--bundle", str(task_dir), cid), check=True)

    try:
        print(f"  {'crun run':20} {percentiles(timed(bare_crun, n))}")
    finally:
        unmount_overlay(task_dir, at)
        crun.remove_roots()

    def agent_run() -> None:
        task = stub.Run(
            pb.RunRequest(
                lease_id=lease_id,
                name="true",
                runtime="crun",
                image="docker://busybox:1.36",
                command=["/bin/true"],
            )
        )
        status = stub.Wait(pb.WaitRequest(task_id=task.task_id))
        assert status.exit_code == 0, status

    print(f"  {'agent Run+Wait':20} {percentiles(timed(agent_run, n))}")


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
    config = AgentConfig(
        data_dir=work / "agent",
        token="bench",
        search_registries=(registry.address,),
        insecure_registries=(registry.address,),
    )
    agent = Agent(config, read_inventory(), available(config.data_dir, config.userns, weak=True))
    agent.start()
    server, port = create_server(agent)
    channel, stub = connect(f"127.0.0.1:{port}", "bench")
    try:
        lease = stub.AcquireLease(pb.AcquireLeaseRequest(holder="bench", cores=1, ttl_seconds=3600))
        image = agent.images.get("docker://busybox:1.36")
        bench_launch(stub, lease.id, image, work, args.launches, config.userns)
        anchor = stub.Run(
            pb.RunRequest(lease_id=lease.id, runtime="process", command=["sleep", "600"])
        ).task_id
        bench_port_forward(stub, anchor, args.mib)
    finally:
        channel.close()
        server.stop(None)
        agent.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
