"""What a task's start and end cost the agent, held as properties of a real agent and crun:
where the runtime's mounts live, what crun runs from, what a start writes, threads per task."""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from api.substrate.v1 import agent_pb2 as pb
from substrate.agent import USERNS_BASE
from substrate.runtimes import crun as crun_module
from substrate.runtimes.crun import sealed_copy
from tests.substrate.conftest import Running

IMAGE = "docker://busybox:1.36"


def run(agent: Running, script: str) -> str:
    return agent.run(["/bin/sh", "-c", script], runtime="crun", image=IMAGE)


def until(check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)
    assert check(), "timed out"  # type: ignore[operator]


def mounts_under(folder: Path) -> list[str]:
    """Mount points under `folder` in any process's mount namespace on this machine."""
    found = set()
    for info in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            lines = info.read_text().splitlines()
        except OSError:
            continue  # the process has gone
        found.update(line.split()[4] for line in lines if line.split()[4].startswith(f"{folder}/"))
    return sorted(found)


def test_a_tasks_root_is_mounted_where_only_crun_sees_it_and_goes_with_the_agent(
    agent: Running,
) -> None:
    """Every task's root was mounted in the host's own mount table (where a crashed agent
    left it), and each crun start ran `unshare`, `sh` and `mount` first to hide cgroup2."""
    crun = agent.agent.runtimes["crun"]
    task = run(agent, "sleep 30")
    root = crun.roots / task  # type: ignore[attr-defined]
    try:
        cgroup = agent.agent.tasks.get(task).cgroup
        assert cgroup is not None
        until(lambda: len(cgroup.pids()) >= 2)  # crun, and the container's sleep
        host = Path("/proc/self/mountinfo").read_text()
        assert f" {root} " not in host
        assert f" {crun.state_dir} " not in host  # type: ignore[attr-defined]
        assert crun.namespace().call(os.path.ismount, root)  # type: ignore[attr-defined]
    finally:
        agent.stub.Cancel(pb.CancelRequest(task_id=task, grace_seconds=1))
    agent.wait(task)
    agent.agent.stop()
    # nothing of the runtime's is mounted anywhere once the agent has stopped
    assert not mounts_under(crun.roots)  # type: ignore[attr-defined]
    assert not mounts_under(crun.state_dir)  # type: ignore[attr-defined]


def test_crun_runs_from_a_sealed_copy_of_itself(agent: Running) -> None:
    """crun copied (or re-mounted) its binary at every start and ran itself a second time,
    to keep a container from overwriting the host's crun (CVE-2019-5736); it now runs from
    one copy the agent sealed, which nothing can write."""
    task = run(agent, "sleep 30")
    try:
        started = agent.agent.tasks.get(task)
        assert started.cgroup is not None
        cgroup = started.cgroup
        until(lambda: len(cgroup.pids()) >= 2)  # crun, and the container's sleep
        fd = os.open(f"/proc/{started.pid}/exe", os.O_RDONLY)  # the task's process: crun
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # EINVAL for a file that has none
        finally:
            os.close(fd)
        assert seals & fcntl.F_SEAL_WRITE
        assert seals & fcntl.F_SEAL_SEAL
    finally:
        agent.stub.Cancel(pb.CancelRequest(task_id=task, grace_seconds=1))


def test_a_start_writes_nothing_to_the_tasks_layer(agent: Running) -> None:
    """The image lacked /dev, /proc and /sys, so every start made them in the task's
    copy-on-write layer (three new files on the node's disk per task); they are made once,
    in the cached image."""
    task = run(agent, "sleep 30")
    try:
        upper = agent.data_dir / "tasks" / task / "upper"
        cgroup = agent.agent.tasks.get(task).cgroup
        assert cgroup is not None
        until(lambda: len(cgroup.pids()) >= 2)
        time.sleep(0.2)
        assert sorted(p.name for p in upper.iterdir()) == []
        rootfs = agent.agent.tasks.get(task).image.rootfs  # type: ignore[union-attr]
        for name in ("dev", "proc", "sys"):
            st = (rootfs / name).lstat()
            assert (st.st_uid, st.st_gid) == (USERNS_BASE, USERNS_BASE)
    finally:
        agent.stub.Cancel(pb.CancelRequest(task_id=task, grace_seconds=1))


