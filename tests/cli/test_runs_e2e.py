"""Runs from the command line, end to end: `squall run` on the local site, and `squall
server` with contexts, `workflow start/status/list/log/cancel/exec --tty/port-forward`, all
as real processes with real agents, containers and a local registry. Then the faults: a
server killed mid-run and started again, and a run cancelled with Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.substrate.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SQUALL = str(Path(sys.executable).parent / "squall")


@dataclass
class Env:
    vars: dict[str, str]
    registry: str
    data: Path

    def run(
        self, *args: str, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SQUALL, *args],
            env=self.vars,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [SQUALL, *args],
            env=self.vars,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kw,
        )

    def registries(self) -> list[str]:
        return ["--search-registry", self.registry, "--insecure-registry", self.registry]


@pytest.fixture
def env(tmp_path: Path, registry: Registry) -> Env:
    data = tmp_path / "data"
    vars = {
        **os.environ,
        "SQUALL_DATA_DIR": str(data),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "SQUALL_SEARCH_REGISTRIES": registry.address,
        "SQUALL_INSECURE_REGISTRIES": registry.address,
    }
    vars.pop("SQUALL_CONTEXT", None)
    return Env(vars, registry.address, data)


def agents_of(run_id: str) -> list[int]:
    """Pids of agent processes of a run (they carry `run=<id>` in their argv)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"substrate" in argv and f"run={run_id}".encode() in argv:
            pids.append(int(proc.name))
    return pids


def run_cgroups(env: Env, run_id: str) -> list[Path]:
    """The task cgroup folders of a run's agents (named after each agent's data dir)."""
    groups = []
    for data in sorted((env.data / "site" / run_id).glob("*/data")):
        agent = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:12]
        for controller in ("pids", "memory", "cpuset", "devices"):
            parent = Path("/sys/fs/cgroup") / controller / "squall" / agent
            groups += [d for d in parent.iterdir() if d.is_dir()] if parent.is_dir() else []
    return groups


def cgroup_pids(groups: list[Path]) -> set[int]:
    pids: set[int] = set()
    for group in groups:
        try:
            pids |= {int(p) for p in (group / "cgroup.procs").read_text().split()}
        except OSError:
            continue
    return pids


