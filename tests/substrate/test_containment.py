"""A job cannot touch the node it runs on: tried as an attacker would, against a real agent and
crun containers of the busybox image built here. Each test names the escape it closes."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from api.substrate.v1 import agent_pb2 as pb
from substrate.agent import USERNS_BASE
from substrate.paths import BENEATH, IN_ROOT, PathEscape, open_regular, write_file
from tests.substrate.conftest import Running, code_of

IMAGE = "docker://busybox:1.36"


def run(agent: Running, script: str, **kw: object) -> str:
    return agent.run(["/bin/sh", "-c", script], runtime="crun", image=IMAGE, **kw)


def output(agent: Running, task: str) -> str:
    return b"".join(c.data for c in agent.logs(task)).decode()


def finished(agent: Running, script: str, **kw: object) -> tuple[int, str]:
    task = run(agent, script, **kw)
    status = agent.wait(task)
    assert status.state == pb.TASK_STATE_EXITED, status.message
    return status.exit_code, output(agent, task)


def container_pid(agent: Running, task_id: str) -> int:
    task = agent.agent.tasks.get(task_id)
    return agent.agent.runtimes["crun"].namespace_pid(task.pid, task.dir)


# ---- paths -----------------------------------------------------------------------------------


def test_an_injected_file_cannot_be_written_outside_the_container(
    agent: Running, tmp_path: Path
) -> None:
    """`files: {/../../../../tmp/x: ...}` was written as root on the host."""
    target = tmp_path / "escaped"
    path = f"/../../../..{target}"
    code = code_of(
        lambda: agent.stub.Run(
            pb.RunRequest(
                lease_id=agent.lease().id,
                name="t",
                runtime="crun",
                image=IMAGE,
                command=["/bin/true"],
                files=[pb.File(path=path, content=b"owned")],
            )
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # through the image's own link to / (etc/escape): followed inside the container's root
    path = f"/etc/escape{target}"
    assert finished(agent, f"cat {path}", files=[pb.File(path=path, content=b"in")]) == (0, "in")
    assert not target.exists()


def test_paths_resolve_inside_their_tree(tmp_path: Path) -> None:
    """The primitives under every path from a workflow or a container."""
    root = tmp_path / "root"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")  # an image's relative link: still works
    (root / "up").symlink_to("/")  # an image's absolute link: its own /
    host = tmp_path / "host-secret"
    host.write_text("host")
    (root / "link").symlink_to(host)
    os.mkfifo(root / "fifo")
    write_file(root, "/lib/x", b"1", 0o644, IN_ROOT)
    assert (root / "usr" / "lib" / "x").read_bytes() == b"1"
    write_file(root, f"/up{tmp_path}/planted", b"2", 0o644, IN_ROOT)
    assert not (tmp_path / "planted").exists()
    assert (root / tmp_path.relative_to("/") / "planted").read_bytes() == b"2"
    with pytest.raises(PathEscape, match=r"'\.\.'"):
        write_file(root, "/a/../../x", b"", 0o644, IN_ROOT)
    # from the host's side of a volume, no link is followed at all
    for name, why in (("link", "is a link"), ("fifo", "not a regular file"), ("lib/x", "link")):
        with pytest.raises(PathEscape, match=why):
            open_regular(root, name, BENEATH)
    write_file(root, "link", b"replaced", 0o644, BENEATH)  # replaces the link itself
    assert host.read_text() == "host"
    assert not (root / "link").is_symlink()


# ---- privileges ------------------------------------------------------------------------------


def test_a_job_is_not_host_root_and_holds_no_dangerous_privilege(agent: Running) -> None:
    """Jobs ran as real root with CAP_MKNOD and CAP_NET_RAW and no seccomp profile."""
    task = run(agent, "sleep 30")
    try:
        status = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{container_pid(agent, task)}/status").read_text().splitlines()
        )
        assert status["Uid"].split() == [str(USERNS_BASE)] * 4
        assert status["Gid"].split() == [str(USERNS_BASE)] * 4
        caps = int(status["CapEff"].strip(), 16)
        for number, name in ((13, "NET_RAW"), (27, "MKNOD"), (21, "SYS_ADMIN"), (12, "NET_ADMIN")):
            assert not caps & (1 << number), name
        assert status["Seccomp"].strip() == "2"  # a filter
        assert status["NoNewPrivs"].strip() == "1"
    finally:
        agent.stub.Cancel(pb.CancelRequest(task_id=task, grace_seconds=1))


def test_a_job_cannot_make_namespaces_or_mounts(agent: Running) -> None:
    """Podman's profile, alone, lets a job make a nested user namespace (full capabilities
    inside it: the way into much of the kernel); the profile is tightened as containerd's."""
    _, out = finished(
        agent,
        "unshare -U true && echo NESTED-USERNS; unshare -n true && echo NESTED-NETNS;"
        " mount -t tmpfs none /tmp && echo MOUNTED; (sleep 0 &) && echo FORK-OK",
    )
    assert out.count("Operation not permitted") >= 2, out
    assert "NESTED" not in out
    assert "MOUNTED" not in out
    assert "FORK-OK" in out  # a plain clone still works