def test_a_running_task_takes_one_thread_of_the_agent(agent: Running) -> None:
    """Each task took three threads (one per output pipe, one waiting for its end)."""

    def threads() -> int:  # but those serving calls, which the server starts as it likes
        return sum(not t.name.startswith("agent-rpc") for t in threading.enumerate())

    agent.wait(agent.run(["true"]))  # the lease taken
    before = threads()
    tasks = [agent.run(["sleep", "30"]) for _ in range(4)]
    try:
        time.sleep(0.2)
        assert threads() - before == len(tasks)
    finally:
        for task in tasks:
            agent.stub.Cancel(pb.CancelRequest(task_id=task, grace_seconds=1))


def test_output_and_timeout_still_reach_the_log_and_the_status(agent: Running) -> None:
    """With one thread per task: both pipes reach the log whole, and a task killed at its
    timeout still ends with its output kept."""
    lines = 2000
    script = f"i=0; while [ $i -lt {lines} ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    task = agent.run(["/bin/sh", "-c", script])
    assert agent.wait(task).exit_code == 0
    chunks = agent.logs(task)
    out = b"".join(c.data for c in chunks if c.stream == pb.STREAM_STDOUT).decode().split()
    err = b"".join(c.data for c in chunks if c.stream == pb.STREAM_STDERR).decode().split()
    assert out == [f"out{i}" for i in range(lines)]
    assert err == [f"err{i}" for i in range(lines)]
    slow = agent.run(["/bin/sh", "-c", "echo started; sleep 30"], timeout_seconds=0.5)
    status = agent.wait(slow)
    assert status.state == pb.TASK_STATE_TIMED_OUT
    assert b"started" in b"".join(c.data for c in agent.logs(slow))


def test_a_volume_the_host_mounted_since_the_first_task_is_what_a_later_task_sees(
    agent: Running, tmp_path: Path
) -> None:
    """crun's mount namespace holds a copy of the host's mounts as they were when it was
    made: a file system mounted since on a volume's folder was hidden from the task."""
    agent.wait(run(agent, "true"))  # crun's namespace is made
    volume = tmp_path / "volume"
    volume.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "squall-test", str(volume)], check=True)
    try:
        (volume / "marker").write_text("on the mounted file system")
        task = agent.run(
            ["/bin/cat", "/data/marker"],
            runtime="crun",
            image=IMAGE,
            mounts=[pb.Mount(source=str(volume), destination="/data")],
        )
        status = agent.wait(task)
        assert b"".join(c.data for c in agent.logs(task)) == b"on the mounted file system"
        assert status.exit_code == 0
    finally:
        subprocess.run(["umount", "--lazy", str(volume)], check=True)


def test_where_the_host_forbids_running_an_in_memory_copy_crun_runs_from_its_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """vm.memfd_noexec=2 refuses an executable in-memory file, =1 makes it unrunnable: crun
    then runs from where it is installed (and copies itself, as it does by default)."""
    program = tmp_path / "program"
    program.write_bytes(b"#!/bin/sh\n")
    program.chmod(0o755)
    copy = sealed_copy(str(program))
    assert copy.startswith(f"/proc/{os.getpid()}/fd/")
    os.close(int(copy.rsplit("/", 1)[1]))

    def refused(*_: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(crun_module.os, "memfd_create", refused)
    assert sealed_copy(str(program)) == str(program)


def test_a_task_that_fails_while_it_is_prepared_leaves_nothing_behind(
    agent: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its network namespace and its root were made before its cgroup; when the cgroup could
    not be made (two first tasks once raced to make the agent's own cgroup folder), both were
    left behind, mounted, for good."""
    import errno

    import grpc

    crun = agent.agent.runtimes["crun"]
    netns = Path("/run/netns")
    before = set(os.listdir(netns)) if netns.is_dir() else set()

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EEXIST, "File exists")

    monkeypatch.setattr(agent.agent.tasks.cgroups, "create", refuse)
    with pytest.raises(grpc.RpcError):
        run(agent, "true")
    after = set(os.listdir(netns)) if netns.is_dir() else set()
    assert after <= before  # no namespace of its own is left
    roots = crun.roots  # type: ignore[attr-defined]

    def mounted() -> list[str]:
        return [d for d in os.listdir(roots) if os.path.ismount(roots / d)]

    assert crun.namespace().call(mounted) == []  # type: ignore[attr-defined]
