"""The agent's API end to end: a real gRPC server on loopback, real processes.

These use the `process` runtime (the command runs on the host, pinned to the leased CPUs);
OCI containers are covered by the runtime tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.substrate.v1 import agent_pb2 as pb
from substrate.client import connect
from tests.substrate.conftest import TOKEN, Running, code_of
from tests.substrate.registry import Registry


def test_health_and_inventory(agent: Running) -> None:
    health = agent.stub.Health(pb.HealthRequest())
    assert health.status == "ok"
    assert health.agent_version
    inv = agent.stub.Inventory(pb.InventoryRequest())
    assert len(inv.cpus) == os.cpu_count()
    assert inv.memory_bytes > 2**30
    assert "process" in inv.runtimes


def test_calls_without_the_right_token_are_refused(agent: Running) -> None:
    for token in ("wrong", ""):
        channel, stub = connect(agent.address, token)
        assert code_of(lambda stub=stub: stub.Health(pb.HealthRequest())) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert code_of(lambda stub=stub: list(stub.Logs(pb.LogsRequest(task_id="x")))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        channel.close()
    bare = grpc.insecure_channel(agent.address)
    from api.substrate.v1 import agent_pb2_grpc as rpc

    assert code_of(lambda: rpc.AgentStub(bare).ListLeases(pb.ListLeasesRequest())) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    bare.close()


def test_exit_code_env_cwd_and_logs(agent: Running, tmp_path: Path) -> None:
    task = agent.run(
        ["/bin/sh", "-c", 'echo "out $GREETING $(pwd)"; echo err >&2; exit 3'],
        env={"GREETING": "hello"},
        cwd=str(tmp_path),
    )
    status = agent.wait(task)
    assert status.state == pb.TASK_STATE_EXITED
    assert status.exit_code == 3
    chunks = agent.logs(task)
    out = b"".join(c.data for c in chunks if c.stream == pb.STREAM_STDOUT)
    err = b"".join(c.data for c in chunks if c.stream == pb.STREAM_STDERR)
    assert out == f"out hello {tmp_path}\n".encode()
    assert err == b"err\n"
    assert all(c.timestamp_ns > 0 for c in chunks)


def test_only_leased_cpus_are_visible(agent: Running) -> None:
    lease = agent.lease(cores=1)
    task = agent.run(["nproc"], lease=lease)
    assert agent.wait(task).exit_code == 0
    assert b"".join(c.data for c in agent.logs(task)).strip() == b"1"


def test_the_agents_environment_does_not_leak(agent: Running, monkeypatch) -> None:
    monkeypatch.setenv("SQUALL_AGENT_TOKEN", "secret-value")
    task = agent.run(["/usr/bin/env"])
    agent.wait(task)
    assert b"secret-value" not in b"".join(c.data for c in agent.logs(task))


def test_timeout_cancel_and_signal_are_told_apart(agent: Running) -> None:
    timed = agent.run(["sleep", "30"], timeout_seconds=0.5)
    cancelled = agent.run(["sleep", "30"])
    signalled = agent.run(["sleep", "30"])
    agent.stub.Signal(pb.SignalRequest(task_id=signalled, signal=signal.SIGKILL))
    status = agent.stub.Cancel(pb.CancelRequest(task_id=cancelled, grace_seconds=2))
    assert status.state == pb.TASK_STATE_CANCELLED
    assert agent.wait(timed).state == pb.TASK_STATE_TIMED_OUT
    killed = agent.wait(signalled)
    assert killed.state == pb.TASK_STATE_EXITED
    assert killed.signal == signal.SIGKILL
    assert killed.exit_code == 128 + signal.SIGKILL


def test_cancel_reaches_children_of_the_task(agent: Running, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    task = agent.run(["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"])
    deadline = time.time() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.time() < deadline
        time.sleep(0.05)
    child = int(pidfile.read_text())
    agent.stub.Cancel(pb.CancelRequest(task_id=task, grace_seconds=2))
    time.sleep(0.2)
    assert (
        not Path(f"/proc/{child}").exists()
        or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    )


def test_logs_follow_a_running_task_live(agent: Running) -> None:
    task = agent.run(["/bin/sh", "-c", "echo first; sleep 2; echo second"])
    stream = agent.stub.Logs(pb.LogsRequest(task_id=task, follow=True))
    first = next(stream)
    assert first.data == b"first\n"
    assert agent.stub.Status(pb.StatusRequest(task_id=task)).state == pb.TASK_STATE_RUNNING
    assert [c.data for c in stream] == [b"second\n"]  # the stream ends when the task does


def test_logs_tail(agent: Running) -> None:
    task = agent.run(["/bin/sh", "-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.01; done"])
    agent.wait(task)
    whole = agent.logs(task)
    assert b"".join(c.data for c in whole) == b"1\n2\n3\n4\n5\n"
    # the last two records (writes the agent read: one line each, unless a busy machine
    # let two lines meet in the pipe before the agent read them)
    assert agent.logs(task, tail=2) == whole[-2:]
    assert len(whole) >= 2


def test_an_expired_lease_stops_its_tasks(agent: Running) -> None:
    lease = agent.lease(ttl=1)
    task = agent.run(["sleep", "60"], lease=lease)
    status = agent.wait(task, timeout=15)
    assert status.state == pb.TASK_STATE_CANCELLED
    assert "expired" in status.message
    assert code_of(lambda: agent.stub.RenewLease(pb.RenewLeaseRequest(lease_id=lease.id))) == (
        grpc.StatusCode.NOT_FOUND
    )


def test_renewing_keeps_the_lease(agent: Running) -> None:
    lease = agent.lease(ttl=1)
    task = agent.run(["sleep", "2"], lease=lease)
    for _ in range(5):
        time.sleep(0.5)
        agent.stub.RenewLease(pb.RenewLeaseRequest(lease_id=lease.id))
    assert agent.wait(task).state == pb.TASK_STATE_EXITED


def test_release_stops_running_tasks(agent: Running) -> None:
    lease = agent.lease()
    task = agent.run(["sleep", "60"], lease=lease)
    reply = agent.stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease.id))
    assert list(reply.stopped_tasks) == [task]
    assert agent.wait(task).state == pb.TASK_STATE_CANCELLED
    assert agent.stub.ListLeases(pb.ListLeasesRequest()).leases == []


def test_errors_have_precise_codes(agent: Running) -> None:
    stub = agent.stub
    too_big = pb.AcquireLeaseRequest(holder="t", cores=1000)
    assert code_of(lambda: stub.AcquireLease(too_big)) == grpc.StatusCode.FAILED_PRECONDITION
    no_cores = pb.AcquireLeaseRequest(holder="t", cores=0)
    assert code_of(lambda: stub.AcquireLease(no_cores)) == grpc.StatusCode.INVALID_ARGUMENT
    run = pb.RunRequest(lease_id="nope", command=["true"], runtime="process")
    assert code_of(lambda: stub.Run(run)) == grpc.StatusCode.NOT_FOUND
    assert (
        code_of(lambda: stub.Status(pb.StatusRequest(task_id="nope"))) == grpc.StatusCode.NOT_FOUND
    )
    lease = agent.lease()
    with_image = pb.RunRequest(
        lease_id=lease.id, command=["true"], runtime="process", image="docker://busybox"
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Run(with_image)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "use an OCI runtime" in info.value.details()
    no_runtime = pb.RunRequest(lease_id=lease.id, command=["true"])
    assert code_of(lambda: stub.Run(no_runtime)) == grpc.StatusCode.FAILED_PRECONDITION
    missing = pb.RunRequest(lease_id=lease.id, command=["/no/such/program"], runtime="process")
    with pytest.raises(grpc.RpcError) as info:
        stub.Run(missing)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no program '/no/such/program'" in info.value.details()


def _exec(
    agent: Running,
    task: str,
    command: list[str],
    stdin: bytes = b"",
    tty: bool = False,
    resize: tuple[int, int] | None = None,
) -> tuple[bytes, bytes, int]:
    def requests():
        yield pb.ExecInput(
            start=pb.ExecStart(
                task_id=task, command=command, tty=tty, size=pb.TerminalSize(rows=24, columns=80)
            )
        )
        if resize:
            yield pb.ExecInput(resize=pb.TerminalSize(rows=resize[0], columns=resize[1]))
        if stdin:
            yield pb.ExecInput(stdin=stdin)
        yield pb.ExecInput(close_stdin=True)

    out, err, code = b"", b"", None
    for msg in agent.stub.Exec(requests()):
        kind = msg.WhichOneof("output")
        if kind == "stdout":
            out += msg.stdout
        elif kind == "stderr":
            err += msg.stderr
        else:
            code = msg.exit_code
    assert code is not None
    return out, err, code


def test_exec_without_a_terminal(agent: Running) -> None:
    task = agent.run(["sleep", "30"])
    out, err, code = _exec(
        agent, task, ["/bin/sh", "-c", "echo hi; cat; echo oops >&2; exit 4"], stdin=b"abc\n"
    )
    assert (out, err, code) == (b"hi\nabc\n", b"oops\n", 4)


def test_exec_with_a_terminal(agent: Running) -> None:
    task = agent.run(["sleep", "30"])
    out, _, code = _exec(agent, task, ["/bin/sh", "-c", "tty; stty size"], tty=True)
    assert code == 0
    lines = out.decode().split()
    assert lines[0].startswith("/dev/pts/")
    assert lines[1:] == ["24", "80"]


def test_exec_into_an_ended_task_is_refused(agent: Running) -> None:
    task = agent.run(["true"])
    agent.wait(task)
    with pytest.raises(grpc.RpcError) as info:
        _exec(agent, task, ["true"])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_port_forward_returns_the_page_byte_for_byte(agent: Running, tmp_path: Path) -> None:
    page = os.urandom(300_000)
    (tmp_path / "page.bin").write_bytes(page)
    port = _free_port()
    task = agent.run(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=str(tmp_path)
    )
    deadline = time.time() + 15
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            break
        except OSError:
            assert time.time() < deadline
            time.sleep(0.1)

    def requests():
        yield pb.PortForwardInput(start=pb.PortForwardStart(task_id=task, port=port))
        yield pb.PortForwardInput(data=b"GET /page.bin HTTP/1.0\r\nHost: x\r\n\r\n")

    response = b"".join(m.data for m in agent.stub.PortForward(requests()))
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert body == page


def test_port_forward_to_a_closed_port(agent: Running) -> None:
    task = agent.run(["sleep", "30"])

    def requests():
        yield pb.PortForwardInput(start=pb.PortForwardStart(task_id=task, port=_free_port()))

    assert code_of(lambda: list(agent.stub.PortForward(requests()))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )


def test_a_restarted_agent_leaves_no_stray_processes(tmp_path: Path, registry: Registry) -> None:
    data = tmp_path / "agent"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    cmd = [
        sys.executable,
        "-m",
        "substrate",
        "--data-dir",
        str(data),
        "--token-file",
        str(token_file),
        "--search-registry",
        registry.address,
        "--insecure-registry",
        registry.address,
        "--weak-runtimes",
    ]

    def start() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        return proc, line.split()[-1]

    first, address = start()
    channel, stub = connect(address, TOKEN)
    lease = stub.AcquireLease(pb.AcquireLeaseRequest(holder="t", cores=1, ttl_seconds=300))
    task = stub.Run(pb.RunRequest(lease_id=lease.id, command=["sleep", "300"], runtime="process"))
    pid = stub.Status(pb.StatusRequest(task_id=task.task_id)).pid
    box = stub.Run(
        pb.RunRequest(
            lease_id=lease.id,
            command=["sleep", "301"],
            runtime="bwrap",
            image="docker://busybox:1.36",
        )
    )
    box_pid = stub.Status(pb.StatusRequest(task_id=box.task_id)).pid
    rootfs = data / "tasks" / box.task_id / "rootfs"
    assert os.path.ismount(rootfs)
    channel.close()
    first.kill()  # SIGKILL: the agent gets no chance to clean up
    first.wait()
    assert Path(f"/proc/{pid}").exists()  # the task outlived its agent...
    second, _ = start()
    try:
        deadline = time.time() + 10
        while _state(pid) not in ("gone", "Z") or _sleepers("301"):
            assert time.time() < deadline, "the new agent did not reap the old tasks"
            time.sleep(0.05)
        assert _state(box_pid) in ("gone", "Z")
        assert not os.path.ismount(rootfs)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=10)
        for proc in (first, second):
            assert proc.stdout is not None
            proc.stdout.close()


def _sleepers(arg: str) -> list[int]:
    """Live processes running `sleep ARG` (a container's process has no other trace here)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if stat.read_bytes().split(b"\0")[:2] == [b"sleep", arg.encode()]:
                pid = int(stat.parent.name)
                if _state(pid) not in ("gone", "Z"):
                    found.append(pid)
        except OSError:
            continue
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_tasks_see_only_their_leased_gpus(tmp_path: Path) -> None:
    """A node with two (synthetic) NVIDIA GPUs: each lease's tasks are told only theirs.
    No GPU is present on the test machine, so only the environment is checked here."""
    from dataclasses import replace

    from substrate.agent import Agent, AgentConfig
    from substrate.inventory import Gpu, read_inventory
    from substrate.leases import LeaseSpec
    from substrate.runtimes import available
    from substrate.runtimes.base import TaskSpec

    inventory = replace(
        read_inventory(),
        gpus=(Gpu(0, "nvidia", "NVIDIA H100", 80 << 30), Gpu(1, "nvidia", "NVIDIA H100", 80 << 30)),
    )
    config = AgentConfig(data_dir=tmp_path / "agent", token=TOKEN)
    agent = Agent(config, inventory, available(config.data_dir, config.userns, weak=True))
    agent.start()
    try:

        def visible(lease_id: str) -> bytes:
            spec = TaskSpec(
                name="t",
                runtime="process",
                command=("/bin/sh", "-c", "echo $CUDA_VISIBLE_DEVICES/$NVIDIA_VISIBLE_DEVICES"),
                env={"CUDA_VISIBLE_DEVICES": "0,1"},
            )  # the job cannot widen it
            task = agent.run(spec, lease_id)
            task.done.wait(10)
            return b"".join(r.data for r in agent.logs.read(task.id)).strip()

        first = agent.acquire(LeaseSpec("a", devices={"nvidia.com/gpu": 1}))
        second = agent.acquire(LeaseSpec("b", devices={"nvidia.com/gpu": 1}))
        seen = [visible(first.id), visible(second.id)]
        agent.release(first.id)
        seen.append(visible(agent.acquire(LeaseSpec("c")).id))
        assert seen == [b"0/0", b"1/1", b"/void"]
    finally:
        agent.stop()


def test_exec_terminal_resize(agent: Running) -> None:
    task = agent.run(["sleep", "30"])
    out, _, code = _exec(
        agent, task, ["/bin/sh", "-c", "sleep 0.5; stty size"], tty=True, resize=(40, 132)
    )
    assert code == 0
    assert out.split() == [b"40", b"132"]


def test_a_lease_with_no_room_now_is_resource_exhausted(agent: Running) -> None:
    if agent.stub.ListLeases(pb.ListLeasesRequest()).leases:  # another test's: no room now
        assert code_of(lambda: agent.lease(exclusive=True)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        return
    held = agent.lease(exclusive=True)
    try:
        assert code_of(lambda: agent.lease()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        agent.stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=held.id))


def test_a_lease_released_at_its_last_tasks_end(agent: Running) -> None:
    """With release_lease_at_end the agent releases the lease as its last running task ends,
    before Wait answers; an earlier task's end leaves it to the task still running."""
    lease = agent.lease()
    long = agent.run(["sleep", "1"], lease=lease, release_lease_at_end=True)
    short = agent.run(["true"], lease=lease, release_lease_at_end=True)
    first = agent.wait(short)
    assert first.state == pb.TASK_STATE_EXITED
    assert not first.lease_released
    assert [x.id for x in agent.stub.ListLeases(pb.ListLeasesRequest()).leases] == [lease.id]
    last = agent.wait(long)
    assert last.lease_released
    assert not agent.stub.ListLeases(pb.ListLeasesRequest()).leases
    assert code_of(lambda: agent.stub.RenewLease(pb.RenewLeaseRequest(lease_id=lease.id))) == (
        grpc.StatusCode.NOT_FOUND
    )
    # a ReleaseLease that comes after finds nothing to release: as for any released lease
    assert code_of(lambda: agent.stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease.id))) == (
        grpc.StatusCode.NOT_FOUND
    )