def test_a_job_cannot_make_or_open_host_devices(agent: Running) -> None:
    """A job could `mknod` the host's /dev/kvm or console and open it."""
    before = os.stat("/dev/null")
    _, out = finished(
        agent,
        "mknod /tmp/kvm c 10 232 && echo MADE; mknod /tmp/con c 5 1 && echo MADE;"
        " ls /dev; cat /proc/self/uid_map; echo ok > /dev/null && echo NULL-OK",
    )
    assert "MADE" not in out
    assert "kvm" not in out.split()
    assert "console" not in out.split()
    assert out.split()[-4:] == ["0", str(USERNS_BASE), "65536", "NULL-OK"]
    # the container's stdio are the agent's pipes: no host file was handed to its root
    after = os.stat("/dev/null")
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )


def test_the_device_cgroup_allows_only_the_default_devices(agent: Running) -> None:
    task = run(agent, "sleep 30")
    try:
        cgroup = agent.agent.tasks.get(task).cgroup
        assert cgroup is not None
        devices = next(d for d in cgroup.dirs if "devices" in d.parts)
        rules = set((devices / "devices.list").read_text().split("\n")) - {""}
        assert "a *:* rwm" not in rules
        assert {"c 1:3 rwm", "c 1:9 rwm", "c 136:* rwm"} <= rules
        assert not any(r.startswith("c 10:") for r in rules)  # misc: kvm, fuse, ...
    finally:
        agent.stub.Cancel(pb.CancelRequest(task_id=task, grace_seconds=1))


# ---- network ---------------------------------------------------------------------------------