def alive(pids: set[int]) -> list[int]:
    """Those of `pids` still running (a zombie has ended)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.append(pid)
    return running


def wait_for(what: str, check, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ---- squall run -----------------------------------------------------------------------------


def test_squall_run_runs_hello_and_reports_json(env: Env) -> None:
    done = env.run("run", str(EXAMPLES / "hello.yaml"), "--name", "me/hello-1", "-o", "json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["state"] == "FINISHED"
    assert summary["jobs"][0]["name"] == "hello"
    assert summary["jobs"][0]["state"] == "FINISHED"
    assert agents_of(summary["id"]) == []
    every = env.run("workflow", "log", "me/hello-1")
    assert every.stdout.startswith("== hello ==\nHello from ")
    log = env.run("workflow", "log", "me/hello-1", "hello")
    assert log.returncode == 0
    assert log.stdout.startswith("Hello from ")
    again = env.run("run", str(EXAMPLES / "hello.yaml"), "--name", "me/hello-1")
    assert again.returncode == 1
    assert "exists already" in again.stderr


def test_squall_run_text_shows_output_and_fails_with_the_run(env: Env, tmp_path: Path) -> None:
    ok = env.run("run", str(EXAMPLES / "hello.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "FINISHED" in ok.stdout
    assert "Hello from" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: v4\njobs:\n  boom:\n    image: {uri: docker://busybox:1.36}\n"
        "    command: [/bin/sh, -c, 'echo going down; exit 7']\n"
    )
    failed = env.run("run", str(bad), "--name", "me/bad")
    assert failed.returncode == 1
    assert "FAILED" in failed.stdout
    assert "exit 7" in failed.stdout + failed.stderr
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("version: v4\njobs:\n  x:\n    image: {uri: busybox}\n")
    refused = env.run("run", str(invalid))
    assert refused.returncode == 1
    assert "invalid.yaml:4" in refused.stderr
    listed = json.loads(env.run("workflow", "list", "me/*", "-o", "json").stdout)
    assert [r["name"] for r in listed] == ["me/bad"]  # the invalid one never became a run


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_cancels_a_squall_run_and_takes_its_cluster_down(
    env: Env, tmp_path: Path, sig: signal.Signals
) -> None:
    slow = tmp_path / "slow.yaml"
    slow.write_text(
        "version: v4\njobs:\n  wait:\n    image: {uri: docker://busybox:1.36}\n"
        "    command: [sleep, '300']\n"
    )
    proc = env.popen("run", str(slow), "--name", "me/slow", "-o", "json")

    def status() -> dict:  # type: ignore[type-arg]
        return json.loads(env.run("workflow", "status", "me/slow", "-o", "json").stdout or "{}")

    try:
        wait_for("the job to run", lambda: status().get("jobs", [{}])[0].get("state") == "RUNNING")
        run_id = status()["id"]
        assert agents_of(run_id)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert json.loads(out)["state"] == "CANCELLED"
    assert agents_of(run_id) == []


# ---- the server -------------------------------------------------------------------------------


@pytest.fixture
def server(env: Env) -> Iterator[subprocess.Popen[str]]:
    egress = env.data.parent / "out"  # where file:/// egress of its workflows may go
    proc = env.popen(
        "server", "--listen", "127.0.0.1:0", "--nodes", "2", "--egress-dir", str(egress)
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("serving on "), proc.stderr.read() if proc.stderr else ""
    address = line.split()[-1]
    created = env.run(
        "context",
        "create",
        "test",
        "--server",
        address,
        "--token-file",
        str(env.data / "server-token"),
    )
    assert created.returncode == 0, created.stderr
    yield proc
    if proc.poll() is None:
        proc.terminate()
    proc.communicate(timeout=60)


def _tty_exec(env: Env, *args: str, keys: bytes) -> tuple[int, bytes]:
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(SQUALL, [SQUALL, *args], env.vars)
    output = b""
    deadline = time.monotonic() + 30
    sent = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        if not sent and b"# " in output:  # the shell's prompt
            os.write(fd, keys)
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output


def test_a_job_reached_by_port_forward_and_exec_through_the_server(
    env: Env, server: subprocess.Popen[str]
) -> None:
    started = env.run(
        "workflow", "start", "me/nb-1", str(EXAMPLES / "interactive.yaml"), "-o", "json"
    )
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["name"] == "me/nb-1"
    wait_for(
        "the notebook to serve",
        lambda: "serving" in env.run("workflow", "log", "me/nb-1", "notebook").stdout,
    )
    forward = env.popen("workflow", "port-forward", "me/nb-1", "notebook", "0:8080")
    try:
        assert forward.stdout is not None
        local = forward.stdout.readline().strip()
        for _ in range(3):  # one stream per connection
            page = urllib.request.urlopen(f"http://{local}/index.html", timeout=10).read()
            assert page == b"hello through the agent\n"
    finally:
        forward.terminate()
        forward.communicate(timeout=10)
    plain = env.run(
        "workflow", "exec", "me/nb-1", "notebook", "--", "sh", "-c", "cat /srv/index.html; exit 4"
    )
    assert (plain.returncode, plain.stdout) == (4, "hello through the agent\n")
    code, screen = _tty_exec(
        env,
        "workflow",
        "exec",
        "me/nb-1",
        "notebook",
        "--tty",
        "--",
        "/bin/sh",
        keys=b"tty; echo sum=$((40+2)); touch /tmp/done; exit 3\r",
    )
    assert code == 3
    assert b"/dev/pts/" in screen
    assert b"sum=42" in screen
    watched = env.run("workflow", "status", "me/nb-1", "--watch", "-o", "json", timeout=60)
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["state"] == "FINISHED"
    assert env.run("workflow", "log", "me/nb-1", "notebook").stdout.endswith("done\n")


def test_status_list_cancel_and_errors_through_the_server(
    env: Env, server: subprocess.Popen[str], tmp_path: Path
) -> None:
    slow = tmp_path / "slow.yaml"
    slow.write_text(
        "version: v4\njobs:\n  wait:\n    image: {uri: docker://busybox:1.36}\n"
        "    command: [sleep, '300']\n"
        "  after:\n    image: {uri: docker://busybox:1.36}\n    command: [/bin/true]\n"
        "    depends-on: [{name: wait}]\n"
    )
    assert env.run("workflow", "start", "me/slow-1", str(slow)).returncode == 0
    assert env.run("workflow", "start", "other/x", str(EXAMPLES / "hello.yaml")).returncode == 0
    taken = env.run("workflow", "start", "me/slow-1", str(slow))
    assert taken.returncode == 1
    assert "exists already" in taken.stderr
    names = [
        r["name"] for r in json.loads(env.run("workflow", "list", "me/*", "-o", "json").stdout)
    ]
    assert names == ["me/slow-1"]

    def status():
        return json.loads(env.run("workflow", "status", "me/slow-1", "-o", "json").stdout)

    wait_for("the job to run", lambda: status()["jobs"][0]["state"] == "RUNNING")
    run_id = status()["id"]
    assert env.run("workflow", "cancel", "me/slow-1").returncode == 0
    final = wait_for("the cancel", lambda: (s := status())["state"] == "CANCELLED" and s)
    assert {j["name"]: j["state"] for j in final["jobs"]} == {
        "wait": "CANCELLED",
        "after": "CANCELLED",
    }
    wait_for("the agents to stop", lambda: agents_of(run_id) == [])
    missing = env.run("workflow", "status", "me/nope")
    assert missing.returncode == 1
    assert "no run named 'me/nope'" in missing.stderr
    not_running = env.run("workflow", "exec", "me/slow-1", "wait", "--", "true")
    assert not_running.returncode == 1
    assert "not running" in not_running.stderr
    # a wrong token is refused, and said so
    contexts = Path(env.vars["XDG_CONFIG_HOME"]) / "squall" / "contexts.yaml"
    contexts.write_text(contexts.read_text().replace("token: ", "token: wrong"))
    denied = env.run("workflow", "list")
    assert denied.returncode == 4
    assert "refused the token: unknown token" in denied.stderr


def test_a_server_killed_mid_run_leaves_nothing_and_its_successor_fails_the_run(
    env: Env, server: subprocess.Popen[str], tmp_path: Path
) -> None:
    slow = tmp_path / "slow.yaml"
    result = tmp_path / "out" / "result.txt"
    slow.write_text(
        "version: v4\n"
        "volumes:\n  out:\n    use: ephemeral\n    egress:\n"
        f"      - {{source: {{uri: file://result.txt}}, destination: {{uri: 'file://{result}'}}}}\n"
        "jobs:\n  wait:\n    image: {uri: docker://busybox:1.36}\n"
        "    command: [/bin/sh, -c, 'echo partial > /out/result.txt; sleep 300']\n"
        "    mounts: {/out: {volume: out}}\n"
    )
    assert env.run("workflow", "start", "me/orphan", str(slow)).returncode == 0

    def status():
        return json.loads(env.run("workflow", "status", "me/orphan", "-o", "json").stdout)

    wait_for("the job to run", lambda: status()["jobs"][0]["state"] == "RUNNING")
    run_id = status()["id"]
    agents = agents_of(run_id)
    assert len(agents) == 2
    # the run's own processes: everything in its agents' task cgroups (the container's
    # `sleep 300` among them), found through the agents' data directories
    groups = run_cgroups(env, run_id)
    procs = wait_for("the container to be in its cgroup", lambda: cgroup_pids(groups))
    server.kill()  # no chance to clean up
    server.communicate()
    # the agents notice their owner is gone and stop, with their containers, and remove
    # the cgroups of their tasks; the kernel ends the rest of a container's PID namespace a
    # moment after its init has gone
    wait_for("the agents to stop", lambda: agents_of(run_id) == [], timeout=30)
    try:
        wait_for("the run's processes to end", lambda: not alive(procs), timeout=10)
    except AssertionError:  # say which processes, where, so that a leak can be traced
        raise AssertionError(
            f"still running: {alive(procs)}; cgroups: {cgroup_pids(groups)}"
        ) from None
    assert not [g for g in groups if g.exists()], "the agents left their task cgroups"
    # the run is still recorded as running, by a dead owner, until an orchestrator starts
    env.vars["SQUALL_CONTEXT"] = "local"
    assert status()["state"] == "RUNNING"
    successor = env.popen("server", "--listen", "127.0.0.1:0")
    try:
        assert successor.stdout is not None
        assert successor.stdout.readline().startswith("serving on ")
        final = status()
        assert final["state"] == "FAILED"
        assert "its orchestrator" in final["reason"]
        assert "stopped while it was RUNNING" in final["reason"]
        assert final["jobs"][0]["state"] == "FAILED"
        assert "kept for the egress still owed" in final["reason"]
        # nothing the job wrote is lost: the egress can still be run, or let go
        pushed = env.run("workflow", "egress", "me/orphan")
        assert pushed.returncode == 0, pushed.stderr
        assert result.read_text() == "partial\n"
        # and nothing of the dead run's agents is left on disk (tokens, task state)
        assert not (env.data / "site" / run_id).exists()
    finally:
        successor.terminate()
        successor.communicate(timeout=60)


def test_the_server_speaks_tls_to_a_context_that_trusts_its_ca(env: Env, tmp_path: Path) -> None:
    from tests.substrate.registry import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path, "server")
    proc = env.popen(
        "server", "--listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().split()[-1]
        token = str(env.data / "server-token")
        trusting = env.run(
            "context",
            "create",
            "tls",
            "--server",
            address,
            "--token-file",
            token,
            "--ca-file",
            str(cert),
        )
        assert trusting.returncode == 0, trusting.stderr
        assert env.run("workflow", "list", "-o", "json").stdout.strip() == "[]"
        plain = env.run("context", "create", "plain", "--server", address, "--token-file", token)
        assert plain.returncode == 0
        refused = env.run("workflow", "list", "--context", "plain", timeout=90)
        assert refused.returncode == 3  # a plaintext client gets nowhere with a TLS server
        assert "cannot reach the server" in refused.stderr
        listed = json.loads(env.run("context", "list", "-o", "json").stdout)
        assert {c["name"]: c["tls"] for c in listed} == {
            "local": False,
            "tls": True,
            "plain": False,
        }
        assert "token" not in json.dumps(listed)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


# ---- many at once -----------------------------------------------------------------------------


def test_fifty_workflows_started_at_once_through_the_server_all_finish(env: Env) -> None:
    """Fifty clients start a workflow at the same moment: the server runs them all, each in
    a thread of its own over one store, and no run fails because another held the store."""
    import grpc

    from api.squall.v1 import control_pb2 as pb
    from api.squall.v1 import control_pb2_grpc as rpc

    count = 50
    text = (
        "version: v4\njobs:\n  hi:\n    image: {uri: docker://busybox:1.36}\n"
        "    command: [/bin/true]\n"
    )
    proc = env.popen("server", "--listen", "127.0.0.1:0")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving on "), proc.stderr.read() if proc.stderr else ""
        channel = grpc.insecure_channel(line.split()[-1])
        stub = rpc.ControlStub(channel)  # type: ignore[no-untyped-call]
        token = (env.data / "server-token").read_text().strip()
        metadata = (("authorization", f"Bearer {token}"),)
        names = [f"me/many-{i}" for i in range(count)]
        together = threading.Barrier(count)

        def start(name: str) -> str:
            """'' once started, or why not."""
            together.wait()
            request = pb.StartWorkflowRequest(name=name, fuzzfile=text)
            try:
                stub.StartWorkflow(request, metadata=metadata, timeout=60)
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            return ""

        with ThreadPoolExecutor(count) as pool:
            answers = dict(zip(names, pool.map(start, names), strict=True))
        assert {n: a for n, a in answers.items() if a} == {}

        def ended() -> dict[str, tuple[str, str]] | None:
            request = pb.ListWorkflowsRequest(pattern="me/many-*")
            runs = stub.ListWorkflows(request, metadata=metadata, timeout=60).workflows
            states = {r.name: (r.state, r.reason) for r in runs}
            done = all(state in ("FINISHED", "FAILED", "CANCELLED") for state, _ in states.values())
            return states if done and len(states) == count else None

        final = wait_for("every run to end", ended, timeout=240)
        assert {n: s for n, s in final.items() if s != ("FINISHED", "")} == {}
        channel.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