def test_a_lease_without_release_at_end_outlives_its_task(agent: Running) -> None:
    lease = agent.lease()
    status = agent.wait(agent.run(["true"], lease=lease))
    assert not status.lease_released
    assert [x.id for x in agent.stub.ListLeases(pb.ListLeasesRequest()).leases] == [lease.id]


def test_wait_brings_a_short_output_whole_and_leaves_a_long_one_to_logs(agent: Running) -> None:
    script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done"
    short = agent.run(["/bin/sh", "-c", script])
    agent.wait(short)
    status = agent.stub.Wait(pb.WaitRequest(task_id=short, output_limit=1000))
    assert status.output_included
    assert status.output == b"".join(c.data for c in agent.logs(short))
    assert sorted(status.output.split()) == [b"err1", b"err2", b"err3", b"out1", b"out2", b"out3"]
    long = agent.run(["/bin/sh", "-c", "head -c 5000 /dev/zero"])
    agent.wait(long)
    status = agent.stub.Wait(pb.WaitRequest(task_id=long, output_limit=4999))
    assert not status.output_included
    assert status.output == b""
    status = agent.stub.Wait(pb.WaitRequest(task_id=long, output_limit=5000))
    assert status.output_included
    assert status.output == bytes(5000)
    running = agent.run(["sleep", "5"])
    status = agent.stub.Wait(pb.WaitRequest(task_id=running, timeout_seconds=0.1, output_limit=99))
    assert status.state == pb.TASK_STATE_RUNNING
    assert not status.output_included


