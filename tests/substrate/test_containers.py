"""Images and containers for real: busybox built here, served by a local registry, pulled by
the agent with skopeo/umoci, run by each OCI runtime (crun, bwrap) in namespaces and cgroups."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from api.substrate.v1 import agent_pb2 as pb
from substrate.images import ImageCache, ImageError
from tests.substrate.conftest import Running, code_of
from tests.substrate.registry import Registry, build_busybox_image, free_port
from tests.substrate.sif_images import build_sif, push_sif
from tests.substrate.test_agent_api import _exec

IMAGE = "docker://busybox:1.36"


def output(agent: Running, task: str) -> bytes:
    return b"".join(c.data for c in agent.logs(task))


RUNTIMES = ["crun", "bwrap"]


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(agent: Running, script: str, runtime: str, **kw) -> str:
    kw.setdefault("image", IMAGE)
    return agent.run(["/bin/sh", "-c", script], runtime=runtime, **kw)


def test_pull_streams_progress_then_hits_the_cache(agent: Running, registry: Registry) -> None:
    first = list(agent.stub.PullImage(pb.PullImageRequest(reference=IMAGE)))
    assert any("Copying blob" in p.message for p in first)
    assert first[-1].done
    assert first[-1].digest.startswith("sha256:")
    assert first[-1].message == f"pulled docker://{registry.address}/busybox:1.36"
    again = list(agent.stub.PullImage(pb.PullImageRequest(reference=IMAGE)))
    assert [p.message for p in again] == [f"cached docker://{registry.address}/busybox:1.36"]
    assert again[-1].digest == first[-1].digest
    by_digest = f"docker://{registry.address}/busybox@{first[-1].digest}"
    pinned = list(agent.stub.PullImage(pb.PullImageRequest(reference=by_digest)))
    assert pinned[-1].digest == first[-1].digest


def test_a_missing_tag_fails_with_the_registrys_reason(agent: Running) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(agent.stub.PullImage(pb.PullImageRequest(reference="docker://busybox:nope")))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "manifest unknown" in info.value.details()


def test_bad_references(agent: Running) -> None:
    for ref in ("busybox", "docker://", "oci://x"):
        with pytest.raises(grpc.RpcError) as info:
            list(agent.stub.PullImage(pb.PullImageRequest(reference=ref)))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_concurrent_pulls_of_one_image_happen_once(tmp_path: Path, registry: Registry) -> None:
    cache = ImageCache(tmp_path, (registry.address,), (registry.address,))
    messages: list[str] = []
    results = []

    def pull() -> None:
        results.append(cache.get(IMAGE, progress=messages.append))

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.digest for r in results}) == 1
    assert sum(m.startswith("pulling ") for m in messages) == 1
    with pytest.raises(ImageError, match="manifest unknown"):
        cache.get("docker://busybox:nope")


def test_env_cwd_mounts_files_and_exit_code(agent: Running, tmp_path: Path, runtime: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    task = agent.run(
        ["/opt/run.sh"],
        image=IMAGE,
        runtime=runtime,
        cwd="/data",
        env={"JOB_VAR": "from-job"},
        mounts=[pb.Mount(source=str(data), destination="/data")],
        files=[
            pb.File(
                path="/opt/run.sh",
                mode=0o755,
                content=b"#!/bin/sh\ncat in.txt\necho $JOB_VAR $IMAGE_VAR $(pwd) > out.txt\n"
                b"exit 7\n",
            )
        ],
    )
    status = agent.wait(task)
    assert status.state == pb.TASK_STATE_EXITED
    assert status.exit_code == 7
    assert output(agent, task) == b"from the host\n"
    assert (data / "out.txt").read_text() == "from-job from-image /data\n"


def test_the_image_cache_is_not_changed_by_a_task(agent: Running, runtime: str) -> None:
    writer = run(agent, "echo scribble > /bin/busybox-note; rm /bin/ls", runtime)
    assert agent.wait(writer).exit_code == 0
    reader = run(agent, "ls /bin/busybox-note 2>/dev/null || echo clean", runtime)
    agent.wait(reader)
    assert output(agent, reader) == b"clean\n"


def test_only_leased_cores_are_visible(agent: Running, runtime: str) -> None:
    task = run(agent, "nproc", runtime, lease=agent.lease(cores=1))
    agent.wait(task)
    assert output(agent, task) == b"1\n"


def test_memory_limit_oom_kill_is_reported(agent: Running, runtime: str) -> None:
    lease = agent.lease(cores=1, memory_bytes=32 * 2**20)
    task = run(agent, "head -c 200m /dev/zero | tail", runtime, lease=lease)
    status = agent.wait(task)
    assert status.state == pb.TASK_STATE_OOM_KILLED
    assert "memory" in status.message


def test_exec_with_a_terminal_in_a_container(agent: Running, runtime: str) -> None:
    task = run(agent, "sleep 30", runtime)
    out, _, code = _exec(agent, task, ["/bin/sh", "-c", "tty; hostname; cat /etc/passwd"], tty=True)
    assert code == 0
    lines = out.decode().split()
    assert lines[0].startswith("/dev/pts/")
    assert lines[1] == "t"  # the task's name
    assert lines[2] == "root:x:0:0:root:/root:/bin/sh"  # the image's file, not the host's


def test_an_exec_whose_client_goes_away_leaves_nothing_running(
    agent: Running, runtime: str
) -> None:
    task = run(agent, "sleep 60", runtime)
    hold = threading.Event()

    def requests():
        command = ["/bin/sh", "-c", "echo started; sleep 47; echo never"]
        yield pb.ExecInput(start=pb.ExecStart(task_id=task, command=command))
        hold.wait(30)

    call = agent.stub.Exec(requests())
    assert next(call).stdout == b"started\n"
    call.cancel()  # the client goes while the command says nothing
    hold.set()
    deadline = time.monotonic() + 10
    while b"sleep 47" in _exec(agent, task, ["ps"])[0]:
        assert time.monotonic() < deadline, "the exec's command is still running in the task"
        time.sleep(0.2)


def test_port_forward_into_an_isolated_network(agent: Running, runtime: str) -> None:
    page = b"<h1>" + bytes(range(32, 127)) * 100 + b"</h1>\n"
    port = free_port()
    task = run(
        agent,
        f"httpd -f -p 127.0.0.1:{port} -h /www",
        runtime,
        network=pb.NETWORK_ISOLATED,
        files=[pb.File(path="/www/index.html", content=page)],
    )
    deadline = time.time() + 10

    def fetch() -> bytes:
        def requests():
            yield pb.PortForwardInput(start=pb.PortForwardStart(task_id=task, port=port))
            yield pb.PortForwardInput(data=b"GET /index.html HTTP/1.0\r\n\r\n")

        return b"".join(m.data for m in agent.stub.PortForward(requests()))

    while True:
        try:
            response = fetch()
            break
        except grpc.RpcError:
            assert time.time() < deadline, "httpd did not come up"
            time.sleep(0.1)
    assert response.split(b"\r\n\r\n", 1)[1] == page
    # the port is not reachable from the host's own network
    import socket

    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass


def test_an_expired_lease_stops_its_container(agent: Running, runtime: str) -> None:
    lease = agent.lease(ttl=1)
    task = run(agent, "sleep 60", runtime, lease=lease)
    status = agent.wait(task, timeout=15)
    assert status.state == pb.TASK_STATE_CANCELLED


def test_the_process_runtime_is_never_a_fallback(agent: Running) -> None:
    lease = agent.lease()
    request = pb.RunRequest(lease_id=lease.id, command=["true"])  # no runtime, no image
    with pytest.raises(grpc.RpcError) as info:
        agent.stub.Run(request)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs an image" in info.value.details()
    assert code_of(
        lambda: agent.stub.Run(pb.RunRequest(lease_id=lease.id, image=IMAGE, runtime="nope"))
    ) == (grpc.StatusCode.FAILED_PRECONDITION)


def test_private_registry_credentials(agent: Running, tmp_path: Path) -> None:
    """A registry that wants a password (HTTPS, htpasswd): refused without it, pulled with it,
    and the password appears in no progress message."""
    secret = "pw-" + os.urandom(6).hex()
    private = Registry(tmp_path, credentials=("squall", secret))
    try:
        private.push(build_busybox_image(tmp_path / "image"), "1.36", "team/busybox:1.36")
        ref = f"docker://{private.address}/team/busybox:1.36"
        agent.agent.images.insecure.add(private.address)  # its certificate was made here
        with pytest.raises(grpc.RpcError) as info:
            list(agent.stub.PullImage(pb.PullImageRequest(reference=ref)))
        assert "unauthorized" in info.value.details().lower()
        creds = pb.RegistryCredentials(username="squall", password=secret)
        progress = list(agent.stub.PullImage(pb.PullImageRequest(reference=ref, credentials=creds)))
        assert progress[-1].done
        assert not any(secret in p.message for p in progress)
    finally:
        private.stop()


def test_oras_sif_images_are_pulled_and_cached(
    agent: Running, registry: Registry, tmp_path: Path
) -> None:
    """(Running them under crun: tests/substrate/test_sif.py.)"""
    sif = build_sif(tmp_path)
    ref = push_sif(registry.address, sif, "sifs/hello:1.0")
    first = list(agent.stub.PullImage(pb.PullImageRequest(reference=ref)))
    assert first[-1].done
    assert [p.message for p in first if p.message.startswith("unpacking")]
    cached = agent.agent.images.get(ref)
    assert cached.cached
    assert cached.sif is not None
    assert cached.sif.read_bytes() == sif.read_bytes()
    assert (cached.rootfs / "bin" / "busybox").is_file()
    with pytest.raises(grpc.RpcError) as info:
        list(
            agent.stub.PullImage(
                pb.PullImageRequest(reference=f"oras://{registry.address}/sifs/hello:nope")
            )
        )
    assert "not found" in info.value.details().lower()
    with pytest.raises(grpc.RpcError) as info:
        list(agent.stub.PullImage(pb.PullImageRequest(reference="oras://hello:1.0")))
    assert "name their registry" in info.value.details()


FAKE_APPTAINER = """#!/bin/sh
# A stand-in for Apptainer, which cannot be installed on the test machines (it is in neither
# Debian 12 nor PyPI). It records its command line, then runs the command after the SIF path
# on the host, so the agent's handling of the task (logs, exit code) is exercised for real.
printf '%s\\n' "$@" > "$APPTAINER_ARGV_LOG"
while [ $# -gt 0 ]; do case "$1" in *.sif) shift; break;; *) shift;; esac; done
exec "$@"
"""


def test_sif_images_run_with_apptainer_when_it_is_installed(
    agent: Running, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mocked: Apptainer itself (see FAKE_APPTAINER). Everything else is real."""
    from dataclasses import replace

    from substrate.runtimes import ApptainerRuntime

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(FAKE_APPTAINER)
    (bin_dir / "apptainer").chmod(0o755)
    log = tmp_path / "argv.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("APPTAINER_ARGV_LOG", str(log))
    agent.agent.runtimes["apptainer"] = ApptainerRuntime()
    # the agent's --sif-runtime: SIF images go to Apptainer when no runtime is named
    agent.agent.config = replace(agent.agent.config, sif_runtime="apptainer")
    ref = push_sif(registry.address, build_sif(tmp_path / "sif"), "sifs/app:2.0")
    data = tmp_path / "data"
    data.mkdir()
    lease = agent.lease(cores=1)
    reply = agent.stub.Run(
        pb.RunRequest(  # no runtime named: a SIF image goes to the --sif-runtime
            lease_id=lease.id,
            name="sif-job",
            image=ref,
            command=["/bin/sh", "-c", "echo ran; exit 5"],
            cwd="/data",
            env={"K": "v"},
            mounts=[pb.Mount(source=str(data), destination="/data", read_only=True)],
            network=pb.NETWORK_ISOLATED,
        )
    )
    status = agent.wait(reply.task_id)
    assert status.exit_code == 5
    assert output(agent, reply.task_id) == b"ran\n"
    argv = log.read_text().splitlines()
    assert argv[:6] == ["exec", "--containall", "--cleanenv", "--pwd", "/data", "--net"]
    assert f"{data}:/data:ro" in argv
    assert "K=v" in argv
    assert argv[argv.index("--network") + 1] == "none"
    assert argv[-3:] == ["/bin/sh", "-c", "echo ran; exit 5"]


@pytest.mark.parametrize("runtime_name", ["crun", "bwrap", "process"])
def test_scripts_run_with_their_args(agent: Running, runtime_name: str) -> None:
    lease = agent.lease()
    image = "" if runtime_name == "process" else IMAGE
    reply = agent.stub.Run(
        pb.RunRequest(
            lease_id=lease.id,
            runtime=runtime_name,
            image=image,
            args=["a b", "c"],
            script='#!/bin/sh\necho "$# args: $1|$2"\nexit 3\n',
        )
    )
    status = agent.wait(reply.task_id)
    assert status.exit_code == 3
    assert output(agent, reply.task_id) == b"2 args: a b|c\n"
    both = pb.RunRequest(
        lease_id=lease.id, runtime=runtime_name, image=image, command=["true"], script="#!/bin/sh\n"
    )
    assert code_of(lambda: agent.stub.Run(both)) == grpc.StatusCode.FAILED_PRECONDITION