class _Listener:
    """A TCP service on the node, as a control plane or an agent would listen."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nreached\n")
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[_Listener]:
    server = _Listener("0.0.0.0")
    yield server
    server.close()


def _node_addresses() -> list[str]:
    import subprocess

    out = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True).stdout)
    return [a["local"] for e in out for a in e.get("addr_info", [])]


def test_a_job_reaches_no_port_of_its_node(agent: Running, listener: _Listener) -> None:
    """Jobs shared the host's network: they reached the control server, every agent's
    plaintext port and everything else listening on the machine."""
    agent_port = int(agent.address.rsplit(":", 1)[1])
    targets = [f"{a}:{listener.port}" for a in _node_addresses()]
    targets.append(f"127.0.0.1:{agent_port}")
    # (busybox's static wget crashes on any URL; its nc works)
    script = "; ".join(f"echo | nc -w 2 {t.replace(':', ' ')} && echo REACHED {t}" for t in targets)
    _, out = finished(agent, script + "; ip route")
    assert "REACHED" not in out, out
    assert listener.accepted == 0
    assert "default via 10." in out  # it has a network: its own, on the node's bridge


def test_jobs_reach_each_other_on_the_pod_network(agent: Running) -> None:
    server = agent.stub.Run(
        pb.RunRequest(
            lease_id=agent.lease().id,
            name="web",
            runtime="crun",
            image=IMAGE,
            command=["/bin/sh", "-c", "echo served | nc -l -p 80"],  # a low port, as root
        )
    )
    try:
        assert server.address.startswith("10.")
        deadline = time.monotonic() + 20
        while True:
            code, out = finished(agent, f"nc -w 2 {server.address} 80 </dev/null")
            if code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (code, out) == (0, "served\n")
    finally:
        agent.stub.Cancel(pb.CancelRequest(task_id=server.task_id, grace_seconds=1))


def test_an_isolated_job_has_loopback_alone(agent: Running) -> None:
    _, out = finished(agent, "ip -o link | wc -l", network=pb.NETWORK_ISOLATED)
    assert out.strip() == "1"


# ---- secrets and leftovers -------------------------------------------------------------------


def test_a_secret_never_reaches_the_agents_disk(agent: Running) -> None:
    """An env secret stayed in clear in the task's OCI bundle after the run. (crun keeps a
    running container's config in its state under /run, in memory, and deletes it with the
    container.)"""
    secret = "s3cret-" + os.urandom(8).hex()
    task = run(agent, 'test -n "$TOKEN" && sleep 2', env={"TOKEN": secret})
    time.sleep(1)  # while it runs, and after
    for moment in ("running", "ended"):
        for path in agent.data_dir.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), (moment, path)
        if moment == "running":
            assert agent.wait(task).exit_code == 0
    crun = agent.agent.runtimes["crun"]
    state = crun.state_dir  # type: ignore[attr-defined]
    assert not any(state.rglob("config.json"))
    # where crun keeps it: a tmpfs of its mount namespace
    assert not crun.namespace().call(lambda: any(state.rglob("config.json")))  # type: ignore[attr-defined]


def test_an_agent_that_stops_kills_even_what_left_its_process_group(
    agent: Running, tmp_path: Path
) -> None:
    """A process that started its own session escaped the agent's kill; cancelling a task
    that had not started yet signalled the agent's own process group."""
    task = run(agent, "setsid sleep 300 & sleep 300")
    cgroup = agent.agent.tasks.get(task).cgroup
    assert cgroup is not None
    deadline = time.monotonic() + 10
    while len(cgroup.pids()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = cgroup.pids()
    agent.agent.tasks.shutdown(grace=0.5)
    assert all(not Path(f"/proc/{p}").exists() or _zombie(p) for p in pids)
    assert not any(d.exists() for d in cgroup.dirs)
    with pytest.raises(Exception, match="stopping"):
        agent.agent.run(agent.agent.tasks.get(task).spec, agent.agent.tasks.get(task).lease_id)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_signalling_a_task_that_has_no_process_yet_signals_nothing(agent: Running) -> None:
    """`cancel` of a task still starting (pid 0) called killpg(0): the agent's own group."""
    from substrate.tasks import Task

    spec = agent.agent.tasks.get(run(agent, "true")).spec
    starting = Task("starting", spec, "lease", (0,), Path())
    assert starting.pid == 0
    # were this killpg(0, SIGKILL), it would kill this test's own process group
    agent.agent.tasks._kill_group(starting, signal.SIGKILL)


def test_a_terminal_is_never_opened_through_a_link_the_job_planted(
    agent: Running, tmp_path: Path
) -> None:
    """The agent opened the task's /dev/ptmx by path, as root: a job that made it a link to
    a host file had the agent open that host file read-write (and learn what exists)."""
    from tests.substrate.test_agent_api import _exec

    host_file = tmp_path / "host-only"
    host_file.write_text("host\n")
    task = run(agent, f"rm /dev/ptmx; ln -s {host_file} /dev/ptmx; sleep 30")
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the link is in place
            out, _, _ = _exec(agent, task, ["/bin/sh", "-c", "readlink /dev/ptmx"])
            if out.strip() == str(host_file).encode():
                break
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as info:
            _exec(agent, task, ["/bin/sh"], tty=True)
        # resolved inside the task's root, where no such file exists (the host's was opened
        # before, and failed later, with "Invalid argument")
        assert "No such file or directory" in info.value.details()
    finally:
        agent.stub.Cancel(pb.CancelRequest(task_id=task, grace_seconds=1))


def test_a_job_that_nests_folders_without_end_still_ends_and_leaves_nothing(
    agent: Running,
) -> None:
    """1,500 nested folders made the clean-up's recursive delete raise: the task never ended,
    and its namespace, address and files stayed."""
    task = run(agent, "i=0; while [ $i -lt 1500 ]; do mkdir d && cd d || break; i=$((i+1)); done")
    status = agent.wait(task, timeout=120)
    assert status.state == pb.TASK_STATE_EXITED, status
    assert status.exit_code == 0
    assert not Path(f"/run/netns/sq{task}").exists()
    assert not (agent.data_dir / "tasks" / task / "upper").exists()


def test_the_root_is_private_nosuid_and_sys_is_read_only(agent: Running) -> None:
    """Any user of the host could read a running job's files under the roots' folder; /sys
    was the host's sysfs, read-write."""
    task = run(agent, "grep ' / / ' /proc/self/mountinfo; touch /sys/kernel/x; sleep 30")
    try:
        crun = agent.agent.runtimes["crun"]
        roots = crun.roots  # type: ignore[attr-defined]
        inside = crun.namespace().call  # type: ignore[attr-defined]  # where crun sees them
        deadline = time.monotonic() + 10
        while not inside(lambda: any(roots.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.05)
        for st in (inside(roots.stat), roots.stat()):  # in crun's namespace, and the host's
            assert (st.st_uid, st.st_mode & 0o777) == (USERNS_BASE, 0o700)
        time.sleep(0.5)
        out = output(agent, task)
        mount_options = out.splitlines()[0].split()[5].split(",")
        assert {"nosuid", "nodev"} <= set(mount_options)
        assert "Read-only file system" in out
    finally:
        agent.stub.Cancel(pb.CancelRequest(task_id=task, grace_seconds=1))