def test_a_task_ending_while_another_starts_in_its_lease_leaves_the_lease_held(
    agent: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task of a lease that ends while another is being started in it (that Run past the
    lease's check, its task not yet recorded) does not release the lease: the other task
    would run on cores and memory given back. The last to end releases it."""
    lease = agent.lease()
    go = tmp_path / "go"
    first = agent.run(
        ["/bin/sh", "-c", f"while [ ! -e {go} ]; do sleep 0.01; done"],
        lease=lease,
        release_lease_at_end=True,
    )
    tasks = agent.agent.tasks
    real = tasks.run

    def run_once_the_first_has_ended(*args: Any, **kw: Any) -> Any:
        go.touch()
        assert tasks.get(first).done.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(tasks, "run", run_once_the_first_has_ended)
    second = agent.run(["sleep", "0.2"], lease=lease, release_lease_at_end=True)
    assert not agent.wait(first).lease_released
    assert [x.id for x in agent.stub.ListLeases(pb.ListLeasesRequest()).leases] == [lease.id]
    assert agent.wait(second).lease_released
    assert not agent.stub.ListLeases(pb.ListLeasesRequest()).leases


def test_two_tasks_of_a_lease_ending_at_once_release_it(
    agent: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both tasks' ends are looked at once both have ended, and neither is done (told to
    its Wait) before both have looked: one of them releases the lease, not neither."""
    both = threading.Barrier(2)
    real = agent.agent._release_if_last

    def when_both_have_ended(task: Any) -> None:
        both.wait(30)
        real(task)
        both.wait(30)

    monkeypatch.setattr(agent.agent, "_release_if_last", when_both_have_ended)
    lease = agent.lease()
    tasks = [agent.run(["true"], lease=lease, release_lease_at_end=True) for _ in range(2)]
    statuses = [agent.wait(task) for task in tasks]
    assert sorted(s.lease_released for s in statuses) == [False, True]
    assert not agent.stub.ListLeases(pb.ListLeasesRequest()).leases


def test_wait_brings_no_more_than_a_mebibyte_whatever_its_output_limit(agent: Running) -> None:
    task = agent.run(["/bin/sh", "-c", f"head -c {2**20 + 1} /dev/zero"])
    agent.wait(task)
    status = agent.stub.Wait(pb.WaitRequest(task_id=task, output_limit=2**32 - 1))
    assert status.state == pb.TASK_STATE_EXITED
    assert not status.output_included
    assert status.output == b""
    short = agent.run(["/bin/sh", "-c", f"head -c {2**20} /dev/zero"])
    agent.wait(short)
    status = agent.stub.Wait(pb.WaitRequest(task_id=short, output_limit=2**32 - 1))
    assert status.output_included
    assert status.output == bytes(2**20)


def test_a_lease_released_while_its_task_starts_ends_that_task(
    agent: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ReleaseLease landing between a Run's lease check and its task's record (made to land
    there): the task is not left running on cores given back; it ends, cancelled."""
    lease = agent.lease()
    real_run = agent.agent.tasks.run

    def run_after_a_release(*args: Any, **kwargs: Any) -> Any:
        agent.agent.release(lease.id)  # what another caller's ReleaseLease does meanwhile
        return real_run(*args, **kwargs)

    monkeypatch.setattr(agent.agent.tasks, "run", run_after_a_release)
    task = agent.run(["sleep", "60"], lease=lease)
    status = agent.wait(task, timeout=15)
    assert status.state == pb.TASK_STATE_CANCELLED
    assert "released while it started" in status.message
